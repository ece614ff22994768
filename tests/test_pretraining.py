"""The pretraining-source study: corpora differ as declared, toy CLIPs cache, effective robustness by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from calib.clip.toyclip import PLACE_WORDS, ToyClipConfig, make_corpus
from calib.studies.pretraining import (
    MIXTURES,
    SOURCES,
    effective_robustness,
    ensure_source_clip,
    fit_logit_line,
    predict_ood,
    robustness_table,
    run_source_study,
    source_names,
    study_frame,
    table_markdown,
)


def _logit(p):
    return np.log(p / (1 - p))


def test_sources_differ_as_declared():
    cfg = ToyClipConfig(n_pairs=1500)
    _, clean, bp = make_corpus(cfg)
    assert make_corpus(cfg)[1] == clean  # the default corpus is the toy CLIP's own
    _, noisy, bp_n = make_corpus(cfg, caption_noise=0.3, stream=1)

    def wrong_bird(captions, pairs):
        named = [(("landbird" in c), ("waterbird" in c)) for c in captions]
        return np.mean([n[1 - b] for n, (b, _) in zip(named, pairs)])

    assert wrong_bird(clean, bp) == 0.0
    # a noisy caption names the other bird with probability 0.3 * 0.5 * (share naming a bird, 0.85)
    assert wrong_bird(noisy, bp_n) == pytest.approx(0.3 * 0.5 * 0.85, abs=0.03)
    _, narrow, _ = make_corpus(cfg, styles=("forest", "ocean"), stream=3)
    words = {w for s in ("field", "lake") for w in PLACE_WORDS[s]}
    assert not any(w in c.split(" ")[-1] for c in narrow for w in words)
    assert any(w in c for c in clean for w in words)
    biased = make_corpus(ToyClipConfig(n_pairs=1500, cooccurrence=0.97), stream=2)[2]
    assert np.mean(biased[:, 0] == biased[:, 1]) == pytest.approx(0.97, abs=0.015)
    with pytest.raises(ValueError, match="no background"):
        make_corpus(ToyClipConfig(n_pairs=5), styles=("forest",))


def test_source_clips_are_cached_and_mixtures_recorded(tmp_path):
    weights = ensure_source_clip("noisy captions + strong habitat bias", "toy-quick", cache_dir=tmp_path)
    again = ensure_source_clip("noisy captions + strong habitat bias", "toy-quick", cache_dir=tmp_path)
    assert weights == again and weights.is_file()
    spec = json.loads((weights.parent / "source.json").read_text())
    assert [p["stream"] for p in spec["parts"]] == [1, 2] and spec["training"]["n_pairs"] == 600
    other = ensure_source_clip("noisy captions", "toy-quick", cache_dir=tmp_path)
    assert other.parent != weights.parent
    assert ensure_source_clip("reference", "toy-quick", cache_dir=tmp_path).parent.name.startswith("calib-toy-vit-")
    with pytest.raises(ValueError, match="unknown toy pretraining source"):
        source_names(["laion"])
    assert set(MIXTURES["noisy captions + strong habitat bias"]) <= set(SOURCES)


def test_logit_line_and_effective_robustness_by_hand():
    # three models exactly on logit(ood) = logit(id) - 1, one 0.1 above its prediction
    ids = np.array([0.6, 0.7, 0.8, 0.75])
    on_line = 1 / (1 + np.exp(-(_logit(ids) - 1.0)))
    ood = on_line.copy()
    ood[3] += 0.1
    slope, intercept = fit_logit_line(ids[:3], ood[:3])
    assert slope == pytest.approx(1.0) and intercept == pytest.approx(-1.0)
    np.testing.assert_allclose(predict_ood((slope, intercept), ids), on_line)
    er = effective_robustness(ids, ood, baseline=np.array([True, True, True, False]))
    assert er[3] == pytest.approx(0.1)  # its line: the other three, exactly
    assert np.allclose(er[:3], 0.0, atol=1e-9)  # each on the line of the other two
    er_all = effective_robustness(ids, ood)  # now model 3 bends the others' lines
    assert er_all[0] != pytest.approx(0.0)
    assert np.isnan(effective_robustness(ids[:2], ood[:2])).all()  # one other model: no line


def test_robustness_table_leaves_mixtures_off_the_line():
    ids = np.array([0.6, 0.7, 0.8, 0.75])
    ood = 1 / (1 + np.exp(-(_logit(ids) - 1.0)))
    ood[3] -= 0.05
    df = pd.DataFrame(
        {
            "family": "toy CLIP",
            "source": ["a", "b", "c", "a + b"],
            "kind": ["toy source"] * 3 + ["mixture"],
            "model": "calib-toy-vit",
            "pretrained": ["toy-source:a", "toy-source:b", "toy-source:c", "toy-source:a + b"],
            "test.avg_acc": ids,
            "test.wga": ood,
            "test.group_acc": [[i, o] for i, o in zip(ids, ood)],
        }
    )
    table = robustness_table(df)
    assert table.loc[3, "er_wga"] == pytest.approx(-0.05)
    np.testing.assert_allclose(table.loc[:2, "er_wga"], 0.0, atol=1e-9)
    assert "| a + b | mixture |" in table_markdown(table)


def test_study_rows_are_reused(toy_quick):
    rows = run_source_study("toy-quick", ["reference", "noisy captions"], preset="toy-quick", device="cpu")
    again = run_source_study("toy-quick", ["reference", "noisy captions"], preset="toy-quick", device="cpu")
    assert [r["provenance"]["time"] for r in rows] == [r["provenance"]["time"] for r in again]
    frame = study_frame(again)
    assert list(frame["source"]) == ["reference", "noisy captions"]
    assert set(frame["kind"]) == {"toy source"} and frame["test.avg_acc"].between(0, 1).all()


def test_notebook_default_sources_and_missing(tmp_path, monkeypatch):
    import nbformat

    from calib.studies.pretraining import DEFAULT_SOURCES, missing_sources
    from tests.test_notebooks import REPO

    nb = nbformat.read(REPO / "notebooks" / "08_pretraining_sources.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    line = next(x for x in params.source.splitlines() if x.startswith("sources:"))
    assert line.split(" = ", 1)[1].split("  #")[0] == json.dumps(list(DEFAULT_SOURCES))
    monkeypatch.setenv("CALIB_CACHE_DIR", str(tmp_path))
    assert missing_sources(("noisy captions",), "toy-quick") == ["noisy captions"]
    ensure_source_clip("noisy captions", "toy-quick")
    assert missing_sources(("noisy captions",), "toy-quick") == []
