"""Append-only JSON-lines result rows, their loader, and tables in markdown and LaTeX.

One row per (experiment, method, dataset, model, pretrained, seed, options), carrying the
resolved hyperparameters and provenance (git revision, package versions, device, time).  Rows are
never edited: a re-run appends, and :func:`load_results` keeps the newest row per key.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calib.core import paths
from calib.core.files import locked, writing_to
from calib.core.hashing import stable_hash
from calib.core.metrics import mean_std
from calib.evaluation.stats import method_intervals

log = logging.getLogger(__name__)

KEY_FIELDS = ("experiment", "method", "dataset", "model", "pretrained", "seed", "options_hash")
# a row's `variant` (ablation or protocol label) is part of its options, hence of options_hash


def git_revision() -> str:
    """The checkout's ``git describe``-style revision (``+dirty`` when modified), or ``"unknown"``."""
    root = paths.repo_root()
    if root is None:
        return "unknown"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    """Versions of the packages that change numbers."""
    import sklearn
    import torch

    import calib

    out = {
        "calib": calib.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
    }
    try:
        import open_clip

        out["open_clip"] = open_clip.__version__
    except ImportError:  # pragma: no cover - open_clip is a dependency
        pass
    return out


def provenance(device: str) -> dict[str, Any]:
    """Git revision, package versions, device and UTC time for a result row."""
    return {
        "git_rev": git_revision(),
        "versions": package_versions(),
        "device": device,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }


