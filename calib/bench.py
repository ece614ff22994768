"""Timing methods: a Waterbirds-sized synthetic feature set and a per-method, per-seed timer."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from calib.data.toy import WATERBIRDS_GROUP_SIZES
from calib.features import FeatureSet, SplitFeatures
from calib.methods import REGISTRY, run_method
from calib.methods.heads import normalize
from calib.utils import seed_everything

log = logging.getLogger(__name__)


def synthetic_features(d_h: int = 1024, d: int = 768, scale: float = 1.0, seed: int = 0) -> FeatureSet:
    """Pre-projection features with Waterbirds' split and group sizes (4,795 / 1,199 / 5,794 at
    ``scale=1``): ``h = class signal + spurious signal (stronger) + Gaussian noise``, a random
    pretrained projection ``W0 [d_h, d]``, and text prototypes that lean on the spurious direction.
    For timing and for checking behaviour on a problem with a known spurious direction.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d_h, 2)))
    class_dir, spur_dir = basis[:, 0], basis[:, 1]
    W0 = (rng.normal(size=(d_h, d)) / np.sqrt(d_h)).astype(np.float32)
    splits = {}
    for split, sizes in WATERBIRDS_GROUP_SIZES.items():
        g = np.repeat(np.arange(4), [max(2, int(round(n * scale))) for n in sizes])
        y, a = g // 2, g % 2
        h = rng.normal(size=(len(g), d_h)) * 0.5
        h += np.outer(2 * y - 1, class_dir) * 0.5 + np.outer(2 * a - 1, spur_dir) * 2.0
        h = h.astype(np.float32)
        splits[split] = SplitFeatures(
            z=h @ W0, y=y.astype(np.int64), g=g.astype(np.int64), a=a.astype(np.int64), ids=np.arange(len(g)), h=h
        )
    # prompts "know" the class a little and the background a lot: zero-shot leans on the spurious feature
    text = normalize(np.stack([(-0.5 * class_dir - spur_dir) @ W0, (0.5 * class_dir + spur_dir) @ W0]))
    return FeatureSet(
        splits=splits,
        text=text.astype(np.float32),
        logit_scale=100.0,
        n_groups=4,
        class_names=["landbird", "waterbird"],
        group_names=["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"],
        attr_names=["land", "water"],
        W0=W0,
        b0=np.zeros(d, np.float32),
        meta={
            "dataset": f"synthetic-{d_h}x{d}",
            "model": "synthetic",
            "pretrained": "none",
            "weights": f"synthetic-{seed}",
            "dataset_version": f"{scale}",
            "device": "cpu",
        },
    )


def time_methods(
    features: FeatureSet,
    methods: list[str] | None = None,
    seeds: tuple[int, ...] = (0,),
    options: dict[str, dict] | None = None,
) -> pd.DataFrame:
    """Wall seconds of fit + evaluation per method and seed, with test WGA and accuracy."""
    rows = []
    for name in methods or [n for n, c in REGISTRY.items() if not c.needs_images()]:  # TPT: `bench tpt`
        for seed in seeds:
            seed_everything(seed)
            t0 = time.perf_counter()
            run = run_method(name, features, seed, (options or {}).get(name))
            rows.append(
                {
                    "method": name,
                    "seed": seed,
                    "seconds": time.perf_counter() - t0,
                    "fit_seconds": run.seconds,
                    "test_wga": run.metrics["test"]["wga"],
                    "test_avg_acc": run.metrics["test"]["avg_acc"],
                }
            )
            log.info("%s seed %d: %.1f s", name, seed, rows[-1]["seconds"])
    return pd.DataFrame(rows)


def time_tpt(
    model: str, pretrained: str, dataset: str = "toy", n_images: int = 4, views: int = 64, device: str | None = None
) -> dict:
    """Seconds per test image of TPT (``views`` views, one AdamW step) with ``model`` under ``pretrained``
    (``random:N`` allowed) on ``dataset``'s first test images, after one warm-up image."""
    from calib.experiment import prepare_dataset
    from calib.methods.base import RunContext, create
    from calib.models import load_clip

    ds = prepare_dataset(dataset, None)
    clip = load_clip(model, pretrained, device=device)
    table = ds.splits["test"]
    dummy = {
        s: SplitFeatures(z=np.zeros((len(t), 1), np.float32), y=t.y, g=t.g, ids=t.ids) for s, t in ds.splits.items()
    }
    feats = FeatureSet(
        splits=dummy,
        text=None,
        logit_scale=1.0,
        n_groups=ds.n_groups,
        class_names=list(ds.class_names),
        group_names=list(ds.group_names),
    )
    tpt = create("tpt", views=views)
    tpt.context = RunContext(ds, clip)
    tpt.fit(feats, seed=0)
    first = SplitFeatures(z=dummy["test"].z[:1], y=table.y[:1], g=table.g[:1], ids=table.ids[:1])
    tpt.logits(first)  # warm-up
    part = SplitFeatures(
        z=dummy["test"].z[1 : 1 + n_images],
        y=table.y[1 : 1 + n_images],
        g=table.g[1 : 1 + n_images],
        ids=table.ids[1 : 1 + n_images],
    )
    t0 = time.perf_counter()
    tpt.logits(part)
    seconds = (time.perf_counter() - t0) / n_images
    import torch

    return {
        "model": model,
        "pretrained": pretrained,
        "views": views,
        "images": n_images,
        "seconds_per_image": seconds,
        "device": str(clip.device),
        "threads": torch.get_num_threads(),
    }
