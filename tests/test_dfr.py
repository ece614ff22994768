"""DFR: the published protocol against constructed cases with known answers."""

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from calib.clip.features import FeatureSet, SplitFeatures
from calib.methods import run_method
from calib.methods.dfr import balanced_subsample, l1_logistic, tune_c


def _problem(n_per_group=(200, 20, 20, 200), seed=0, core=1.5):
    """Feature 0 carries the class (core), feature 1 the spurious attribute, 3 noise features."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(4), n_per_group)
    y, a = g // 2, g % 2
    x = rng.normal(size=(len(g), 5))
    x[:, 0] += core * (2 * y - 1)
    x[:, 1] += 3.0 * (2 * a - 1)
    return x.astype(np.float32), y, g


def _features(seed=0) -> FeatureSet:
    splits = {}
    for i, (split, sizes) in enumerate(
        {"train": (300, 15, 15, 300), "val": (60, 60, 20, 20), "test": (100, 100, 100, 100)}.items()
    ):
        x, y, g = _problem(sizes, seed=seed + i)
        splits[split] = SplitFeatures(z=x, y=y, g=g)
    return FeatureSet(
        splits=splits, text=None, logit_scale=1.0, n_groups=4, class_names=["a", "b"], group_names=["0", "1", "2", "3"]
    )


def test_balanced_subsample_sizes():
    g = np.repeat(np.arange(4), [50, 7, 13, 30])
    idx = balanced_subsample(g, np.random.default_rng(0), 4)
    assert np.bincount(g[idx], minlength=4).tolist() == [7, 7, 7, 7]
    assert len(set(idx.tolist())) == len(idx)  # without replacement


def test_c_is_chosen_by_heldout_worst_group_accuracy():
    x, y, g = _problem()
    # C = 1e-4 zeroes every L1 coefficient: one class is always predicted, worst-group accuracy 0
    best, scores = tune_c(x, y, g, 4, np.random.default_rng(0), grid=(1e-4, 1.0))
    assert scores[1e-4] == 0.0 and scores[1.0] > 0.7
    assert best == 1.0


def test_ties_keep_the_first_c_in_grid_order():
    x, y, g = _problem(core=8.0)  # separable on the core feature: every reasonable C is perfect
    for grid in ((1.0, 0.7), (0.7, 1.0)):
        best, scores = tune_c(x, y, g, 4, np.random.default_rng(0), grid=grid)
        assert scores[grid[0]] == scores[grid[1]] == 1.0
        assert best == grid[0]


def test_coefficients_are_the_average_of_balanced_fits():
    data = _features()
    run = run_method("dfr", data, seed=3, options={"n_retrains": 5})
    dfr = run.instance
    # replay the protocol with the same random stream
    rng = np.random.default_rng(3)
    val = data.splits["val"]
    c, _ = tune_c(val.z, val.y, val.g, 4, rng)
    assert c == dfr.C
    scaler = StandardScaler().fit(data.splits["train"].z)
    coefs = []
    for _ in range(5):
        idx = balanced_subsample(val.g, rng, 4)
        coefs.append(l1_logistic(c, rng).fit(scaler.transform(val.z[idx]), val.y[idx]).coef_)
    np.testing.assert_allclose(dfr.coef, np.mean(coefs, axis=0), rtol=1e-6)
    assert len(np.unique(np.round(np.array(coefs)[:, 0, 0], 6))) > 1  # the fits differ: real averaging


def test_scaler_variants_and_determinism():
    data = _features()
    a = run_method("dfr", data, seed=1)
    b = run_method("dfr", data, seed=1)
    np.testing.assert_array_equal(a.instance.coef, b.instance.coef)
    np.testing.assert_allclose(a.instance.scaler.mean_, data.splits["train"].z.astype(np.float64).mean(0), rtol=1e-5)
    v = run_method("dfr", data, seed=1, options={"scaler": "val"})
    np.testing.assert_allclose(v.instance.scaler.mean_, data.splits["val"].z.astype(np.float64).mean(0), rtol=1e-5)
    assert a.metrics["test"]["wga"] > 0.6  # DFR undoes the spurious attribute here
    with pytest.raises(ValueError, match="scaler"):
        run_method("dfr", data, options={"scaler": "test"})


def test_three_classes_fit_one_vs_rest_like_the_published_liblinear():
    """sklearn >= 1.8 refuses multiclass liblinear; DFR fits one-vs-rest, as liblinear itself did when DFR was
    published.  Each class's row must equal a binary liblinear fit of that class against the rest."""
    from calib.methods.dfr import fit_l1

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 4)) + 2.0 * np.eye(3, 4)[y]
    coef, intercept = fit_l1(0.3, np.random.default_rng(1), x, y, 3)
    assert coef.shape == (3, 4) and intercept.shape == (3,)
    seed = int(np.random.default_rng(1).integers(2**31 - 1))  # the liblinear seed fit_l1 draws
    for k in range(3):
        ref = l1_logistic(0.3, np.random.default_rng(1)).set_params(random_state=seed).fit(x, (y == k).astype(int))
        np.testing.assert_allclose(coef[k], ref.coef_[0], rtol=1e-6, atol=1e-8)
    splits = {}
    for i, split in enumerate(("train", "val", "test")):
        r = np.random.default_rng(10 + i)
        yy = np.repeat(np.arange(3), 60)
        a = r.integers(0, 2, len(yy))
        z = (r.normal(size=(len(yy), 4)) + 2.0 * np.eye(3, 4)[yy]).astype(np.float32)
        splits[split] = SplitFeatures(z=z, y=yy, g=2 * yy + a)
    data = FeatureSet(
        splits=splits,
        text=None,
        logit_scale=1.0,
        n_groups=6,
        class_names=["a", "b", "c"],
        group_names=[str(k) for k in range(6)],
    )
    run = run_method("dfr", data, seed=0)
    assert run.metrics["test"]["avg_acc"] > 0.8


def test_a_validation_set_too_small_for_the_protocol_is_a_clear_error():
    data = _features()
    val = data.splits["val"]
    keep = np.flatnonzero(val.y == 0)  # a validation split without class 1: no balanced fit can work
    data.splits["val"] = SplitFeatures(z=val.z[keep], y=val.y[keep], g=val.g[keep])
    with pytest.raises(ValueError, match=r"the val split lacks class\(es\) 1 .* of the train split"):
        run_method("dfr", data, seed=0)  # stopped where the features enter, before DFR's own check
    with pytest.raises(ValueError, match="validation split is too small for DFR"):
        run_method("dfr", data, seed=0, allow_partial=True)  # a partial evaluation asked for: DFR still cannot fit
