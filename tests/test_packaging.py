"""Install metadata, scripts and docs stay consistent."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

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
    assert len(readme.splitlines()) <= 150, "the README is a front page; details go to docs/"


def _links(page: Path) -> list[tuple[str, str]]:
    """``(target file, anchor)`` of every relative Markdown link on ``page``."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if not re.match(r"[a-z]+:", target):
            path, _, anchor = target.partition("#")
            out.append(((page.parent / path).resolve() if path else page, anchor))
    return out


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_docs_link_resolves_and_every_page_is_reachable():
    pages = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target, anchor in _links(page):
            assert target.exists(), f"{page.name} links to a missing {target}"
            if anchor and target.suffix == ".md":
                assert anchor in _anchors(target), f"{page.name} links to a missing anchor {target.name}#{anchor}"
    linked = {t for p in (REPO / "README.md", REPO / "docs" / "README.md") for t, _ in _links(p)}
    for page in (REPO / "docs").glob("*.md"):
        assert page.resolve() in linked, f"docs/{page.name} is linked from neither README.md nor docs/README.md"


def test_cli_help_and_methods():
    out = subprocess.run([sys.executable, "-m", "calib", "list", "methods"], capture_output=True, text=True, check=True)
    assert "clip_erm†" in out.stdout and "zeroshot" in out.stdout


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
    assert "calib.clip.toyclip" in graph["calib.clip.models"]  # the graph sees real edges

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
    assert '-c "$lock"' in boot and "CALIB_UNPINNED" in boot
    assert "CALIB_UNPINNED" in (REPO / "docs" / "usage.md").read_text()


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


def test_bootstrap_warns_before_an_install_that_cannot_fit(tmp_path):
    """The disk check the bootstrap runs before installing (a full disk once failed CI halfway through pip)."""

    def check(gib: int) -> str:
        script = f'source "{REPO}/scripts/bootstrap.sh"; calib_check_space "{tmp_path}/not/yet/made" {gib}'
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stderr

    warning = check(10**9)  # more than any disk: warned, naming the folder and the way out
    assert "GiB free where the environment goes" in warning and f"{tmp_path}/not/yet/made" in warning
    assert "CALIB_VENV" in warning
    assert check(0) == ""  # enough space: silent