def make_row(
    *,
    experiment: str,
    method: str,
    dataset: str,
    model: str,
    pretrained: str,
    seed: int,
    options: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """One result row; ``metrics`` maps split name to an :class:`~calib.core.metrics.Evaluation` dict."""
    return {
        "experiment": experiment,
        "method": method,
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "seed": int(seed),
        "options": options,
        "options_hash": stable_hash(options, 10),
        "metrics": metrics,
        **(extra or {}),
        "provenance": provenance(device),
    }


def results_path(experiment: str, results_dir: Path | None = None) -> Path:
    """``<results_dir>/<experiment>.jsonl``."""
    return Path(results_dir or paths.results_dir()) / f"{experiment}.jsonl"


ROW_IDENTITY = (
    "experiment",
    "dataset",
    "model",
    "pretrained",
    "method",
    "variant",
    "seed",
    "options_hash",
    "weights",
    "dataset_version",
    "code",
)


def row_identity(row: dict[str, Any]) -> tuple:
    """What makes two rows the same run: the same method, seed and options on the same features and code."""
    return tuple(json.dumps(row.get(k), sort_keys=True, default=_json_default) for k in ROW_IDENTITY)


def append_rows(rows: Iterable[dict[str, Any]], path: Path, dedupe: bool = False) -> int:
    """Append rows to a JSONL file under an exclusive lock; returns how many were written.

    Concurrent writers (two ``run_experiment`` calls on one experiment) never interleave lines, and
    with ``dedupe`` a row whose run (:func:`row_identity`) is already in the file is not written again
    (without it a re-run is appended and the newest row wins in :func:`load_results`).
    A read-only or full output folder raises :class:`calib.core.files.OutputNotWritableError`.
    """
    path = Path(path)
    with writing_to(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path), writing_to(path):
        seen = {row_identity(r) for r in read_rows(path)} if dedupe and path.is_file() else set()
        lines = []
        for row in rows:
            ident = row_identity(row)
            if dedupe and ident in seen:
                log.info(
                    "%s: a row for this run (%s seed %s) is already there; not written twice",
                    path.name,
                    row.get("method"),
                    row.get("seed"),
                )
                continue
            seen.add(ident)
            lines.append(json.dumps(row, sort_keys=True, default=_json_default) + "\n")
        if lines and _ends_mid_line(path):  # a killed writer left half a line: never glue a row onto it
            log.warning("%s ended in a partial line (an interrupted write); the next row starts a new line", path)
            lines[0] = "\n" + lines[0]
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
    return len(lines)


def _ends_mid_line(path: Path) -> bool:
    """Whether a non-empty file's last byte is not a newline."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


_WARNED: set[tuple] = set()  # (file, what) already warned about in this process: each warning once


def _warn_once(path: Path, what: str, lines: list[tuple[int, str]], unit: str = "line") -> None:
    """One warning naming ``lines`` (``(number, why)``) of ``path``, the first time this process meets them."""
    key = (str(path), what, tuple(lines))
    if key in _WARNED:
        return
    _WARNED.add(key)
    shown = "; ".join(f"{unit} {n}: {why}" for n, why in lines[:5]) + (" ..." if len(lines) > 5 else "")
    log.warning("%s: %d %s(s) %s (%s)", path, len(lines), unit, what, shown)


REQUIRED_FIELDS = ("method", "seed", "dataset", "model", "pretrained", "metrics")


def _migrate(row: Any, path: Path) -> tuple[dict[str, Any] | None, str]:
    """A row of an older schema brought to the current one where that is unambiguous: ``(row, "")``, or
    ``(None, why)`` when it cannot be (not an object, a required field missing, metrics not per split)."""
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not a result row"
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        return None, f"lacks {', '.join(missing)}"
    if not isinstance(row["metrics"], dict) or not all(isinstance(m, dict) for m in row["metrics"].values()):
        return None, "its metrics are not a mapping of split to metrics"
    row = dict(row)
    if "experiment" not in row:  # older rows: the file is named after its experiment
        row["experiment"] = path.stem
    if "options_hash" not in row:  # older rows: the hash is a function of the options they store
        if not isinstance(row.get("options"), dict):
            return None, "lacks options_hash and options"
        row["options_hash"] = stable_hash(row["options"], 10)
    return row, ""


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of one JSONL file, brought to the current schema where unambiguous (:func:`_migrate`).

    A line that is not valid JSON (an interrupted write) or not a result row is skipped; each file's skipped
    lines are named in one warning, once per process."""
    rows, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                skipped.append((lineno, "not valid JSON (an interrupted write?)"))
                continue
            row, why = _migrate(raw, Path(path))
            if row is None:
                skipped.append((lineno, why))
            else:
                rows.append(row)
    if skipped:
        _warn_once(Path(path), "skipped", skipped)
    return rows


def flatten_row(row: dict[str, Any]) -> dict[str, Any]:
    """A result row with ``metrics`` spread into ``<split>.<metric>`` columns, ``compute`` into ``compute.<field>``
    columns, and provenance dropped (its ``time`` kept)."""
    flat = {k: v for k, v in row.items() if k not in ("metrics", "provenance", "compute")}
    for name, value in (row.get("compute") or {}).items():
        flat[f"compute.{name}"] = value
    for split, metrics in row.get("metrics", {}).items():
        for name, value in metrics.items():
            flat[f"{split}.{name}"] = value
    flat["time"] = row.get("provenance", {}).get("time")
    return flat


def load_results(
    paths_or_experiments: Iterable[str | Path] | str | Path, results_dir: Path | None = None
) -> pd.DataFrame:
    """Rows of one or more experiments (names or JSONL paths) as a flat DataFrame.

    Columns: the key fields, ``label_needs``, ``options``, and ``<split>.<metric>`` for every scalar
    metric (e.g. ``test.wga``) plus ``test.group_acc``.  The newest row per key wins.  Rows come grouped by
    feature set (dataset, model, weights) in order of first appearance, each group in the order its experiment
    declared its runs (``task``): a file holds them in the order their passes ended, or a resumed run wrote them.
    Rows with an option
    the method no longer has (written by an older calib, e.g. UMFC's ``fit_on`` before ``mode``) are left
    out: their setting cannot be named, so no table mixes them in.
    """
    items = [paths_or_experiments] if isinstance(paths_or_experiments, (str, Path)) else list(paths_or_experiments)
    records = []
    for item in items:
        p = Path(item) if str(item).endswith(".jsonl") else results_path(str(item), results_dir)
        if not p.is_file():
            raise FileNotFoundError(f"no results at {p}; run the experiment notebook first")
        rows = read_rows(p)
        stale = [(i, why) for i, why in enumerate(_stale_options(r) for r in rows) if why]
        if stale:  # their setting cannot be named, so no table mixes them in
            _warn_once(p, "left out of tables", [(i + 1, why) for i, why in stale], unit="row")
        gone = {i for i, _ in stale}
        records += [flatten_row(row) for i, row in enumerate(rows) if i not in gone]
    df = pd.DataFrame.from_records(records)
    if df.empty:
        return df
    df = df.drop_duplicates(subset=list(KEY_FIELDS), keep="last").reset_index(drop=True)
    return _declared_order(df)


def _declared_order(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` grouped by (dataset, model, pretrained) in order of first appearance, each group sorted by ``task``
    (stable; rows without one, written by other code or an older calib, keep their place among themselves)."""
    feature_set = list(zip(df["dataset"], df["model"], df["pretrained"]))
    first = {k: i for i, k in reversed(list(enumerate(feature_set)))}
    task = df["task"] if "task" in df else pd.Series([np.nan] * len(df))
    position = [t if t == t else i for i, t in enumerate(task.tolist())]  # NaN != NaN: no task, keep the row's place
    order = sorted(range(len(df)), key=lambda i: (first[feature_set[i]], position[i], i))
    return df.iloc[order].reset_index(drop=True)


def _stale_options(row: dict[str, Any]) -> str:
    """Why a row's options cannot be named today (an option the method no longer has), or ``""``."""
    import dataclasses

    from calib.methods import REGISTRY

    method, options = row.get("method"), row.get("options")
    if method not in REGISTRY or not isinstance(options, dict):
        return ""
    gone = sorted(set(options) - {f.name for f in dataclasses.fields(REGISTRY[method].Options)})
    return f"{method} has no option(s) {gone} any more" if gone else ""


def select_rows(
    df: pd.DataFrame,
    datasets: Iterable[str] | None = None,
    backbones: Iterable[Iterable[str]] | None = None,
    methods: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
    variants: Iterable[str] | None = None,
) -> pd.DataFrame:
    """The rows of ``df`` (from :func:`load_results`) matching every filter given; ``None`` keeps all.

    ``backbones`` holds ``(model, pretrained)`` pairs: rows of the same model under other weights are dropped.
    """
    keep = np.ones(len(df), dtype=bool)
    for column, wanted in (("dataset", datasets), ("method", methods), ("seed", seeds), ("variant", variants)):
        if wanted is not None:
            keep &= df[column].isin(list(wanted)).to_numpy()
    if backbones is not None:
        pairs = {tuple(b) for b in backbones}
        keep &= np.array([(m, p) in pairs for m, p in zip(df["model"], df["pretrained"])], dtype=bool)
    return df[keep]


def summarize(
    df: pd.DataFrame,
    metrics: tuple[str, ...] = ("test.avg_acc", "test.avg_acc_trainw", "test.wga"),
    by: tuple[str, ...] = ("dataset", "model", "method"),
    scale: float = 100.0,
    ci: bool = True,
) -> pd.DataFrame:
    """Mean ± std over seeds per ``by`` group: columns ``<metric>`` (formatted), ``<metric>_mean``,
    ``<metric>_std`` and ``seeds``; with ``ci`` also ``test.wga_ci`` and ``test.avg_acc_ci``, the 95%
    bootstrap intervals of :mod:`calib.evaluation.stats`.  Row order follows first appearance in ``df``."""
    out = []
    for key, part in df.groupby(list(by), sort=False):
        rec = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        if "label_needs" in part:
            rec["label_needs"] = part["label_needs"].iloc[0]
        for m in metrics:
            mean, std, n = mean_std(part[m].to_numpy(float))
            rec[f"{m}_mean"], rec[f"{m}_std"] = mean, std
            rec[m] = f"{mean * scale:.1f} ± {std * scale:.1f}"
        if ci:
            for name, text in method_intervals(part).items():
                rec[f"test.{name}_ci"] = text
        rec["seeds"] = int(part["seed"].nunique())
        out.append(rec)
    return pd.DataFrame(out)


def to_markdown(df: pd.DataFrame, columns: list[str] | None = None, headers: list[str] | None = None) -> str:
    """A GitHub markdown table of ``df[columns]``."""
    cols = columns or list(df.columns)
    heads = headers or cols
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(" --- " for _ in heads) + "|"]
    for _, row in df[cols].iterrows():
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "±": r"$\pm$"}


def to_latex(
    df: pd.DataFrame, columns: list[str] | None = None, headers: list[str] | None = None, caption: str = ""
) -> str:
    """A booktabs LaTeX table of ``df[columns]`` (``±`` rendered as ``$\\pm$``)."""
    cols = columns or list(df.columns)
    heads = headers or cols

    def esc(v: Any) -> str:
        s = str(v)
        for a, b in _LATEX_ESCAPES.items():
            s = s.replace(a, b)
        return s

    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\begin{tabular}{" + "l" * len(cols) + "}",
        r"\toprule",
        " & ".join(esc(h) for h in heads) + r" \\",
        r"\midrule",
    ]
    for _, row in df[cols].iterrows():
        lines.append(" & ".join(esc(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(r"\caption{" + esc(caption) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
