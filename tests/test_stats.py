"""Bootstrap intervals and paired comparisons (calib.evaluation.stats) against hand-computed cases."""

import numpy as np
import pandas as pd
import pytest

from calib.evaluation.stats import interval, pack_correct, paired_difference, replicates, unpack_correct


def test_pack_orders_by_group_and_round_trips():
    correct = np.array([1, 0, 1, 1, 0, 0, 1], bool)
    g = np.array([1, 0, 1, 0, 2, 1, 0])
    groups = unpack_correct(pack_correct(correct, g), np.bincount(g).tolist())
    assert [c.tolist() for c in groups] == [[False, True, True], [True, True, False], [False]]


def test_no_variance_when_every_group_is_all_right_or_all_wrong():
    method = {s: [np.ones(30, bool), np.zeros(10, bool), np.ones(60, bool)] for s in (0, 1, 2)}
    reps = replicates({"m": method}, n_boot=200)["m"]
    assert interval(reps["wga"]) == (0.0, 0.0)
    assert interval(reps["avg_acc"]) == pytest.approx((0.9, 0.9))


def test_interval_width_matches_the_binomial_standard_error():
    rng = np.random.default_rng(1)
    c = rng.random(400) < 0.5
    reps = replicates({"m": {0: [c]}}, n_boot=4000)["m"]
    se = np.sqrt(c.mean() * (1 - c.mean()) / 400)  # the plug-in standard error of a proportion
    assert np.std(reps["avg_acc"]) == pytest.approx(se, rel=0.08)
    lo, hi = interval(reps["avg_acc"])
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_replicates_of_several_methods_equal_their_single_runs():
    rng = np.random.default_rng(2)
    a = {s: [rng.random(50) < 0.8, rng.random(20) < 0.4] for s in (0, 1)}
    b = {s: [rng.random(50) < 0.7, rng.random(20) < 0.6] for s in (0, 1)}
    both = replicates({"a": a, "b": b}, n_boot=300)
    np.testing.assert_array_equal(both["a"]["wga"], replicates({"a": a}, n_boot=300)["a"]["wga"])
    np.testing.assert_array_equal(both["b"]["avg_acc"], replicates({"b": b}, n_boot=300)["b"]["avg_acc"])


def _rows(groups_by_seed):
    recs = []
    for seed, groups in groups_by_seed.items():
        correct = np.concatenate(groups)
        g = np.concatenate([np.full(len(c), k) for k, c in enumerate(groups)])
        recs.append(
            {"seed": seed, "correct": {"test": pack_correct(correct, g)}, "test.group_n": [len(c) for c in groups]}
        )
    return pd.DataFrame(recs)


def test_paired_difference_is_exact_when_methods_differ_by_fixed_samples():
    rng = np.random.default_rng(3)
    a = {s: [rng.random(40) < 0.9, rng.random(40) < 0.9] for s in (0, 1, 2)}
    b = {s: [c.copy() for c in a[s]] for s in a}
    for s in b:  # b gets 4 of the samples a has right in group 0 wrong, every seed
        b[s][0][np.flatnonzero(b[s][0])[:4]] = False
    same = paired_difference(_rows(a), _rows(a), "avg_acc")
    assert same["diff"] == 0 and (same["lo"], same["hi"]) == (0.0, 0.0)
    d = paired_difference(_rows(a), _rows(b), "avg_acc")
    assert d["diff"] == pytest.approx(4 / 80)  # 4 of 80 samples per seed
    assert 0 < d["lo"] <= d["diff"] <= d["hi"] <= 0.11  # paired: only the 4 changed samples vary
    assert d["seeds"] == 3


def test_rows_without_bits_give_no_interval():
    from calib.evaluation.stats import method_intervals

    assert method_intervals(pd.DataFrame({"seed": [0], "test.wga": [0.5]})) == {"wga": "—", "avg_acc": "—"}


def _result_rows():
    from calib.evaluation.results import flatten_row, make_row

    rng = np.random.default_rng(4)
    rows = []
    for method, p in (("zeroshot", 0.6), ("cfr", 0.8)):
        for seed in (0, 1):
            groups = [rng.random(30) < 0.9, rng.random(20) < p]
            correct = np.concatenate(groups)
            g = np.repeat([0, 1], [30, 20])
            accs = [float(c.mean()) for c in groups]
            metrics = {
                "test": {
                    "wga": min(accs),
                    "avg_acc": float(correct.mean()),
                    "avg_acc_trainw": 0.0,
                    "group_acc": accs,
                    "group_n": [30, 20],
                }
            }
            rows.append(
                flatten_row(
                    make_row(
                        experiment="e",
                        method=method,
                        dataset="toy",
                        model="m",
                        pretrained="p",
                        seed=seed,
                        options={},
                        metrics=metrics,
                        extra={"correct": {"test": pack_correct(correct, g)}},
                    )
                )
            )
    return pd.DataFrame(rows)


def test_tables_carry_intervals_and_the_paired_comparison():
    from calib.evaluation.tables import main_table, paired_table, render_paired, render_table, results_table

    df = _result_rows()
    text = render_table(results_table(df))
    assert "WGA 95% CI" in text and "avg acc 95% CI" in text and "percentile bootstrap" in text
    table = main_table(df)
    assert table["paper protocol: WGA 95% CI"].str.match(r"\[\d+\.\d, \d+\.\d\]").all()
    paired = paired_table(df, reference="cfr")
    assert list(paired["against"]) == ["zeroshot", "zeroshot"]  # both protocols
    expected = np.mean(
        [
            df[(df.method == "cfr") & (df.seed == s)]["test.wga"].item()
            - df[(df.method == "zeroshot") & (df.seed == s)]["test.wga"].item()
            for s in (0, 1)
        ]
    )
    assert paired.iloc[0, 4] == f"{100 * expected:+.1f}"
    assert "Paired on the same seeds" in render_paired(paired)


def test_readme_versions_line():
    from calib.experiments.readme import render_versions

    rows = [{"provenance": {"versions": {"torch": "2.14.1", "numpy": "2.4.6"}, "git_rev": "abcdef1234567890"}}] * 2
    assert render_versions(rows).splitlines()[-1] == "- numpy 2.4.6, torch 2.14.1 (code at abcdef123456)"
