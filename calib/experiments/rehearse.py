"""A full-scale rehearsal of the paper profile on synthetic inputs with the real shapes (issue 20).

Methods stage: for each paper dataset and backbone, synthetic pre-projection features with the dataset's split and
group sizes and the backbone's dimensions (:data:`DATASET_GROUPS`, :data:`BACKBONE_DIMS`), and every method run that
notebooks 00-06 make in the paper profile, grouped into passes (lanes) exactly as they group them: the same
:class:`~calib.experiments.runner.RunSpec` through :func:`~calib.experiments.runner.run_experiment` (rows not
written).  Image stage: feature-extraction throughput of each backbone at random weights, model-bound and
pipeline-bound (synthetic JPEGs), against the model's FLOPs.  Everything goes to one JSON report stamped with the
device, the versions and the commit, beside a GEMM peak measured in the same run.

``fraction`` scales every split (at least 2 samples a group), so the same rehearsal runs on a CPU in minutes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from calib.clip.features import FeatureSet
from calib.data.toy import WATERBIRDS_GROUP_SIZES

log = logging.getLogger(__name__)

# pre-projection width -> embedding width of each paper backbone's image tower
BACKBONE_DIMS = {
    "RN50-quickgelu": (2048, 1024),
    "ViT-L-14-quickgelu": (1024, 768),
    "ViT-L-14-336-quickgelu": (1024, 768),
}


def _chexpert_groups(total: int) -> tuple[int, ...]:
    # y x (sex x race), g = y * 6 + sex * 3 + race: P(no finding) 0.1, P(male) 0.6, race White/Black/Other .56/.05/.39
    p_y, p_sex, p_race = (0.9, 0.1), (0.4, 0.6), (0.56, 0.05, 0.39)
    return tuple(round(total * py * ps * pr) for py in p_y for ps in p_sex for pr in p_race)


# split -> group sizes.  Waterbirds and CelebA exact (the published splits); MetaShift and CheXpert approximate
# (their sizes depend on the construction; the totals are those of calib.experiments.plan.full_size_plan)
DATASET_GROUPS: dict[str, dict[str, tuple[int, ...]]] = {
    "waterbirds": WATERBIRDS_GROUP_SIZES,
    "celeba": {
        "train": (71629, 66874, 22880, 1387),
        "val": (8535, 8276, 2874, 182),
        "test": (9767, 7535, 2480, 180),
    },
    "metashift": {"train": (1000, 138, 137, 1000), "val": (100, 100, 100, 100), "test": (193, 193, 193, 193)},
    "chexpert": {"train": _chexpert_groups(167700), "val": _chexpert_groups(22365), "test": _chexpert_groups(33583)},
}
EXACT_SIZES = ("waterbirds", "celeba")


def notebook_specs(seeds: list[int], epochs: int) -> dict[str, Any]:
    """The :class:`RunSpec` of every method run notebooks 00-06 make for one (dataset, backbone) in the paper profile
    (``run_all.sh --profile paper``: 05 on seed 0, 06 without the testbed); 03's image method (TPT) is timed in
    the image stage."""
    from calib.experiments.runner import RunSpec, epoch_options, protocol_variants
    from calib.studies.ablations import ablation_variants
    from calib.studies.dynamics import dynamics_variants

    base = {"epochs": epochs, "reference_epochs": epochs}
    erm = {"clip_erm": {"epochs": epochs}}
    main_methods = [m for m in _main_methods() if m != "tpt"]
    return {
        "00_quickstart": RunSpec("quickstart", ["zeroshot", "linear_probe", "clip_erm"], seeds, options=erm),
        "01_spurious_correlation": RunSpec("spurious_correlation", ["zeroshot", "clip_erm"], seeds, options=erm),
        "02_last_layer_retraining": RunSpec(
            "last_layer_retraining", ["zeroshot", "linear_probe", "clip_erm", "dfr"], seeds, options=erm
        ),
        "03_main_results": RunSpec(
            "main_results", [], seeds, variants=protocol_variants(main_methods, epoch_options(epochs))
        ),
        "04_ablations": RunSpec("ablations", [], seeds, variants=ablation_variants([], base=base)),
        "05_feature_geometry": RunSpec("feature_geometry", ["cfr"], [0], options={"cfr": base}),
        "06_cfr_dynamics": RunSpec("cfr_dynamics", [], seeds, variants=dynamics_variants([], base=base), history=True),
    }


def _main_methods() -> list[str]:
    """Notebook 03's default ``methods`` parameter (read from the notebook, so the rehearsal follows it; calib
    installed without its notebooks: the main table's order)."""
    from calib.core import paths
    from calib.evaluation.tables import TABLE_ORDER

    root = paths.repo_root()
    if root is None:
        return list(TABLE_ORDER)
    nb = json.loads((root / "notebooks" / "03_main_results.ipynb").read_text())
    for cell in nb["cells"]:
        for line in "".join(cell["source"]).splitlines():
            if line.startswith("methods: list = "):
                return json.loads(line.split("=", 1)[1].split("#")[0].strip())
    raise ValueError("notebook 03 declares no `methods: list = [...]` parameter")


