"""Waterbirds, read exactly as the Stanford group-DRO / WILDS release lays it out.

Layout (``waterbird_complete95_forest2water2`` or WILDS ``waterbirds_v1.0``)::

    <root>/metadata.csv        img_id,img_filename,y,split,place,place_filename
    <root>/<img_filename>      e.g. 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg

``<root>`` may also be the folder the archive was extracted in, holding one of those two folders.
``y``: 1 = waterbird; ``place``: 1 = water; ``split``: 0 train, 1 val, 2 test; group g = 2*y + place.
The built-in toy benchmark (:mod:`calib.data.toy`) is written in this same layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from calib.core.hashing import file_hash
from calib.data.base import SPLITS, DatasetLayoutError, GroupDataset, SplitTable, find_layout_root

INNER_FOLDERS = ("waterbird_complete95_forest2water2", "waterbirds_v1.0")  # what the two archives extract to
COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
CLASS_NAMES = ["landbird", "waterbird"]
ATTR_NAMES = ["land", "water"]
GROUP_NAMES = ["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"]
SOURCE_HINT = (
    "Waterbirds comes from the group-DRO release (waterbird_complete95_forest2water2.tar.gz) or WILDS "
    "(waterbirds_v1.0); extract it so that <root>/metadata.csv and the class folders sit side by side. "
    "Or run `python -m calib data make-toy --root DIR` for the built-in toy benchmark in the same layout."
)


def _fail(root: Path, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"Waterbirds layout problem in {root}: {problem}\n"
        f"Expected {root}/metadata.csv with columns {','.join(COLUMNS)} (y, place in {{0,1}}, "
        f"split in {{0,1,2}}) and every image at {root}/<img_filename>.\n{SOURCE_HINT}"
    )


def read_metadata(root: Path) -> pd.DataFrame:
    """Read and validate ``metadata.csv``; raise :class:`DatasetLayoutError` on any problem."""
    root = Path(root)
    if not root.is_dir():
        raise _fail(root, "the folder does not exist")
    meta_path = root / "metadata.csv"
    if not meta_path.is_file():
        raise _fail(root, "metadata.csv is missing")
    try:
        df = pd.read_csv(meta_path)
    except Exception as err:  # pandas raises several parser errors
        raise _fail(root, f"metadata.csv cannot be parsed as CSV ({err})") from err
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise _fail(root, f"metadata.csv lacks column(s) {missing}; it has {list(df.columns)}")
    if df.empty:
        raise _fail(root, "metadata.csv has no rows")
    for col, allowed in (("y", {0, 1}), ("place", {0, 1}), ("split", {0, 1, 2})):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = df.loc[values.isna() | ~values.isin(allowed), col]
        if len(bad):
            row = int(bad.index[0]) + 2  # +1 header, +1 one-based
            raise _fail(root, f"column {col!r} has value {bad.iloc[0]!r} at line {row}; allowed {sorted(allowed)}")
        df[col] = values.astype(np.int64)
    if df["img_id"].duplicated().any():
        raise _fail(root, f"img_id {df.loc[df['img_id'].duplicated(), 'img_id'].iloc[0]!r} appears twice")
    if df["img_filename"].isna().any():
        raise _fail(root, f"img_filename is empty at line {int(df.index[df['img_filename'].isna()][0]) + 2}")
    return df


def missing_images(root: Path, df: pd.DataFrame) -> list[str]:
    """File names listed in the metadata that are not on disk."""
    return [f for f in df["img_filename"] if not (root / f).is_file()]


def load_waterbirds(root: Path, check_files: bool = True, name: str = "waterbirds") -> GroupDataset:
    """Load the Waterbirds split tables from ``root`` (see the module docstring for the layout).

    With ``check_files`` every listed image must exist; the first few missing ones are named.
    """
    root, layout = find_layout_root(root, "metadata.csv", INNER_FOLDERS)
    df = read_metadata(root)
    if check_files:
        missing = missing_images(root, df)
        if missing:
            raise _fail(root, f"{len(missing)} image(s) listed in metadata.csv are absent, e.g. {missing[:3]}")
    splits = {}
    for code, split in enumerate(SPLITS):
        part = df[df["split"] == code]
        y = part["y"].to_numpy(np.int64)
        a = part["place"].to_numpy(np.int64)
        splits[split] = SplitTable(
            paths=[root / f for f in part["img_filename"]],
            y=y,
            a=a,
            g=2 * y + a,
            ids=part["img_id"].to_numpy(np.int64),
        )
    return GroupDataset(
        name=name,
        root=root,
        class_names=list(CLASS_NAMES),
        attr_names=list(ATTR_NAMES),
        group_names=list(GROUP_NAMES),
        splits=splits,
        version=file_hash(root / "metadata.csv"),
        extra={"layout": layout},
    )
