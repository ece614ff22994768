"""Notebook 07's experiment: where do the zero-shot model and the CFR-calibrated model look, group by group?

For a seeded sample of test images per group, the maps of :mod:`calib.studies.attribution_maps` for each image's own
class prompt (the zero-shot head's class prototype, the text the classifier compares with), under the pretrained
projection and under CFR's.  On the toy benchmark the bird's pixels are known (:func:`calib.data.toy.
foreground_masks`), so each map's share of attribution on the bird is measured against the bird's share of the
image (what a map with no preference would give).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from calib.clip.features import FeatureSet, ImageFiles
from calib.clip.models import LoadedClip
from calib.core.logs import progress as tqdm
from calib.data.base import GroupDataset
from calib.data.toy import MARKER, foreground_masks
from calib.evaluation.plots import use_style
from calib.evaluation.results import make_row
from calib.studies.attribution_maps import (
    METHODS,
    M2IBOptions,
    applicable_methods,
    image_maps,
    image_tower,
    mass_inside,
    method_projection,
)

log = logging.getLogger(__name__)

MODELS = ("zero-shot", "CFR")
TEXT_FREE = ("attention", "rollout")  # these read attention weights only: the projection cannot change them


@dataclass
class AttributionStudy:
    """Maps of ``n`` test images: ``images [n, H, W, 3]`` (display, uint8), ``y``, ``g``, ``ids`` ``[n]``,
    ``masks [n, H, W]`` bool (toy only, else None), ``maps[(model, method)] [n, H, W]`` in ``[0, 1]``,
    ``predictions[model] [n]``, and ``seconds[method]`` per image and model."""

    images: np.ndarray
    y: np.ndarray
    g: np.ndarray
    ids: np.ndarray
    masks: np.ndarray | None
    maps: dict[tuple[str, str], np.ndarray]
    predictions: dict[str, np.ndarray]
    seconds: dict[str, float]
    group_names: list[str]
    options: dict[str, Any]
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)  # weights, dataset version, code

    def mass_table(self) -> pd.DataFrame:
        """Per model, method and group: mean share of attribution on the bird, the bird's mean share of the
        image, their ratio (1: no preference) and the image count.  Needs ``masks``."""
        if self.masks is None:
            raise ValueError("no foreground masks: the mass table needs the toy benchmark")
        area = self.masks.mean(axis=(1, 2))
        recs = []
        for (model, method), maps in self.maps.items():
            inside = mass_inside(maps, self.masks)
            for gi, name in enumerate(self.group_names):
                sel = self.g == gi
                recs.append(
                    {
                        "model": model,
                        "method": method,
                        "group": name,
                        "mass_on_bird": float(np.nanmean(inside[sel])),
                        "bird_area": float(area[sel].mean()),
                        "ratio": float(np.nanmean(inside[sel]) / area[sel].mean()),
                        "n": int(sel.sum()),
                    }
                )
        return pd.DataFrame(recs)


def sample_per_group(g: np.ndarray, per_group: int, seed: int) -> np.ndarray:
    """Indices of ``per_group`` images of each group (all of a smaller group), seeded, sorted by group."""
    rng = np.random.default_rng([seed, 70])
    out = []
    for gi in np.unique(g):
        idx = np.flatnonzero(g == gi)
        out.append(np.sort(rng.choice(idx, size=min(per_group, len(idx)), replace=False)))
    return np.concatenate(out)


def _normalize_stats(preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            return torch.tensor(t.mean).view(3, 1, 1), torch.tensor(t.std).view(3, 1, 1)
    return torch.zeros(3, 1, 1), torch.ones(3, 1, 1)


def load_images(loaded: LoadedClip, paths: list[Path]) -> tuple[torch.Tensor, np.ndarray]:
    """Preprocessed images ``[n, 3, H, W]`` and the same pixels for display ``[n, H, W, 3]`` uint8."""
    files = ImageFiles(list(paths), loaded.preprocess)  # the feature extractor's reader: its errors for bad files
    x = torch.stack([files[i][0] for i in range(len(files))])
    mean, std = _normalize_stats(loaded.preprocess)
    show = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return x, show


def _toy_masks(ds: GroupDataset, ids: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """The bird masks of toy images, at the model's input size (toy images are square, so the preprocessing's
    resize and centre crop are a plain resize); None for a dataset that is not the toy."""
    if not (Path(ds.root) / MARKER).is_file():
        return None
    masks = torch.as_tensor(foreground_masks(ds.root, ids)).float()[:, None]
    return (F.interpolate(masks, size=size, mode="nearest")[:, 0] > 0.5).numpy()


def attribution_study(
    ds: GroupDataset,
    loaded: LoadedClip,
    features: FeatureSet,
    seed: int = 0,
    per_group: int = 50,
    cfr_options: dict[str, Any] | None = None,
    methods: tuple[str, ...] = METHODS,
    m2ib_options: M2IBOptions | None = None,
) -> AttributionStudy:
    """Train CFR (``seed``, ``cfr_options``) on ``features``, then map ``per_group`` test images of each group
    under the pretrained projection and under CFR's, by every method in ``methods``."""
    from calib.methods import run_method

    m2ib_options = m2ib_options or M2IBOptions(seed=seed)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown attribution method {m!r}; choose from {', '.join(METHODS)}")
    test = ds.splits["test"]
    if features.text is None:
        raise ValueError("the features carry no zero-shot text head; attribution needs the class prompts")
    pick = sample_per_group(test.g, per_group, seed)
    images, show = load_images(loaded, [test.paths[i] for i in pick])
    images = images.to(loaded.device)
    y = test.y[pick]
    text = torch.as_tensor(features.text, dtype=torch.float32, device=loaded.device)[torch.as_tensor(y)]
    masks = _toy_masks(ds, test.ids[pick], tuple(images.shape[-2:]))

    log.info("training CFR (seed %d) for the calibrated projection", seed)
    cfr = run_method("cfr", features, seed, cfr_options, splits=("test",)).instance
    towers = {"zero-shot": image_tower(loaded.model), "CFR": image_tower(loaded.model, method_projection(cfr))}
    usable = applicable_methods(towers["zero-shot"], methods)
    if usable != tuple(methods):
        log.info("%s: no attention maps on this tower (a ResNet); mapping %s", loaded.name, ", ".join(usable))
    methods = usable
    maps, seconds, predictions = {}, {}, {}
    for name, tower in towers.items():
        with torch.no_grad():
            emb = F.normalize(tower.encode(images), dim=-1)
        predictions[name] = (emb @ text.new_tensor(features.text).T).argmax(1).cpu().numpy()
    for method in tqdm(methods, desc="attribution maps", unit="method"):
        for name, tower in towers.items():
            if method in TEXT_FREE and name != MODELS[0]:
                maps[(name, method)] = maps[(MODELS[0], method)]  # identical by construction
                continue
            start = time.perf_counter()
            maps[(name, method)] = image_maps(method, tower, images, text, m2ib_options)
            seconds[f"{method} ({name})"] = (time.perf_counter() - start) / len(images)
    options = {
        "per_group": per_group,
        "seed": seed,
        "cfr": dataclasses.asdict(cfr.options) if hasattr(cfr, "options") else cfr_options,
        "m2ib": dataclasses.asdict(m2ib_options),
        "text": "class prototype of the image's class",
    }
    from calib.core.hashing import code_hash

    provenance = {
        "weights": features.meta.get("weights"),
        "dataset_version": features.meta.get("dataset_version"),
        "code": code_hash(),
    }
    return AttributionStudy(
        show, y, test.g[pick], test.ids[pick], masks, maps, predictions, seconds, ds.group_names, options, provenance
    )


