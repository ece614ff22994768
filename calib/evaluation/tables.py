"""Result tables from result rows: mean ± std over seeds, label-need marks, 95% CIs, both selection protocols,
the paired comparison; as markdown and LaTeX."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from calib.core import paths
from calib.evaluation.results import summarize, to_latex, to_markdown
from calib.evaluation.stats import format_interval, method_intervals, paired_difference
from calib.methods import LABEL_LEGEND, method_mark

log = logging.getLogger(__name__)

TABLE_METRICS = ("test.avg_acc", "test.avg_acc_trainw", "test.wga")
TABLE_HEADERS = {
    "test.avg_acc": "avg acc (plain)",
    "test.avg_acc_trainw": "avg acc (train-weighted)",
    "test.wga": "worst-group acc",
    "test.avg_acc_ci": "avg acc 95% CI",
    "test.wga_ci": "WGA 95% CI",
    "seeds": "seeds",
}
CI_NOTE = (
    "Mean ± std over seeds; 95% CI: percentile bootstrap (1000 replicates) resampling test samples within "
    "groups and the seeds."
)


def with_row_labels(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``row`` column: each row's method as tables name it (its setting, e.g. ``umfc (transductive)``)."""
    from calib.methods import REGISTRY

    out = df.copy()
    out["row"] = [
        REGISTRY[m].row_label(o if isinstance(o, dict) else {}) if m in REGISTRY else m
        for m, o in zip(df["method"], df["options"] if "options" in df else [{}] * len(df))
    ]
    return out


def results_table(df: pd.DataFrame, metrics: tuple[str, ...] = TABLE_METRICS) -> pd.DataFrame:
    """One row per (dataset, model, method setting): metrics as ``mean ± std`` (percent), method names marked
    by the group labels they read (see :data:`calib.methods.LABEL_LEGEND`)."""
    table = summarize(with_row_labels(df), metrics, by=("dataset", "model", "row"))
    needs = table.get("label_needs", [""] * len(table))
    methods = table["row"].map(dict(zip(with_row_labels(df)["row"], df["method"])))
    table["method"] = [f"{r}{method_mark(m, n)}" for r, m, n in zip(table["row"], methods, needs)]
    return table


def render_table(
    table: pd.DataFrame, fmt: str = "markdown", caption: str = "", metrics: tuple[str, ...] = TABLE_METRICS
) -> str:
    """The table as ``markdown`` or ``latex``, with the label-needs legend."""
    cis = [c for c in ("test.avg_acc_ci", "test.wga_ci") if c in table]
    cols = ["dataset", "model", "method", *metrics, *cis, "seeds"]
    heads = [TABLE_HEADERS.get(c, c) for c in cols]
    if fmt == "markdown":
        return to_markdown(table, cols, heads) + f"\n{LABEL_LEGEND} {CI_NOTE}\n"
    if fmt == "latex":
        return to_latex(table, cols, heads, caption=(caption + " " + LABEL_LEGEND + " " + CI_NOTE).strip())
    raise ValueError(f"unknown table format {fmt!r}; use 'markdown' or 'latex'")


def write_tables(
    table: pd.DataFrame, name: str, figures_dir: Path | None = None, caption: str = "", render=None
) -> tuple[Path, Path]:
    """Write ``<name>.md`` and ``<name>.tex`` next to the figures (``render``: :func:`render_table`
    by default, or :func:`render_main_table`)."""
    render = render or render_table
    out = Path(figures_dir or paths.figures_dir())
    out.mkdir(parents=True, exist_ok=True)
    md, tex = out / f"{name}.md", out / f"{name}.tex"
    md.write_text(render(table, "markdown"))
    tex.write_text(render(table, "latex", caption))
    return md, tex


def write_markdown(text: str, name: str, figures_dir: Path | None = None) -> Path:
    """Write ``<figures_dir>/<name>.md`` atomically (a table a notebook rendered)."""
    from calib.core.files import atomic_write_bytes

    path = Path(figures_dir or paths.figures_dir()) / f"{name}.md"
    atomic_write_bytes(path, text.encode())
    return path


PROTOCOLS = (("val_wga", "paper protocol"), ("val_worst_class", "no group labels"))


