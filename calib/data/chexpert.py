"""CheXpert "No Finding" with attribute sex x race (or sex only): the SubpopBench construction.

Layout (``CheXpert-v1.0-small``, registration required at the Stanford AIMI site)::

    <root>/train.csv, <root>/valid.csv     columns Path, Sex, "No Finding" (blank = 0), ...
    <root>/train/patientXXXXX/...jpg        Path is "CheXpert-v1.0-small/train/patient.../view1_frontal.jpg"
    <root>/CHEXPERT DEMO.csv (or .xlsx, or in the parent folder)   PATIENT, PRIMARY_RACE, ... (distributed separately)

``<root>`` may also be the parent holding ``CheXpert-v1.0-small/`` (the demographics table may sit there).
y = No Finding (1 vs blank / 0 / -1); sex from ``Sex`` (rows with another value are dropped); race
from ``PRIMARY_RACE``: White, Black or Other (any other value; patients without a record are
dropped).  Attribute ``a`` = 3 * sex + race (6 values, 12 groups) or sex only (``chexpert-sex``,
4 groups); g = n_attr * y + a.  Split: train and valid rows pooled, then a stratified (by group)
random split 75 / 10 / 15 with ``random_state=42`` (SubpopBench's rule).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from calib.data.base import DatasetLayoutError, GroupDataset, SplitTable, find_layout_root

INNER_FOLDER = "CheXpert-v1.0-small"  # what the archive extracts to; its parent is accepted as --root
RACES = ["White", "Black", "Other"]
SEXES = ["Female", "Male"]
DEMO_NAMES = ("CHEXPERT DEMO.csv", "CHEXPERT DEMO.xlsx")
HINT = (
    "CheXpert requires registration: request CheXpert-v1.0-small at https://stanfordaimi.azurewebsites.net/ and the "
    "demographics table (CHEXPERT DEMO.xlsx) from the same site; put train.csv, valid.csv, train/, valid/ and "
    "'CHEXPERT DEMO.csv' (or .xlsx) in one folder and pass it as --root."
)


def _strata(g: np.ndarray, test_size: float) -> np.ndarray | None:
    """``g`` when a split stratified by it is possible, else ``None`` (a plain random split).

    Stratifying needs every present group twice and both sides at least as large as the number of groups;
    the full dataset always qualifies, small subsets (fixtures, debugging cuts) may not.
    """
    _, counts = np.unique(g, return_counts=True)
    n_test = int(np.ceil(test_size * len(g)))
    if counts.min() < 2 or min(n_test, len(g) - n_test) < len(counts):
        return None
    return g


def _fail(root: Path, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"CheXpert layout problem in {root}: {problem}\n{HINT}")


def _read_demographics(root: Path) -> pd.DataFrame:
    for folder in (root, root.parent):
        for fname in DEMO_NAMES:
            path = folder / fname
            if path.is_file():
                if path.suffix == ".xlsx":
                    try:
                        return pd.read_excel(path)
                    except ImportError as err:
                        raise _fail(
                            root,
                            f"reading {path.name} needs openpyxl (pip install openpyxl), "
                            "or save it as 'CHEXPERT DEMO.csv'",
                        ) from err
                try:
                    return pd.read_csv(path)
                except (pd.errors.ParserError, UnicodeDecodeError) as err:
                    raise _fail(root, f"{path.name} cannot be parsed as CSV ({err})") from err
    raise _fail(root, f"the demographics table ({' or '.join(DEMO_NAMES)}) is missing")


def load_chexpert(
    root: Path, check_files: bool = True, name: str = "chexpert", attribute: str = "sex_race"
) -> GroupDataset:
    """Load CheXpert split tables; ``attribute`` is ``"sex_race"`` (12 groups) or ``"sex"`` (4 groups)."""
    root, layout = find_layout_root(root, "train.csv", (INNER_FOLDER,))
    if not root.is_dir():
        raise _fail(root, "the folder does not exist")
    frames = []
    for fname in ("train.csv", "valid.csv"):
        if not (root / fname).is_file():
            raise _fail(root, f"{fname} is missing")
        df = pd.read_csv(root / fname)
        missing = [c for c in ("Path", "Sex", "No Finding") if c not in df.columns]
        if missing:
            raise _fail(root, f"{fname} lacks column(s) {missing}")
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    demo = _read_demographics(root)
    if not {"PATIENT", "PRIMARY_RACE"} <= set(demo.columns):
        raise _fail(root, f"the demographics table needs columns PATIENT and PRIMARY_RACE; it has {list(demo.columns)}")
    df["patient"] = df["Path"].str.extract(r"(patient\d+)", expand=False)
    if df["patient"].isna().any():
        raise _fail(root, f"cannot read a patient id from Path {df.loc[df['patient'].isna(), 'Path'].iloc[0]!r}")
    race = demo.drop_duplicates("PATIENT").set_index("PATIENT")["PRIMARY_RACE"].astype(str)
    df["race_text"] = df["patient"].map(race)
    df = df[df["race_text"].notna() & df["Sex"].isin(SEXES)].reset_index(drop=True)
    if df.empty:
        raise _fail(root, "no row has both a Female/Male Sex and a demographics record")
    race_id = np.where(df["race_text"].str.contains("White"), 0, np.where(df["race_text"].str.contains("Black"), 1, 2))
    sex_id = (df["Sex"] == "Male").to_numpy().astype(np.int64)
    y = (pd.to_numeric(df["No Finding"], errors="coerce").fillna(0) == 1).to_numpy().astype(np.int64)
    if attribute == "sex_race":
        a, attr_names = sex_id * 3 + race_id, [f"{s}/{r}" for s in SEXES for r in RACES]
    elif attribute == "sex":
        a, attr_names = sex_id, list(SEXES)
    else:
        raise ValueError(f"attribute must be 'sex_race' or 'sex', not {attribute!r}")
    n_attr = len(attr_names)
    g = y * n_attr + a

    # Path starts with the release folder's own name ("CheXpert-v1.0-small/train/..."): drop it, so a
    # renamed folder still works
    paths = [root.joinpath(*Path(p).parts[1:]) for p in df["Path"]]
    if check_files:
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise _fail(root, f"{len(absent)} image(s) listed are absent, e.g. {absent[:2]}")
    idx = np.arange(len(df))
    rest, test = train_test_split(idx, test_size=0.15, random_state=42, stratify=_strata(g, 0.15))
    train, val = train_test_split(rest, test_size=0.10 / 0.85, random_state=42, stratify=_strata(g[rest], 0.10 / 0.85))
    splits = {}
    for split, part in (("train", np.sort(train)), ("val", np.sort(val)), ("test", np.sort(test))):
        splits[split] = SplitTable(
            paths=[paths[i] for i in part],
            y=y[part],
            a=a[part].astype(np.int64),
            g=g[part].astype(np.int64),
            ids=part.astype(np.int64),
        )
    h = hashlib.sha256()
    for fname in ("train.csv", "valid.csv"):
        h.update((root / fname).read_bytes())
    h.update(pd.util.hash_pandas_object(race, index=True).values.tobytes())
    return GroupDataset(
        name=name,
        root=root,
        class_names=["finding", "no finding"],
        attr_names=attr_names,
        group_names=[f"{c}/{an}" for c in ("finding", "no finding") for an in attr_names],
        splits=splits,
        version=h.hexdigest()[:16] + f"-{attribute}",
        extra={"layout": layout},
    )
