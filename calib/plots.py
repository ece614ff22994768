"""Figures: one style, one saver (PDF + PNG, byte-identical across runs), and the shared plots."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from calib import paths

log = logging.getLogger(__name__)
STYLE = paths.PACKAGE_DIR / "calib.mplstyle"


def use_style() -> None:
    """Apply calib's matplotlib style (shipped in the package)."""
    plt.style.use(str(STYLE))


def save_figure(fig: plt.Figure, name: str, figures_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``<figures_dir>/<name>.pdf`` and ``.png``; identical bytes for identical figures."""
    from calib.utils import writing_to

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


def group_accuracy_bars(
    df: pd.DataFrame, group_names: list[str], methods: list[str] | None = None, split: str = "test", title: str = ""
) -> plt.Figure:
    """Per-group accuracy (mean ± std over seeds) of each method, from result rows.

    ``df`` is :func:`calib.results.load_results` output; it needs ``method`` and ``<split>.group_acc``.
    """
    use_style()
    methods = methods or list(dict.fromkeys(df["method"]))
    n_g = len(group_names)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots()
    for k, m in enumerate(methods):
        rows = df[df["method"] == m]
        accs = np.array(rows[f"{split}.group_acc"].tolist(), dtype=float) * 100
        mean, std = accs.mean(0), accs.std(0, ddof=1) if len(accs) > 1 else np.zeros(n_g)
        xs = np.arange(n_g) + (k - (len(methods) - 1) / 2) * width
        wga = rows[f"{split}.wga"].mean() * 100  # mean over seeds of each seed's worst group
        ax.bar(xs, mean, width, yerr=std, capsize=2, label=f"{m} (WGA {wga:.1f}, {len(rows)} seeds)")
    ax.set_xticks(np.arange(n_g), group_names, rotation=0)
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def metric_bars(table: pd.DataFrame, label_col: str, metrics: dict[str, str], title: str = "") -> plt.Figure:
    """Horizontal bars of ``<metric>_mean`` columns (in [0, 1]) per row of a summary table.

    ``metrics`` maps a column prefix (e.g. ``"test.wga"``) to its legend label.
    """
    use_style()
    n = len(table)
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * n * len(metrics) + 1.2))
    height = 0.8 / len(metrics)
    for k, (col, label) in enumerate(metrics.items()):
        ys = np.arange(n) + (k - (len(metrics) - 1) / 2) * height
        ax.barh(
            ys,
            table[f"{col}_mean"].to_numpy() * 100,
            height,
            xerr=table.get(f"{col}_std", 0) * 100,
            capsize=2,
            label=label,
        )
    ax.set_yticks(np.arange(n), table[label_col])
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def cfr_dynamics(frame: pd.DataFrame, title: str = "") -> plt.Figure:
    """CFR's per-epoch dynamics from :func:`calib.dynamics.history_frame` output: one row of panels
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
                ax.legend(fontsize=6, loc="best", frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
