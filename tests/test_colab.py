"""The Colab branch: install without touching torch, Drive for data and caches, a warning without a GPU."""

import importlib.metadata as md
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_bootstrap_installs_calib_and_pins_torch(nb, monkeypatch):
    book = nbformat.read(nb, as_version=4)
    boot = next(c.source for c in book.cells if c.cell_type == "code" and "Bootstrap" in c.source)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "calib" else real_find(name, *a))
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    exec(compile(boot, nb.name, "exec"), {})
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    from calib.experiments.colab import repository

    assert f"calib @ git+https://github.com/{repository()}" in cmd
    assert not any(arg.split("==")[0] in ("torch", "torchvision") for arg in cmd)  # never asks for torch itself
    pins = Path(cmd[cmd.index("-c") + 1]).read_text().split()
    assert f"torch=={md.version('torch')}" in pins  # the installed torch is pinned: pip cannot replace it
    assert f"torchvision=={md.version('torchvision')}" in pins


def test_bootstrap_does_nothing_when_calib_is_installed(monkeypatch):
    boot = next(c.source for c in nbformat.read(NOTEBOOKS[0], as_version=4).cells if "Bootstrap" in c.source)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    exec(compile(boot, "boot", "exec"), {})
    assert calls == []


@pytest.fixture
def fake_colab(monkeypatch):
    mounted = []
    drive = types.ModuleType("google.colab.drive")
    drive.mount = lambda path, **kw: mounted.append(path)
    colab = types.ModuleType("google.colab")
    colab.drive = drive
    google = types.ModuleType("google")
    google.colab = colab
    for name, mod in (("google", google), ("google.colab", colab), ("google.colab.drive", drive)):
        monkeypatch.setitem(sys.modules, name, mod)
    return mounted


def test_colab_drive_and_gpu_warning(fake_colab, monkeypatch, capfd):
    import calib.experiments.notebook as nbm

    monkeypatch.delenv("CALIB_HOME", raising=False)
    device = nbm.setup(colab_drive=True)
    assert fake_colab == ["/content/drive"]
    import os

    assert os.environ["CALIB_HOME"] == "/content/drive/MyDrive/calib"
    from calib.core import paths

    assert paths.cache_dir() == Path("/content/drive/MyDrive/calib/.cache")
    captured = capfd.readouterr()
    assert device == "cpu" and "WARNING: No GPU attached" in captured.out  # notebooks log to stdout


def test_outside_colab_drive_is_ignored(monkeypatch):
    import calib.experiments.notebook as nbm

    before = dict(**__import__("os").environ)
    assert nbm.setup(colab_drive=True) == "cpu"
    assert __import__("os").environ.get("CALIB_HOME") == before.get("CALIB_HOME")


def test_badges_and_bootstrap_cells_agree_with_the_one_setting():
    from calib.experiments.colab import BADGE_URL, bootstrap_source, repository

    repo = repository()
    assert repo == "calib-org/calib" or "/" in repo
    for nb in NOTEBOOKS:
        book = nbformat.read(nb, as_version=4)
        assert [c.source for c in book.cells if "Bootstrap" in c.source] == [bootstrap_source(repo)]
    for path in [*NOTEBOOKS, REPO / "README.md"]:
        urls = BADGE_URL.finditer(path.read_text())
        assert all(f"/github/{repo}/blob/main/" in m.group(0) for m in urls), path


def test_report_notebooks_follows_pyproject(tmp_path):
    """A fork edits [project.urls] Repository and reruns the report step: every badge and cell follows."""
    import shutil

    from calib.experiments.cli import main
    from calib.experiments.colab import repository, sync_notebooks

    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns("executed"))
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    text = (REPO / "pyproject.toml").read_text().replace(f"github.com/{repository()}", "github.com/someone/fork")
    (tmp_path / "pyproject.toml").write_text(text)
    assert repository(tmp_path / "pyproject.toml") == "someone/fork"
    changed = sync_notebooks(root=tmp_path)
    assert len(changed) == len(NOTEBOOKS) + 1  # every notebook and the README
    for path in [*(tmp_path / "notebooks").glob("*.ipynb"), tmp_path / "README.md"]:
        assert "calib-org" not in path.read_text() and "someone/fork" in path.read_text()
    assert sync_notebooks(root=tmp_path) == []  # idempotent
    sync_notebooks(repository(), root=tmp_path)  # and back, byte for byte
    for nb in NOTEBOOKS:
        assert (tmp_path / "notebooks" / nb.name).read_text() == nb.read_text()
    assert (tmp_path / "README.md").read_text() == (REPO / "README.md").read_text()
    (tmp_path / "pyproject.toml").write_text(text.replace("https://github.com/someone/fork", "https://gitlab.com/x/y"))
    with pytest.raises(ValueError, match="not https://github.com"):
        repository(tmp_path / "pyproject.toml")
    assert main(["report", "notebooks"]) == 0  # the checkout already agrees: rewrites nothing


def test_notebook_logging_progress_and_expected_warnings(capsys, caplog):
    import io
    import logging

    import calib.experiments.notebook as nbm
    from calib.core import logs

    try:
        nbm.setup()
        logging.getLogger("calib.test").info("plain line")
        logging.getLogger("calib.test").warning("look")
        out = capsys.readouterr()
        assert "plain line\n" in out.out and "WARNING: look\n" in out.out and out.err == ""
        buf = io.StringIO()
        for _ in logs.progress(range(50), file=buf, desc="work"):
            pass
        assert buf.getvalue().rstrip().split("\r")[-1].startswith("work: 100%")
        with caplog.at_level(logging.WARNING):
            from calib.clip.models import load_clip

            load_clip("calib-toy-vit", "random:0", device="cpu")
        assert "initialized randomly" not in caplog.text
    finally:
        logs.setup_logging()
        logs.use_plain_progress(False)
