"""Result rows: append-only JSONL, newest row per key wins, tables."""

import pandas as pd
import pytest

from calib.evaluation.results import (
    append_rows,
    load_results,
    make_row,
    read_rows,
    select_rows,
    summarize,
    to_latex,
    to_markdown,
)
from calib.evaluation.tables import main_table, render_table, results_table


def _row(method, seed, wga, acc=0.9, experiment="exp", dataset="toy", model="m", pretrained="p"):
    m = {
        "test": {
            "wga": wga,
            "avg_acc": acc,
            "avg_acc_trainw": acc,
            "worst_class_acc": acc,
            "group_acc": [acc, wga],
            "group_n": [5, 5],
        }
    }
    return make_row(
        experiment=experiment,
        method=method,
        dataset=dataset,
        model=model,
        pretrained=pretrained,
        seed=seed,
        options={},
        metrics=m,
        extra={"label_needs": "none"},
    )


def test_rows_carry_provenance(tmp_path):
    row = _row("zeroshot", 0, 0.5)
    for key in ("git_rev", "versions", "device", "time"):
        assert key in row["provenance"]
    assert {"torch", "numpy", "calib"} <= set(row["provenance"]["versions"])


def test_append_only_and_newest_wins(tmp_path):
    path = tmp_path / "exp.jsonl"
    append_rows([_row("zeroshot", 0, 0.5), _row("zeroshot", 1, 0.6)], path)
    append_rows([_row("zeroshot", 0, 0.55)], path)  # a re-run of seed 0
    assert len(read_rows(path)) == 3  # nothing rewritten
    df = load_results(path)
    assert len(df) == 2
    assert df.set_index("seed").loc[0, "test.wga"] == 0.55


def test_truncated_line_is_skipped(tmp_path):
    path = tmp_path / "exp.jsonl"
    append_rows([_row("zeroshot", 0, 0.5)], path)
    with open(path, "a") as f:
        f.write('{"experiment": "exp", "meth')  # interrupted write
    assert len(read_rows(path)) == 1


def test_missing_results_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the experiment"):
        load_results(tmp_path / "nope.jsonl")


def test_summary_and_tables(tmp_path):
    path = tmp_path / "exp.jsonl"
    append_rows([_row("zeroshot", 0, 0.5), _row("zeroshot", 1, 0.7)], path)
    df = load_results(path)
    s = summarize(df, ("test.wga",))
    assert s.loc[0, "test.wga"] == "60.0 ± 14.1"
    assert s.loc[0, "seeds"] == 2
    md = to_markdown(s, ["method", "test.wga"], ["method", "WGA"])
    assert md == "| method | WGA |\n| --- | --- |\n| zeroshot | 60.0 ± 14.1 |\n"
    tex = to_latex(s, ["method", "test.wga"], ["method", "WGA"])
    assert r"zeroshot & 60.0 $\pm$ 14.1 \\" in tex and r"\toprule" in tex


def test_label_marks_in_table():
    rows = pd.DataFrame(
        [
            {
                "dataset": "d",
                "model": "m",
                "method": "a",
                "label_needs": "none",
                "seed": 0,
                "test.wga": 0.5,
                "test.avg_acc": 0.9,
                "test.avg_acc_trainw": 0.9,
            },
            {
                "dataset": "d",
                "model": "m",
                "method": "b",
                "label_needs": "val_groups",
                "seed": 0,
                "test.wga": 0.6,
                "test.avg_acc": 0.9,
                "test.avg_acc_trainw": 0.9,
            },
        ]
    )
    table = results_table(rows)
    assert list(table["method"]) == ["a", "b†"]
    assert "† uses validation group labels" in render_table(table)


def test_select_rows(tmp_path):
    path = tmp_path / "exp.jsonl"
    append_rows(
        [
            _row("cfr", 0, 0.5),
            _row("cfr", 1, 0.5),
            _row("dfr", 0, 0.5),
            _row("cfr", 0, 0.5, pretrained="other"),
            _row("cfr", 0, 0.5, dataset="celeba"),
        ],
        path,
    )
    df = load_results(path)
    assert len(select_rows(df)) == 5
    picked = select_rows(df, datasets=["toy"], backbones=[["m", "p"]], methods=["cfr"], seeds=[0])
    assert len(picked) == 1 and picked.iloc[0]["pretrained"] == "p"  # the same model under other weights is dropped
    assert set(select_rows(df, backbones=[("m", "other")]).pretrained) == {"other"}
    assert len(select_rows(df, seeds=[0, 1], methods=["cfr"], datasets=["toy"])) == 3


def test_main_table_protocols_marks_and_order():
    def row(ds, method, seed, wga, selection=None):
        return {
            "dataset": ds,
            "model": "m",
            "method": method,
            "seed": seed,
            "test.wga": wga,
            "test.avg_acc": 0.8,
            "options": {"selection": selection} if selection else {},
        }

    rows = pd.DataFrame(
        [  # written in an order unlike the table's
            row("toy", "cfr", 0, 0.30, "val_wga"),
            row("toy", "cfr", 0, 0.20, "val_worst_class"),
            row("toy", "cfr", 1, 0.40, "val_wga"),
            row("toy", "cfr", 1, 0.10, "val_worst_class"),
            row("toy", "dfr", 0, 0.70, "val_wga"),
            row("celeba", "cfr", 0, 0.5, "val_wga"),
            row("toy", "zeroshot", 0, 0.25),
            row("toy", "zeroshot", 1, 0.25),
        ]
    )
    table = main_table(rows)
    assert list(zip(table["dataset"], table["method"])) == [
        ("toy", "zeroshot"),
        ("toy", "dfr†"),
        ("toy", "cfr"),
        ("celeba", "cfr"),
    ]
    cfr = table.iloc[2]
    assert cfr["paper protocol: worst-group acc"] == "35.0 ± 7.1"  # mean of 30 and 40; std sqrt(50)
    assert cfr["no group labels: worst-group acc"] == "15.0 ± 7.1"
    dfr = table.iloc[1]
    assert dfr["paper protocol: worst-group acc"] == "70.0 ± 0.0" and dfr["no group labels: worst-group acc"] == "—"
    zs = table.iloc[0]  # no selection: the same numbers under both protocols
    assert zs["paper protocol: worst-group acc"] == zs["no group labels: worst-group acc"] == "25.0 ± 0.0"
    assert list(main_table(rows, methods=["cfr", "dfr", "zeroshot"])["method"])[:3] == ["cfr", "dfr†", "zeroshot"]


def test_rows_with_options_the_method_no_longer_has_are_left_out(tmp_path):
    path = tmp_path / "exp.jsonl"
    old = _row("umfc", 0, 0.37)
    old["options"] = {"n_clusters": 4, "alpha": 0.9, "beta": 0.3, "fit_on": "train"}  # before UMFC's `mode`
    new = _row("umfc", 0, 0.60)
    new["options"] = {"n_clusters": 4, "alpha": 0.9, "beta": 0.3, "mode": "train-fit", "max_iter": 500}
    new["options_hash"] = "other"
    append_rows([old, new], path)
    df = load_results(path)
    assert len(df) == 1 and df["test.wga"].item() == 0.60
