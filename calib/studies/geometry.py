"""Feature geometry before and after CFR: 2-D projections and the calibration set's composition."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.decomposition import PCA

from calib.clip.features import FeatureSet
from calib.core import paths
from calib.evaluation.plots import use_style
from calib.methods.heads import normalize


def embeddings_after(method_instance, features: FeatureSet, split: str = "test") -> np.ndarray:
    """Normalised embeddings ``[n, d]`` of ``split`` under a trained projection method's head."""
    head = method_instance.head
    with torch.no_grad():
        h = torch.as_tensor(features.splits[split].h, device=next(head.parameters()).device)
        return head.embed(h)[0].cpu().numpy()  # the one lane of a trained method


def project_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """PCA to 2-D of normalised rows ``[n, d] -> [n, 2]`` (deterministic: full SVD)."""
    return PCA(n_components=2, svd_solver="full", random_state=seed).fit_transform(normalize(x))


def geometry_figure(
    before: np.ndarray,
    after: np.ndarray,
    y: np.ndarray,
    a: np.ndarray,
    class_names: list[str],
    attr_names: list[str],
    max_points: int = 3000,
    seed: int = 0,
) -> plt.Figure:
    """2x2 panels: PCA of embeddings before / after, coloured by class (top) and by spurious attribute (bottom)."""
    import seaborn as sns

    use_style()
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(y))[:max_points]
    fig, axes = plt.subplots(2, 2, figsize=(8.8, 7))
    for col, (title, emb) in enumerate((("before (pretrained projection)", before), ("after CFR", after))):
        pts = project_2d(emb, seed)[keep]
        for row, (labels, names, what) in enumerate(
            ((y[keep], class_names, "class"), (a[keep], attr_names, "spurious attribute"))
        ):
            ax = axes[row, col]
            hue = np.asarray(names, dtype=object)[labels]
            sns.scatterplot(
                x=pts[:, 0],
                y=pts[:, 1],
                hue=hue,
                hue_order=list(names),
                s=6,
                alpha=0.5,
                linewidth=0,
                ax=ax,
                legend=col == 1,
            )
            ax.set_title(f"{title}\ncoloured by {what}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if col == 1:  # one legend per row, outside the data
                sns.move_legend(
                    ax, "upper left", bbox_to_anchor=(1.01, 1.0), markerscale=2, fontsize=8, frameon=False, title=what
                )
    fig.tight_layout()
    return fig


def composition_figure(counts: list[int], train_counts: list[int], group_names: list[str]) -> plt.Figure:
    """Per-group size of the calibration set next to the share of each training group it holds."""
    import seaborn as sns

    use_style()
    counts, train_counts = np.asarray(counts), np.asarray(train_counts)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
    sns.barplot(x=list(group_names), y=counts, ax=ax1, color="C0")
    ax1.set_ylabel("calibration samples")
    ax1.set_title(f"calibration set ({counts.sum()} samples)")
    sns.barplot(x=list(group_names), y=100 * counts / np.maximum(train_counts, 1), ax=ax2, color="C0")
    ax2.set_ylabel("% of the training group")
    ax2.set_title("share of each training group")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    return fig


def cfr_geometry(
    features: FeatureSet, seed: int = 0, options: dict | None = None, split: str = "test", cache_dir: Path | None = None
) -> dict:
    """Train CFR once and return what the geometry notebook draws, cached like result rows.

    Returns ``{"before": [n, d], "after": [n, d], "calibration_groups": [G], "metrics": {...}}``; the
    cache key holds the features' weights fingerprint and dataset version, the options, the seed and
    calib's source hash, so a stale entry is never reused.
    """
    from calib.core.files import atomic_write_bytes
    from calib.core.hashing import code_hash, stable_hash
    from calib.methods import make_options, run_method

    opts = dataclasses.asdict(make_options("cfr", options))
    key = stable_hash(
        {
            "weights": features.meta.get("weights"),
            "data": features.meta.get("dataset_version"),
            "options": opts,
            "seed": seed,
            "split": split,
            "code": code_hash(),
        }
    )
    path = Path(cache_dir or paths.cache_dir()) / "geometry" / f"cfr-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return {
                "before": f["before"],
                "after": f["after"],
                "calibration_groups": f["groups"].tolist(),
                "metrics": json.loads(str(f["metrics"])),
            }
    run = run_method("cfr", features, seed, options)
    out = {
        "before": features.splits[split].z,
        "after": embeddings_after(run.instance, features, split),
        "calibration_groups": run.instance.calibration_groups,
        "metrics": run.metrics[split],
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        before=out["before"],
        after=out["after"],
        groups=np.array(out["calibration_groups"]),
        metrics=np.array(json.dumps(out["metrics"])),
    )
    atomic_write_bytes(path, buf.getvalue())
    return out
