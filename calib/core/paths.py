"""Where calib reads and writes.  Never relative to the working directory.

Every location can be overridden with an environment variable; otherwise it lives under
``CALIB_HOME``, which defaults to the repository root for a source checkout (so
``./run_all.sh`` keeps everything next to the code) and to ``~/.calib`` for an installed package.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the calib package folder (this file is calib/core/paths.py)


def repo_root() -> Path | None:
    """The source checkout holding this package, or None when calib is installed elsewhere."""
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir():
        return root
    return None


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


def home() -> Path:
    """Base folder for data, caches, results and figures (``CALIB_HOME``)."""
    return _env_path("CALIB_HOME", repo_root() or Path.home() / ".calib")


def data_dir() -> Path:
    """Datasets (``CALIB_DATA_DIR``); the toy benchmark is written to ``data_dir()/toy_waterbirds``."""
    return _env_path("CALIB_DATA_DIR", home() / "data")


def cache_dir() -> Path:
    """Feature caches and trained toy models (``CALIB_CACHE_DIR``)."""
    return _env_path("CALIB_CACHE_DIR", home() / ".cache")


def results_dir() -> Path:
    """Append-only JSONL result rows (``CALIB_RESULTS_DIR``)."""
    return _env_path("CALIB_RESULTS_DIR", home() / "results")


def figures_dir() -> Path:
    """Figures as PDF and PNG (``CALIB_FIGURES_DIR``)."""
    return _env_path("CALIB_FIGURES_DIR", home() / "figures")