def rehearsal_features(dataset: str, backbone: str, fraction: float, seed: int = 0) -> FeatureSet:
    """Synthetic features of ``dataset`` at ``fraction`` of its size under ``backbone``'s dimensions, with the
    dataset's prompt file embedded as random vectors (the prompt methods' real shapes)."""
    from calib.clip.prompts import PromptBank
    from calib.data.prompt_files import load_prompt_file, prompt_texts
    from calib.experiments.bench import synthetic_features

    d_h, d = BACKBONE_DIMS[backbone]
    feats = synthetic_features(d_h, d, scale=fraction, seed=seed, group_sizes=DATASET_GROUPS[dataset])
    spec = load_prompt_file(dataset)
    texts = prompt_texts(spec)
    vectors = np.random.default_rng([seed, 17]).normal(size=(len(texts), d)).astype(np.float32)
    feats.prompts = PromptBank(spec, texts, vectors)
    # its own identity (CFR memoises reference heads by the features' weights and version)
    feats.meta.update(dataset=dataset, model=backbone, weights=f"synthetic-{seed}-{backbone}")
    return feats


class PeakRSS:
    """Peak resident memory (bytes) of this process while the context is open, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime high-water mark is the best there is
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


@contextmanager
def measured(device: str):
    """Wall seconds, peak RSS and peak GPU memory of the block: yields a dict filled on exit."""
    import torch

    out: dict[str, Any] = {}
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        yield out
        if cuda:
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0
    out["peak_rss_gib"] = rss.peak / 2**30
    out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def rehearse_methods(
    dataset: str, backbone: str, fraction: float, seeds: list[int], epochs: int, device: str
) -> list[dict[str, Any]]:
    """Run every notebook's method runs on :func:`rehearsal_features`; one record per notebook."""
    from calib.experiments.runner import run_experiment

    feats = rehearsal_features(dataset, backbone, fraction)
    records = []
    for notebook, spec in notebook_specs(seeds, epochs).items():
        spec = _with_device(spec, device)
        with measured(device) as m:
            rows = run_experiment(spec, feats, write=False, reuse=False)
        records.append(
            {
                "stage": "methods",
                "dataset": dataset,
                "backbone": backbone,
                "notebook": notebook,
                "runs": len(rows),
                "train": len(feats.splits["train"]),
                **m,
            }
        )
        log.info("%s / %s / %s: %d runs in %.1f s", dataset, backbone, notebook, len(rows), m["seconds"])
    return records


def _with_device(spec: Any, device: str) -> Any:
    """``spec`` with ``device`` set for every method that has a ``device`` option."""
    import dataclasses

    from calib.methods import make_options

    def put(method: str, options: dict) -> dict:
        return {**options, "device": device} if hasattr(make_options(method), "device") else options

    variants = {label: (m, put(m, o)) for label, m, o in spec.runs()}
    return dataclasses.replace(spec, methods=[], options={}, variants=variants)


def rehearse_images(backbone: str, device: str, n_files: int, seconds: float) -> dict[str, Any]:
    """Extraction throughput of ``backbone`` at random weights on ``device`` (model- and pipeline-bound)."""
    from calib.clip.models import load_clip
    from calib.clip.throughput import as_dict, measure

    loaded = load_clip(backbone, "random", device=device)
    with measured(device) as m:
        t = measure(loaded, batch_size=64 if device.startswith("cuda") else 8, n_files=n_files, seconds=seconds)
    return {"stage": "images", "backbone": backbone, **as_dict(t), **m}


COUNT_FRACTION = 0.01  # the share of a dataset CFR's FLOPs are counted on (then scaled to the timed size)


