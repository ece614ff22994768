"""Datasets: the Waterbirds layout reader and the built-in toy benchmark.

:func:`load_dataset` is the one entry point: ``load_dataset("waterbirds", root)``.
"""
from __future__ import annotations

from pathlib import Path

from calib.data.base import SPLITS, DatasetLayoutError, GroupDataset, SplitTable
from calib.data.toy import ToyConfig, make_toy_waterbirds
from calib.data.waterbirds import load_waterbirds

# name -> loader(root, check_files) ; more datasets join here.
LOADERS = {"waterbirds": load_waterbirds}


def load_dataset(name: str, root: Path, check_files: bool = True) -> GroupDataset:
    """Load dataset ``name`` from ``root``; raise :class:`DatasetLayoutError` on a bad layout."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")
    return LOADERS[name](Path(root), check_files=check_files)


__all__ = [
    "SPLITS",
    "DatasetLayoutError",
    "GroupDataset",
    "SplitTable",
    "ToyConfig",
    "LOADERS",
    "load_dataset",
    "load_waterbirds",
    "make_toy_waterbirds",
]
