"""Group-robustness metrics, defined once (see ../shared/docs/method.md, "Metrics").

- ``wga``            worst-group accuracy: min over groups present of accuracy within the group
- ``avg_acc``        plain accuracy over all samples
- ``avg_acc_trainw`` group accuracies weighted by the *training-set* group proportions
                     (the Waterbirds convention of DFR / JTT / CFR)
- ``group_acc``      per-group accuracy (NaN for a group with no sample)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRIC_LABELS = {
    "wga": "worst-group acc.",
    "avg_acc": "avg. acc. (plain)",
    "avg_acc_trainw": "avg. acc. (train-group-weighted)",
    "worst_class_acc": "worst-class acc.",
}


def group_accuracy(pred: np.ndarray, y: np.ndarray, g: np.ndarray, n_groups: int) -> np.ndarray:
    """Accuracy within each group, shape ``[n_groups]``; NaN where a group has no sample."""
    pred, y, g = np.asarray(pred), np.asarray(y), np.asarray(g)
    if not (pred.shape == y.shape == g.shape):
        raise ValueError(f"pred, y, g must have one shape; got {pred.shape}, {y.shape}, {g.shape}")
    correct = np.bincount(g, weights=(pred == y).astype(float), minlength=n_groups)
    counts = np.bincount(g, minlength=n_groups).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)


def worst_group_accuracy(pred: np.ndarray, y: np.ndarray, g: np.ndarray, n_groups: int) -> float:
    """Minimum over the groups present of the within-group accuracy."""
    return float(np.nanmin(group_accuracy(pred, y, g, n_groups)))


def worst_class_accuracy(pred: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """Minimum over the classes present of the within-class accuracy (needs no group label)."""
    return worst_group_accuracy(pred, y, y, n_classes)


@dataclass
class Evaluation:
    """All metrics of one prediction on one split."""

    wga: float
    avg_acc: float
    avg_acc_trainw: float
    worst_class_acc: float
    group_acc: list[float]
    group_n: list[int]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def evaluate(
    pred: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    n_groups: int,
    n_classes: int,
    train_group_counts: np.ndarray | list[int] | None = None,
) -> Evaluation:
    """Every metric for predictions ``pred`` (shape ``[n]``) against labels ``y`` and groups ``g``.

    ``train_group_counts`` (shape ``[n_groups]``) gives the weights of ``avg_acc_trainw``; when
    absent it falls back to the evaluated split's own group counts (then it equals ``avg_acc``).
    Groups absent from the evaluated split are left out of the weighting.
    """
    accs = group_accuracy(pred, y, g, n_groups)
    counts = np.bincount(np.asarray(g), minlength=n_groups)
    weights = np.asarray(train_group_counts if train_group_counts is not None else counts, dtype=float)
    present = ~np.isnan(accs)
    trainw = float(np.sum(accs[present] * weights[present]) / np.sum(weights[present]))
    return Evaluation(
        wga=float(np.nanmin(accs)),
        avg_acc=float(np.mean(np.asarray(pred) == np.asarray(y))),
        avg_acc_trainw=trainw,
        worst_class_acc=worst_class_accuracy(pred, y, n_classes),
        group_acc=[float(v) for v in accs],
        group_n=[int(c) for c in counts],
    )


def mean_std(values: list[float] | np.ndarray) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count."""
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std, int(arr.size)


def format_mean_std(values: list[float] | np.ndarray, scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± std"`` in percent by default, e.g. ``"71.3 ± 2.0"``."""
    m, s, _ = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"
