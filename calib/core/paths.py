"""Where calib reads and writes.  Never relative to the working directory.

Every location can be overridden with an environment variable; otherwise it lives under
``CALIB_HOME``, which defaults to the repository root for a source checkout (so
``./run_all.sh`` keeps everything next to the code) and to ``~/.calib`` for an installed package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the calib package folder (this file is calib/core/paths.py)


def repo_root() -> Path | None:
    """The source checkout holding this package, or None when calib is installed elsewhere."""
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir():
        return root
    return None


class NotAFolderError(ValueError):
    """A location calib keeps files in (``CALIB_HOME``, ``CALIB_DATA_DIR``, ...) is an existing file."""


def _env_path(var: str, default: Callable[[], Path]) -> Path:
    """``$var`` (``~`` expanded, made absolute) or ``default()``; the default is only computed when the variable is
    unset, so a bad ``CALIB_HOME`` does not matter once every location is set on its own."""
    value = os.environ.get(var)
    path = Path(value).expanduser().resolve() if value else default()
    # a file where a folder belongs would otherwise surface much later as NotADirectoryError deep in a mkdir
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        source = f"{var}={value}" if value else f"{path} (the default {var})"
        where = "is a file" if existing == path else f"lies inside {existing}, which is a file"
        raise NotAFolderError(f"{source} {where}; it must be a folder (calib keeps its files there)")
    return path


def home() -> Path:
    """Base folder for data, caches, results and figures (``CALIB_HOME``)."""
    return _env_path("CALIB_HOME", lambda: repo_root() or Path.home() / ".calib")


def data_dir() -> Path:
    """Datasets (``CALIB_DATA_DIR``); the toy benchmark is written to ``data_dir()/toy_waterbirds``."""
    return _env_path("CALIB_DATA_DIR", lambda: home() / "data")


def cache_dir() -> Path:
    """Feature caches and trained toy models (``CALIB_CACHE_DIR``)."""
    return _env_path("CALIB_CACHE_DIR", lambda: home() / ".cache")


def results_dir() -> Path:
    """Append-only JSONL result rows (``CALIB_RESULTS_DIR``)."""
    return _env_path("CALIB_RESULTS_DIR", lambda: home() / "results")


def figures_dir() -> Path:
    """Figures as PDF and PNG (``CALIB_FIGURES_DIR``)."""
    return _env_path("CALIB_FIGURES_DIR", lambda: home() / "figures")
