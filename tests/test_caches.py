"""What calib makes itself is checked, and rebuilt when damaged; concurrent runs share one build; killed runs'
temporaries are cleaned up; files get the user's umask."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from calib.clip import features as feat_mod
from calib.clip.features import get_text_prototypes
from calib.clip.models import load_clip
from calib.clip.toyclip import TOY_PRESETS, ToyClipConfig, ensure_toy_clip
from calib.core.files import LEGACY_TEMP_AGE_S, atomic_dir, atomic_write_bytes
from calib.data import ToyConfig, load_waterbirds, make_toy_waterbirds

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = ToyClipConfig(n_pairs=300, steps=4, warmup=2, batch_size=64)  # a second to train
TINY_TOY = ToyConfig(scale=0.002, seed=5)  # 2 images per group and split


@pytest.fixture(scope="module")
def toy_model():
    return load_clip("calib-toy-vit", "toy-quick", device="cpu")


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def warnings_naming(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- A: text prototypes -------------------------------------------------------------------------------------------


def _damage_protos(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        bad = {"nan": np.full((2, 64), np.nan, np.float32), "shape": np.ones((3, 5), np.float32)}[how]
        with open(path, "wb") as f:  # a well-formed .npy holding the wrong array
            np.save(f, bad)


@pytest.mark.parametrize("how", ["truncated", "empty", "nan", "shape"])
def test_damaged_text_prototype_cache_is_named_and_rebuilt(toy_model, tmp_path, caplog, how):
    classes = ["landbird", "waterbird"]
    first = get_text_prototypes(toy_model, classes, cache_dir=tmp_path)
    (path,) = (tmp_path / "text").iterdir()
    _damage_protos(path, how)
    with caplog.at_level(logging.WARNING, logger="calib"):
        again = get_text_prototypes(toy_model, classes, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, first)  # rebuilt, bit for bit
    assert len(warnings_naming(caplog, path)) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calib"):
        np.testing.assert_array_equal(get_text_prototypes(toy_model, classes, cache_dir=tmp_path), first)
    assert not caplog.records  # the rebuilt file is sound: no warning on the next run
    assert not list((tmp_path / "text").glob(".*.tmp-*"))


def test_text_prototypes_cached_as_npy_by_older_calib_are_still_used(toy_model, tmp_path, monkeypatch):
    """The numbers of existing caches stay the same: a sound ``.npy`` of the same key is read, not recomputed."""
    classes = ["landbird", "waterbird"]
    fresh = get_text_prototypes(toy_model, classes, cache_dir=tmp_path)
    (path,) = (tmp_path / "text").iterdir()
    legacy = path.with_suffix(".npy")
    stored = (fresh * np.float32(1 + 1e-6)).astype(np.float32)  # differs from a recomputation in the last bits
    with open(legacy, "wb") as f:
        np.save(f, stored)
    path.unlink()

    def boom(*a, **k):
        raise AssertionError("should have come from the .npy cache")

    monkeypatch.setattr(feat_mod, "text_prototypes", boom)
    np.testing.assert_array_equal(get_text_prototypes(toy_model, classes, cache_dir=tmp_path), stored)


def test_text_prototype_cache_fails_its_checksum(toy_model, tmp_path, caplog):
    classes = ["landbird", "waterbird"]
    first = get_text_prototypes(toy_model, classes, cache_dir=tmp_path)
    (path,) = (tmp_path / "text").iterdir()
    with np.load(path) as f:
        arrays = dict(f)
    arrays["protos"] = arrays["protos"].copy()
    arrays["protos"][0, 0] = np.nextafter(arrays["protos"][0, 0], 2)  # a one-bit edit: still unit rows
    np.savez(path, **arrays)
    with caplog.at_level(logging.WARNING, logger="calib"):
        np.testing.assert_array_equal(get_text_prototypes(toy_model, classes, cache_dir=tmp_path), first)
    assert any("checksum" in m for m in warnings_naming(caplog, path))


# --- A: the toy CLIP's checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "older-folder"])
def test_truncated_toy_clip_checkpoint_is_retrained(tmp_path, caplog, manifest):
    weights = ensure_toy_clip(TINY_CLIP, tmp_path)
    good = weights.read_bytes()
    if not manifest:  # a checkpoint folder made before manifests existed: checked by reading it
        (weights.parent / "manifest.json").unlink()
    weights.write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="calib"):
        again = ensure_toy_clip(TINY_CLIP, tmp_path)
    assert again == weights and weights.read_bytes() == good  # retrained, bit for bit
    assert len(warnings_naming(caplog, weights.parent)) == 1
    load_clip("calib-toy-vit", str(weights), device="cpu")  # and it loads
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="calib"):
        ensure_toy_clip(TINY_CLIP, tmp_path)
    assert not any("training" in r.getMessage() for r in caplog.records)  # sound now: reused


def test_toy_clip_checkpoint_without_weights_is_retrained(tmp_path):
    weights = ensure_toy_clip(TINY_CLIP, tmp_path)
    good = weights.read_bytes()
    weights.unlink()
    assert ensure_toy_clip(TINY_CLIP, tmp_path).read_bytes() == good


def test_damaged_pretraining_source_checkpoint_is_retrained(tmp_path, caplog):
    from calib.studies.pretraining import ensure_source_clip

    weights = ensure_source_clip("small", preset="toy-quick", cache_dir=tmp_path)
    good = weights.read_bytes()
    weights.write_bytes(good[:1000])
    with caplog.at_level(logging.WARNING, logger="calib"):
        assert ensure_source_clip("small", preset="toy-quick", cache_dir=tmp_path).read_bytes() == good
    assert len(warnings_naming(caplog, weights.parent)) == 1
    assert (weights.parent / "source.json").is_file()


# --- A: the toy benchmark ------------------------------------------------------------------------------------------


def _delete_image(root: Path) -> None:
    next((root / "002.Toy_Waterbird").iterdir()).unlink()


def _garble_image(root: Path) -> None:
    next((root / "001.Toy_Landbird").iterdir()).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def _truncate_image(root: Path) -> None:
    img = next((root / "001.Toy_Landbird").iterdir())
    img.write_bytes(img.read_bytes()[:100])


def _truncate_metadata(root: Path) -> None:
    meta = root / "metadata.csv"
    meta.write_text("\n".join(meta.read_text().splitlines()[:5]) + "\n")


def _edit_metadata(root: Path) -> None:
    meta = root / "metadata.csv"
    meta.write_text(meta.read_text().replace(",0,1,", ",1,1,", 1))


def _garble_marker(root: Path) -> None:
    (root / "toy_benchmark.json").write_text('{"seed": 5, "sca')


DAMAGES = [_delete_image, _garble_image, _truncate_image, _truncate_metadata, _edit_metadata, _garble_marker]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__[1:] for d in DAMAGES])
def test_damaged_toy_benchmark_is_made_again(tmp_path, caplog, damage):
    root = make_toy_waterbirds(tmp_path / "toy", TINY_TOY)
    good = files_of(root)
    damage(root)
    with caplog.at_level(logging.WARNING, logger="calib"):
        make_toy_waterbirds(tmp_path / "toy", TINY_TOY)
    assert files_of(root) == good  # made again, bit for bit
    assert len(warnings_naming(caplog, root)) == 1
    load_waterbirds(root)


def test_toy_benchmark_made_before_manifests_is_checked_and_reused(tmp_path, caplog):
    root = make_toy_waterbirds(tmp_path / "toy", TINY_TOY)
    (root / "toy_files.json").unlink()  # as an older calib wrote it
    before = files_of(root)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="calib"):
        make_toy_waterbirds(root, TINY_TOY)
    assert files_of(root) == before  # sound: reused as it is
    assert [r.getMessage() for r in caplog.records] == [f"toy benchmark already at {root}"]
    _delete_image(root)
    with caplog.at_level(logging.WARNING, logger="calib"):
        make_toy_waterbirds(root, TINY_TOY)
    assert len(warnings_naming(caplog, root)) == 1
    assert set(files_of(root)) == set(before) | {"toy_files.json"}


def test_a_folder_calib_did_not_make_is_never_written_over(tmp_path):
    from calib.data import DatasetLayoutError

    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetLayoutError, match="not a toy benchmark"):
        make_toy_waterbirds(root, TINY_TOY)
    assert (root / "notes.txt").read_text() == "keep me"


# --- B: concurrent runs and killed runs' temporaries ---------------------------------------------------------------


def test_two_concurrent_extractions_share_one_build(tmp_path):
    """Two ``calib extract`` runs on a fresh data and cache folder: both succeed; the toy data, the toy CLIP and
    each feature-cache entry are made once (the other process waits for the lock, then reuses them)."""
    env = {
        **os.environ,
        "CALIB_HOME": str(tmp_path / "home"),
        "CALIB_DATA_DIR": str(tmp_path / "data"),
        "CALIB_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [sys.executable, "-m", "calib", "extract", "--dataset", "toy-quick", "--model", "calib-toy-vit"]
    cmd += ["--pretrained", "toy-quick", "--split", "val", "--num-workers", "0"]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    both = "\n".join(outs)
    assert both.count("toy images to") == 1, both  # "wrote N toy images to ..."
    assert both.count("toy CLIP trained in") == 1, both
    assert len(re.findall(r"cached \d+ toy-quick/val features", both)) == 1, both  # the entry is extracted once
    assert not list(tmp_path.rglob(".*.tmp-*")) and not list(tmp_path.rglob("*.lock"))  # nothing left beside


def _hold_lock(path: Path) -> int:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if path.is_dir() else os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_killed_runs_temporaries_are_removed_and_live_ones_kept(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    stale_dir = folder / ".toy_waterbirds.tmp-4242-abcd_123"  # a killed run's folder: nobody holds its lock
    stale_dir.mkdir()
    (stale_dir / "metadata.csv").write_text("half")
    stale_file = folder / ".train-0123.npz.tmp-4242-q1w2e3r4"
    stale_file.write_bytes(b"half")
    live_dir = folder / ".toy_waterbirds.tmp-4343-zzzzzzzz"  # another run is writing it: its lock is held
    live_dir.mkdir()
    live_file = folder / ".text.npz.tmp-4343-yyyyyyyy"
    live_file.write_bytes(b"in progress")
    old_legacy = folder / ".old.npy.tmp-k2j3h4g5"  # an older calib's unlocked temporary, untouched for long
    old_legacy.write_bytes(b"old")
    past = time.time() - LEGACY_TEMP_AGE_S - 60
    os.utime(old_legacy, (past, past))
    young_legacy = folder / ".young.npy.tmp-m2n3b4v5"  # may still be written by an older calib's run
    young_legacy.write_bytes(b"young")
    others = [folder / ".hidden", folder / "notes.tmp-abcdefgh", folder / "x.lock"]
    for f in others:
        f.write_text("user")
    fds = [_hold_lock(live_dir), _hold_lock(live_file)]
    try:
        atomic_write_bytes(folder / "new.bin", b"data")
    finally:
        for fd in fds:
            os.close(fd)
    assert not stale_dir.exists() and not stale_file.exists() and not old_legacy.exists()
    assert live_dir.is_dir() and live_file.read_bytes() == b"in progress" and young_legacy.exists()
    assert all(f.read_text() == "user" for f in others)
    assert (folder / "new.bin").read_bytes() == b"data"
    with atomic_dir(folder / "made") as tmp:  # atomic_dir cleans up the same way; the live ones are free now
        (tmp / "f").write_text("x")
    assert not live_dir.exists() and not live_file.exists()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and "tmp" in p.name) == [young_legacy.name]


def test_killed_toy_build_leftover_is_removed_by_the_next_run(tmp_path):
    stale = tmp_path / ".toy.tmp-99999-abcdefgh"
    (stale / "001.Toy_Landbird").mkdir(parents=True)
    make_toy_waterbirds(tmp_path / "toy", TINY_TOY)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # and no lock file beside it


# --- C: permissions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_get_the_users_umask(tmp_path, mask, file_mode, dir_mode):
    with umask(mask):
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == dir_mode


def test_caches_and_checkpoints_are_readable_under_umask_022(toy_model, tmp_path):
    with umask(0o022):
        weights = ensure_toy_clip(TINY_CLIP, tmp_path / "cache")
        get_text_prototypes(toy_model, ["landbird", "waterbird"], cache_dir=tmp_path / "cache")
        root = make_toy_waterbirds(tmp_path / "toy", TINY_TOY)
    made = [weights.parent, root, *weights.parent.iterdir(), *(tmp_path / "cache" / "text").iterdir()]
    made += [root / "metadata.csv", root / "toy_benchmark.json"]
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in made}
    assert modes == {str(p): oct(0o755 if p.is_dir() else 0o644) for p in made}
    assert json.loads((weights.parent / "manifest.json").read_text())  # the manifest was written too
    assert TOY_PRESETS["toy-quick"] != TINY_CLIP
