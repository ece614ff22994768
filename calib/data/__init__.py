"""Stage 1, data: the Waterbirds, CelebA, MetaShift and CheXpert readers, the built-in toy benchmark, downloads.

:func:`prepare_dataset` loads any dataset by name (making the toy first if needed); :func:`load_dataset` reads a
real one from a folder: ``load_dataset("waterbirds", root)``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from calib.core import paths
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
TOY_DATASETS: dict[str, ToyConfig] = {"toy": ToyConfig(), "toy-quick": ToyConfig(scale=0.04)}


def default_root(dataset: str) -> Path:
    """Where a dataset lives by default: ``<CALIB_DATA_DIR>/<folder>``."""
    folder = {"toy": "toy_waterbirds", "toy-quick": "toy_waterbirds_quick"}.get(dataset, dataset)
    return paths.data_dir() / folder


def prepare_dataset(dataset: str, root: str | Path | None = None) -> GroupDataset:
    """Load ``dataset`` (making the toy benchmark first if needed)."""
    root = Path(root) if root else default_root(dataset)
    if dataset in TOY_DATASETS:
        make_toy_waterbirds(root, TOY_DATASETS[dataset])
        return load_waterbirds(root, name=dataset)
    return load_dataset(dataset, root)


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
    "TOY_DATASETS",
    "default_root",
    "load_dataset",
    "prepare_dataset",
    "load_waterbirds",
    "make_toy_waterbirds",
]
