"""Feature extraction under torchrun (2 CPU processes, gloo) writes the same cache as one process."""

import os
import subprocess
import sys

import numpy as np

from calib.core import paths


def _extract(env, nproc):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29531", "-m"]
        if nproc > 1
        else [sys.executable, "-m"]
    )
    cmd = launcher + [
        "calib",
        "extract",
        "--dataset",
        "toy-quick",
        "--model",
        "calib-toy-vit",
        "--pretrained",
        "toy-quick",
        "--split",
        "val",
        "--split",
        "test",
        "--batch-size",
        "16",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def _split_files():
    base = paths.cache_dir() / "features" / "toy-quick"
    return sorted(f for f in base.rglob("*.npz") if f.name.startswith(("val-", "test-")))


def _clear():
    for f in _split_files():
        f.unlink()


def _arrays():
    out = {}
    for f in _split_files():
        with np.load(f) as d:
            out[f.name] = {k: d[k] for k in ("h", "z", "y", "g", "ids", "key")}
    return out


def test_two_processes_write_the_single_process_cache(toy_features):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    _clear()
    out = _extract(env, 2)
    assert "(2 processes)" in out
    multi = _arrays()
    assert len(multi) == 2  # val and test
    _clear()
    _extract(env, 1)
    single = _arrays()
    assert multi.keys() == single.keys()
    for name in single:
        for k in single[name]:
            np.testing.assert_array_equal(multi[name][k], single[name][k], err_msg=f"{name}:{k}")
