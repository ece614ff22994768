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
TABLE_HEADERS = {"test.avg_acc": "avg acc (plain)", "test.avg_acc_trainw": "avg acc (train-weighted)",
                 "test.wga": "worst-group acc", "seeds": "seeds"}
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def results_table(df: pd.DataFrame, metrics: tuple[str, ...] = TABLE_METRICS) -> pd.DataFrame:
    """One row per (dataset, model, method): metrics as ``mean ± std`` (percent), method names marked
    by the group labels they read (see :data:`calib.methods.LABEL_LEGEND`)."""
    table = summarize(df, metrics)
    table["method"] = [f"{m}{LABEL_MARKS.get(n, '')}" for m, n in zip(table["method"], table.get("label_needs", ""))]
    return table


def render_table(table: pd.DataFrame, fmt: str = "markdown", caption: str = "",
                 metrics: tuple[str, ...] = TABLE_METRICS) -> str:
    """The table as ``markdown`` or ``latex``, with the label-needs legend."""
    cols = ["dataset", "model", "method", *metrics, "seeds"]
    heads = [TABLE_HEADERS.get(c, c) for c in cols]
    if fmt == "markdown":
        return to_markdown(table, cols, heads) + f"\n{LABEL_LEGEND}\n"
    if fmt == "latex":
        return to_latex(table, cols, heads, caption=(caption + " " + LABEL_LEGEND).strip())
    raise ValueError(f"unknown table format {fmt!r}; use 'markdown' or 'latex'")


def write_tables(table: pd.DataFrame, name: str, figures_dir: Path | None = None, caption: str = "") -> tuple[Path, Path]:
    """Write ``<name>.md`` and ``<name>.tex`` next to the figures."""
    out = Path(figures_dir or paths.figures_dir())
    out.mkdir(parents=True, exist_ok=True)
    md, tex = out / f"{name}.md", out / f"{name}.tex"
    md.write_text(render_table(table, "markdown"))
    tex.write_text(render_table(table, "latex", caption))
    return md, tex


def update_readme(experiment: str = "spurious_correlation", dataset: str = "toy", readme: Path | None = None) -> Path:
    """Replace the block between the README's results markers with the current table."""
    readme = readme or (paths.repo_root() or Path.cwd()) / "README.md"
    df = load_results(experiment)
    df = df[df["dataset"] == dataset]
    if df.empty:
        raise ValueError(f"no {experiment} rows for dataset {dataset!r}; run the notebooks first")
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} lacks the markers {README_START} ... {README_END}")
    block = render_table(results_table(df), "markdown")
    new = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END),
                 lambda _: f"{README_START}\n{block}{README_END}", text, flags=re.S)
    readme.write_text(new)
    return readme