def rehearse_cfr(
    dataset: str, backbone: str, fraction: float, seeds: list[int], device: str, peak_gflops: float
) -> dict[str, Any]:
    """CFR at the released schedule's per-epoch cost, its seeds as lanes of one pass, extrapolated to 100 epochs (and
    100 reference epochs) at the dataset's full size, with its matrix-product rate against ``peak_gflops``.

    Three timed runs (CFR epochs, reference epochs) = (1, 1), (2, 1), (1, 2) give one CFR epoch and one reference
    epoch by difference (fixed costs cancel); the same three under ``torch.utils.flop_counter`` give their
    matrix-product FLOPs (counted in separate runs: the counter slows what it counts).  Full size: ``1 / fraction``
    times the steps (an epoch's steps grow linearly with the training set)."""
    from torch.utils.flop_counter import FlopCounterMode

    from calib.methods import run_methods
    from calib.methods.cfr import clear_reference_cache

    feats = rehearsal_features(dataset, backbone, fraction)
    # FLOPs are counted on a small copy and scaled by the training-set size (an epoch's work is linear in it)
    count_fraction = min(fraction, COUNT_FRACTION)
    small = feats if count_fraction == fraction else rehearsal_features(dataset, backbone, count_fraction)
    runs = {"base": (1, 1), "cfr": (2, 1), "reference": (1, 2)}

    def once(data: FeatureSet, epochs: int, ref: int, count: bool) -> float:
        clear_reference_cache()
        opts = {"epochs": epochs, "reference_epochs": ref, "device": device}
        if count:
            with FlopCounterMode(display=False) as counter:
                run_methods("cfr", data, list(seeds), [opts] * len(seeds))
            return float(counter.get_total_flops())
        with measured(device) as m:
            run_methods("cfr", data, list(seeds), [opts] * len(seeds))
        return m["seconds"]

    once(feats, 1, 1, False)  # warm-up: allocator, kernels, caches
    secs = {k: once(feats, *v, False) for k, v in runs.items()}
    flops = {k: once(small, *v, True) for k, v in runs.items()}
    cfr_epoch = max(secs["cfr"] - secs["base"], 1e-9)
    ref_epoch = max(secs["reference"] - secs["base"], 1e-9)
    cfr_gflop = (flops["cfr"] - flops["base"]) / 1e9 * len(feats.splits["train"]) / len(small.splits["train"])
    full = secs["base"] / fraction + 99 * (cfr_epoch + ref_epoch) / fraction
    rec = {
        "stage": "cfr_schedule",
        "dataset": dataset,
        "backbone": backbone,
        "lanes": len(seeds),
        "train": len(feats.splits["train"]),
        "fraction": fraction,
        "base_seconds": secs["base"],
        "cfr_epoch_seconds": cfr_epoch,
        "reference_epoch_seconds": ref_epoch,
        "cfr_epoch_gflop": cfr_gflop,
        "cfr_gflops": cfr_gflop / cfr_epoch,
        "cfr_fraction_of_gemm_peak": cfr_gflop / cfr_epoch / peak_gflops,
        "full_size_100_epochs_minutes": full / 60,
    }
    log.info(
        "CFR %s / %s, %d lanes: %.2f s an epoch (%.0f GFLOP/s, %.0f %% of the GEMM peak); 100 epochs at full size "
        "about %.1f min",
        dataset,
        backbone,
        len(seeds),
        cfr_epoch,
        rec["cfr_gflops"],
        100 * rec["cfr_fraction_of_gemm_peak"],
        rec["full_size_100_epochs_minutes"],
    )
    return rec


def layout_sizes(dataset: str, fraction: float, max_images: int) -> dict[str, tuple[int, ...]]:
    """Per split and group, the images the image stage writes: ``fraction`` of the dataset (at least 2 a group),
    scaled down further so the total stays within ``max_images``."""
    total = sum(sum(v) for v in DATASET_GROUPS[dataset].values())
    f = min(fraction, max_images / total)
    return {split: tuple(max(2, round(n * f)) for n in sizes) for split, sizes in DATASET_GROUPS[dataset].items()}


