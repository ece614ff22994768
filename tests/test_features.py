"""Feature extraction and the cache: reuse, keys, atomicity, bad images."""

import numpy as np
import pytest

from calib.clip import features as feat_mod
from calib.clip.features import cache_key, cache_path, get_split_features
from calib.clip.models import encode_pre_projection, load_clip
from calib.data import DatasetLayoutError, load_waterbirds


@pytest.fixture(scope="module")
def toy_model():
    return load_clip("calib-toy-vit", "toy-quick", device="cpu")


def test_feature_set_contents(toy_features, toy_quick):
    tr = toy_features.splits["train"]
    assert tr.h.shape == (len(toy_quick.splits["train"]), 96) and tr.z.shape[1] == 64
    assert tr.h.dtype == np.float32
    np.testing.assert_array_equal(tr.g, toy_quick.splits["train"].g)
    np.testing.assert_array_equal(tr.ids, toy_quick.splits["train"].ids)
    np.testing.assert_allclose(tr.h @ toy_features.W0 + toy_features.b0, tr.z, rtol=1e-4, atol=1e-5)
    assert toy_features.text.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(toy_features.text, axis=1), 1, rtol=1e-5)


def test_features_match_a_direct_forward(toy_model, toy_quick, toy_features):
    """The cached z of the first test image equals the model's embedding of that image file."""
    from PIL import Image

    table = toy_quick.splits["test"]
    with Image.open(table.paths[0]) as im:
        x = toy_model.preprocess(im.convert("RGB"))[None]
    _, z = encode_pre_projection(toy_model.model, x)
    np.testing.assert_allclose(toy_features.splits["test"].z[0], z[0].numpy(), rtol=1e-4, atol=1e-5)


def test_cache_is_reused(toy_model, toy_quick, toy_features, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(feat_mod, "extract_split", boom)
    again = get_split_features(toy_model, toy_quick, "val")
    np.testing.assert_array_equal(again.h, toy_features.splits["val"].h)


def test_cache_key_separates_models_and_versions(toy_model, toy_quick):
    base = cache_key(toy_model, toy_quick, "val")
    other = load_clip("calib-toy-vit", "random:1", device="cpu")
    assert cache_path(cache_key(other, toy_quick, "val")) != cache_path(base)
    changed = dict(base, dataset_version="something-else")
    assert cache_path(changed) != cache_path(base)
    changed = dict(base, preprocess="Resize(224)")
    assert cache_path(changed) != cache_path(base)
    assert base["precision"] == "fp32"  # on CPU autocast is off unless asked for
    bf16 = cache_key(toy_model, toy_quick, "val", amp=True)
    assert bf16["precision"] == "bf16-autocast" and cache_path(bf16) != cache_path(base)


def test_cache_file_from_another_key_is_refused(toy_model, toy_quick, tmp_path):
    key = cache_key(toy_model, toy_quick, "val")
    src = cache_path(key)
    wrong = dict(key, split="test")
    dst = cache_path(wrong, tmp_path)
    dst.parent.mkdir(parents=True)
    dst.write_bytes(src.read_bytes())
    with pytest.raises(RuntimeError, match="was made for"):
        feat_mod._load(dst, wrong)


def test_corrupted_image_is_named_and_nothing_cached(tmp_path, toy_model):
    from calib.data import ToyConfig, make_toy_waterbirds

    root = make_toy_waterbirds(tmp_path / "toy", ToyConfig(scale=0.002, seed=5))
    ds = load_waterbirds(root, name="corrupt-test")
    bad = ds.splits["val"].paths[1]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetLayoutError, match="cannot be decoded") as err:
        get_split_features(toy_model, ds, "val", cache_dir=tmp_path / "cache", num_workers=0)
    assert bad.name in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.npz"))  # nothing half-written
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))
