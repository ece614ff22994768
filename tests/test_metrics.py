"""Metrics against hand-computed values."""

import numpy as np
import pytest

from calib.core.metrics import (
    evaluate,
    format_mean_std,
    group_accuracy,
    mean_std,
    worst_class_accuracy,
    worst_group_accuracy,
)

# 10 samples, 4 groups (g = 2y + a), hand-checked below
Y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
G = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
P = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 1])
# group 0: 2/3 correct, group 1: 1/2, group 2: 1/2, group 3: 3/3


def test_group_accuracy_by_hand():
    np.testing.assert_allclose(group_accuracy(P, Y, G, 4), [2 / 3, 1 / 2, 1 / 2, 1.0])
    assert worst_group_accuracy(P, Y, G, 4) == pytest.approx(0.5)
    # class 0: 3/5, class 1: 4/5
    assert worst_class_accuracy(P, Y, 2) == pytest.approx(0.6)


def test_evaluate_by_hand():
    train_counts = [3498, 184, 56, 1057]  # Waterbirds training groups
    ev = evaluate(P, Y, G, 4, 2, train_counts)
    assert ev.avg_acc == pytest.approx(7 / 10)
    assert ev.wga == pytest.approx(0.5)
    expected = (2 / 3 * 3498 + 0.5 * 184 + 0.5 * 56 + 1.0 * 1057) / (3498 + 184 + 56 + 1057)
    assert ev.avg_acc_trainw == pytest.approx(expected)
    assert ev.group_n == [3, 2, 2, 3]
    # without training counts the weighted mean falls back to the split's own counts = plain accuracy
    assert evaluate(P, Y, G, 4, 2).avg_acc_trainw == pytest.approx(0.7)


def test_empty_group_is_nan_and_ignored():
    g = np.array([0, 0, 3, 3])
    acc = group_accuracy(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), g, 4)
    assert np.isnan(acc[1]) and np.isnan(acc[2])
    ev = evaluate(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), g, 4, 2, [10, 5, 5, 10])
    assert ev.wga == pytest.approx(0.5)
    assert ev.avg_acc_trainw == pytest.approx((0.5 * 10 + 1.0 * 10) / 20)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        group_accuracy(np.zeros(3), np.zeros(4), np.zeros(4, int), 2)


def test_mean_std():
    m, s, n = mean_std([0.7, 0.8, 0.9])
    assert (m, n) == (pytest.approx(0.8), 3)
    assert s == pytest.approx(0.1)  # sample std, ddof=1
    assert mean_std([0.5]) == (0.5, 0.0, 1)
    assert format_mean_std([0.7, 0.8, 0.9]) == "80.0 ± 10.0"
