"""Install metadata, scripts and docs stay consistent."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.fixtures import FIGURE_STEMS

REPO = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_pyproject_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"]} | {_norm(r) for r in project["optional-dependencies"]["dev"]}
    env = (REPO / "environment.yml").read_text()
    pip_section = env.split("- pip:", 1)[1]
    listed = {
        _norm(line.strip()[2:])
        for line in pip_section.splitlines()
        if line.strip().startswith("- ") and not line.strip().startswith("- -e")
    }
    assert listed == wanted
    assert re.search(r"python\s*>=\s*3\.1\d", env)
    assert project["requires-python"] == ">=3.10"


def test_entry_scripts_exist_and_ci_calls_tests():
    for script in ("run_all.sh", "run_tests.sh", ".ci/run"):
        path = REPO / script
        assert path.is_file() and path.stat().st_mode & 0o111, script
    assert "run_tests.sh" in (REPO / ".ci/run").read_text()
    for script in ("run_all.sh", "run_tests.sh", "scripts/bootstrap.sh", ".ci/run"):
        subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_readme_has_the_two_commands_and_badges():
    readme = (REPO / "README.md").read_text()
    assert "./run_all.sh" in readme and "./run_tests.sh" in readme
    for nb in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"blob/main/notebooks/{nb.name}" in readme, f"README lacks a Colab badge for {nb.name}"
    for target in re.findall(r"\]\((figures/[^)]+)\)", readme):
        assert (REPO / target).is_file(), target


def test_cli_help_and_methods():
    out = subprocess.run([sys.executable, "-m", "calib", "list", "methods"], capture_output=True, text=True, check=True)
    assert "clip_erm†" in out.stdout and "zeroshot" in out.stdout


def test_run_all_quick_end_to_end(tmp_path):
    """./run_all.sh --quick with the current interpreter: every stage, both notebook lanes, all figures."""
    import os

    env = {**os.environ, "CALIB_USE_CURRENT_ENV": "1", "PYTHON": sys.executable, "CALIB_HOME": str(tmp_path)}
    for var in ("CALIB_DATA_DIR", "CALIB_CACHE_DIR", "CALIB_RESULTS_DIR", "CALIB_FIGURES_DIR"):
        env.pop(var, None)
    r = subprocess.run(
        ["bash", str(REPO / "run_all.sh"), "--quick"], capture_output=True, text=True, env=env, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("toy data", "toy CLIP training", "feature extraction", "notebook 04_ablations.ipynb", "total"):
        assert stage in r.stdout
    figures = {p.name for p in (tmp_path / "figures").glob("*.png")}
    for stem in FIGURE_STEMS:
        assert f"{stem}_toy-quick_calib-toy-vit.png" in figures, stem
    assert "cfr_dynamics_testbed-mu_core0.5-scale0.1.png" in figures
    assert len(list((tmp_path / "notebooks" / "executed").glob("*.ipynb"))) == 7  # under CALIB_HOME, not the checkout


def _calib_import_graph() -> dict[str, set[str]]:
    """Module -> the calib modules it imports anywhere in its body (function-level imports included)."""
    import ast

    pkg = REPO / "calib"
    mods = {}
    for p in pkg.rglob("*.py"):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "calib":
                targets = (node.module, *(f"{node.module}.{a.name}" for a in node.names))
                graph[m] |= {t for t in targets if t in mods and t != m}
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods}
    return graph


def test_no_import_cycles():
    graph = _calib_import_graph()
    assert "calib.toyclip" in graph["calib.models"]  # the graph sees real edges

    def reaches(src: str, dst: str) -> bool:
        seen, todo = set(), [src]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == dst:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    # a package importing its own submodules (calib.methods -> calib.methods.cfr) is not a cycle unless back
    cycles = [(a, b) for a in graph for b in graph[a] if not b.startswith(a + ".") and reaches(b, a)]
    assert cycles == []


def test_pre_commit_runs_ruff_and_nbstripout_with_the_papermill_keys():
    text = (REPO / ".pre-commit-config.yaml").read_text()
    for hook in ("id: ruff", "id: ruff-format", "id: nbstripout"):
        assert hook in text
    assert '"metadata.papermill cell.metadata.papermill"' in text
    assert "ruff check" in (REPO / "run_tests.sh").read_text()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_lock_pins_every_dependency_within_pyproject_ranges():
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for req in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        r = Requirement(req)
        name = r.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in requirements.lock (run scripts/lock.sh)"
        assert r.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {r.specifier}"
    assert "autogenerated by pip-compile with Python 3." in (REPO / "requirements.lock").read_text()
    boot = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert '-c "$lock"' in boot and "CALIB_UNPINNED" in boot and "CALIB_UNPINNED" in (REPO / "README.md").read_text()


def test_project_environment_matches_the_lock():
    """The venv run_tests.sh built holds exactly the locked versions (skipped in another environment)."""
    import importlib.metadata as md
    import os

    if os.environ.get("CALIB_USE_CURRENT_ENV") == "1" or os.environ.get("CALIB_UNPINNED") == "1":
        pytest.skip("not the pinned project environment")
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("not running in the project venv")
    pins = _lock()
    for name in ("torch", "numpy", "open-clip-torch", "scikit-learn", "pandas", "seaborn", "matplotlib"):
        assert md.version(name).split("+")[0] == pins[name], name
