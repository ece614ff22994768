"""Result tables (mean ± std over seeds, label-need marks) and the README's results block."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from calib import paths
from calib.methods import LABEL_LEGEND, LABEL_MARKS
from calib.results import load_results, summarize, to_latex, to_markdown

log = logging.getLogger(__name__)

TABLE_METRICS = ("test.avg_acc", "test.avg_acc_trainw", "test.wga")
TABLE_HEADERS = {
    "test.avg_acc": "avg acc (plain)",
    "test.avg_acc_trainw": "avg acc (train-weighted)",
    "test.wga": "worst-group acc",
    "seeds": "seeds",
}


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
    table["method"] = [f"{m}{LABEL_MARKS.get(n, '')}" for m, n in zip(table["row"], table.get("label_needs", ""))]
    return table


def render_table(
    table: pd.DataFrame, fmt: str = "markdown", caption: str = "", metrics: tuple[str, ...] = TABLE_METRICS
) -> str:
    """The table as ``markdown`` or ``latex``, with the label-needs legend."""
    cols = ["dataset", "model", "method", *metrics, "seeds"]
    heads = [TABLE_HEADERS.get(c, c) for c in cols]
    if fmt == "markdown":
        return to_markdown(table, cols, heads) + f"\n{LABEL_LEGEND}\n"
    if fmt == "latex":
        return to_latex(table, cols, heads, caption=(caption + " " + LABEL_LEGEND).strip())
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


PROTOCOLS = (("val_wga", "paper protocol"), ("val_worst_class", "no group labels"))


# the main table's row order (as in notebook 03): the baselines, then the GroupDRO oracle, then CFR
TABLE_ORDER = (
    "zeroshot",
    "linear_probe",
    "clip_erm",
    "dfr",
    "jtt",
    "afr",
    "contrastive_adapter",
    "umfc",
    "groupdro",
    "cfr",
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
    from calib.methods import get_method_class

    records = []
    for (ds, model, method, row), part in with_row_labels(df).groupby(
        ["dataset", "model", "method", "row"], sort=False
    ):
        needs = get_method_class(method).label_needs
        rec = {"dataset": ds, "model": model, "method": f"{row}{LABEL_MARKS.get(needs, '')}"}
        selection = part["options"].map(lambda o: o.get("selection") if isinstance(o, dict) else None)
        for proto, label in PROTOCOLS:
            sub = part[selection == proto] if selection.notna().any() else part
            if proto != "val_wga" and needs == "val_groups":
                sub = sub.iloc[0:0]
            for m in metrics:
                if len(sub):
                    mean, std = sub[m].mean() * 100, (sub[m].std(ddof=1) * 100 if len(sub) > 1 else 0.0)
                    rec[f"{label}: {TABLE_HEADERS.get(m, m)}"] = f"{mean:.1f} ± {std:.1f}"
                    rec[f"{label}: {m}_mean"] = mean / 100
                else:
                    rec[f"{label}: {TABLE_HEADERS.get(m, m)}"] = "—"
                    rec[f"{label}: {m}_mean"] = float("nan")
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
        LABEL_LEGEND + " Paper protocol: selection by validation worst-group accuracy (reads validation "
        "group labels); no group labels: selection by validation worst-class accuracy."
    )
    if fmt == "markdown":
        return to_markdown(table, cols) + f"\n{legend}\n"
    if fmt == "latex":
        return to_latex(table, cols, caption=(caption + " " + legend).strip())
    raise ValueError(f"unknown table format {fmt!r}; use 'markdown' or 'latex'")


def render_dynamics(df: pd.DataFrame) -> str:
    """Issue 8's per-epoch table for every feature set in ``df`` (the toy first, then the testbeds)."""
    from calib.dynamics import epoch_table

    parts = []
    for (ds, model), part in df.groupby(["dataset", "model"], sort=False):
        parts.append(f"**{ds} / {model}**\n\n{to_markdown(epoch_table(part))}")
    return "\n".join(parts) + (
        "\nValidation WGA per epoch (percent, mean over seeds); the calibration set per group "
        "(landbird/land, landbird/water, waterbird/land, waterbird/water) is a diagnostic, "
        "never read by CFR.\n"
    )


README_BLOCKS = {  # marker name -> (experiment, table renderer, also the testbed's rows)
    "results": ("spurious_correlation", lambda df: render_table(results_table(df), "markdown"), False),
    "main-table": ("main_results", lambda df: render_main_table(main_table(df), "markdown"), False),
    "cfr-dynamics": ("cfr_dynamics", render_dynamics, True),
}


def update_readme(dataset: str = "toy", readme: Path | None = None) -> Path:
    """Refresh every README block (``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``) whose rows exist."""
    readme = readme or (paths.repo_root() or Path.cwd()) / "README.md"
    text = readme.read_text()
    for name, (experiment, render, testbeds) in README_BLOCKS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text or end not in text:
            raise ValueError(f"{readme} lacks the markers {start} ... {end}")
        try:
            df = load_results(experiment)
        except FileNotFoundError:
            log.warning("no %s rows yet; README block %r left as is", experiment, name)
            continue
        keep = df["dataset"] == dataset
        if testbeds:  # the known-answer testbed's rows sit beside the toy's (seed and options as run)
            keep |= df["dataset"].str.startswith("testbed")
        df = df[keep]
        if df.empty:
            continue
        block = render(df)
        new = f"{start}\n{block}{end}"
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, new=new: new, text, flags=re.S)
    readme.write_text(text)
    return readme
