"""How CLIP-like a feature set is: the measures of docs/toy_realism.md, on any :class:`FeatureSet`.

:func:`realism_report` measures the toy CLIP on the toy benchmark (or real CLIP on real Waterbirds)
against the targets fixed in docs/toy_realism.md: zero-shot accuracy, class and background
decodability by a group-balanced linear probe (from ``z`` and ``h``), ``d_h / d``, CLIP+ERM's
training error rate and the minority share of its errors, and the effective rank of ``h``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from calib.clip.features import FeatureSet
from calib.core.metrics import group_accuracy
from calib.methods import run_method
from calib.methods.cfr import CFROptions, reference_erm
from calib.methods.heads import normalize

log = logging.getLogger(__name__)

# measure -> (low, high) of docs/toy_realism.md (percent where the measure is one); None: unbounded
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "zeroshot_avg_acc": (70.0, 90.0),
    "zeroshot_wga": (25.0, 50.0),
    "class_decodability_z": (85.0, None),
    "class_decodability_h": (85.0, None),
    "background_decodability_z": (95.0, None),
    "background_decodability_h": (95.0, None),
    "background_minus_class_z": (0.0, None),
    "d_h_over_d": (1.33, 2.0),
    "erm_train_error_rate": (1.0, 10.0),
    "erm_error_minority_share": (50.0, None),
    "effective_rank_fraction": (10.0, 90.0),
}


def effective_rank(x: np.ndarray) -> float:
    """Roy & Vetterli's effective rank of the centred rows ``x [n, k]``: ``exp(H(s / sum s))``,
    ``s`` the singular values.  ``k`` for isotropic data, 1 for data on a line."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def balanced_subsample(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices with the same number of samples (the smallest non-empty group's) from every group."""
    groups = [np.flatnonzero(g == k) for k in np.unique(g)]
    m = min(len(ix) for ix in groups)
    return np.sort(np.concatenate([rng.choice(ix, m, replace=False) for ix in groups]))


def probe_decodability(data: FeatureSet, space: str, target: str, seed: int = 0) -> tuple[float, float]:
    """(mean, worst) group accuracy in percent on the test split of an L2 logistic probe predicting
    ``target`` (``"y"`` the class or ``"a"`` the spurious attribute) from ``space`` (``"z"``:
    normalised embeddings, ``"h"``: standardised pre-projection features), fit on a group-balanced
    subsample of the validation split (DFR's data)."""
    val, test = data.splits["val"], data.splits["test"]
    get = {"z": lambda s: normalize(s.z), "h": lambda s: s.h}[space]
    if space == "h" and val.h is None:
        raise ValueError("these features have no pre-projection h")
    if getattr(val, target) is None:
        raise ValueError(f"these features have no {target!r} labels")
    idx = balanced_subsample(val.g, np.random.default_rng(seed))
    scaler = StandardScaler().fit(get(val)[idx])
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.transform(get(val)[idx]), getattr(val, target)[idx])
    pred = clf.predict(scaler.transform(get(test)))
    acc = group_accuracy(pred, getattr(test, target), test.g, data.n_groups)
    return float(np.nanmean(acc) * 100), float(np.nanmin(acc) * 100)


def realism_report(data: FeatureSet, seed: int = 0) -> dict[str, float]:
    """Every measure of docs/toy_realism.md for ``data`` (percentages in 0-100).

    The CLIP+ERM reference is CFR's (same options, ``seed``), so its errors are exactly CFR's
    calibration set; minority groups are those whose class and attribute disagree (binary data).
    """
    zs = run_method("zeroshot", data, seed).metrics["test"]
    out = {"zeroshot_avg_acc": 100 * zs["avg_acc"], "zeroshot_wga": 100 * zs["wga"]}
    for space in ("z", "h"):
        out[f"class_decodability_{space}"], out[f"class_worst_group_{space}"] = probe_decodability(
            data, space, "y", seed
        )
        out[f"background_decodability_{space}"], _ = probe_decodability(data, space, "a", seed)
    out["background_minus_class_z"] = out["background_decodability_z"] - out["class_decodability_z"]
    out["d_h_over_d"] = data.W0.shape[0] / data.W0.shape[1]
    tr = data.splits["train"]
    o = CFROptions()
    ref, _ = reference_erm(data, o.projection_options(o.reference_epochs, 0.0), seed)
    with torch.no_grad():
        pred = ref(torch.as_tensor(tr.h, device=ref.W.device))[0].argmax(1).cpu().numpy()
    wrong = pred != tr.y
    out["erm_train_error_rate"] = 100 * float(wrong.mean())
    minority = tr.y != tr.a
    out["erm_error_minority_share"] = 100 * float(minority[wrong].mean()) if wrong.any() else float("nan")
    rank = effective_rank(tr.h.astype(np.float64))
    out["effective_rank"] = rank
    out["effective_rank_fraction"] = 100 * rank / tr.h.shape[1]
    return out


def within_target(name: str, value: float) -> bool | None:
    """Whether ``value`` meets the target of measure ``name`` (None when the measure has none)."""
    if name not in TARGETS:
        return None
    lo, hi = TARGETS[name]
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def realism_table(report: dict[str, float]) -> str:
    """A markdown table: measure, value, target, met."""
    lines = ["| measure | value | target | met |", "| --- | --- | --- | --- |"]
    for name, value in report.items():
        lo, hi = TARGETS.get(name, (None, None))
        target = "—" if name not in TARGETS else (f"≥ {lo:g}" if hi is None else f"{lo:g}–{hi:g}")
        met = within_target(name, value)
        lines.append(f"| {name} | {value:.2f} | {target} | {'—' if met is None else ('yes' if met else '**no**')} |")
    return "\n".join(lines)