def study_rows(study: AttributionStudy, dataset: str, model: str, pretrained: str, device: str) -> list[dict]:
    """One result row per (model, method): the per-group mass on the bird, the bird's area and the counts."""
    table = study.mass_table()
    rows = []
    for (model_label, method), part in table.groupby(["model", "method"], sort=False):
        metrics = {
            "mass_on_bird": float(np.average(part["mass_on_bird"], weights=part["n"])),
            "bird_area": float(np.average(part["bird_area"], weights=part["n"])),
            "mass_group": part["mass_on_bird"].tolist(),
            "area_group": part["bird_area"].tolist(),
            "n_group": part["n"].tolist(),
            "seconds_per_image": study.seconds.get(f"{method} ({model_label})"),
        }
        rows.append(
            make_row(
                experiment="attribution",
                method=method,
                dataset=dataset,
                model=model,
                pretrained=pretrained,
                seed=study.options["seed"],
                options={**study.options, "variant": model_label},
                metrics={"test": metrics},
                extra={"variant": model_label, "group_names": study.group_names, **study.provenance},
                device=device,
            )
        )
    return rows


def mass_table_from_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The mass table (:meth:`AttributionStudy.mass_table`'s columns) rebuilt from ``attribution`` result rows
    (:func:`calib.evaluation.results.load_results`), for tables that only read rows."""
    recs = []
    for r in rows.to_dict("records"):  # (itertuples would rename the dotted metric columns)
        for name, mass, area, n in zip(r["group_names"], r["test.mass_group"], r["test.area_group"], r["test.n_group"]):
            recs.append(
                {
                    "model": r["variant"],
                    "method": r["method"],
                    "group": name,
                    "mass_on_bird": mass,
                    "bird_area": area,
                    "ratio": mass / area,
                    "n": n,
                }
            )
    table = pd.DataFrame(recs)
    order = {m: i for i, m in enumerate(METHODS)}
    table["_m"] = table["method"].map(order)
    table["_v"] = table["model"].map({m: i for i, m in enumerate(MODELS)})
    return table.sort_values(["_m", "_v"], kind="stable").drop(columns=["_m", "_v"]).reset_index(drop=True)


def mass_markdown(table: pd.DataFrame) -> str:
    """The mass table as markdown: one row per method and model, per group ``mass % (ratio x)``."""
    groups = list(dict.fromkeys(table["group"]))
    lines = ["| method | model | " + " | ".join(groups) + " |", "| --- | --- |" + " --- |" * len(groups)]
    for (method, model), part in table.groupby(["method", "model"], sort=False):
        cells = [
            f"{100 * r.mass_on_bird:.1f} % ({r.ratio:.2f}x)" for r in part.set_index("group").loc[groups].itertuples()
        ]
        lines.append(f"| {method} | {model} | " + " | ".join(cells) + " |")
    area = table.drop_duplicates("group").set_index("group").loc[groups, "bird_area"]
    lines.append("| bird's share of the image | | " + " | ".join(f"{100 * a:.1f} %" for a in area) + " |")
    note = (
        "\nEach cell: the mean share of a map's attribution that falls on the bird's pixels (from the toy "
        "generator), and in brackets its ratio to the bird's share of the image (1.00x: no preference for the "
        "bird). Maps are min-max normalised, as the M2IB release does. Attention and rollout do not depend on the "
        "projection, so their zero-shot and CFR rows are the same maps.\n"
    )
    return "\n".join(lines) + "\n" + note


def maps_figure(
    study: AttributionStudy, per_group: int = 1, methods: tuple[str, ...] = ("m2ib", "gradcam")
) -> plt.Figure:
    """Rows: ``per_group`` example images per group; columns: the image (bird outlined when the mask is known),
    then each method under each model, then rollout if computed."""
    use_style()
    cols = [(m, model) for m in methods for model in MODELS if (model, m) in study.maps]
    if (MODELS[0], "rollout") in study.maps:
        cols.append(("rollout", MODELS[0]))
    rows = np.concatenate([np.flatnonzero(study.g == gi)[:per_group] for gi in np.unique(study.g)])
    fig, axes = plt.subplots(len(rows), 1 + len(cols), figsize=(1.6 * (1 + len(cols)), 1.7 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(study.images[i])
        if study.masks is not None:
            ax.contour(study.masks[i], levels=[0.5], colors="white", linewidths=0.8)
        ax.set_ylabel(study.group_names[study.g[i]].replace(" / ", "\n"), fontsize=7)
        for c, (method, model) in enumerate(cols, 1):
            ax = axes[r, c]
            ax.imshow(study.images[i])
            ax.imshow(study.maps[(model, method)][i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                ax.set_title(f"{method}\n{model if method not in TEXT_FREE else 'any projection'}", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    fig.tight_layout()
    return fig


def mass_figure(table: pd.DataFrame) -> plt.Figure:
    """Bars: share of attribution on the bird per group, per method (panels) and model (hue); the dashed line is
    the bird's share of the image."""
    import seaborn as sns

    use_style()
    methods = list(dict.fromkeys(table["method"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.0), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        part = table[table["method"] == method]
        sns.barplot(data=part, x="group", y="mass_on_bird", hue="model", hue_order=list(MODELS), ax=ax)
        area = part.drop_duplicates("group")["bird_area"].to_numpy()
        for k, a in enumerate(area):
            ax.plot([k - 0.4, k + 0.4], [a, a], ls="--", color="black", lw=1)
        ax.set_title(method)
        ax.set_xlabel("")
        ax.set_ylabel("share of attribution on the bird")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        if ax is not axes[0, -1]:
            ax.get_legend().remove() if ax.get_legend() else None
    fig.tight_layout()
    return fig
