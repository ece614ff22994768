"""Checks on labels and features where they enter calib (a dataset reader, an npz, a feature set before a method).

Nothing is computed on data that cannot give a meaningful number: a split with no sample, a validation or test split
that lacks a class or group the training split has (worst-group accuracy would be taken over the groups present, and
model selection with it), labels that the training split never shows, or a feature row so large that it dominates
every fit.  Each failed check raises one :class:`InputCheckError` naming the source, the split and the values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

NORM_RATIO = 1000.0  # a row whose norm is this many times its split's median row norm is a corrupt row


class InputCheckError(ValueError):
    """Labels or features that no method can give a meaningful number on; the message says where and what."""


def _names(ids: Sequence[int], names: Sequence[str] | None) -> str:
    ids = [int(i) for i in ids]
    if names is None:
        return str(ids)
    return ", ".join(f"{i} ({names[i]})" if 0 <= i < len(names) else str(i) for i in ids)


def check_labels(
    labels: Mapping[str, tuple[np.ndarray, np.ndarray]],
    source: str,
    class_names: Sequence[str] | None = None,
    group_names: Sequence[str] | None = None,
    allow_partial: bool = False,
) -> dict[str, dict[str, list[int]]]:
    """Check the labels of every split: ``labels`` maps a split to ``(y [n], g [n])``.

    - every split holds samples;
    - the reference split (``train``, else ``val``) holds at least two classes;
    - every class and every group of the reference split is present in each other split;
    - every other split's classes and groups lie in the reference split's.

    With ``allow_partial`` the third check only reports: the return value maps each split to its missing
    ``classes`` and ``groups`` (record it with the result), and the worst group is then taken over the groups
    present.  Without it, a missing class or group raises.  The other checks always raise.
    """
    for split, (y, _) in labels.items():
        if len(y) == 0:
            raise InputCheckError(f"{source}: the {split} split is empty; every split needs samples")
    if not labels:
        raise InputCheckError(f"{source}: no split at all")
    ref = "train" if "train" in labels else ("val" if "val" in labels else next(iter(labels)))
    ref_y, ref_g = (np.unique(np.asarray(a)) for a in labels[ref])
    if len(ref_y) < 2:
        raise InputCheckError(
            f"{source}: the {ref} split holds only class {_names(ref_y, class_names)}; a classifier needs two"
        )
    partial: dict[str, dict[str, list[int]]] = {}
    for split, (y, g) in labels.items():
        if split == ref:
            continue
        have_y, have_g = np.unique(np.asarray(y)), np.unique(np.asarray(g))
        extra_y, extra_g = np.setdiff1d(have_y, ref_y), np.setdiff1d(have_g, ref_g)
        if len(extra_y) or len(extra_g):
            what = [f"class(es) {_names(extra_y, class_names)}"] if len(extra_y) else []
            what += [f"group(s) {_names(extra_g, group_names)}"] if len(extra_g) else []
            raise InputCheckError(
                f"{source}: the {split} split has {' and '.join(what)} that the {ref} split never shows"
            )
        miss_y, miss_g = np.setdiff1d(ref_y, have_y), np.setdiff1d(ref_g, have_g)
        if len(miss_y) or len(miss_g):
            if not allow_partial:
                what = [f"class(es) {_names(miss_y, class_names)}"] if len(miss_y) else []
                what += [f"group(s) {_names(miss_g, group_names)}"] if len(miss_g) else []
                raise InputCheckError(
                    f"{source}: the {split} split lacks {' and '.join(what)} of the {ref} split, so its worst-group "
                    "accuracy (and any selection by it) would silently skip them. Fix the split, or allow a partial "
                    "evaluation on purpose (allow_partial=True; the row records what was missing)"
                )
            partial[split] = {"classes": miss_y.tolist(), "groups": miss_g.tolist()}
    return partial


def check_norms(arrays: Mapping[str, np.ndarray | None], source: str, ratio: float = NORM_RATIO) -> None:
    """Raise when a row of a feature array is ``ratio`` times longer than its array's median row.

    ``arrays`` maps a name (``"train z"``) to ``[n, d]`` features (None: skipped).  One such row (1e30 in a
    training split) turns every fit into predicting the majority class, without any error.
    """
    for name, x in arrays.items():
        if x is None or len(x) == 0:
            continue
        norms = np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)
        median = float(np.median(norms))
        bad = np.flatnonzero(norms > ratio * max(median, np.finfo(np.float64).tiny))
        if len(bad):
            raise InputCheckError(
                f"{source}: {len(bad)} {name} row(s) have a norm over {ratio:g}x the split's median "
                f"{median:.3g} (rows {bad[:5].tolist()}, largest {norms[bad].max():.3g}); such a row dominates "
                "every fit. Remove or re-extract them"
            )
