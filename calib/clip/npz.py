"""Bring your own embeddings: the npz layout of the DFR authors' saved embeddings.

Keys: ``embeddings_{split}`` (float ``[n, d]``), ``y_{split}`` and ``g_{split}`` (integer ``[n]``)
for ``split`` in train / val / test.  ``train`` may be absent (then only methods that do not
need training data run, e.g. DFR with ``scaler="val"``).  No text prototypes are stored, so
methods that use the zero-shot head or pre-projection features cannot run on an npz.

:func:`export_npz` writes calib's cached features in this layout.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from calib.clip.features import FeatureSet, SplitFeatures
from calib.core.checks import InputCheckError, check_labels, check_norms
from calib.core.files import atomic_write_bytes
from calib.core.hashing import file_hash

REQUIRED_SPLITS = ("val", "test")


class EmbeddingsFileError(ValueError):
    """The npz does not have the expected keys, shapes or dtypes; the message says which."""


def _fail(path: Path, problem: str) -> EmbeddingsFileError:
    return EmbeddingsFileError(
        f"{path}: {problem}\nExpected keys embeddings_<split> (float, [n, d]), y_<split> and g_<split> "
        f"(integer, [n]) for <split> in train (optional), val, test."
    )


def load_npz(path: Path, allow_partial: bool = False) -> FeatureSet:
    """Read and validate an embeddings npz into a :class:`FeatureSet` (no ``h``, no text head).

    Besides keys, shapes and dtypes, the labels and rows are checked (:mod:`calib.core.checks`); with
    ``allow_partial`` a split may lack a class or group of the training split (pass it to the method run too)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsFileError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # numpy would talk about pickles for a text file renamed .npz
        with open(path, "rb") as f:
            head = f.read(16)
        raise _fail(path, f"is not an npz archive (an npz is a zip file; this one starts with {head!r})")
    try:
        data = dict(np.load(path, allow_pickle=False))
    except Exception as err:
        raise _fail(path, f"cannot be read as an npz archive ({err})") from err
    splits, dim = {}, None
    for split in ("train", "val", "test"):
        keys = [f"embeddings_{split}", f"y_{split}", f"g_{split}"]
        present = [k in data for k in keys]
        if not any(present):
            if split in REQUIRED_SPLITS:
                raise _fail(path, f"split {split!r} is missing (no {', '.join(keys)})")
            continue
        if not all(present):
            raise _fail(path, f"split {split!r} lacks {[k for k, p in zip(keys, present) if not p]}")
        x, y, g = (data[k] for k in keys)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
            raise _fail(path, f"embeddings_{split} must be a 2-D float array; got shape {x.shape}, dtype {x.dtype}")
        for name, arr in ((f"y_{split}", y), (f"g_{split}", g)):
            if arr.ndim != 1 or len(arr) != len(x):
                raise _fail(path, f"{name} must be 1-D with {len(x)} entries; got shape {arr.shape}")
            if not np.issubdtype(arr.dtype, np.integer):
                raise _fail(path, f"{name} must hold integers; got dtype {arr.dtype}")
            if len(arr) and arr.min() < 0:
                raise _fail(path, f"{name} has negative labels")
        if not np.isfinite(x).all():
            rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise _fail(
                path, f"embeddings_{split} holds NaN or infinity in {len(rows)} row(s), first {rows[:5].tolist()}"
            )
        if dim is not None and x.shape[1] != dim:
            raise _fail(path, f"embeddings_{split} has {x.shape[1]} dims, other splits {dim}")
        dim = x.shape[1]
        splits[split] = SplitFeatures(z=x.astype(np.float32), y=y.astype(np.int64), g=g.astype(np.int64))
    try:  # where the embeddings enter: empty splits, missing groups, labels the training split never shows
        check_labels({s: (f.y, f.g) for s, f in splits.items()}, str(path), allow_partial=allow_partial)
        check_norms({f"embeddings_{s}": f.z for s, f in splits.items()}, str(path))
    except InputCheckError as err:
        raise EmbeddingsFileError(str(err)) from None
    n_classes = int(max(s.y.max() for s in splits.values())) + 1
    n_groups = int(max(s.g.max() for s in splits.values())) + 1
    return FeatureSet(
        splits=splits,
        text=None,
        logit_scale=1.0,
        n_groups=n_groups,
        class_names=[f"class{c}" for c in range(n_classes)],
        group_names=[f"group{k}" for k in range(n_groups)],
        meta={
            "dataset": path.stem,
            "model": "npz",
            "pretrained": str(path),
            "weights": file_hash(path),
            "dataset_version": file_hash(path),
            "device": "cpu",
            "source": str(path),
        },
    )


def export_npz(features: FeatureSet, path: Path) -> Path:
    """Write ``features``' final embeddings and labels in the DFR npz layout (atomically)."""
    arrays = {}
    for split, f in features.splits.items():
        arrays[f"embeddings_{split}"] = f.z.astype(np.float32)
        arrays[f"y_{split}"] = f.y.astype(np.int64)
        arrays[f"g_{split}"] = f.g.astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
