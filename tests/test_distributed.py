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


def test_assign_cells_balances_the_estimated_hours():
    from calib.experiments.profile import Cell, assign_cells

    cells = [Cell(f"d{h}", "m", "p", float(h)) for h in (5, 1, 4, 3, 2)]
    shares = assign_cells(cells, 2)
    # longest first, each to the least-loaded rank: 5 -> r0, 4 -> r1, 3 -> r1 (4 < 5), 2 -> r0 (5 < 7), 1 -> r0 (7 = 7)
    assert [[c.dataset for c in s] for s in shares] == [["d5", "d2", "d1"], ["d4", "d3"]]
    assert assign_cells(cells, 1) == [sorted(cells, key=lambda c: -c.hours)]
    assert assign_cells(cells[:1], 3)[1:] == [[], []]  # more ranks than cells: the others only wait


def test_cell_notebooks_get_only_parameters_they_declare():
    import json as _json

    from calib.core import paths
    from calib.experiments.profile import CELL_NOTEBOOKS, Cell, Settings, notebook_parameters

    cell = Cell("metashift", "RN50-quickgelu", "openai")
    for nb in sorted((paths.repo_root() / "notebooks").glob("0*.ipynb")):
        if not nb.name.startswith(CELL_NOTEBOOKS):
            continue
        cells = _json.loads(nb.read_text())["cells"]
        source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
        declared = {line.split(":")[0].split("=")[0].strip() for line in source.splitlines() if line[:1].isalpha()}
        for quick in (False, True):
            params = notebook_parameters(nb.name, cell, Settings(quick=quick))
            assert set(params) <= declared, (nb.name, set(params) - declared)
    assert notebook_parameters("04_ablations.ipynb", cell, Settings(quick=True))["ablations"] == ["CFR (default)"]
    assert notebook_parameters("07_attribution.ipynb", cell, Settings())["per_group"] == 50


def test_one_process_runs_every_cell_then_the_tables(tmp_path, monkeypatch):
    """Outside torchrun: every cell (extraction, then its notebooks in order, each with its parameters and the data
    folder in its environment), then notebook 08 per dataset and notebook 03 over the cells."""
    import json as _json

    import calib.experiments.profile as profile

    calls = []
    monkeypatch.setattr(profile, "_run", lambda cmd, env, what, report: calls.append((what, cmd, env)))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cells = [
        profile.Cell("waterbirds", "RN50-quickgelu", "openai", 1.0),
        profile.Cell("celeba", "RN50-quickgelu", "openai", 9.0),
    ]
    settings = profile.Settings(quick=True, tpt_images=7, notebooks=("00", "07"), methods=["zeroshot"])
    report = profile.run_profile(cells, settings, tmp_path / "data", executed=tmp_path / "executed")
    names = [what for what, _, _ in calls]
    assert names == [
        "extract celeba / RN50-quickgelu / openai",  # the costlier cell first
        "notebook 00_quickstart (celeba / RN50-quickgelu)",
        "notebook 07_attribution (celeba / RN50-quickgelu)",
        "extract waterbirds / RN50-quickgelu / openai",
        "notebook 00_quickstart (waterbirds / RN50-quickgelu)",
        "notebook 07_attribution (waterbirds / RN50-quickgelu)",
        "notebook 08_pretraining_sources (waterbirds)",
        "notebook 08_pretraining_sources (celeba)",
        "notebook 03_main_results (paper)",
    ]
    assert all(env["CALIB_DATA_DIR"] == str((tmp_path / "data").resolve()) for _, _, env in calls)
    params = {what: _json.loads(cmd[-1]) for what, cmd, _ in calls if what.startswith("notebook")}
    assert params["notebook 07_attribution (celeba / RN50-quickgelu)"] == {
        "dataset": "celeba",
        "model": "RN50-quickgelu",
        "pretrained": "openai",
        "seed": 0,
        "epochs": 3,
        "per_group": 2,
    }
    assert params["notebook 03_main_results (paper)"] == {
        "datasets": ["waterbirds", "celeba"],
        "backbones": [["RN50-quickgelu", "openai"]],
        "seeds": [0],
        "tpt_images": 7,
        "epochs": 3,
        "methods": ["zeroshot"],
    }
    assert report.world == 1 and report.cells == [
        "celeba__RN50-quickgelu__openai",
        "waterbirds__RN50-quickgelu__openai",
    ]
    assert _json.loads((tmp_path / "executed" / "profile_rank0.json").read_text())["cells"] == report.cells
