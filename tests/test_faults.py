"""No finished work is lost and nothing is silently wrong (issue 22): rows saved as each pass ends, partial lines,
older result schemas, and inputs checked where they enter."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from calib.clip.features import FeatureSet, SplitFeatures
from calib.clip.npz import EmbeddingsFileError, export_npz, load_npz
from calib.core.checks import InputCheckError, check_labels, check_norms
from calib.core.hashing import stable_hash
from calib.evaluation.results import append_rows, load_results, read_rows, row_identity
from calib.methods import run_method

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- result files


def _row(seed: int, **extra) -> dict:
    return {
        "experiment": "e",
        "method": "zeroshot",
        "dataset": "d",
        "model": "m",
        "pretrained": "p",
        "seed": seed,
        "options": {},
        "options_hash": "x",
        "metrics": {"test": {"wga": 0.5, "avg_acc": 0.9}},
        **extra,
    }


def test_a_row_after_a_partial_line_starts_a_new_line(tmp_path):
    path = tmp_path / "e.jsonl"
    append_rows([_row(0)], path)
    with open(path, "a") as f:
        f.write(json.dumps(_row(1))[:25])  # a writer killed mid-line
    append_rows([_row(2)], path)
    assert [r["seed"] for r in read_rows(path)] == [0, 2]
    assert path.read_text().count("\n") == 3


def test_older_and_broken_lines_are_migrated_or_skipped_with_one_warning(tmp_path, caplog):
    path = tmp_path / "old.jsonl"
    no_hash = _row(3)
    del no_hash["options_hash"], no_hash["experiment"]
    lines = [json.dumps(_row(0)), "null", "[1, 2]", json.dumps({"seed": 1}), json.dumps(no_hash), '{"meth']
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # the runner, the dedupe and the tables each read the file: one warning all the same
            rows = read_rows(path)
    assert [r["seed"] for r in rows] == [0, 3]
    assert rows[1]["options_hash"] == stable_hash({}, 10)  # recomputed from the options it stores
    assert rows[1]["experiment"] == "old"  # the file is named after its experiment
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    for part in ("line 2: a JSON NoneType", "line 3: a JSON list", "line 4: lacks method", "line 6: not valid JSON"):
        assert part in warnings[0]


def test_rows_with_an_option_the_method_lost_are_left_out_with_one_warning(tmp_path, caplog):
    path = tmp_path / "t.jsonl"
    gone = _row(1, method="dfr", options={"n_retrains": 20, "fit_on": "val"})
    append_rows([_row(0), gone], path)
    with caplog.at_level(logging.WARNING):
        df = load_results(path)
        load_results(path)
    assert df["seed"].tolist() == [0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "row 2: dfr has no option(s) ['fit_on']" in warnings[0]


def test_tables_read_rows_in_declared_order_whatever_order_the_passes_wrote_them(tmp_path):
    path = tmp_path / "e.jsonl"
    rows = [_row(0, variant="late pass", task=2), _row(1, variant="first", task=0), _row(2, variant="second", task=1)]
    rows += [_row(3, variant="other features", task=0, dataset="d2"), _row(4, variant="untracked")]  # no task
    append_rows(rows, path)
    df = load_results(path)
    assert df["variant"].tolist() == ["first", "second", "late pass", "untracked", "other features"]


# ---------------------------------------------------------------- inputs checked where they enter


def _features(seed: int = 0, n: int = 60) -> FeatureSet:
    rng = np.random.default_rng(seed)
    splits = {}
    for name in ("train", "val", "test"):
        g = np.tile(np.arange(4), n // 4)
        y = g // 2
        z = rng.normal(size=(len(g), 8)).astype(np.float32)
        z[:, 0] += 2.0 * (2 * y - 1)
        splits[name] = SplitFeatures(z=z, y=y.astype(np.int64), g=g.astype(np.int64))
    return FeatureSet(splits, None, 1.0, 4, ["a", "b"], ["a0", "a1", "b0", "b1"], meta={"source": "synthetic"})


def _drop(data: FeatureSet, split: str, mask: np.ndarray) -> FeatureSet:
    s = data.splits[split]
    data.splits[split] = SplitFeatures(z=s.z[mask], y=s.y[mask], g=s.g[mask])
    return data


def test_a_group_missing_from_validation_stops_unless_a_partial_evaluation_is_asked_for():
    data = _features()
    data = _drop(data, "val", data.splits["val"].g != 2)
    with pytest.raises(InputCheckError, match=r"synthetic: the val split lacks group\(s\) 2 \(b0\) of the train"):
        run_method("dfr", data, seed=0)
    run = run_method("dfr", data, seed=0, allow_partial=True)
    assert run.partial == {"val": {"classes": [], "groups": [2]}}
    assert np.isnan(run.metrics["val"]["group_acc"][2])


def test_one_huge_training_row_stops_before_a_fit():
    data = _features()
    data.splits["train"].z[7] = 1e30
    with pytest.raises(InputCheckError, match=r"1 train z row\(s\) have a norm over 1000x .* \(rows \[7\]"):
        run_method("dfr", data, seed=0)


def test_label_checks_by_hand():
    y, g = np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3])
    assert check_labels({"train": (y, g), "val": (y, g)}, "s") == {}
    with pytest.raises(InputCheckError, match="the val split is empty"):
        check_labels({"train": (y, g), "val": (y[:0], g[:0])}, "s")
    with pytest.raises(InputCheckError, match="holds only class 0 .a.; a classifier needs two"):
        check_labels({"train": (y[:2], g[:2]), "val": (y, g)}, "s", class_names=["a", "b"])
    with pytest.raises(InputCheckError, match=r"the test split has class\(es\) \[2\] that the train split never"):
        check_labels({"train": (y, g), "test": (np.array([0, 1, 2, 2]), g)}, "s")
    partial = check_labels({"train": (y, g), "test": (y[:2], g[:2])}, "s", allow_partial=True)
    assert partial == {"test": {"classes": [1], "groups": [2, 3]}}
    check_norms({"z": np.array([[1.0], [999.0], [1.0]])}, "s")  # 999x the median: kept
    with pytest.raises(InputCheckError, match=r"rows \[1\]"):
        check_norms({"z": np.array([[1.0], [1001.0], [1.0]])}, "s")


def test_npz_inputs_are_checked_where_they_enter(tmp_path):
    data = _features()
    path = export_npz(_drop(data, "test", data.splits["test"].g != 3), tmp_path / "e.npz")
    with pytest.raises(EmbeddingsFileError, match=r"e\.npz: the test split lacks group\(s\) \[3\] of the train"):
        load_npz(path)
    assert load_npz(path, allow_partial=True).n_groups == 4
    empty = export_npz(_drop(_features(), "val", np.zeros(60, bool)), tmp_path / "empty.npz")
    with pytest.raises(EmbeddingsFileError, match="the val split is empty"):
        load_npz(empty)
    text = tmp_path / "notes.npz"
    text.write_text("just some notes\n")
    with pytest.raises(EmbeddingsFileError, match="is not an npz archive") as err:
        load_npz(text)
    assert "pickle" not in str(err.value)


# ---------------------------------------------------------------- kill -9 and Ctrl-C inside run_experiment

CHILD = textwrap.dedent(
    """
    import sys
    from calib.core.logs import setup_logging
    from calib.experiments.runner import RunSpec, run_experiment
    from calib.studies.testbed import TestbedConfig, make_testbed

    bed = make_testbed(TestbedConfig(scale=0.08))
    spec = RunSpec("k", ["groupdro", "clip_erm", "cfr"], seeds=[0, 1],
                   options={"groupdro": {"epochs": 30}, "clip_erm": {"epochs": 60},
                            "cfr": {"epochs": 15, "reference_epochs": 15}})
    setup_logging()
    print("STARTED", file=sys.stderr, flush=True)
    try:
        run_experiment(spec, bed)
    except KeyboardInterrupt:
        sys.exit(130)
    """
)


def _valid_rows(path: Path) -> list[str]:
    """The file's whole, valid row lines (a line cut by kill -9 is not one)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            if isinstance(json.loads(line), dict):
                out.append(line)
        except json.JSONDecodeError:
            pass
    return out


