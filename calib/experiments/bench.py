"""Timing methods: a Waterbirds-sized synthetic feature set and a per-method, per-seed timer."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from calib.clip.features import FeatureSet, SplitFeatures
from calib.core.runtime import seed_everything
from calib.data.toy import WATERBIRDS_GROUP_SIZES
from calib.methods import REGISTRY, run_method
from calib.methods.heads import normalize

log = logging.getLogger(__name__)


def synthetic_features(
    d_h: int = 1024,
    d: int = 768,
    scale: float = 1.0,
    seed: int = 0,
    group_sizes: dict[str, tuple[int, ...]] | None = None,
) -> FeatureSet:
    """Pre-projection features with Waterbirds' split and group sizes (4,795 / 1,199 / 5,794 at
    ``scale=1``), or ``group_sizes`` (split -> size of each group ``g = y * (G / 2) + a``, two classes):
    ``h = class signal + spurious signal (stronger) + Gaussian noise``, a random pretrained projection
    ``W0 [d_h, d]``, and text prototypes that lean on the spurious direction.  For timing and for checking
    behaviour on a problem with a known spurious direction.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d_h, 2)))
    class_dir, spur_dir = basis[:, 0], basis[:, 1]
    W0 = (rng.normal(size=(d_h, d)) / np.sqrt(d_h)).astype(np.float32)
    splits = {}
    group_sizes = group_sizes or WATERBIRDS_GROUP_SIZES
    n_groups = len(next(iter(group_sizes.values())))
    n_attr = n_groups // 2
    attr_names = ["land", "water"] if n_attr == 2 else [f"a{i}" for i in range(n_attr)]
    for split, sizes in group_sizes.items():
        g = np.repeat(np.arange(n_groups), [max(2, int(round(n * scale))) for n in sizes])
        y, a = g // n_attr, g % n_attr
        h = rng.normal(size=(len(g), d_h)) * 0.5
        h += np.outer(2 * y - 1, class_dir) * 0.5 + np.outer(2 * (a % 2) - 1, spur_dir) * 2.0
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
        n_groups=n_groups,
        class_names=["landbird", "waterbird"],
        group_names=[f"{c}/{a}" for c in ("landbird", "waterbird") for a in attr_names],
        attr_names=attr_names,
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


def gemm_peak(m: int = 3000, k: int = 1024, n: int = 768, seconds: float = 1.0, device: str = "cpu") -> float:
    """This machine's fp32 matrix-product rate now, GFLOP/s: ``[m, k] @ [k, n]`` repeated for ``seconds``
    with torch's current thread count (the roofline the methods are held against)."""
    import torch

    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def count_flops(name: str, features: FeatureSet, seed: int, options: dict | None = None) -> float:
    """Matrix-product FLOPs (forward and backward: mm, bmm, addmm, baddbmm, einsum products) of fitting and
    evaluating ``name``, counted by ``torch.utils.flop_counter``.  Methods trained for ``epochs`` (and CFR's
    ``reference_epochs``) are counted at 1 and 2 epochs and extrapolated linearly to the epochs the
    options ask for (an epoch's work does not depend on its index); others, and methods whose option does not
    set the epochs trained one for one, are counted in full.  NaN for
    methods whose work is not torch (scikit-learn solvers)."""
    from torch.utils.flop_counter import FlopCounterMode

    from calib.methods import make_options
    from calib.methods.cfr import clear_reference_cache

    opts = dict(options or {})
    full = make_options(name, opts)
    epoch_keys = [k for k in ("epochs", "reference_epochs") if hasattr(full, k)]

    def counted(overrides: dict) -> tuple[float, int]:  # FLOPs, epochs trained
        clear_reference_cache()
        with FlopCounterMode(display=False) as counter:
            run = run_method(name, features, seed, {**opts, **overrides})
        return float(counter.get_total_flops()), len(run.history)

    if not epoch_keys:
        return counted({})[0] or float("nan")
    (one, e1), (two, e2) = counted(dict.fromkeys(epoch_keys, 1)), counted(dict.fromkeys(epoch_keys, 2))
    if e2 - e1 != 1:  # the option does not set the epochs trained one for one (the adapter rescales it)
        total = counted({})[0]
    else:
        total = one + (two - one) * (full.epochs - 1)
    return total if total > 0 else float("nan")


def time_methods(
    features: FeatureSet,
    methods: list[str] | None = None,
    seeds: tuple[int, ...] = (0,),
    options: dict[str, dict] | None = None,
    lanes: bool = True,
    flops: bool = True,
) -> pd.DataFrame:
    """Wall seconds of fit + evaluation per method and seed, with test WGA and accuracy.

    With ``lanes`` the seeds of a method that can share a pass (:meth:`Method.lane_key`) run as its lanes
    and each seed is charged the pass's time divided by the seeds.  With ``flops`` each row also has the
    method's matrix-product work per seed (:func:`count_flops`), the rate it achieved and that rate as a
    fraction of :func:`gemm_peak`, measured in the same call (the count runs first and doubles as a warm-up).
    """
    from calib.methods import get_method_class, make_options, run_methods
    from calib.methods.cfr import clear_reference_cache

    peak = gemm_peak() if flops else float("nan")
    rows = []
    for name in methods or [n for n, c in REGISTRY.items() if not c.needs_images()]:  # TPT: `bench tpt`
        opts = (options or {}).get(name)
        # counting runs the method at 1 and 2 epochs: it also warms up (first-touch memory, thread pools), so
        # the timing below is of a steady state
        gflop = count_flops(name, features, seeds[0], opts) / 1e9 if flops else float("nan")
        batched = lanes and len(seeds) > 1 and get_method_class(name).lane_key(make_options(name, opts)) is not None
        groups = [list(seeds)] if batched else [[s] for s in seeds]
        for group in groups:
            seed_everything(group[0])
            clear_reference_cache()
            t0 = time.perf_counter()
            runs = run_methods(name, features, group, [opts] * len(group))
            seconds = (time.perf_counter() - t0) / len(group)
            for run in runs:
                rows.append(
                    {
                        "method": name,
                        "seed": run.seed,
                        "lanes": run.lanes,
                        "seconds": seconds,
                        "test_wga": run.metrics["test"]["wga"],
                        "test_avg_acc": run.metrics["test"]["avg_acc"],
                    }
                )
            log.info("%s seeds %s: %.1f s per seed", name, group, seconds)
        if flops:
            for row in rows:
                if row["method"] == name:
                    row.update(gflop=gflop, gflops=gflop / row["seconds"], peak_gflops=peak)
                    row["fraction_of_peak"] = row["gflops"] / peak
    return pd.DataFrame(rows)


def time_tpt(
    model: str, pretrained: str, dataset: str = "toy", n_images: int = 4, views: int = 64, device: str | None = None
) -> dict:
    """Seconds per test image of TPT (``views`` views, one AdamW step) with ``model`` under ``pretrained``
    (``random:N`` allowed) on ``dataset``'s first test images, after one warm-up image."""
    from calib.clip.models import load_clip
    from calib.data import prepare_dataset
    from calib.methods.base import RunContext, create

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