def rehearse_dataset_images(
    dataset: str,
    backbone: str,
    device: str,
    fraction: float,
    workdir: Path,
    max_images: int = 4096,
    per_image: int = 4,
) -> dict[str, Any]:
    """The image stage of one (dataset, backbone) on synthetic JPEGs in the dataset's release layout
    (:func:`calib.data.layouts.write_synthetic_release`, at the images' real sizes, written under ``workdir`` once
    per dataset: ``write_seconds`` is None for the backbones that reuse them), read by the real loader:
    extraction throughput of the training split through the real pipeline (decode, resize, normalise, the tower at
    random weights), TPT seconds per test image (the released 64 views and one step) and the attribution study's
    seconds per test image for every map it draws (M2IB: 10 steps of 10 noisy copies)."""
    from calib.clip.features import extract_split
    from calib.clip.models import load_clip
    from calib.data import LOADERS
    from calib.data.layouts import RELEASE_IMAGE_SIZES, write_synthetic_release

    sizes = layout_sizes(dataset, fraction, max_images)
    root = Path(workdir) / dataset
    write_s = None  # written once per dataset, read by every backbone
    if not (root / ".written").is_file():
        t0 = time.perf_counter()
        write_synthetic_release(dataset, root, sizes)
        (root / ".written").touch()
        write_s = time.perf_counter() - t0
    ds = LOADERS[dataset](root)
    loaded = load_clip(backbone, "random", device=device)
    cuda = device.startswith("cuda")
    train = ds.splits["train"]
    with measured(device) as m:
        extract_split(loaded, train, batch_size=256 if cuda else 32, desc=f"{dataset} train")
    rec: dict[str, Any] = {
        "stage": "dataset_images",
        "dataset": dataset,
        "backbone": backbone,
        "image_size": list(RELEASE_IMAGE_SIZES[dataset]),
        "images_written": sum(sum(v) for v in sizes.values()),
        "write_seconds": write_s,
        "extracted": len(train),
        "pipeline_img_s": len(train) / m["seconds"],
        **m,
    }
    test = ds.splits["test"]
    n = min(per_image, len(test))
    rec["tpt_s_per_img"] = _tpt_seconds(ds, loaded, device, n)
    rec["attribution_s_per_img"] = _attribution_seconds(loaded, [test.paths[i] for i in range(n)])
    log.info(
        "%s / %s: %.1f img/s through the pipeline; TPT %.2f s/img; M2IB %.2f s/img",
        dataset,
        backbone,
        rec["pipeline_img_s"],
        rec["tpt_s_per_img"],
        rec["attribution_s_per_img"].get("m2ib", float("nan")),
    )
    return rec


def _tpt_seconds(ds: Any, loaded: Any, device: str, n: int) -> float:
    """TPT's seconds per image (its defaults: 64 views, one AdamW step) on the first ``n`` test images."""
    from types import SimpleNamespace

    from calib.methods import get_method_class, make_options
    from calib.methods.base import RunContext

    tpt = get_method_class("tpt")(make_options("tpt", {"device": device}))
    tpt.context = RunContext(ds, loaded)
    tpt.fit(SimpleNamespace(class_names=ds.class_names), seed=0)
    test = ds.splits["test"]
    if device.startswith("cuda"):
        tpt.image_logits(test.paths[0], int(test.ids[0]))  # warm-up (allocator, kernel selection)
    with measured(device) as m:
        for i in range(n):
            tpt.image_logits(test.paths[i], int(test.ids[i]))
    return m["seconds"] / n