def test_kill_and_ctrl_c_at_random_points_lose_no_row_and_write_none_twice(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "CALIB_RESULTS_DIR": str(tmp_path / "results"), "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = str(REPO)
    path = tmp_path / "results" / "k.jsonl"
    rng = random.Random(0)
    saved: list[str] = []
    partial_seen = False
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True)
        # a random point of the run, whatever this machine's speed: after the k-th finished run (k = 0: at the
        # start), plus up to two seconds; each pass logs a "test WGA" line per run just before its rows are saved
        # (the first attempt: at the third finished run, when the first pass's two rows are surely saved)
        k, lines, seen = (3 if attempt == 0 else rng.randrange(6)), [], -1
        for line in proc.stderr:
            lines.append(line)
            seen += "STARTED" in line or "test WGA" in line
            if seen >= k:
                break
        time.sleep(0.0 if attempt == 0 else rng.uniform(0.0, 2.0))  # a row takes ~0.5 s to make (git, versions)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if attempt % 2 == 0 else signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        err = "".join(lines) + (rest or "")
        now = _valid_rows(path)
        assert now[: len(saved)] == saved, f"attempt {attempt}: a saved row changed or vanished"
        idents = [row_identity(json.loads(line)) for line in now]
        assert len(set(idents)) == len(idents), f"attempt {attempt}: a row written twice"
        if proc.returncode == 130 and "STARTED" in err:  # Ctrl-C inside the run: one warning says what was saved
            assert "row(s) are saved in" in err and "a rerun computes only the rest" in err
        saved = now
        partial_seen |= 0 < len(now) < 6
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = _valid_rows(path)
    assert rows[: len(saved)] == saved
    assert len(rows) == 6 and len({row_identity(json.loads(line)) for line in rows}) == 6
    assert partial_seen  # some kills landed between passes: finished rows were there to lose