# the main table's row order (as in notebook 03): the baselines, the label-free methods that followed CFR, then the
# GroupDRO oracle, then CFR
TABLE_ORDER = (
    "zeroshot",
    "linear_probe",
    "clip_erm",
    "dfr",
    "jtt",
    "afr",
    "contrastive_adapter",
    "umfc",
    "tpt",
    "orth_cali",
    "roboshot",
    "tie_star",
    "fairerclip",
    "ppa",
    "groupdro",
    "cfr",
)


def _protocol_parts(df: pd.DataFrame):
    """Per (dataset, model, method setting): its key, its table name with label mark, all its rows, and
    ``{protocol label: rows under that protocol}`` (methods without selection: the same rows under both;
    methods that read validation group labels by construction: none under "no group labels")."""
    from calib.methods import get_method_class

    for (ds, model, method, row), part in with_row_labels(df).groupby(
        ["dataset", "model", "method", "row"], sort=False
    ):
        needs = get_method_class(method).label_needs
        selection = part["options"].map(lambda o: o.get("selection") if isinstance(o, dict) else None)
        protocols = {}
        for proto, label in PROTOCOLS:
            sub = part[selection == proto] if selection.notna().any() else part
            protocols[label] = sub.iloc[0:0] if proto != "val_wga" and needs == "val_groups" else sub
        yield (ds, model, method, f"{row}{method_mark(method, needs)}"), part, protocols


def protocol_long(df: pd.DataFrame, metric: str = "test.wga", methods: tuple[str, ...] = TABLE_ORDER) -> pd.DataFrame:
    """Per-seed ``metric`` of every method setting under each protocol, long form for
    :func:`calib.evaluation.plots.metric_bars`: columns dataset, model, method, protocol, seed, value."""
    rank = {m: i for i, m in enumerate(methods)}
    records = []
    for (ds, model, method, name), _, protocols in _protocol_parts(df):
        for label, sub in protocols.items():
            records += [
                {
                    "dataset": ds,
                    "model": model,
                    "method": name,
                    "protocol": label,
                    "seed": s,
                    "value": v,
                    "_rank": rank.get(method, len(rank)),
                }
                for s, v in zip(sub["seed"], sub[metric])
            ]
    out = pd.DataFrame(records)
    return out.sort_values("_rank", kind="stable").drop(columns="_rank").reset_index(drop=True) if len(out) else out


def long_metrics(df: pd.DataFrame, label_col: str, metrics: dict[str, str]) -> pd.DataFrame:
    """Per-seed metrics of result rows in long form for :func:`calib.evaluation.plots.metric_bars`: columns
    ``label_col``, seed, metric (the names ``metrics`` maps each column to), value."""
    long = df.melt(id_vars=[label_col, "seed"], value_vars=list(metrics), var_name="metric", value_name="value")
    return long.assign(metric=long["metric"].map(metrics))


def paired_table(
    df: pd.DataFrame, reference: str = "cfr", metric: str = "wga", methods: tuple[str, ...] = TABLE_ORDER
) -> pd.DataFrame:
    """``reference`` against every other method setting, paired on the same seeds and test samples: the mean
    over shared seeds of ``metric(reference) - metric(other)`` (percentage points) with its 95% bootstrap
    interval, per dataset, model and protocol (:func:`calib.evaluation.stats.paired_difference`).  A method evaluated on
    a test subsample (TPT's ``max_images``) shares no full test set with the reference and is left out."""
    parts = list(_protocol_parts(df))
    rank = {m: i for i, m in enumerate(methods)}
    records = []
    for (ds, model, method, _), _, ref_protocols in parts:
        if method != reference:
            continue
        for (ds2, model2, other, name), _, protocols in parts:
            if (ds2, model2) != (ds, model) or other == reference:
                continue
            for label, sub in protocols.items():
                if any(isinstance(o, dict) and o.get("max_images", 0) for o in sub.get("options", [])):
                    continue  # a test subsample: not the reference's samples, nothing to pair
                ref = ref_protocols.get(label)
                result = paired_difference(ref, sub, metric) if ref is not None and len(ref) and len(sub) else None
                records.append(
                    {
                        "dataset": ds,
                        "model": model,
                        "protocol": label,
                        "against": name,
                        f"Δ{metric.upper()} ({reference} − it)": "—"
                        if result is None
                        else f"{100 * result['diff']:+.1f}",
                        "95% CI": "—" if result is None else format_interval(result["lo"], result["hi"]),
                        "seeds": 0 if result is None else result["seeds"],
                        "_feats": len(records),  # this reference's (dataset, model) block keeps its place
                        "_rank": rank.get(other, len(rank)),
                    }
                )
    out = pd.DataFrame(records)
    if out.empty:
        return out
    out["_feats"] = out.groupby(["dataset", "model"], sort=False)["_feats"].transform("min")
    out["_proto"] = out["protocol"].map({label: i for i, (_, label) in enumerate(PROTOCOLS)})
    return out.sort_values(["_feats", "_proto", "_rank"], kind="stable").drop(columns=["_feats", "_rank", "_proto"])


