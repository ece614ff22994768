"""The known-answer testbed: its geometry on paper, and what each CFR component does to W on it."""

import numpy as np
import pytest

from calib.methods import run_method
from calib.methods.diagnostics import direction_weights
from calib.studies.testbed import TestbedConfig, group_accuracy_on_paper, make_testbed

CFG = TestbedConfig(scale=0.5)
# a few epochs from the pretrained projection, zero-shot reference: each component alone
SHORT = {"epochs": 3, "reference": "zeroshot", "selection": "last", "dropout": 0.0}


@pytest.fixture(scope="module")
def bed():
    return make_testbed(CFG)


def _last(run, key):
    return run.history[-1][key]


def test_direction_weights_by_hand():
    W = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # d_h = 3 -> d = 2
    text = np.array([[0.0, -1.0], [1.0, 0.0]])  # t_1 - t_0 = (1, 1): v = W (1, 1) = (1, 2, 2)
    dirs = {"core": np.array([1.0, 0.0, 0.0]), "spurious": np.array([0.0, 1.0, 0.0])}
    out = direction_weights(W, text, dirs)
    assert out == {"w_core": 1.0, "w_spurious": 2.0, "spurious_ratio": 2.0}
    with pytest.raises(ValueError, match="two classes"):
        direction_weights(W, np.zeros((3, 2)), dirs)


def test_testbed_geometry_is_the_documented_one(bed):
    core, spur = bed.directions["core"], bed.directions["spurious"]
    assert abs(core @ spur) < 1e-12 and np.linalg.norm(core) == pytest.approx(1)
    # W0 is an isometry on its span and keeps both directions: the zero-shot weights are alpha : beta exactly
    w = direction_weights(bed.W0, bed.text, bed.directions)
    assert w["spurious_ratio"] == pytest.approx(CFG.beta / CFG.alpha, rel=1e-5)
    np.testing.assert_allclose(bed.W0.T @ bed.W0, np.eye(CFG.d), atol=1e-5)
    tr = bed.splits["train"]
    assert np.bincount(tr.g).tolist() == [round(n * 0.5) for n in (3498, 184, 56, 1057)]
    # the class mean sits at +-mu_core along the core direction, the background at +-mu_spur
    assert (tr.h[tr.y == 1] @ core).mean() == pytest.approx(CFG.mu_core, abs=0.05)
    assert (tr.h[tr.a == 0] @ spur).mean() == pytest.approx(-CFG.mu_spur, abs=0.05)


def test_zero_shot_accuracy_matches_the_paper_formula(bed):
    acc = np.array(run_method("zeroshot", bed).metrics["test"]["group_acc"])
    expected = group_accuracy_on_paper(CFG, CFG.alpha, CFG.beta)  # minority groups: 30.7%
    assert expected[1] == pytest.approx(0.3075, abs=0.0005)  # Phi(-0.3 / (0.5 * sqrt(1.4225))) = Phi(-0.503)
    np.testing.assert_allclose(acc, expected, atol=0.05)  # 321-sample minority groups: +-2.6% std


def test_wga_on_paper_is_best_when_the_spurious_weight_vanishes():
    wga = [group_accuracy_on_paper(CFG, 1.0, ws).min() for ws in (0.65, 0.3, 0.1, 0.0)]
    assert wga == sorted(wga) and wga[-1] == pytest.approx(0.977, abs=0.001)  # Phi(mu_core / sigma) = Phi(2)


def test_infonce_with_hard_negatives_lowers_the_spurious_weight(bed):
    """Anchors (zero-shot errors: mostly minority samples) are pulled to correct same-class samples,
    which differ from them mostly along the spurious direction, and pushed from the nearest other-class
    samples, which differ mostly along the core one: the spurious/core ratio falls."""
    run = run_method("cfr", bed, seed=0, options={**SHORT, "epochs": 6, "anchor_ce_weight": 0.0, "regularizer": "none"})
    ratios = [h["spurious_ratio"] for h in run.history]
    assert ratios == sorted(ratios, reverse=True)  # falls every epoch (slowly: tau = 1 keeps InfoNCE flat)
    assert ratios[-1] < CFG.beta / CFG.alpha - 0.03  # measured: 0.65 -> 0.61 in 6 epochs
    assert run.history[-1]["w_core"] > run.history[0]["w_core"] > 0  # pushed from the negatives: core grows
    assert run.history[-1]["loss_anchor_ce"] > 0  # measured, though weighted 0


def test_anchor_ce_alone_fixes_the_anchors(bed):
    run = run_method("cfr", bed, seed=0, options={**SHORT, "contrastive_weight": 0.0, "regularizer": "none"})
    first_acc = 0.0  # the calibration set is, by construction, misclassified by the zero-shot reference
    assert run.history[-1]["calibration_acc"] > first_acc + 0.8
    assert _last(run, "spurious_ratio") < CFG.beta / CFG.alpha


def test_random_same_class_negatives_do_not_lower_the_spurious_weight_as_much(bed):
    """The release's overwritten negatives (anchor's own class) carry no core contrast."""
    opts = {**SHORT, "epochs": 6, "anchor_ce_weight": 0.0, "regularizer": "none"}
    hard = run_method("cfr", bed, seed=0, options=opts)
    same = run_method("cfr", bed, seed=0, options={**opts, "negative_rule": "random_same_class"})
    start = CFG.beta / CFG.alpha
    assert start - _last(same, "spurious_ratio") < 0.25 * (start - _last(hard, "spurious_ratio"))


def test_tsc_on_the_correlated_batch_raises_the_spurious_weight(bed):
    """TSC alone clusters each class of the 95%-correlated regular batch, and the background is the
    easiest way to do that: the spurious ratio grows (measured: 0.65 -> 0.74 in 6 epochs)."""
    run = run_method(
        "cfr", bed, seed=0, options={**SHORT, "epochs": 6, "anchor_ce_weight": 0.0, "contrastive_weight": 0.0}
    )
    assert _last(run, "spurious_ratio") > CFG.beta / CFG.alpha + 0.05


def test_cfr_defaults_improve_worst_group_accuracy_on_the_testbed(bed):
    zs = run_method("zeroshot", bed).metrics["test"]["wga"]
    run = run_method("cfr", bed, seed=0, options={"epochs": 5, "reference_epochs": 5})
    assert run.metrics["test"]["wga"] > zs + 0.3
    hist = run.history
    assert {
        "loss_anchor_ce",
        "loss_contrastive",
        "loss_regularizer",
        "c",
        "grad_norm",
        "w_shift",
        "logit_scale",
        "train_group_acc",
        "val_group_acc",
        "calibration_acc",
        "w_core",
        "w_spurious",
    } <= set(hist[0])
    assert hist[0]["c"] == pytest.approx(1.5) and hist[0]["logit_scale"] < 1 / 0.07 + 1  # starts at the release's s
    assert len(hist[0]["train_group_acc"]) == 4 and all(0 <= a <= 1 for a in hist[0]["train_group_acc"])
