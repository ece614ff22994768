"""Figures: one style, one saver (PDF + PNG, byte-identical across runs), and the shared plots."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from calib.core import paths

log = logging.getLogger(__name__)
STYLE = Path(__file__).resolve().parent / "calib.mplstyle"


def use_style() -> None:
    """Apply calib's matplotlib style (shipped in the package)."""
    plt.style.use(str(STYLE))


def save_figure(fig: plt.Figure, name: str, figures_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``<figures_dir>/<name>.pdf`` and ``.png``; identical bytes for identical figures."""
    from calib.core.files import writing_to

    out = Path(figures_dir or paths.figures_dir())
    pdf, png = out / f"{name}.pdf", out / f"{name}.png"
    with writing_to(pdf):
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(pdf, metadata={"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None})
        fig.savefig(png, metadata={"Software": None})
    log.info("saved %s and %s", pdf, png)
    return pdf, png


def example_grid(dataset, split: str = "train", per_group: int = 6, seed: int = 0) -> plt.Figure:
    """Random example images of each group of a :class:`~calib.data.GroupDataset` (rows = groups)."""
    from PIL import Image

    use_style()
    table = dataset.splits[split]
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(dataset.n_groups, per_group, figsize=(1.1 * per_group, 1.2 * dataset.n_groups))
    for gi in range(dataset.n_groups):
        members = np.flatnonzero(table.g == gi)
        picks = rng.choice(members, size=min(per_group, len(members)), replace=False) if len(members) else []
        for j in range(per_group):
            ax = axes[gi, j]
            ax.axis("off")
            if j < len(picks):
                with Image.open(table.paths[picks[j]]) as im:
                    ax.imshow(im.convert("RGB"))
        axes[gi, 0].set_title(f"{dataset.group_names[gi]} (n={len(members)})", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def _legend_outside(ax: plt.Axes, title: str | None = None) -> None:
    """Move the legend right of the axes, where it covers no data."""
    import seaborn as sns

    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), title=title, frameon=False)


def group_accuracy_bars(
    df: pd.DataFrame, group_names: list[str], methods: list[str] | None = None, split: str = "test", title: str = ""
) -> plt.Figure:
    """Per-group accuracy of each method (seaborn bars: mean over seeds, error bar ± 1 std over seeds).

    ``df`` is :func:`calib.evaluation.results.load_results` output; it needs ``method``, ``seed`` and
    ``<split>.group_acc``.
    The legend, right of the axes, gives each method's WGA (mean over seeds of each seed's worst group).
    """
    import seaborn as sns

    use_style()
    methods = methods or list(dict.fromkeys(df["method"]))
    records = []
    for m in methods:
        rows = df[df["method"] == m]
        label = f"{m} (WGA {rows[f'{split}.wga'].mean() * 100:.1f}, {len(rows)} seeds)"
        for accs in rows[f"{split}.group_acc"]:
            records += [{"group": g, "accuracy": 100 * float(a), "method": label} for g, a in zip(group_names, accs)]
    long = pd.DataFrame(records)
    fig, ax = plt.subplots(figsize=(6.4 + 0.4 * len(group_names), 3.6))
    sns.barplot(
        data=long,
        x="group",
        y="accuracy",
        hue="method",
        order=group_names,
        errorbar=("sd", 1),
        capsize=0.1,
        err_kws={"linewidth": 1},
        ax=ax,
    )
    ax.set_xlabel("")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_ylim(0, 100)
    _legend_outside(ax)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def metric_bars(
    long: pd.DataFrame,
    label_col: str,
    hue_col: str,
    value_col: str = "value",
    title: str = "",
    xlabel: str = "test accuracy (%)",
) -> plt.Figure:
    """Horizontal seaborn bars of per-seed values in [0, 1] (one row per seed): the mean per ``label_col``
    and ``hue_col`` with ± 1 std over seeds.  :func:`calib.evaluation.tables.long_metrics` and
    :func:`calib.evaluation.tables.protocol_long` build ``long`` from result rows."""
    import seaborn as sns

    use_style()
    data = long.assign(**{value_col: long[value_col] * 100})
    labels = list(dict.fromkeys(data[label_col]))
    hues = list(dict.fromkeys(data[hue_col]))
    fig, ax = plt.subplots(figsize=(6.4, 0.3 * len(labels) * len(hues) + 1.2))
    sns.barplot(
        data=data,
        y=label_col,
        x=value_col,
        hue=hue_col,
        order=labels,
        hue_order=hues,
        orient="h",
        errorbar=("sd", 1),
        capsize=0.1,
        err_kws={"linewidth": 1},
        ax=ax,
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    _legend_outside(ax)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def cfr_dynamics(frame: pd.DataFrame, title: str = "") -> plt.Figure:
    """CFR's per-epoch dynamics from :func:`calib.studies.dynamics.history_frame` output: one row of panels
    per variant (per-group training accuracy; validation WGA / worst-class / calibration-set accuracy;
    the loss terms and ``c``; ``||W - W0|| / ||W0||`` and the gradient norm; the logit scale; on the
    testbed, the logit weights of the core and spurious directions), mean over seeds with a band when
    there are several."""
    import seaborn as sns

    use_style()
    variants = list(dict.fromkeys(frame["variant"]))
    panels = list(dict.fromkeys(frame["panel"]))
    fig, axes = plt.subplots(
        len(variants), len(panels), figsize=(3.3 * len(panels), 2.1 * len(variants) + 0.6), squeeze=False, sharex=True
    )
    for i, variant in enumerate(variants):
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            part = frame[(frame["variant"] == variant) & (frame["panel"] == panel)]
            if part.empty:
                ax.axis("off")
                continue
            sns.lineplot(
                data=part, x="epoch", y="value", hue="series", ax=ax, errorbar=("sd", 1), legend=i == 0, linewidth=1.0
            )
            if "accuracy" in panel or panel == "validation":
                ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(variant if j == 0 else "", fontsize=8)
            ax.set_xlabel("epoch" if i == len(variants) - 1 else "")
            if i == 0:
                ax.set_title(panel, fontsize=9)
                sns.move_legend(
                    ax, "lower center", bbox_to_anchor=(0.5, 1.12), fontsize=6, frameon=False, ncol=2, title=None
                )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
