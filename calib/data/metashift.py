"""MetaShift cats vs dogs, indoor / outdoor (the SubpopBench construction).

Layout (``MetaShift-Cat-Dog-indoor-outdoor``)::

    <root>/train/cat/cat(indoor)/*.jpg     <root>/train/dog/dog(outdoor)/*.jpg
    <root>/test/cat/cat(outdoor)/*.jpg     <root>/test/dog/dog(indoor)/*.jpg

``<root>`` may also be its parent, SubpopBench's data folder holding ``MetaShift-Cat-Dog-indoor-outdoor/``.

y: cat = 1, dog = 0; a: indoor = 1, outdoor = 0; g = 2*y + a.

Split rule (explicit, as SubpopBench re-splits the folders): all images of the four folders are
pooled and sorted by relative path, permuted by ``numpy.random.default_rng(42)``; the first 25%
are test, the next 10% validation, the rest training.  (The fractions and seed follow
SubpopBench; the exact file lists are calib's own.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from calib.data.base import DatasetLayoutError, GroupDataset, SplitTable, find_layout_root

FOLDERS = {  # relative folder -> (y, a)
    "train/cat/cat(indoor)": (1, 1),
    "train/dog/dog(outdoor)": (0, 0),
    "test/cat/cat(outdoor)": (1, 0),
    "test/dog/dog(indoor)": (0, 1),
}
INNER_FOLDER = "MetaShift-Cat-Dog-indoor-outdoor"
SPLIT_SEED, TEST_FRACTION, VAL_FRACTION = 42, 0.25, 0.10
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CLASS_NAMES = ["dog", "cat"]
ATTR_NAMES = ["outdoor", "indoor"]
GROUP_NAMES = ["dog/outdoor", "dog/indoor", "cat/outdoor", "cat/indoor"]


def load_metashift(root: Path, check_files: bool = True, name: str = "metashift") -> GroupDataset:
    """Load MetaShift cats/dogs with calib's explicit re-split (see the module docstring)."""
    root, layout = find_layout_root(root, next(iter(FOLDERS)), (INNER_FOLDER,))
    hint = (
        f"Expected {root} to hold {', '.join(FOLDERS)} (MetaShift-Cat-Dog-indoor-outdoor, built by the MetaShift "
        f"repository's dataset_generation script, or as distributed by SubpopBench), or its parent holding "
        f"{INNER_FOLDER}/."
    )
    if not root.is_dir():
        raise DatasetLayoutError(f"MetaShift layout problem: {root} does not exist.\n{hint}")
    files, labels = [], []
    for folder, (y, a) in FOLDERS.items():
        d = root / folder
        if not d.is_dir():
            raise DatasetLayoutError(f"MetaShift layout problem in {root}: folder {folder!r} is missing.\n{hint}")
        found = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DatasetLayoutError(f"MetaShift layout problem in {root}: folder {folder!r} holds no images.\n{hint}")
        files += found
        labels += [(y, a)] * len(found)
    order = np.argsort([str(p.relative_to(root)) for p in files], kind="stable")
    files = [files[i] for i in order]
    lab = np.array(labels)[order]
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(files))
    n_test, n_val = int(round(TEST_FRACTION * len(files))), int(round(VAL_FRACTION * len(files)))
    parts = {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
    splits = {}
    for split in ("train", "val", "test"):
        idx = np.sort(parts[split])
        y, a = lab[idx, 0].astype(np.int64), lab[idx, 1].astype(np.int64)
        splits[split] = SplitTable(paths=[files[i] for i in idx], y=y, a=a, g=2 * y + a, ids=idx.astype(np.int64))
    version = hashlib.sha256("\n".join(str(p.relative_to(root)) for p in files).encode()).hexdigest()[:16]
    return GroupDataset(
        name=name,
        root=root,
        class_names=list(CLASS_NAMES),
        attr_names=list(ATTR_NAMES),
        group_names=list(GROUP_NAMES),
        splits=splits,
        version=version,
        extra={"layout": layout},
    )
