"""CelebA (y = Blond_Hair, a = Male), in either of the two layouts people have on disk.

1. Original text files (Google Drive release)::

       <root>/list_attr_celeba.txt      line 1: image count; line 2: the 40 attribute names;
                                        then "<file> v1 ... v40" with values -1/1, separated by spaces
       <root>/list_eval_partition.txt   "<file> <split>", split 0 train / 1 val / 2 test
       <root>/img_align_celeba/<file>

2. Kaggle CSVs::

       <root>/list_attr_celeba.csv      image_id + 40 attribute columns, values -1/1
       <root>/list_eval_partition.csv   image_id,partition
       <root>/img_align_celeba/[img_align_celeba/]<file>

Group g = 2*y + a: dark-haired women, dark-haired men, blond women, blond men (the smallest).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from calib.data.base import SPLITS, DatasetLayoutError, GroupDataset, SplitTable, find_layout_root

TARGET, SPURIOUS = "Blond_Hair", "Male"
INNER_FOLDERS = ("celeba", "CelebA", "celeba-dataset")  # folder names the archives extract to
CLASS_NAMES = ["person with dark hair", "person with blond hair"]
ATTR_NAMES = ["female", "male"]
GROUP_NAMES = ["dark hair/female", "dark hair/male", "blond/female", "blond/male"]
SOURCE_HINT = (
    "CelebA comes from the authors' page (mmlab.ie.cuhk.edu.hk/projects/CelebA.html: Anno/list_attr_celeba.txt, "
    "Eval/list_eval_partition.txt, Img/img_align_celeba.zip) or Kaggle (jessicali9530/celeba-dataset); "
    "put the files side by side in one folder."
)


def _fail(root: Path, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"CelebA layout problem in {root}: {problem}\nExpected either list_attr_celeba.txt + list_eval_partition.txt "
        f"(original) or list_attr_celeba.csv + list_eval_partition.csv (Kaggle), with images in img_align_celeba/ "
        f"(Kaggle: possibly img_align_celeba/img_align_celeba/).\n{SOURCE_HINT}"
    )


def _read_original(root: Path) -> tuple[pd.DataFrame, pd.Series]:
    attr_path, part_path = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    with open(attr_path) as f:
        first = f.readline().strip()
        names = f.readline().split()
    if not first.isdigit():
        raise _fail(root, f"list_attr_celeba.txt line 1 should be the image count, got {first[:40]!r}")
    if len(names) != 40:
        raise _fail(root, f"list_attr_celeba.txt line 2 should list 40 attribute names, got {len(names)}")
    attrs = pd.read_csv(attr_path, sep=r"\s+", skiprows=2, header=None, names=["image_id", *names], engine="python")
    if len(attrs) != int(first):
        raise _fail(root, f"list_attr_celeba.txt announces {first} images but lists {len(attrs)}")
    part = pd.read_csv(part_path, sep=r"\s+", header=None, names=["image_id", "partition"], engine="python")
    return attrs, part.set_index("image_id")["partition"]


def _read_kaggle(root: Path) -> tuple[pd.DataFrame, pd.Series]:
    attrs = pd.read_csv(root / "list_attr_celeba.csv")
    part = pd.read_csv(root / "list_eval_partition.csv")
    for col, frame, name in (
        ("image_id", attrs, "list_attr_celeba.csv"),
        ("partition", part, "list_eval_partition.csv"),
    ):
        if col not in frame.columns:
            raise _fail(root, f"{name} lacks column {col!r}; it has {list(frame.columns)[:5]}...")
    return attrs, part.set_index("image_id")["partition"]


def _image_dir(root: Path) -> Path:
    nested = root / "img_align_celeba" / "img_align_celeba"
    return nested if nested.is_dir() else root / "img_align_celeba"


def load_celeba(root: Path, check_files: bool = True, name: str = "celeba") -> GroupDataset:
    """Load CelebA split tables (either layout); raise :class:`DatasetLayoutError` on any problem."""
    root, layout = find_layout_root(root, "list_eval_partition.txt", INNER_FOLDERS)
    if layout.startswith("no known"):
        root, layout = find_layout_root(root, "list_eval_partition.csv", INNER_FOLDERS)
    if not root.is_dir():
        raise _fail(root, "the folder does not exist")
    if (root / "list_attr_celeba.txt").is_file() and (root / "list_eval_partition.txt").is_file():
        attrs, part = _read_original(root)
        meta_files = [root / "list_attr_celeba.txt", root / "list_eval_partition.txt"]
    elif (root / "list_attr_celeba.csv").is_file() and (root / "list_eval_partition.csv").is_file():
        attrs, part = _read_kaggle(root)
        meta_files = [root / "list_attr_celeba.csv", root / "list_eval_partition.csv"]
    else:
        raise _fail(root, "neither the original .txt pair nor the Kaggle .csv pair of annotation files is present")
    for col in (TARGET, SPURIOUS):
        if col not in attrs.columns:
            raise _fail(root, f"attribute {col!r} is missing from the attribute table")
        bad = attrs.loc[~attrs[col].isin([-1, 1]), col]
        if len(bad):
            raise _fail(
                root,
                f"attribute {col!r} has value {bad.iloc[0]!r} for {attrs.loc[bad.index[0], 'image_id']}; "
                "allowed -1 / 1",
            )
    missing_part = attrs.loc[~attrs["image_id"].isin(part.index), "image_id"]
    if len(missing_part):
        raise _fail(root, f"{len(missing_part)} image(s) have attributes but no partition, e.g. {missing_part.iloc[0]}")
    split_code = part.loc[attrs["image_id"]].to_numpy()
    if not np.isin(split_code, [0, 1, 2]).all():
        raise _fail(root, f"partition values must be 0/1/2, found {sorted(set(split_code.tolist()) - {0, 1, 2})}")
    images = _image_dir(root)
    if check_files:
        if not images.is_dir():
            raise _fail(root, f"image folder {images} is missing")
        absent = [f for f in attrs["image_id"] if not (images / f).is_file()]
        if absent:
            raise _fail(root, f"{len(absent)} image(s) listed are absent from {images}, e.g. {absent[:3]}")
    y = (attrs[TARGET].to_numpy() == 1).astype(np.int64)
    a = (attrs[SPURIOUS].to_numpy() == 1).astype(np.int64)
    ids = np.arange(1, len(attrs) + 1)  # 1-based row order of the attribute table
    splits = {}
    for code, split in enumerate(SPLITS):
        m = split_code == code
        splits[split] = SplitTable(
            paths=[images / f for f in attrs["image_id"][m]], y=y[m], a=a[m], g=2 * y[m] + a[m], ids=ids[m]
        )
    h = hashlib.sha256()
    for f in meta_files:
        h.update(f.read_bytes())
    return GroupDataset(
        name=name,
        root=root,
        class_names=list(CLASS_NAMES),
        attr_names=list(ATTR_NAMES),
        group_names=list(GROUP_NAMES),
        splits=splits,
        version=h.hexdigest()[:16],
        extra={"layout": ("original" if meta_files[0].suffix == ".txt" else "kaggle") + f"; {layout}"},
    )
