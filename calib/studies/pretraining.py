"""The pretraining-source study, after "Quality Not Quantity" (Nguyen et al., NeurIPS 2022): does the data a CLIP
is pretrained on change its group robustness, and does mixing sources dilute it?

**Toy sources.**  Toy CLIPs trained with the toy CLIP's code and budget (:func:`calib.clip.toyclip.train_toy_clip`,
the ``toy`` preset's 800 steps of 200 pairs) on corpora drawn by the same renderer and captioner, differing the
way web sources differ.  The sources were fixed before any of them was trained (never tuned on results):

- ``reference``: the toy CLIP's own corpus (12,000 pairs, 85% habitat co-occurrence, clean captions), so its
  model is the toy CLIP every other notebook uses;
- ``noisy captions``: 30% of captions describe another, random scene (alt text that does not match its image);
- ``strong habitat bias``: 97% of birds are on their habitat's background;
- ``narrow backgrounds``: one background style per place (forest, ocean), where the benchmark has two;
- ``small``: 4,000 pairs (the same steps, so three times the epochs).

A **mixture** takes an equal share of each part's corpus at the reference's size (12,000 pairs), so size does not
confound the comparison.

**Real backbones.**  Any list of open_clip ``(model, pretrained tag)`` pairs (for example ViT-B-32 under
openai, laion400m, laion2b, datacomp) is evaluated zero-shot on the same dataset.

**Effective robustness** (Taori et al. 2020, as Quality Not Quantity uses it): fit a line to
``(logit ID accuracy, logit OOD accuracy)`` of a baseline set of models; a model's effective robustness is its OOD
accuracy minus the line's prediction at its ID accuracy, mapped back to accuracy.  Here ID is the test average
accuracy and OOD the worst-group accuracy (or the group-balanced accuracy); each model's line is fitted on the
*other* models (leave one out), so it measures robustness beyond the trend of the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from calib.clip.toyclip import (
    TOY_MODEL_NAME,
    TOY_PRESETS,
    ToyClipConfig,
    ensure_checkpoint,
    ensure_toy_clip,
    make_corpus,
    train_toy_clip,
)
from calib.core import paths
from calib.core.hashing import stable_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToySource:
    """How one toy pretraining corpus differs from the toy CLIP's own."""

    cooccurrence: float = 0.85  # P(the background matches the bird's habitat)
    caption_noise: float = 0.0  # P(a caption describes another, random scene)
    styles: tuple[str, ...] = ()  # background styles drawn (empty: all four)
    n_pairs: int = 12000  # corpus size
    stream: int = 0  # image stream (0: the toy CLIP's corpus; every other source draws its own images)


SOURCES: dict[str, ToySource] = {
    "reference": ToySource(),
    "noisy captions": ToySource(caption_noise=0.3, stream=1),
    "strong habitat bias": ToySource(cooccurrence=0.97, stream=2),
    "narrow backgrounds": ToySource(styles=("forest", "ocean"), stream=3),
    "small": ToySource(n_pairs=4000, stream=4),
}
MIXTURES: dict[str, tuple[str, ...]] = {
    "noisy captions + strong habitat bias": ("noisy captions", "strong habitat bias"),
    "reference + narrow backgrounds": ("reference", "narrow backgrounds"),
}


# notebook 08's default `sources` (a fast subset; tests check the notebook declares exactly this)
DEFAULT_SOURCES = ("reference", "noisy captions", "strong habitat bias", "noisy captions + strong habitat bias")


def _training(preset: str, n_pairs: int) -> ToyClipConfig:
    """The toy preset's training settings for a corpus of ``n_pairs`` (quick preset: at most its size)."""
    base = TOY_PRESETS[preset]
    n = n_pairs if preset == "toy" else min(n_pairs, base.n_pairs)
    return dataclasses.replace(base, n_pairs=n)