@pytest.mark.parametrize("scale", [0, -1, 1.5])
def test_a_toy_scale_outside_0_1_is_refused(scale):
    from calib.data import ToyConfig

    with pytest.raises(ValueError, match=rf"toy scale must be in \(0, 1\] .*got {scale}"):
        ToyConfig(scale=scale)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "calib", *args], capture_output=True, text=True, env=env, timeout=300)


def test_data_check_refuses_a_split_without_rows_or_without_a_group(tmp_path):
    from tests.fixtures import write_waterbirds_fixture

    cells = [(s, g) for s in (0, 1, 2) for g in range(4)]  # (split, group): every group in every split
    every = [(i, f"b/{i}.jpg", g // 2, s, g % 2) for i, (s, g) in enumerate(cells)]

    def check(name: str, rows: list) -> subprocess.CompletedProcess:
        root = write_waterbirds_fixture(tmp_path / name, rows)
        return _cli("data", "check", "--dataset", "waterbirds", "--root", str(root))

    ok = check("ok", every)
    assert ok.returncode == 0 and "layout OK" in ok.stdout
    r = check("nv", [r for r in every if r[3] != 1])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "the val split has no rows" in r.stderr
    r = check("ng", [r for r in every if not (r[3] == 1 and r[2] == 1 and r[4] == 0)])  # no waterbird on land in val
    assert r.returncode == 0 and "layout OK" in r.stdout  # the layout is right; the labels get one warning
    assert r.stderr.startswith("warning: ") and "the val split lacks group(s) 2 (waterbird/land)" in r.stderr


def test_evaluate_stops_on_a_missing_validation_group_unless_asked_for_a_partial_evaluation(tmp_path):
    data = _features()
    path = export_npz(_drop(data, "val", data.splits["val"].g != 1), tmp_path / "valmissgroup.npz")
    r = _cli("evaluate", "--embeddings", str(path), "--method", "dfr")
    assert r.returncode == 2 and "the val split lacks group(s) [1]" in r.stderr and "Traceback" not in r.stderr
    r = _cli("evaluate", "--embeddings", str(path), "--method", "dfr", "--allow-partial", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["partial_evaluation"] == {"val": {"classes": [], "groups": [1]}}
