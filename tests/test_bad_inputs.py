"""Bad input gets one clear, actionable error and nothing half-written (issue 11's sixteen kinds, the five that
failed badly first)."""

import errno
import json
import logging
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from calib.clip.features import (
    FeatureSet,
    NonFiniteFeaturesError,
    SplitFeatures,
    cache_key,
    cache_path,
    get_split_features,
)
from calib.clip.models import CheckpointError, load_clip
from calib.core.files import OutputNotWritableError
from calib.data import ToyConfig, load_waterbirds, make_toy_waterbirds
from calib.experiments.cli import main
from calib.methods import make_options, run_method


def _npz(path, nan_row=None):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        x = rng.normal(size=(40, 8)).astype(np.float32)
        y = rng.integers(0, 2, 40)
        arrays |= {f"embeddings_{split}": x, f"y_{split}": y, f"g_{split}": 2 * y + rng.integers(0, 2, 40)}
    if nan_row is not None:
        arrays["embeddings_test"][nan_row, 3] = np.nan
    np.savez(path, **arrays)
    return path


def test_npz_with_a_nan_embedding_stops_with_one_line(tmp_path, capsys):
    path = _npz(tmp_path / "emb.npz", nan_row=7)
    assert main(["evaluate", "--embeddings", str(path), "--method", "linear_probe"]) == 2
    err = capsys.readouterr().err
    assert "embeddings_test holds NaN or infinity in 1 row(s), first [7]" in err and "Traceback" not in err


def test_non_finite_features_stop_before_any_method_runs(monkeypatch):
    rng = np.random.default_rng(0)
    split = SplitFeatures(z=rng.normal(size=(20, 4)).astype(np.float32), y=np.arange(20) % 2, g=np.arange(20) % 4)
    bad = SplitFeatures(z=split.z.copy(), y=split.y, g=split.g, h=np.full((20, 3), np.inf, np.float32))
    data = FeatureSet(
        {"train": split, "val": split, "test": bad},
        text=np.eye(2, 4),
        logit_scale=10.0,
        n_groups=4,
        class_names=["a", "b"],
        group_names=list("abcd"),
        meta={"dataset": "d", "model": "m"},
    )
    called = []
    from calib.methods.heads import ZeroShot

    monkeypatch.setattr(ZeroShot, "fit", lambda self, *a: called.append(1))
    with pytest.raises(NonFiniteFeaturesError, match=r"features of d / m: 20 of 20 test rows of 'h'"):
        run_method("zeroshot", data)
    assert called == []


