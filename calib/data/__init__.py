"""Stage 1, data: the Waterbirds, CelebA, MetaShift and CheXpert readers, the built-in toy benchmark, downloads.

:func:`prepare_dataset` loads any dataset by name (making the toy first if needed); :func:`load_dataset` reads a
real one from a folder: ``load_dataset("waterbirds", root)``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from calib.core import paths
from calib.data.base import SPLITS, DatasetLayoutError, GroupDataset, SplitTable
from calib.data.celeba import load_celeba
from calib.data.metashift import load_metashift
from calib.data.toy import ToyConfig, make_toy_waterbirds
from calib.data.waterbirds import load_waterbirds


def load_chexpert(root: Path, check_files: bool = True, **kwargs: Any) -> GroupDataset:
    """:func:`calib.data.chexpert.load_chexpert`, imported when called: it needs scikit-learn, whose import alone
    takes a second, and ``python -m calib data check`` of any other dataset should not pay for it."""
    from calib.data.chexpert import load_chexpert as load

    return load(root, check_files=check_files, **kwargs)


# name -> loader(root, check_files)
LOADERS = {
    "waterbirds": load_waterbirds,
    "celeba": load_celeba,
    "metashift": load_metashift,
    "chexpert": load_chexpert,  # attribute sex x race (12 groups)
    "chexpert-sex": partial(load_chexpert, name="chexpert-sex", attribute="sex"),
}
TOY_DATASETS: dict[str, ToyConfig] = {"toy": ToyConfig(), "toy-quick": ToyConfig(scale=0.04)}


def known_datasets() -> list[str]:
    """Every dataset name :func:`prepare_dataset` and :func:`load_dataset` accept: the real ones and the toys."""
    return sorted([*LOADERS, *TOY_DATASETS])


def _check_name(name: str) -> None:
    if name not in LOADERS and name not in TOY_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known_datasets())}")


def _check_folder(root: Path) -> None:
    """A dataset root that is an existing file gets one clear message instead of NotADirectoryError from deep
    inside a loader (or a misleading "the folder does not exist")."""
    if root.exists() and not root.is_dir():
        raise DatasetLayoutError(f"dataset root {root} is a file; it must be a folder")


def default_root(dataset: str) -> Path:
    """Where a dataset lives by default: ``<CALIB_DATA_DIR>/<folder>``."""
    folder = {"toy": "toy_waterbirds", "toy-quick": "toy_waterbirds_quick"}.get(dataset, dataset)
    return paths.data_dir() / folder


def prepare_dataset(dataset: str, root: str | Path | None = None) -> GroupDataset:
    """Load ``dataset`` (making the toy benchmark first if needed)."""
    _check_name(dataset)
    root = Path(root) if root else default_root(dataset)
    _check_folder(root)
    if dataset in TOY_DATASETS:
        make_toy_waterbirds(root, TOY_DATASETS[dataset])
        return load_waterbirds(root, name=dataset)
    return load_dataset(dataset, root)


def load_dataset(name: str, root: Path, check_files: bool = True) -> GroupDataset:
    """Load dataset ``name`` from ``root``; raise :class:`DatasetLayoutError` on a bad layout.  A toy name reads
    a toy benchmark already written there (Waterbirds layout; :func:`prepare_dataset` writes one)."""
    _check_name(name)
    _check_folder(Path(root))
    if name in TOY_DATASETS:
        return load_waterbirds(Path(root), check_files=check_files, name=name)
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
    "known_datasets",
    "load_dataset",
    "prepare_dataset",
    "load_waterbirds",
    "make_toy_waterbirds",
]
