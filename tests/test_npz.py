"""Bring-your-own embeddings: the DFR npz layout, export, the evaluate command, clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from calib.clip.npz import EmbeddingsFileError, export_npz, load_npz
from calib.methods import REGISTRY, get_method_class, run_method

EMBEDDING_ONLY = ["linear_probe", "dfr", "jtt", "afr", "groupdro"]


@pytest.fixture(scope="module")
def npz_path(toy_features, tmp_path_factory):
    return export_npz(toy_features, tmp_path_factory.mktemp("npz") / "toy.npz")


def test_export_roundtrip(npz_path, toy_features):
    with np.load(npz_path) as f:
        assert sorted(f.files) == sorted(f"{k}_{s}" for k in ("embeddings", "y", "g") for s in ("train", "val", "test"))
        assert f["embeddings_val"].dtype == np.float32 and f["y_val"].dtype == np.int64
    loaded = load_npz(npz_path)
    np.testing.assert_array_equal(loaded.splits["test"].z, toy_features.splits["test"].z)
    np.testing.assert_array_equal(loaded.splits["train"].g, toy_features.splits["train"].g)
    assert loaded.n_groups == 4 and loaded.n_classes == 2


def test_which_methods_run_on_embeddings():
    needs_more = {n for n, c in REGISTRY.items() if {"h", "text", "prompts", "images"} & set(c.uses)}
    assert set(REGISTRY) - needs_more == set(EMBEDDING_ONLY)


@pytest.mark.parametrize("method", EMBEDDING_ONLY)
def test_embedding_methods_run_on_npz(method, npz_path):
    run = run_method(method, load_npz(npz_path), seed=0, options={"epochs": 2} if method == "groupdro" else None)
    assert 0 <= run.metrics["test"]["wga"] <= 1


@pytest.mark.parametrize("method", ["cfr", "clip_erm", "zeroshot", "umfc"])
def test_methods_needing_clip_say_so(method, npz_path):
    with pytest.raises(ValueError, match="zero-shot head|pre-projection"):
        run_method(method, load_npz(npz_path))


def test_train_may_be_absent(tmp_path, npz_path):
    with np.load(npz_path) as f:
        arrays = {k: f[k] for k in f.files if not k.endswith("_train")}
    path = tmp_path / "no_train.npz"
    np.savez(path, **arrays)
    feats = load_npz(path)
    assert "train" not in feats.splits
    run_method("dfr", feats, options={"scaler": "val"})
    with pytest.raises(ValueError, match="training"):
        run_method("linear_probe", feats)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.pop("y_test"), "lacks"),
        (lambda a: [a.pop(k) for k in ("embeddings_val", "y_val", "g_val")], "split 'val' is missing"),
        (lambda a: a.__setitem__("y_val", a["y_val"].astype(np.float32)), "must hold integers"),
        (lambda a: a.__setitem__("g_val", a["g_val"][:-1]), "entries"),
        (lambda a: a.__setitem__("embeddings_test", a["embeddings_test"][:, :5]), "dims"),
        (lambda a: a.__setitem__("embeddings_val", a["embeddings_val"].astype(np.int64)), "float"),
    ],
)
def test_bad_npz(tmp_path, npz_path, mutate, message):
    with np.load(npz_path) as f:
        arrays = {k: f[k] for k in f.files}
    mutate(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(EmbeddingsFileError, match=message):
        load_npz(path)


def test_evaluate_command(npz_path, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "calib",
            "evaluate",
            "--embeddings",
            str(npz_path),
            "--method",
            "dfr",
            "--seed",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["label_needs"] == "val_groups" and set(out["metrics"]) == {"train", "val", "test"}
    direct = run_method("dfr", load_npz(npz_path), seed=1).metrics["test"]["wga"]
    assert out["metrics"]["test"]["wga"] == pytest.approx(direct)
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not an npz")
    r = subprocess.run(
        [sys.executable, "-m", "calib", "evaluate", "--embeddings", str(bad), "--method", "dfr"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "is not an npz archive" in r.stderr and "pickle" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "calib", "evaluate", "--embeddings", str(npz_path), "--method", "cfr"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "pre-projection" in r.stderr
    assert get_method_class("dfr").label_needs == "val_groups"
