"""The Colab side of the notebooks: the repository they open from, their badges and bootstrap cells.

One setting names the repository: ``Repository`` under ``[project.urls]`` in ``pyproject.toml``.  The
badges (in each notebook and in the README's notebook table) and each notebook's bootstrap cell are
generated from it by ``python -m calib report notebooks``; a fork changes that one line and reruns it.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import re
from pathlib import Path

import nbformat

from calib.core import paths

log = logging.getLogger(__name__)

_GITHUB = re.compile(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?$")
_URL_LINE = re.compile(r'^\s*Repository\s*=\s*"([^"]+)"', re.M)
BADGE_URL = re.compile(
    r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/main/(notebooks/[\w.-]+\.ipynb)"
)
BOOTSTRAP_MARK = "# Bootstrap:"
_BOOT_COMMENT = "in Colab (or any kernel without calib) install calib, keeping the preinstalled torch/torchvision."


def repository(pyproject: Path | None = None) -> str:
    """``owner/name`` of the GitHub repository the notebooks open from.

    Read from ``[project.urls] Repository`` of the checkout's ``pyproject.toml`` (or ``pyproject``), else
    from the installed package's metadata.  Raises ``ValueError`` when it is not a GitHub address.
    """
    root = paths.repo_root()
    path = pyproject or (root / "pyproject.toml" if root else None)
    if path is not None and path.is_file():
        section = path.read_text().split("[project.urls]", 1)
        found = _URL_LINE.search(section[1].split("\n[", 1)[0]) if len(section) == 2 else None
        if found is None:
            raise ValueError(f'{path}: no Repository = "https://github.com/<owner>/<name>" under [project.urls]')
        url = found.group(1)
    else:
        urls = [
            u.split(",", 1)[1].strip()
            for u in md.metadata("calib").get_all("Project-URL") or []
            if u.lower().startswith("repository,")
        ]
        if not urls:
            raise ValueError("the installed calib's metadata names no Repository URL")
        url = urls[0]
    match = _GITHUB.match(url)
    if match is None:
        raise ValueError(f"Repository URL {url!r} is not https://github.com/<owner>/<name> (Colab opens GitHub only)")
    return match.group(1)


def badge_url(repo: str, notebook: str) -> str:
    """The Colab address of ``notebooks/<notebook>`` on ``repo``'s main branch."""
    return f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{notebook}"


def bootstrap_source(repo: str) -> str:
    """The first code cell of every notebook: install calib from ``repo`` when the kernel lacks it,
    pinning the kernel's torch and torchvision so pip never replaces them (Colab's CUDA builds)."""
    return f"""{BOOTSTRAP_MARK} {_BOOT_COMMENT}
import importlib.metadata as md
import importlib.util
import subprocess
import sys
import tempfile

if importlib.util.find_spec("calib") is None:
    pins = [f"{{p}}=={{md.version(p)}}" for p in ("torch", "torchvision") if importlib.util.find_spec(p)]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("\\n".join(pins))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", constraints.name,
                    "calib @ git+https://github.com/{repo}"], check=True)"""


def _rebadge(text: str, repo: str) -> str:
    return BADGE_URL.sub(lambda m: badge_url(repo, Path(m.group(1)).name), text)


def sync_notebooks(repo: str | None = None, root: Path | None = None) -> list[Path]:
    """Rewrite the Colab badges and bootstrap cells of ``root/notebooks/*.ipynb`` and the README's badges
    for ``repo`` (default: :func:`repository`).  Returns the files changed."""
    root = Path(root or paths.repo_root() or Path.cwd())
    repo = repo or repository(root / "pyproject.toml")
    changed = []
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        book = nbformat.read(path, as_version=4)
        before = nbformat.writes(book)
        boots = [c for c in book.cells if c.cell_type == "code" and c.source.startswith(BOOTSTRAP_MARK)]
        if len(boots) != 1:
            raise ValueError(f"{path.name}: expected one code cell starting {BOOTSTRAP_MARK!r}, found {len(boots)}")
        boots[0].source = bootstrap_source(repo)
        for cell in book.cells:
            if cell.cell_type == "markdown":
                cell.source = _rebadge(cell.source, repo)
        if nbformat.writes(book) != before:
            nbformat.write(book, path)
            changed.append(path)
    readme = root / "README.md"
    if readme.is_file():
        text = readme.read_text()
        new = _rebadge(text, repo)
        if new != text:
            readme.write_text(new)
            changed.append(readme)
    log.info("Colab badges and bootstrap cells point at %s (%d files changed)", repo, len(changed))
    return changed