def _source_corpus(source: ToySource, preset: str, n: int | None = None) -> tuple[np.ndarray, list[str]]:
    cfg = dataclasses.replace(_training(preset, source.n_pairs), cooccurrence=source.cooccurrence)
    if n is not None:
        cfg = dataclasses.replace(cfg, n_pairs=n)
    images, captions, _ = make_corpus(cfg, source.styles, source.caption_noise, source.stream)
    return images, captions


def source_names(names: list[str]) -> None:
    """Raise a clear error for a name that is neither a source nor a mixture."""
    known = list(SOURCES) + list(MIXTURES)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown toy pretraining source {name!r}; known: {', '.join(known)}")


def _checkpoint(name: str, preset: str, cache_dir: Path | None) -> tuple[Path, ToyClipConfig, tuple[str, ...], dict]:
    """The checkpoint folder of source or mixture ``name``, its training settings, its parts and its definition."""
    parts = MIXTURES.get(name, (name,))
    size = SOURCES["reference"].n_pairs if name in MIXTURES else SOURCES[name].n_pairs
    cfg = _training(preset, size)
    spec = {"training": dataclasses.asdict(cfg), "parts": [dataclasses.asdict(SOURCES[p]) for p in parts]}
    folder = Path(cache_dir or paths.cache_dir()) / "models" / f"{TOY_MODEL_NAME}-source-{stable_hash(spec, 12)}"
    return folder, cfg, parts, spec


def missing_sources(names: tuple[str, ...] = DEFAULT_SOURCES, preset: str = "toy") -> list[str]:
    """The sources among ``names`` whose toy CLIP is not cached yet (``run_all.sh`` balances its lanes by it)."""
    from calib.clip.toyclip import checkpoint_dir, checkpoint_problem

    source_names(list(names))
    out = []
    for name in names:
        folder = checkpoint_dir(TOY_PRESETS[preset]) if name == "reference" else _checkpoint(name, preset, None)[0]
        if not folder.exists() or checkpoint_problem(folder) is not None:
            out.append(name)
    return out


