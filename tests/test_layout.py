"""The package's folders follow the pipeline: no import climbs from a lower stage to a higher one (issue 19)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graph():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_climbs_a_stage(graph):
    assert graph.violations() == []
    assert len(graph.edges()) > 100  # the walk found the package's imports, lazy ones included


def test_the_checker_catches_a_climbing_import(graph, tmp_path, monkeypatch):
    pkg = tmp_path / "calib"
    for folder, body in {
        "core": "",
        "methods": "def f():\n    from calib.evaluation.tables import main_table  # lazy, still a dependency\n",
        "evaluation": "from calib.methods import REGISTRY\n",
        "stray": "",
    }.items():
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text(body)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "x.py").write_text("from calib.stray import y\n")
    monkeypatch.setattr(graph, "PACKAGE", pkg)
    bad = graph.violations()
    assert len(bad) == 2, bad
    assert "calib.methods (stage 3 methods) imports calib.evaluation.tables (stage 4 evaluation)" in bad[1]
    assert "calib/methods/__init__.py:2:" in bad[1]
    assert "without a stage" in bad[0] and "calib.stray" in bad[0]
    assert "evaluation[evaluation 4] -->|1| methods[methods 3]" in graph.mermaid()


def test_top_level_is_a_few_stage_folders(graph):
    entries = sorted(p.name for p in (REPO / "calib").iterdir() if p.name != "__pycache__")
    assert entries == sorted(["__init__.py", "__main__.py", *(s for s in graph.STAGES if s != "__main__")])


def test_every_folder_says_what_lives_there():
    for init in sorted((REPO / "calib").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} has no docstring"
        first = doc.split("\n\n")[0]
        assert first.startswith("Stage "), f"{init}: the docstring should open with its stage"
        assert len(first.splitlines()) <= 2, f"{init}: say what lives there in two lines"


def test_no_grab_bag_modules():
    names = {p.stem for p in (REPO / "calib").rglob("*.py")}
    assert not names & {"utils", "helpers", "misc", "common"}