def render_paired(table: pd.DataFrame, reference: str = "cfr") -> str:
    """The paired comparison as markdown, with what the interval means."""
    if table.empty:
        return f"(no {reference} rows to compare)\n"
    return to_markdown(table) + (
        f"\nPaired on the same seeds and test samples: each bootstrap replicate resamples test samples within "
        f"groups and the seeds once, for {reference} and the method it is compared with. An interval that excludes "
        "0 means the difference is larger than test-set and seed noise.\n"
    )


def main_table(
    df: pd.DataFrame,
    metrics: tuple[str, ...] = ("test.avg_acc", "test.wga"),
    methods: list[str] | tuple[str, ...] = TABLE_ORDER,
) -> pd.DataFrame:
    """One row per (dataset, model, method), the two selection protocols side by side.

    Rows follow datasets and models in order of appearance, then ``methods`` order (others last), whatever
    order the result rows were written in.

    "paper protocol": epochs / models selected by validation worst-group accuracy (the released
    code's protocol).  "no group labels": selected by validation worst-class accuracy; methods that
    need no selection appear with the same numbers in both; methods that read validation group
    labels by construction (DFR) show "—" there.  Method names carry their intrinsic label marks.
    """
    records = []
    for (ds, model, method, name), part, protocols in _protocol_parts(df):
        rec = {"dataset": ds, "model": model, "method": name}
        for label, sub in protocols.items():
            cis = method_intervals(sub) if len(sub) else {}
            for m in metrics:
                if len(sub):
                    mean, std = sub[m].mean() * 100, (sub[m].std(ddof=1) * 100 if len(sub) > 1 else 0.0)
                    rec[f"{label}: {TABLE_HEADERS.get(m, m)}"] = f"{mean:.1f} ± {std:.1f}"
                    rec[f"{label}: {m}_mean"] = mean / 100
                else:
                    rec[f"{label}: {TABLE_HEADERS.get(m, m)}"] = "—"
                    rec[f"{label}: {m}_mean"] = float("nan")
                short = m.removeprefix("test.")
                if short in ("wga", "avg_acc"):
                    rec[f"{label}: {TABLE_HEADERS[m + '_ci']}"] = cis.get(short, "—")
        rec["seeds"] = int(part["seed"].nunique())
        records.append(((ds, model), method, rec))
    first = {k: i for i, k in enumerate(dict.fromkeys(zip(df["dataset"], df["model"])))}
    rank = {m: i for i, m in enumerate(methods)}
    order = sorted(range(len(records)), key=lambda i: (first[records[i][0]], rank.get(records[i][1], len(rank)), i))
    return pd.DataFrame([records[i][2] for i in order])


def render_main_table(table: pd.DataFrame, fmt: str = "markdown", caption: str = "") -> str:
    """The main table (both protocols) as markdown or LaTeX, with the legend."""
    cols = [c for c in table.columns if not c.endswith("_mean")]
    legend = (
        CI_NOTE
        + " "
        + LABEL_LEGEND
        + " Paper protocol: selection by validation worst-group accuracy (reads validation "
        "group labels); no group labels: selection by validation worst-class accuracy."
    )
    if fmt == "markdown":
        return to_markdown(table, cols) + f"\n{legend}\n"
    if fmt == "latex":
        return to_latex(table, cols, caption=(caption + " " + legend).strip())
    raise ValueError(f"unknown table format {fmt!r}; use 'markdown' or 'latex'")
