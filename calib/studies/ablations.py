"""CFR ablations: each option of method.md in turn, everything else at the default.

One seed per variant on the toy.  The variants train as lanes of one pass where their shapes and optimiser agree
(all but the calibration-set epoch unit; :mod:`calib.methods.lanes`): 268 s for all 18 in ``./run_all.sh``'s
second lane, on one CPU thread.  Pass other variants through :func:`ablation_variants`.
"""

from __future__ import annotations

from typing import Any

# label -> CFR option overrides (the default configuration first)
CFR_ABLATIONS: dict[str, dict[str, Any]] = {
    "CFR (default)": {},
    "reference: zero-shot": {"reference": "zeroshot"},
    # the release's ERM checkpoint came from a run whose length is not released (docs/cfr_fidelity.md)
    "reference: CLIP+ERM trained 10 epochs": {"reference_epochs": 10},
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


def ablation_variants(
    names: list[str] | None = None,
    base: dict[str, Any] | None = None,
    table: dict[str, dict[str, Any]] | None = None,
    kind: str = "ablation",
) -> dict[str, tuple[str, dict]]:
    """RunSpec variants of CFR for the named entries of ``table`` (default :data:`CFR_ABLATIONS`; all when
    ``names`` is empty), on top of ``base`` options.  ``kind`` names the table in errors."""
    table = CFR_ABLATIONS if table is None else table
    names = names or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown {kind}(s) {unknown}; known: {list(table)}")
    return {n: ("cfr", {**(base or {}), **table[n]}) for n in names}
