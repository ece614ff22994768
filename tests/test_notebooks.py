"""Every notebook runs under papermill in a fast test mode; committed notebooks are clean."""

import json
import re
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from calib import paths

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
QUICK = {"dataset": "toy-quick", "pretrained": "toy-quick", "seeds": [0, 1], "epochs": 2}
# notebook -> (fast parameters, figure stems it must write, results file it must append to or None)
EXPECT = {
    "00_quickstart": (QUICK, ["quickstart"], "quickstart"),
    "01_spurious_correlation": (QUICK, ["spurious_correlation"], "spurious_correlation"),
    "02_last_layer_retraining": (QUICK, ["last_layer_retraining"], "last_layer_retraining"),
    "03_main_results": (
        {"datasets": ["toy-quick"], "backbones": [["calib-toy-vit", "toy-quick"]], "seeds": [0, 1], "epochs": 2},
        ["main_results"],
        "main_results",
    ),
    "04_ablations": (
        {
            **QUICK,
            "seeds": [0],
            "ablations": ["CFR (default)", "regulariser: none", "released behaviour (faithful_release)"],
        },
        ["ablations"],
        "ablations",
    ),
    "05_feature_geometry": (
        {k: v for k, v in QUICK.items() if k != "seeds"},
        ["feature_geometry", "calibration_set"],
        None,
    ),
    "06_cfr_dynamics": (
        {
            **QUICK,
            "seeds": [0],
            "variants": ["CFR (default)", "regulariser: none"],
            "testbed_core": [0.5],
            "testbed_scale": 0.1,
            "testbed_variants": ["CFR (default)"],
        },
        ["cfr_dynamics"],
        "cfr_dynamics",
    ),
}


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "00_quickstart.ipynb",
        "01_spurious_correlation.ipynb",
        "02_last_layer_retraining.ipynb",
        "03_main_results.ipynb",
        "04_ablations.ipynb",
        "05_feature_geometry.ipynb",
        "06_cfr_dynamics.ipynb",
    ]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_parameterised(nb):
    book = nbformat.read(nb, as_version=4)
    assert book.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for line in tagged[0].source.splitlines():
        assert re.match(r"^\w+: [\w\[\]]+ = .+  # .+$", line), f"parameter lines are typed with a comment: {line}"
    # thin: no function or class definitions in notebooks
    assert not any(re.search(r"^\s*(def|class) ", c.source, re.M) for c in code)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_badge_points_at_this_notebook(nb):
    from calib.colab import repository

    github_repo = repository()

    text = nb.read_text()
    badges = re.findall(
        r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/main/(notebooks/[^)\s\"]+\.ipynb)", text
    )
    assert badges and all(
        repo == github_repo and (REPO / path).is_file() and path.endswith(nb.name) for repo, path in badges
    )


def test_every_notebook_has_expectations():
    assert sorted(EXPECT) == [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(nb, tmp_path, toy_features):
    params, stems, results = EXPECT[nb.stem]
    out = tmp_path / nb.name
    # a different working directory: paths must not depend on it
    pm.execute_notebook(
        str(nb), str(out), parameters=params, kernel_name="python3", cwd=str(tmp_path), progress_bar=False
    )
    executed = nbformat.read(out, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # clean in JupyterLab: calib's log lines on stdout (no red stderr boxes), text progress bars saved in their
    # final state (a widget bar would be saved at 0%), no open_clip warning about the toy CLIP's random start
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    stdout = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert "INFO" not in stderr and "initialized randomly" not in stderr + stdout, stderr[:500]
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    if re.search(r"\d+%\|", stdout):  # a progress bar ran: it was saved at its end
        assert "100%|" in stdout
    figs = paths.figures_dir()
    for stem in stems:
        assert (figs / f"{stem}_toy-quick_calib-toy-vit.png").is_file(), stem
        assert (figs / f"{stem}_toy-quick_calib-toy-vit.pdf").is_file(), stem
    if results:
        rows = [json.loads(line) for line in (paths.results_dir() / f"{results}.jsonl").read_text().splitlines()]
        assert {r["seed"] for r in rows} >= set(params.get("seeds", [0]))
    if nb.stem == "06_cfr_dynamics":  # the testbed's figure, and histories in the rows
        assert (figs / "cfr_dynamics_testbed-mu_core0.5-scale0.1.png").is_file()
        assert all(len(r["history"]) == params["epochs"] for r in rows)
    assert not list(tmp_path.glob("*.png"))  # nothing written to the working directory
