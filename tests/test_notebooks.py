"""Every notebook runs under papermill (once, in `./run_all.sh --quick`); committed notebooks are clean."""

import json
import re
from pathlib import Path

import nbformat
import pytest

from tests.fixtures import FIGURE_STEMS

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# notebook -> (figure stems it must write, results file it must append to or None)
EXPECT = {
    "00_quickstart": (["quickstart"], "quickstart"),
    "01_spurious_correlation": (["spurious_correlation"], "spurious_correlation"),
    "02_last_layer_retraining": (["last_layer_retraining"], "last_layer_retraining"),
    "03_main_results": (["main_results"], "main_results"),
    "04_ablations": (["ablations"], "ablations"),
    "05_feature_geometry": (["feature_geometry", "calibration_set"], None),
    "06_cfr_dynamics": (["cfr_dynamics"], "cfr_dynamics"),
    "07_attribution": (["attribution_maps", "attribution_mass"], "attribution"),
    "08_pretraining_sources": (["pretraining_sources", "pretraining_sources_balanced"], "pretraining_sources"),
}
SUFFIX = {"08_pretraining_sources": "_toy-quick"}  # a study across models: figures named by the dataset only
QUICK_SEEDS, QUICK_EPOCHS = {0, 1}, 3  # what ./run_all.sh --quick passes the notebooks


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, paper_profile_run, start_run_all):
    """``./run_all.sh --quick`` once, with the current interpreter, into a fresh CALIB_HOME: every stage, both
    notebook lanes, every notebook under papermill (in its own working directory).  The tests below read it.
    ``paper_profile_run`` is requested first only to start it: the two long runs overlap on the CPU."""
    home = tmp_path_factory.mktemp("quick_home")
    returncode, stdout, stderr = start_run_all(["--quick"], home).wait()
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    return home, stdout


def test_run_all_quick_end_to_end(quick_run):
    home, stdout = quick_run
    for stage in ("toy data", "toy CLIP training", "feature extraction", "notebook 04_ablations.ipynb", "total"):
        assert stage in stdout
    figures = {p.name for p in (home / "figures").glob("*.png")}
    for stem in FIGURE_STEMS:
        assert f"{stem}_toy-quick_calib-toy-vit.png" in figures, stem
    assert "cfr_dynamics_testbed-mu_core0.5-scale0.1.png" in figures
    assert len(list((home / "notebooks" / "executed").glob("*.ipynb"))) == len(
        NOTEBOOKS
    )  # under CALIB_HOME, not the checkout
    rows = [json.loads(line) for line in (home / "results" / "main_results.jsonl").read_text().splitlines()]
    assert {r["lanes"] for r in rows if r["method"] == "cfr"} == {2}  # the two seeds trained in one pass


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "00_quickstart.ipynb",
        "01_spurious_correlation.ipynb",
        "02_last_layer_retraining.ipynb",
        "03_main_results.ipynb",
        "04_ablations.ipynb",
        "05_feature_geometry.ipynb",
        "06_cfr_dynamics.ipynb",
        "07_attribution.ipynb",
        "08_pretraining_sources.ipynb",
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
    from calib.experiments.colab import repository

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
def test_notebook_executes(nb, quick_run):
    home, _ = quick_run
    stems, results = EXPECT[nb.stem]
    executed = nbformat.read(home / "notebooks" / "executed" / nb.name, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs and not [o for o in outputs if o.output_type == "error"]
    # clean in JupyterLab: calib's log lines on stdout (no red stderr boxes), text progress bars saved in their
    # final state (a widget bar would be saved at 0%), no open_clip warning about the toy CLIP's random start
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    stdout = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert "INFO" not in stderr and "initialized randomly" not in stderr + stdout, stderr[:500]
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    if re.search(r"\d+%\|", stdout):  # a progress bar ran: it was saved at its end
        assert "100%|" in stdout
    figs = home / "figures"
    suffix = SUFFIX.get(nb.stem, "_toy-quick_calib-toy-vit")
    for stem in stems:
        assert (figs / f"{stem}{suffix}.png").is_file(), stem
        assert (figs / f"{stem}{suffix}.pdf").is_file(), stem
    if results:
        rows = [json.loads(line) for line in (home / "results" / f"{results}.jsonl").read_text().splitlines()]
        single_seed = ("04_ablations", "06_cfr_dynamics", "07_attribution", "08_pretraining_sources")
        assert {r["seed"] for r in rows} >= ({0} if nb.stem in single_seed else QUICK_SEEDS)
    if nb.stem == "06_cfr_dynamics":  # the testbed's figure, and histories in the rows
        assert (figs / "cfr_dynamics_testbed-mu_core0.5-scale0.1.png").is_file()
        assert all(len(r["history"]) == QUICK_EPOCHS for r in rows)
    if nb.stem == "07_attribution":  # per group mass on the bird, for both projections, every method
        assert {(r["variant"], r["method"]) for r in rows} == {
            (m, a) for m in ("zero-shot", "CFR") for a in ("m2ib", "gradcam", "attention", "rollout")
        }
        assert all(len(r["metrics"]["test"]["mass_group"]) == 4 for r in rows)
    if nb.stem == "08_pretraining_sources":
        assert {r["kind"] for r in rows} == {"toy source", "mixture"}
        assert (figs / "pretraining_sources_toy-quick.md").is_file()
    # run in notebooks/executed/ (papermill --cwd): nothing written to the working directory
    assert not list((home / "notebooks" / "executed").glob("*.png"))