@pytest.mark.parametrize(
    "value, message",
    [("abc", "option 'epochs' of method 'clip_erm' expects int, got 'abc'"), ("2.5", "expects int, got '2.5'")],
)
def test_option_values_are_parsed_to_their_declared_type(tmp_path, capsys, value, message):
    path = _npz(tmp_path / "emb.npz")
    assert main(["evaluate", "--embeddings", str(path), "--method", "clip_erm", "--option", f"epochs={value}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_option_parsing_by_type():
    o = make_options("cfr", {"epochs": "3", "lr": "1e-4", "train_logit_scale": "false", "selection": "val_wga"})
    assert (o.epochs, o.lr, o.train_logit_scale, o.selection) == (3, 1e-4, False, "val_wga")
    assert make_options("dfr", {"C_grid": "[1, 0.5]"}).C_grid == (1.0, 0.5)
    assert make_options("dfr", {"C_grid": "1,0.5"}).C_grid == (1.0, 0.5)
    assert make_options("cfr", {"lr": 1}).lr == 1.0  # an int where a float is declared is fine
    with pytest.raises(ValueError, match="expects bool, got 'maybe'"):
        make_options("cfr", {"train_logit_scale": "maybe"})
    with pytest.raises(ValueError, match="expects int, got True"):
        make_options("cfr", {"epochs": True})


def test_corrupt_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"garbage, not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=f"cannot read the weights file {bad}") as err:
        load_clip("calib-toy-vit", str(bad), device="cpu")
    assert "Expected an open_clip" in str(err.value)
    assert main(["extract", "--dataset", "toy-quick", "--model", "calib-toy-vit", "--pretrained", str(bad)]) == 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_toy_waterbirds(tmp_path_factory.mktemp("tiny") / "toy", ToyConfig(scale=0.002, seed=3))
    return load_waterbirds(root, name="bad-input-test"), load_clip("calib-toy-vit", "random:0", device="cpu")


@pytest.mark.parametrize("damage", ["flip_labels", "truncate", "garbage"])
def test_damaged_feature_cache_is_reported_and_rebuilt(tmp_path, tiny, damage, caplog):
    ds, model = tiny
    cache = tmp_path / "cache"
    first = get_split_features(model, ds, "val", cache_dir=cache, num_workers=0)
    path = cache_path(cache_key(model, ds, "val"), cache)
    if damage == "flip_labels":  # a cache edited by hand: valid npz, wrong content
        with np.load(path) as f:
            arrays = dict(f)
        arrays["y"] = 1 - arrays["y"]
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="calib.clip.features"):
        again = get_split_features(model, ds, "val", cache_dir=cache, num_workers=0)
    assert "rebuilding it" in caplog.text
    np.testing.assert_array_equal(again.y, first.y)
    np.testing.assert_allclose(again.z, first.z, rtol=1e-6)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calib.clip.features"):
        get_split_features(model, ds, "val", cache_dir=cache, num_workers=0)  # the rebuilt file is good
    assert "rebuilding" not in caplog.text


def test_data_check_decode_finds_a_corrupted_jpeg(tmp_path, capsys):
    root = make_toy_waterbirds(tmp_path / "toy", ToyConfig(scale=0.002, seed=4))
    ds = load_waterbirds(root)
    bad = ds.splits["test"].paths[2]
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated JPEG: the file exists, so the layout check passes
    assert main(["data", "check", "--dataset", "waterbirds", "--root", str(root)]) == 0
    assert "--decode checks them" in capsys.readouterr().out
    assert main(["data", "check", "--dataset", "waterbirds", "--root", str(root), "--decode"]) == 2
    err = capsys.readouterr().err
    assert f"1 of {sum(len(t) for t in ds.splits.values())} images cannot be decoded" in err and bad.name in err


def test_extraction_error_from_a_worker_is_one_line(tmp_path, tiny):
    from calib.data import DatasetLayoutError

    _, model = tiny
    root = make_toy_waterbirds(tmp_path / "toy", ToyConfig(scale=0.002, seed=6))
    ds = load_waterbirds(root, name="worker-error-test")
    bad = ds.splits["val"].paths[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetLayoutError) as err:
        get_split_features(model, ds, "val", cache_dir=tmp_path / "cache", num_workers=1)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert message.startswith("image cannot be decoded") and bad.name in message


def _run_zeroshot_and_umfc(results_dir):
    from calib.experiments.runner import RunSpec, run_experiment
    from tests.test_methods import _synthetic

    run_experiment(RunSpec("race", ["zeroshot", "umfc"], [0, 1, 2]), _synthetic(), results_dir=results_dir)
    return True


def test_two_writers_on_one_results_file_neither_corrupt_nor_duplicate(tmp_path):
    import multiprocessing

    from calib.evaluation.results import read_rows, row_identity

    # spawn, not fork: a forked child can inherit a held OpenMP / logging lock from this process and hang
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert all(pool.map(_run_zeroshot_and_umfc, [tmp_path, tmp_path]))
    lines = (tmp_path / "race.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line is whole JSON
    assert len(rows) == 6 == len({row_identity(r) for r in read_rows(tmp_path / "race.jsonl")})


def test_read_only_or_full_output_gives_one_message(tmp_path, monkeypatch, capsys):
    import os

    from calib.core.files import atomic_write_bytes
    from calib.evaluation.results import append_rows

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputNotWritableError, match=r"cannot write .*rows.jsonl: its folder is on a full disk"):
        append_rows([{"method": "x"}], tmp_path / "rows.jsonl")
    monkeypatch.undo()

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    monkeypatch.setattr("tempfile.mkdtemp", read_only)
    with pytest.raises(OutputNotWritableError, match="read-only file system.*CALIB_HOME"):
        atomic_write_bytes(tmp_path / "x.bin", b"1")
    assert not list(tmp_path.glob(".x.bin.tmp-*"))
    # through the command line: one line, exit 2, nothing written
    assert main(["data", "make-toy", "--root", str(tmp_path / "toy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read-only file system" in err and not (tmp_path / "toy").exists()
