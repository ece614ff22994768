"""The realism measures of docs/toy_realism.md, against hand-computed values."""

import numpy as np
import pytest

from calib.studies.realism import (
    TARGETS,
    balanced_subsample,
    effective_rank,
    realism_report,
    realism_table,
    within_target,
)
from calib.studies.testbed import TestbedConfig, make_testbed


def test_effective_rank_by_hand():
    rng = np.random.default_rng(0)
    # singular values (after centring) 2, 2, 0: p = (1/2, 1/2) -> exp(log 2) = 2
    x = np.concatenate([np.diag([2.0, 2.0, 0.0]) / np.sqrt(2), -np.diag([2.0, 2.0, 0.0]) / np.sqrt(2)])
    assert effective_rank(x) == pytest.approx(2.0)
    assert effective_rank(np.outer(rng.normal(size=50), [1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert effective_rank(rng.normal(size=(20000, 8))) == pytest.approx(8.0, rel=0.01)


def test_balanced_subsample_takes_the_smallest_group_from_each():
    g = np.array([0] * 10 + [1] * 3 + [2] * 5)
    idx = balanced_subsample(g, np.random.default_rng(0))
    assert np.bincount(g[idx]).tolist() == [3, 3, 3] and len(set(idx)) == 9


def test_targets_and_table():
    assert within_target("zeroshot_wga", 30) and not within_target("zeroshot_wga", 20)
    assert within_target("class_decodability_z", 99) and within_target("unknown", 1) is None
    assert set(TARGETS) <= {
        "zeroshot_avg_acc",
        "zeroshot_wga",
        "class_decodability_z",
        "class_decodability_h",
        "background_decodability_z",
        "background_decodability_h",
        "background_minus_class_z",
        "d_h_over_d",
        "erm_train_error_rate",
        "erm_error_minority_share",
        "effective_rank_fraction",
    }
    table = realism_table({"zeroshot_wga": 20.0, "effective_rank": 3.0})
    assert "| zeroshot_wga | 20.00 | 25–50 | **no** |" in table and "| effective_rank | 3.00 | — | — |" in table


def test_report_on_the_testbed_reads_its_known_geometry():
    cfg = TestbedConfig(scale=0.3)
    r = realism_report(make_testbed(cfg))
    assert r["d_h_over_d"] == pytest.approx(1.5)
    assert r["background_decodability_z"] > r["class_decodability_z"] > 85  # the core direction alone: Phi(2)
    assert r["zeroshot_wga"] == pytest.approx(30.7, abs=6)  # on paper 30.7 (docs/cfr_testbed.md)
    assert 0 <= r["erm_train_error_rate"] <= 100 and r["effective_rank"] > 10
