"""calib.studies.dynamics: variants, the long-form history and issue 8's per-epoch table, from hand-made rows."""

import pandas as pd
import pytest

from calib.studies.dynamics import CFR_DYNAMICS, dynamics_variants, epoch_table, history_frame


def _rows():
    def hist(vals):
        return [
            {
                "epoch": e,
                "val_wga": v,
                "val_worst_class": v,
                "calibration_acc": 0.5,
                "loss_anchor_ce": 1.0,
                "loss_contrastive": 2.0,
                "loss_regularizer": 3.0,
                "c": 1.5,
                "w_shift_rel": 0.1 * e,
                "grad_norm": 1.0,
                "logit_scale": 14.0,
                "train_group_acc": [1.0, 0.5],
            }
            for e, v in enumerate(vals)
        ]

    return pd.DataFrame(
        [
            {
                "dataset": "toy",
                "model": "m",
                "variant": "CFR (default)",
                "seed": 0,
                "history": hist([0.1, 0.3, 0.2]),
                "group_names": ["a", "b"],
                "calibration_groups": [2, 4],
                "selected_epoch": 1,
                "test.wga": 0.25,
            },
            {
                "dataset": "toy",
                "model": "m",
                "variant": "CFR (default)",
                "seed": 1,
                "history": hist([0.3, 0.5, 0.0]),
                "group_names": ["a", "b"],
                "calibration_groups": [4, 6],
                "selected_epoch": 1,
                "test.wga": 0.35,
            },
        ]
    )


def test_variants_are_cfr_with_overrides():
    v = dynamics_variants(["CFR (default)", "no anchor CE (InfoNCE + TSC)"], base={"epochs": 7})
    assert v == {
        "CFR (default)": ("cfr", {"epochs": 7}),
        "no anchor CE (InfoNCE + TSC)": ("cfr", {"epochs": 7, "anchor_ce_weight": 0.0}),
    }
    assert list(dynamics_variants()) == list(CFR_DYNAMICS)
    with pytest.raises(ValueError, match="unknown dynamics"):
        dynamics_variants(["nope"])


def test_history_frame_expands_groups_and_panels():
    f = history_frame(_rows())
    # rows x epochs x (2 groups + 3 validation + 4 loss + 2 projection + 1 scale); no direction weights off the testbed
    assert len(f) == 2 * 3 * (2 + 3 + 4 + 2 + 1)
    b = f[(f.seed == 1) & (f.series == "train acc: b")]
    assert b["value"].tolist() == [0.5, 0.5, 0.5] and set(b["panel"]) == {"train accuracy per group"}
    assert f[(f.seed == 0) & (f.series == "w_shift_rel")]["value"].tolist() == pytest.approx([0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="history"):
        history_frame(_rows().drop(columns="history").assign(history=None))


def test_epoch_table_by_hand():
    t = epoch_table(_rows(), epochs=(0, 1, 2, 5))
    row = t.iloc[0]
    assert row["calibration set per group"] == "3 / 5" and row["selected epoch"] == "1" and row["seeds"] == 2
    assert row["val WGA at epochs 0 / 1 / 2 / 5"] == "20.0 / 40.0 / 10.0 / —"
    assert row["test WGA"] == "30.0 ± 7.1"
