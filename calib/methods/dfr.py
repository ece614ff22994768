"""DFR (Kirichenko et al., 2023): last-layer retraining on group-balanced validation data.

The exact published protocol (PolinaKirichenko/deep_feature_reweighting), on CLIP embeddings ``z``:

1. Tuning: shuffle the validation set and split it in halves; group-balance the first half (keep
   the smallest group's count from every group, chosen at random); fit a ``StandardScaler`` on that
   balanced half; for each C in the grid fit an L1 logistic regression (liblinear) and score it by
   worst-group accuracy on the other, unbalanced half; keep the best C (the first in grid order on
   ties, as ``np.argmax`` does).
2. Final: ``n_retrains`` fits, each on a fresh group-balanced subsample of the whole validation
   set, standardised by a scaler fit on the training embeddings (``scaler="train"``, the original
   repository) or on the validation embeddings (``scaler="val"``, the authors' newer repository);
   average coefficients and intercepts; predict.

The originals never seed numpy; here every draw comes from ``default_rng(seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from calib.clip.features import FeatureSet, SplitFeatures
from calib.core.metrics import worst_group_accuracy
from calib.methods.base import Method, option, register

C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


def l1_logistic(C: float, rng: np.random.Generator) -> LogisticRegression:
    """L1-penalised logistic regression with liblinear (``l1_ratio=1``: sklearn >= 1.8 spelling).

    liblinear shuffles coordinates; its seed is drawn from ``rng`` (the originals left it unseeded).
    """
    return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", random_state=int(rng.integers(2**31 - 1)))


def fit_l1(
    C: float, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, n_classes: int, what: str = "fit"
) -> tuple[np.ndarray, np.ndarray]:
    """Fit :func:`l1_logistic`; returns ``coef`` ``[1, d]`` (two classes) or ``[n_classes, d]``, and ``intercept``.

    More than two classes are fit one-vs-rest, which is what liblinear did inside ``LogisticRegression``
    when DFR was published (sklearn >= 1.8 refuses multiclass liblinear).  Raises ``ValueError`` when
    ``y`` lacks a class: DFR's balanced subsets of a tiny validation set can.
    """
    present = np.unique(y)
    if len(present) < n_classes:
        raise ValueError(
            f"DFR: the {what} subset ({len(y)} validation samples) holds only class(es) "
            f"{present.tolist()} of {n_classes}; the validation split is too small for DFR's "
            "protocol (it halves the validation set, then group-balances each half)"
        )
    clf = l1_logistic(C, rng)
    if n_classes == 2:
        clf.fit(x, y)
        return clf.coef_, clf.intercept_
    ovr = OneVsRestClassifier(clf).fit(x, y)
    return (np.vstack([e.coef_ for e in ovr.estimators_]), np.concatenate([e.intercept_ for e in ovr.estimators_]))


def linear_scores(x: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Class scores ``[n, n_classes]`` of a :func:`fit_l1` model (binary: ``[-s/2, s/2]``)."""
    s = x @ coef.T + intercept
    if s.shape[1] == 1:  # binary: sklearn's single decision function -> two columns
        s = np.concatenate([-s / 2, s / 2], axis=1)
    return s


def balanced_subsample(g: np.ndarray, rng: np.random.Generator, n_groups: int | None = None) -> np.ndarray:
    """Indices with the smallest present group's count drawn without replacement from every present group."""
    groups = [np.flatnonzero(g == k) for k in range(int(n_groups or g.max() + 1))]
    groups = [idx for idx in groups if len(idx)]
    m = min(len(idx) for idx in groups)
    return np.concatenate([rng.permutation(idx)[:m] for idx in groups])


def tune_c(
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    n_groups: int,
    rng: np.random.Generator,
    grid: tuple[float, ...] = C_GRID,
    n_classes: int | None = None,
) -> tuple[float, dict[float, float]]:
    """DFR's C selection: returns the best C and the held-out worst-group accuracy of every C.

    ``n_classes`` defaults to ``y.max() + 1``.
    """
    order = rng.permutation(len(x))
    half = len(x) // 2
    held, fit = order[:half], order[half:]
    fit = fit[balanced_subsample(g[fit], rng, n_groups)]
    scaler = StandardScaler().fit(x[fit])
    n_classes = int(n_classes or y.max() + 1)
    scores = {}
    for c in grid:
        coef, intercept = fit_l1(c, rng, scaler.transform(x[fit]), y[fit], n_classes, what="tuning")
        pred = linear_scores(scaler.transform(x[held]), coef, intercept).argmax(1)
        scores[c] = worst_group_accuracy(pred, y[held], g[held], n_groups)
    best = list(scores)[int(np.argmax(list(scores.values())))]
    return best, scores


@dataclass
class DFROptions:
    C_grid: tuple[float, ...] = option(C_GRID, gt=0)  # inverse L1 strengths tried in tuning (DFR's grid)
    n_retrains: int = option(20, ge=1)  # balanced fits averaged in the final model
    scaler: str = "train"  # standardise with training ("train", original repo) or validation ("val") embeddings


@register
class DFR(Method):
    """DFR: L1 logistic regression on group-balanced validation embeddings, C tuned by held-out WGA."""

    name = "dfr"
    Options = DFROptions
    label_needs = "val_groups"
    uses = ("z",)
    summary = "DFR, exact published protocol (L1 logreg on balanced val, C by held-out WGA, 20 averaged fits)"

    def fit(self, data: FeatureSet, seed: int) -> None:
        if self.options.scaler not in ("train", "val"):
            raise ValueError(f"DFR scaler must be 'train' or 'val', not {self.options.scaler!r}")
        if self.options.scaler == "train" and "train" not in data.splits:
            raise ValueError("DFR with scaler='train' needs training embeddings; use scaler='val'")
        rng = np.random.default_rng(seed)
        val = data.splits["val"]
        x, y, g = val.z, val.y, val.g
        n_classes = len(data.class_names)
        self.C, self.tuning_scores = tune_c(x, y, g, data.n_groups, rng, tuple(self.options.C_grid), n_classes)
        self.scaler = StandardScaler().fit(data.splits[self.options.scaler].z)
        coefs, intercepts = [], []
        for _ in range(self.options.n_retrains):
            idx = balanced_subsample(g, rng, data.n_groups)
            coef, intercept = fit_l1(self.C, rng, self.scaler.transform(x[idx]), y[idx], n_classes, what="balanced")
            coefs.append(coef)
            intercepts.append(intercept)
        self.coef = np.mean(coefs, axis=0)  # [1, d] for two classes, [C, d] otherwise
        self.intercept = np.mean(intercepts, axis=0)

    def logits(self, split: SplitFeatures) -> np.ndarray:
        return linear_scores(self.scaler.transform(split.z), self.coef, self.intercept)
