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


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:2] == ["00_quickstart.ipynb", "01_spurious_correlation.ipynb"]


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
    from calib.notebook import GITHUB_REPO

    text = nb.read_text()
    badges = re.findall(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/main/(notebooks/[^)\s\"]+\.ipynb)", text)
    assert badges and all(repo == GITHUB_REPO and (REPO / path).is_file() and path.endswith(nb.name)
                          for repo, path in badges)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(nb, tmp_path, toy_features):
    out = tmp_path / nb.name
    # a different working directory: paths must not depend on it
    pm.execute_notebook(str(nb), str(out), parameters=QUICK, kernel_name="python3", cwd=str(tmp_path),
                        progress_bar=False)
    executed = nbformat.read(out, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    figs = paths.figures_dir()
    stem = "quickstart" if nb.stem.startswith("00") else "spurious_correlation"
    assert (figs / f"{stem}_toy-quick_calib-toy-vit.png").is_file()
    assert (figs / f"{stem}_toy-quick_calib-toy-vit.pdf").is_file()
    rows = [json.loads(line) for line in (paths.results_dir() / f"{stem}.jsonl").read_text().splitlines()]
    assert {r["seed"] for r in rows} == {0, 1}
    assert not list(tmp_path.glob("*.png"))  # nothing written to the working directory
