"""Dataset-independent containers: one table per split, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calib.core.checks import check_labels

SPLITS: tuple[str, ...] = ("train", "val", "test")


class DatasetLayoutError(ValueError):
    """The files on disk do not have the layout the loader expects.  The message says which."""


def find_layout_root(root: Path, marker: str, inner: tuple[str, ...]) -> tuple[Path, str]:
    """The dataset folder for a ``root`` given by a user: ``root`` itself when ``root/marker`` exists, else
    ``root/<name>`` for the first of the release's folder names ``inner`` (what its archive extracts to)
    that holds ``marker``.  Returns the folder and a one-line description of the layout found; when
    neither matches, ``root`` unchanged (the loader then says what is missing).
    """
    root = Path(root).resolve()
    if (root / marker).exists():
        return root, f"dataset folder given directly ({root.name}/{marker})"
    for name in inner:
        if (root / name / marker).exists():
            return root / name, f"parent folder given: using {name}/ inside it"
    return root, "no known layout found"


@dataclass
class SplitTable:
    """One split of a group-labelled image dataset.

    Arrays have length ``n``: ``y`` class ids, ``a`` spurious-attribute ids, ``g`` group ids,
    ``ids`` stable image ids; ``paths`` are absolute image paths.
    """

    paths: list[Path]
    y: np.ndarray
    a: np.ndarray
    g: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class GroupDataset:
    """A dataset with classes ``y``, a spurious attribute ``a`` and groups ``g``."""

    name: str
    root: Path
    class_names: list[str]
    attr_names: list[str]
    group_names: list[str]
    splits: dict[str, SplitTable]
    version: str  # hash of the metadata files: part of every feature-cache key
    extra: dict = field(default_factory=dict)  # e.g. "layout": which on-disk layout the reader found

    def __post_init__(self) -> None:
        # an empty split is never a dataset a method can use: stop where it is read
        for split, table in self.splits.items():
            if len(table.y) == 0:
                raise DatasetLayoutError(f"dataset {self.name!r} at {self.root}: the {split} split has no rows")

    def check(self, allow_partial: bool = False) -> dict[str, dict[str, list[int]]]:
        """Raise :class:`~calib.core.checks.InputCheckError` if a split lacks a class or group of the training
        split, or has labels it never shows (:func:`calib.core.checks.check_labels`; ``allow_partial``: report)."""
        return check_labels(
            {s: (t.y, t.g) for s, t in self.splits.items()},
            f"dataset {self.name!r} at {self.root}",
            self.class_names,
            self.group_names,
            allow_partial=allow_partial,
        )

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    def group_counts(self) -> dict[str, list[int]]:
        """Per split, the number of images in each group (index = group id)."""
        return {s: np.bincount(t.g, minlength=self.n_groups).tolist() for s, t in self.splits.items()}

    def undecodable(self, progress: bool = True) -> list[tuple[Path, str]]:
        """Decode every image of every split (as feature extraction will); ``(path, reason)`` for each failure."""
        from PIL import Image

        from calib.core.logs import progress as tqdm

        files = [p for t in self.splits.values() for p in t.paths]
        bad = []
        for path in tqdm(files, desc=f"decoding {self.name}", unit="img", mininterval=1, disable=not progress):
            try:
                with Image.open(path) as im:
                    im.load()
                    im.convert("RGB")
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
                bad.append((path, f"{type(err).__name__}: {err}"))
        return bad
