"""CFR ablations: each option of method.md in turn, everything else at the default.

The list is sized so that ``./run_all.sh`` stays under 15 minutes on 2 CPU cores (one seed per
variant on the toy, ~50 s each); pass other variants through :func:`ablation_variants`.
"""
from __future__ import annotations

from typing import Any

# label -> CFR option overrides (the default configuration first)
CFR_ABLATIONS: dict[str, dict[str, Any]] = {
    "CFR (default)": {},
    "reference: zero-shot": {"reference": "zeroshot"},
    # size: the default misclassified set is ~3% of the toy's training set; the low-margin one 20%
    "calibration: low margin, q=0.2": {"calibration": "low_margin", "calibration_fraction": 0.2},
    "P = N = 4": {"positives": 4, "negatives": 4},
    "temperature 0.1": {"temperature": 0.1},
    "positives: nearest": {"positive_rule": "nearest"},
    "negatives: random same-class (release)": {"negative_rule": "random_same_class"},
    "negatives ranked in pre-projection space": {"negative_space": "pre_projection"},
    "logit scale: pretrained s": {"logit_scale_init": "pretrained"},
    "regulariser: CE": {"regularizer": "ce"},
    "regulariser: SupCon": {"regularizer": "supcon"},
    "regulariser: none": {"regularizer": "none"},
    "schedule: constant 1.5": {"weight_schedule": "constant"},
    "selection: val worst-class (no group labels)": {"selection": "val_worst_class"},
    "selection: last epoch": {"selection": "last"},
    "released behaviour (faithful_release)": {"faithful_release": True},
    "epoch = one pass over the calibration set": {"epoch_unit": "calibration"},
}


def ablation_variants(names: list[str] | None = None, base: dict[str, Any] | None = None) -> dict[str, tuple[str, dict]]:
    """RunSpec variants for the named ablations (all when ``names`` is empty), on top of ``base`` options."""
    names = names or list(CFR_ABLATIONS)
    unknown = [n for n in names if n not in CFR_ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; known: {list(CFR_ABLATIONS)}")
    return {n: ("cfr", {**(base or {}), **CFR_ABLATIONS[n]}) for n in names}
