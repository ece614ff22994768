"""CFR's training dynamics (notebook 06): which runs to record, and their per-epoch history as tables.

Rows of the ``cfr_dynamics`` experiment carry each run's ``history`` (see :mod:`calib.methods.cfr`):
per epoch, each loss term, ``c``, the gradient norm, ``||W - W0||``, the logit scale, per-group
training and validation accuracy, the calibration set's accuracy and, on the testbed, the logit
weight of the core and spurious directions.  :func:`history_frame` turns rows into long form for
plotting; :func:`epoch_table` gives issue 8's per-epoch table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from calib.evaluation.results import to_markdown
from calib.studies.ablations import ablation_variants

# label -> CFR option overrides: the default, each regulariser, each anchor term alone, the logit-scale
# fix undone, and the other rows of issue 8's table.  Everything not named is at the default.
CFR_DYNAMICS: dict[str, dict[str, Any]] = {
    "CFR (default)": {},
    "regulariser: CE": {"regularizer": "ce"},
    "regulariser: SupCon": {"regularizer": "supcon"},
    "regulariser: none": {"regularizer": "none"},
    "no InfoNCE (anchor CE + TSC)": {"contrastive_weight": 0.0},
    "no anchor CE (InfoNCE + TSC)": {"anchor_ce_weight": 0.0},
    "logit scale: pretrained s": {"logit_scale_init": "pretrained"},
    # the two further variants of issue 8's table
    "lr 1e-3": {"lr": 1e-3},
    "reference: zero-shot": {"reference": "zeroshot"},
}

# history keys drawn per panel of the dynamics figure (lists are expanded per group)
PANELS: dict[str, tuple[str, ...]] = {
    "train accuracy per group": ("train_group_acc",),
    "validation": ("val_wga", "val_worst_class", "calibration_acc"),
    "loss terms": ("loss_anchor_ce", "loss_contrastive", "loss_regularizer", "c"),
    "projection": ("w_shift_rel", "grad_norm"),
    "logit scale": ("logit_scale",),
    # testbed only: logit weights of the known directions (the ratio w_spurious / w_core is in the rows,
    # but diverges where w_core crosses zero, so the two weights are drawn instead)
    "direction weights": ("w_core", "w_spurious"),
}


def dynamics_variants(
    names: list[str] | None = None, base: dict[str, Any] | None = None
) -> dict[str, tuple[str, dict]]:
    """RunSpec variants for the named dynamics runs (all when ``names`` is empty), on top of ``base``."""
    return ablation_variants(names, base, table=CFR_DYNAMICS, kind="dynamics run")


def history_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Long form of the rows' histories: one line per (row, epoch, series) with columns
    ``dataset, model, variant, seed, epoch, panel, series, value``.  Per-group lists become one
    series per group (``train acc: <group>``)."""
    out = []
    for _, row in rows.iterrows():
        history = row.get("history")
        if not isinstance(history, list):
            raise ValueError(
                f"row {row.get('variant')!r} seed {row.get('seed')} has no history; run it with RunSpec(history=True)"
            )
        groups = row.get("group_names") or []
        for rec in history:
            for panel, keys in PANELS.items():
                for key in keys:
                    value = rec.get(key)
                    if value is None:
                        continue
                    series = (
                        zip([f"train acc: {g}" for g in groups or range(len(value))], value)
                        if isinstance(value, list)
                        else [(key, value)]
                    )
                    out += [
                        (row["dataset"], row["model"], row["variant"], row["seed"], rec["epoch"], panel, name, v)
                        for name, v in series
                    ]
    return pd.DataFrame(out, columns=["dataset", "model", "variant", "seed", "epoch", "panel", "series", "value"])


def epoch_table(rows: pd.DataFrame, epochs: tuple[int, ...] = (0, 10, 20, 30, 50, 99)) -> pd.DataFrame:
    """Issue 8's table, one line per variant (mean over seeds): calibration set per group
    (diagnostic), selected epoch(s), validation WGA at ``epochs`` and test WGA, in percent."""
    out = []
    for variant, grp in rows.groupby("variant", sort=False):
        val = np.array([[h[e]["val_wga"] if e < len(h) else np.nan for e in epochs] for h in grp["history"]]) * 100
        val_mean = [float(np.mean(col[~np.isnan(col)])) if (~np.isnan(col)).any() else np.nan for col in val.T]
        cal = grp["calibration_groups"].tolist() if "calibration_groups" in grp else []
        cal_text = " / ".join(str(int(round(v))) for v in np.mean(cal, 0)) if cal and cal[0] is not None else "—"
        out.append(
            {
                "variant": variant,
                "seeds": len(grp),
                "calibration set per group": cal_text,
                "selected epoch": ", ".join(str(int(s)) for s in sorted(set(grp["selected_epoch"]))),
                "val WGA at epochs " + " / ".join(map(str, epochs)): " / ".join(
                    "—" if np.isnan(v) else f"{v:.1f}" for v in val_mean
                ),
                "test WGA": f"{grp['test.wga'].mean() * 100:.1f} ± "
                f"{grp['test.wga'].std(ddof=1) * 100 if len(grp) > 1 else 0:.1f}",
            }
        )
    return pd.DataFrame(out)


def render_dynamics(df: pd.DataFrame) -> str:
    """Issue 8's per-epoch table for every feature set in ``df`` (the toy first, then the testbeds)."""
    parts = []
    for (ds, model), part in df.groupby(["dataset", "model"], sort=False):
        parts.append(f"**{ds} / {model}**\n\n{to_markdown(epoch_table(part))}")
    return "\n".join(parts) + (
        "\nValidation WGA per epoch (percent, mean over seeds); the calibration set per group "
        "(landbird/land, landbird/water, waterbird/land, waterbird/water) is a diagnostic, "
        "never read by CFR.\n"
    )