def _attribution_seconds(loaded: Any, paths: list[Path]) -> dict[str, float]:
    """Seconds per image of every map notebook 07 draws under one tower (it draws them under two: the pretrained
    projection and CFR's), on ``paths``, towards random unit text targets (the cost does not depend on them)."""
    import torch

    from calib.studies.attribution import load_images
    from calib.studies.attribution_maps import M2IBOptions, applicable_methods, image_maps, image_tower

    images, _ = load_images(loaded, paths)
    images = images.to(loaded.device)
    tower = image_tower(loaded.model)
    with torch.no_grad():
        d = tower.encode(images[:1]).shape[-1]
    text = torch.nn.functional.normalize(torch.randn(len(paths), d, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = {}
    for method in applicable_methods(tower):
        with measured(str(loaded.device)) as m:
            image_maps(method, tower, images, text.to(loaded.device), M2IBOptions(seed=0))
        out[method] = m["seconds"] / len(paths)
    return out


def stamp(device: str) -> dict[str, Any]:
    """Where and with what the report was measured."""
    import torch

    from calib.clip.throughput import device_name
    from calib.core.hashing import code_hash
    from calib.evaluation.results import git_revision

    return {
        "device": device,
        "device_name": device_name(device),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "commit": git_revision(),
        "code_hash": code_hash(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def rehearse(
    datasets: list[str],
    backbones: list[str],
    fraction: float,
    seeds: list[int],
    epochs: int,
    device: str,
    images: int = 256,
    image_seconds: float = 5.0,
    out: Path | None = None,
    layout_images: int = 4096,
    per_image: int = 4,
    cfr_schedule: tuple[str, str, float] | None = None,
) -> dict[str, Any]:
    """The whole rehearsal; the report (and ``out``, when given, as JSON).  ``images`` (0: none) and
    ``image_seconds`` size the model-bound timing per backbone; ``layout_images`` (0: no dataset image stage) caps
    the synthetic JPEGs written per dataset; ``per_image`` test images time TPT and the attribution maps;
    ``cfr_schedule`` = (dataset, backbone, fraction) times CFR's released schedule with the seeds as lanes
    (:func:`rehearse_cfr`; None: not timed)."""
    import tempfile

    from calib.experiments.bench import gemm_peak

    for name in datasets:
        if name not in DATASET_GROUPS:
            raise ValueError(f"unknown paper dataset {name!r}; known: {sorted(DATASET_GROUPS)}")
    for name in backbones:
        if name not in BACKBONE_DIMS:
            raise ValueError(f"unknown paper backbone {name!r}; known: {sorted(BACKBONE_DIMS)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if cfr_schedule is not None and (cfr_schedule[0] not in DATASET_GROUPS or cfr_schedule[1] not in BACKBONE_DIMS):
        raise ValueError(
            f"cfr_schedule {cfr_schedule[:2]}: expected a paper dataset ({sorted(DATASET_GROUPS)}) and backbone "
            f"({sorted(BACKBONE_DIMS)})"
        )
    report: dict[str, Any] = {
        "stamp": stamp(device),
        "fraction": fraction,
        "seeds": list(seeds),
        "epochs": epochs,
        "exact_sizes": [d for d in datasets if d in EXACT_SIZES],
        "gemm_peak_gflops": gemm_peak(device=device),
        "records": [],
    }
    if cfr_schedule is not None:
        ds, bb, frac = cfr_schedule
        report["records"].append(rehearse_cfr(ds, bb, frac, list(seeds), device, report["gemm_peak_gflops"]))
    with tempfile.TemporaryDirectory(prefix="calib-rehearse-") as tmp:
        for backbone in backbones:
            if images:
                report["records"].append(rehearse_images(backbone, device, images, image_seconds))
            for dataset in datasets:
                if layout_images:
                    work = Path(tmp)
                    rec = rehearse_dataset_images(dataset, backbone, device, fraction, work, layout_images, per_image)
                    report["records"].append(rec)
                report["records"] += rehearse_methods(dataset, backbone, fraction, list(seeds), epochs, device)
    if out is not None:
        from calib.core.files import atomic_write_bytes

        atomic_write_bytes(Path(out), json.dumps(report, indent=1, default=str).encode())
    return report


def render_report(report: dict[str, Any]) -> str:
    """The report as a short text table: per record, what ran and what it cost."""
    st = report["stamp"]
    lines = [
        f"rehearsal on {st['device_name']} ({st['device']}; torch {st['torch']}, commit {st['commit']}); fraction "
        f"{report['fraction']}, seeds {report['seeds']}, {report['epochs']} epochs; GEMM peak "
        f"{report['gemm_peak_gflops']:.0f} GFLOP/s",
        f"{'stage':7} {'dataset':10} {'backbone':24} {'notebook':26} {'runs':>5} {'train':>7} {'s':>8} "
        f"{'RSS GiB':>8} {'GPU GiB':>8}",
    ]
    for r in report["records"]:
        gpu = "" if r.get("peak_gpu_gib") is None else f"{r['peak_gpu_gib']:.2f}"
        if r["stage"] == "images":
            what = f"{r['model_bound_img_s']:.1f} / {r['pipeline_bound_img_s']:.1f} img/s (model / pipeline)"
            cost = f"{r['seconds']:8.1f} {r['peak_rss_gib']:8.2f} {gpu:>8}"
            lines.append(f"{'images':7} {'':10} {r['backbone']:24} {what:40} {cost}")
        elif r["stage"] == "cfr_schedule":
            what = (
                f"CFR {r['lanes']} lanes: {r['cfr_epoch_seconds']:.2f} s/epoch, "
                f"{100 * r['cfr_fraction_of_gemm_peak']:.0f}% of peak; "
                f"full size x 100 epochs {r['full_size_100_epochs_minutes']:.1f} min"
            )
            lines.append(f"{'cfr':7} {r['dataset']:10} {r['backbone']:24} {what}")
        elif r["stage"] == "dataset_images":
            m2ib = r["attribution_s_per_img"].get("m2ib", float("nan"))
            what = f"{r['pipeline_img_s']:.1f} img/s; TPT {r['tpt_s_per_img']:.2f}, M2IB {m2ib:.2f} s/img"
            cost = f"{r['seconds']:8.1f} {r['peak_rss_gib']:8.2f} {gpu:>8}"
            lines.append(f"{'layout':7} {r['dataset']:10} {r['backbone']:24} {what:40} {cost}")
        else:
            lines.append(
                f"{'methods':7} {r['dataset']:10} {r['backbone']:24} {r['notebook']:26} {r['runs']:5d} {r['train']:7d} "
                f"{r['seconds']:8.1f} {r['peak_rss_gib']:8.2f} {gpu:>8}"
            )
    return "\n".join(lines)