def ensure_source_clip(name: str, preset: str = "toy", cache_dir: Path | None = None) -> Path:
    """The checkpoint (``open_clip_model.safetensors``) of the toy CLIP pretrained on source or mixture ``name``,
    training it first if it is not cached.  ``reference`` under a preset is that preset's toy CLIP itself."""
    source_names([name])
    if name == "reference":
        return ensure_toy_clip(TOY_PRESETS[preset], cache_dir)
    folder, cfg, parts, spec = _checkpoint(name, preset, cache_dir)

    def train(tmp: Path) -> None:
        shares = [cfg.n_pairs // len(parts) + (k < cfg.n_pairs % len(parts)) for k in range(len(parts))]
        corpora = [_source_corpus(SOURCES[p], preset, n) for p, n in zip(parts, shares)]
        images = np.concatenate([c[0] for c in corpora])
        captions = [t for c in corpora for t in c[1]]
        train_toy_clip(cfg, tmp, corpus=(images, captions))
        (tmp / "source.json").write_text(json.dumps({"name": name, **spec}, indent=2))

    # the same checks, lock and atomic folder as the toy CLIP's own checkpoint
    return ensure_checkpoint(folder, train, f"a toy CLIP pretrained on {name!r}")


# --- effective robustness -----------------------------------------------------------------------------------


def _logit(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    p = np.clip(np.asarray(p, float), eps, 1 - eps)
    return np.log(p / (1 - p))


def fit_logit_line(id_acc: np.ndarray, ood_acc: np.ndarray) -> tuple[float, float]:
    """Least-squares ``logit(ood) = slope * logit(id) + intercept``; needs two distinct ID accuracies."""
    x, y = _logit(id_acc), _logit(ood_acc)
    if len(x) < 2 or np.ptp(x) < 1e-9:
        raise ValueError("the linear trend needs at least two models with different ID accuracy")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def predict_ood(line: tuple[float, float], id_acc: np.ndarray) -> np.ndarray:
    """The line's OOD accuracy at ``id_acc`` (back from logit space)."""
    z = line[0] * _logit(id_acc) + line[1]
    return 1 / (1 + np.exp(-z))


def effective_robustness(id_acc: np.ndarray, ood_acc: np.ndarray, baseline: np.ndarray | None = None) -> np.ndarray:
    """Each model's OOD accuracy minus the logit-space line of the *other* baseline models at its ID accuracy.

    ``baseline``: bool ``[n]``, the models a line may be fitted on (default: all).  A model is left out of its own
    line; NaN where fewer than two other baseline models (with distinct ID accuracy) remain.
    """
    id_acc, ood_acc = np.asarray(id_acc, float), np.asarray(ood_acc, float)
    baseline = np.ones(len(id_acc), bool) if baseline is None else np.asarray(baseline, bool)
    out = np.full(len(id_acc), np.nan)
    for i in range(len(id_acc)):
        others = baseline.copy()
        others[i] = False
        try:
            line = fit_logit_line(id_acc[others], ood_acc[others])
        except ValueError:
            continue
        out[i] = ood_acc[i] - predict_ood(line, id_acc[i : i + 1])[0]
    return out


def robustness_table(rows: pd.DataFrame) -> pd.DataFrame:
    """From the study's rows (:func:`calib.evaluation.results.load_results` of ``pretraining_sources``): per model
    its ID (test avg acc), WGA, group-balanced accuracy and both effective robustnesses.  The line of a toy model is
    fitted on the other single-source toy models; that of a real backbone on the other real backbones."""
    df = rows.copy()
    df["balanced_acc"] = [float(np.mean(g)) for g in df["test.group_acc"]]
    out = []
    for _, part in df.groupby("family", sort=False):
        part = part.copy()
        base = (part["kind"] != "mixture").to_numpy()
        part["er_wga"] = effective_robustness(part["test.avg_acc"], part["test.wga"], base)
        part["er_balanced"] = effective_robustness(part["test.avg_acc"], part["balanced_acc"], base)
        out.append(part)
    cols = ["family", "source", "kind", "model", "pretrained", "test.avg_acc", "test.wga", "balanced_acc"]
    table = pd.concat(out)[cols + ["er_wga", "er_balanced"]].reset_index(drop=True)
    return table.rename(columns={"test.avg_acc": "avg_acc", "test.wga": "wga"})


def table_markdown(table: pd.DataFrame) -> str:
    lines = [
        "| source | kind | avg acc | WGA | balanced acc | eff. robustness (WGA) | eff. robustness (balanced) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def pct(v: float) -> str:
        return "—" if not np.isfinite(v) else f"{100 * v:+.1f}"

    for r in table.itertuples():
        lines.append(
            f"| {r.source} | {r.kind} | {100 * r.avg_acc:.1f} | {100 * r.wga:.1f} | {100 * r.balanced_acc:.1f} | "
            f"{pct(r.er_wga)} | {pct(r.er_balanced)} |"
        )
    note = (
        "\nAccuracies in %, zero-shot on the test split. Effective robustness: the model's accuracy minus the "
        "logit-space line through the *other* single-source models of its family at its average accuracy "
        "(percentage points); mixtures are never on a line. — : fewer than two other models to fit a line.\n"
    )
    return "\n".join(lines) + "\n" + note


def scatter_figure(table: pd.DataFrame, ood: str = "wga", title: str = "") -> plt.Figure:
    """The paper's scatter: ID (average) accuracy vs ``ood`` accuracy on logit axes, one point per model, and the
    line fitted on the single-source models of each family."""
    import seaborn as sns

    from calib.evaluation.plots import use_style

    use_style()
    table = table.copy()
    # a logit axis cannot show 0 or 1: points there are drawn at 0.1% / 99.9% (the fitted lines use 0.01%)
    table[["avg_acc", ood]] = table[["avg_acc", ood]].clip(1e-3, 1 - 1e-3)
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    sns.scatterplot(data=table, x="avg_acc", y=ood, hue="source", style="kind", s=70, ax=ax)
    for _, part in table.groupby("family", sort=False):
        base = part[part["kind"] != "mixture"]
        try:
            line = fit_logit_line(base["avg_acc"], base[ood])
        except ValueError:
            continue
        xs = np.linspace(part["avg_acc"].min() - 0.02, min(part["avg_acc"].max() + 0.02, 0.999), 50)
        ax.plot(xs, predict_ood(line, xs), ls="--", color="grey", lw=1)
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.set_xscale("logit")
    ax.set_yscale("logit")
    ticks = [0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]
    for axis in (ax.xaxis, ax.yaxis):  # accuracies in percent at readable points of the logit axis
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("average test accuracy (ID), logit scale")
    ax.set_ylabel(("worst-group" if ood == "wga" else "group-balanced") + " accuracy, logit scale")
    if title:
        ax.set_title(title, fontsize=9)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def run_source_study(
    dataset: str,
    sources: list[str],
    backbones: list[tuple[str, str]] | None = None,
    preset: str = "toy",
    root: str | Path | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Zero-shot rows of every toy source or mixture in ``sources`` (pretrained first when not cached) and of every
    open_clip ``(model, tag)`` in ``backbones``, on ``dataset``.  Rows go to the ``pretraining_sources``
    experiment; one already written for the same weights, data and code is reused, not recomputed."""
    from calib.clip.features import prepare_features
    from calib.core.hashing import code_hash
    from calib.core.logs import progress as tqdm
    from calib.evaluation.results import append_rows, make_row, read_rows, results_path
    from calib.methods import run_method

    source_names(sources)
    path = results_path("pretraining_sources")
    done = {}
    if path.is_file():
        for row in read_rows(path):
            done[(row["dataset"], row.get("weights"), row.get("dataset_version"), row.get("code"))] = row
    plan = [("toy", name, TOY_MODEL_NAME) for name in sources] + [
        ("open_clip", tag, model) for model, tag in (backbones or [])
    ]
    rows = []
    for kind, name, model in tqdm(plan, desc="pretraining sources", unit="model"):
        weights = str(ensure_source_clip(name, preset)) if kind == "toy" else name
        features = prepare_features(dataset, model, weights, root=root, device=device)
        key = (dataset, features.meta.get("weights"), features.meta.get("dataset_version"), code_hash())
        if key in done:
            rows.append(done[key])
            continue
        run = run_method("zeroshot", features, seed=0, splits=("test",))
        is_mix = kind == "toy" and name in MIXTURES
        row = make_row(
            experiment="pretraining_sources",
            method="zeroshot",
            dataset=dataset,
            model=model,
            pretrained=f"toy-source:{name}" if kind == "toy" else name,
            seed=0,
            options=run.options,
            metrics=run.metrics,
            extra={
                "source_spec": source_spec(kind, name, preset),
                "source": name if kind == "toy" else f"{model} / {name}",
                "kind": "mixture" if is_mix else ("toy source" if kind == "toy" else "open_clip"),
                "family": "toy CLIP" if kind == "toy" else "open_clip",
                "weights": features.meta.get("weights"),
                "dataset_version": features.meta.get("dataset_version"),
                "code": code_hash(),
            },
            device=str(device or "cpu"),
        )
        append_rows([row], path)
        rows.append(row)
    return rows


def study_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows :func:`run_source_study` returned, read back from the ``pretraining_sources`` results file
    (newest row per run), in the study's order."""
    from calib.evaluation.results import load_results

    df = load_results("pretraining_sources")
    wanted = [(r["dataset"], r["pretrained"], r["model"], r["code"]) for r in rows]
    key = list(zip(df["dataset"], df["pretrained"], df["model"], df["code"]))
    df = df[[k in wanted for k in key]].copy()
    df["_order"] = [wanted.index(k) for k in zip(df["dataset"], df["pretrained"], df["model"], df["code"])]
    return df.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def source_spec(kind: str, name: str, preset: str) -> dict[str, Any]:
    """What a row records of its pretraining data: the source's definition (toy) or the tag (real)."""
    if kind == "open_clip":
        return {"source": name}
    parts = MIXTURES.get(name, (name,))
    return {"source": name, "preset": preset, "parts": [dataclasses.asdict(SOURCES[p]) for p in parts]}
