"""Datasets: Waterbirds, CelebA, MetaShift and CheXpert readers, and the built-in toy benchmark.

:func:`load_dataset` is the one entry point: ``load_dataset("waterbirds", root)``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from calib.data.base import SPLITS, DatasetLayoutError, GroupDataset, SplitTable
from calib.data.celeba import load_celeba
from calib.data.chexpert import load_chexpert
from calib.data.metashift import load_metashift
from calib.data.toy import ToyConfig, make_toy_waterbirds
from calib.data.waterbirds import load_waterbirds

# name -> loader(root, check_files)
LOADERS = {
    "waterbirds": load_waterbirds,
    "celeba": load_celeba,
    "metashift": load_metashift,
    "chexpert": load_chexpert,  # attribute sex x race (12 groups)
    "chexpert-sex": partial(load_chexpert, name="chexpert-sex", attribute="sex"),
}


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
