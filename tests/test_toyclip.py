"""The toy CLIP: corpus bias, determinism, a real open_clip checkpoint."""

import json

import numpy as np
import pytest

from calib.clip.models import load_clip
from calib.clip.toyclip import TOY_PRESETS, ToyClipConfig, caption, make_corpus, train_toy_clip


def test_corpus_has_the_cooccurrence_bias():
    cfg = ToyClipConfig(n_pairs=2000)
    images, captions, bp = make_corpus(cfg)
    assert images.shape == (2000, 64, 64, 3)
    assert np.mean(bp[:, 0] == bp[:, 1]) == pytest.approx(0.85, abs=0.03)
    mentions_bird = np.mean([("landbird" in c) or ("waterbird" in c) for c in captions])
    assert mentions_bird == pytest.approx(1 - cfg.p_place_only, abs=0.03)
    # the caption names the right bird
    for (b, _), c in zip(bp[:50], captions[:50]):
        assert ("waterbird" in c, "landbird" in c) in ((b == 1, b == 0), (False, False))


def test_caption_is_english():
    c = caption(np.random.default_rng(0), 1, "ocean", ToyClipConfig())
    assert c.endswith(".") and c.split()[0] in ("a", "the", "this")


def test_training_is_deterministic_and_loads(tmp_path):
    cfg = ToyClipConfig(n_pairs=300, steps=4, warmup=2, batch_size=64)
    train_toy_clip(cfg, tmp_path / "a")
    train_toy_clip(cfg, tmp_path / "b")
    wa = (tmp_path / "a" / "open_clip_model.safetensors").read_bytes()
    assert wa == (tmp_path / "b" / "open_clip_model.safetensors").read_bytes()
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["config"]["steps"] == 4
    m = load_clip("calib-toy-vit", str(tmp_path / "a" / "open_clip_model.safetensors"), device="cpu")
    m2 = load_clip("calib-toy-vit", f"local-dir:{tmp_path / 'a'}", device="cpu")
    assert m.fingerprint == m2.fingerprint


def test_presets_are_distinct():
    assert TOY_PRESETS["toy"] != TOY_PRESETS["toy-quick"]
    assert TOY_PRESETS["toy"] == ToyClipConfig()  # the default is what run_all.sh trains
