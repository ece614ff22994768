"""Where a projection-trained method's step spends its time: wall time per lane-step, then torch.profiler's op table.

Usage (docs/speed.md quotes its output):
    OMP_NUM_THREADS=2 .venv/bin/python scripts/profile_method.py --dataset toy --method cfr --lanes 5 --epochs 4
    OMP_NUM_THREADS=2 .venv/bin/python scripts/profile_method.py --dataset synthetic --method clip_erm --lanes 1
On the GPU machine (scripts/gpu_rehearsal.sh), at a paper dataset's split sizes and a paper backbone's dimensions:
    python scripts/profile_method.py --dataset celeba --backbone ViT-L-14-336-quickgelu --fraction 0.1 \
        --method cfr --device cuda --precision fp32 tf32 bf16
Add ``--by-shape`` to split each op by its input shapes.  The first pass is a warm-up (CFR memoises its
CLIP+ERM references), the timed passes are the best of ``--repeats``, and the profiled pass comes last.  On CUDA
it also counts the step's host synchronisations (``torch.cuda.set_sync_debug_mode``) and profiles GPU kernels.
"""

import argparse
import logging
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from calib.clip.features import prepare_features
from calib.experiments.bench import synthetic_features
from calib.experiments.rehearse import DATASET_GROUPS, rehearsal_features
from calib.methods import make_options, run_methods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dataset",
        default="toy",
        help="'synthetic' (Waterbirds-sized), a paper dataset's sizes (with --backbone), or one with cached features",
    )
    ap.add_argument("--model", default="calib-toy-vit")
    ap.add_argument("--pretrained", default="toy")
    ap.add_argument("--backbone", default=None, help="a paper backbone's dimensions for a paper dataset's sizes")
    ap.add_argument("--fraction", type=float, default=1.0, help="share of the paper dataset's size")
    ap.add_argument("--method", default="cfr")
    ap.add_argument("--lanes", type=int, default=5, help="seeds 0..lanes-1, trained as lanes of one pass")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", nargs="+", default=["fp32"], help="training precisions to time (the first profiled)")
    ap.add_argument("--rows", type=int, default=30, help="rows of the op table")
    ap.add_argument("--by-shape", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.backbone and a.dataset in DATASET_GROUPS:
        features = rehearsal_features(a.dataset, a.backbone, a.fraction)
    elif a.dataset == "synthetic":
        features = synthetic_features()
    else:
        features = prepare_features(a.dataset, a.model, a.pretrained)
    seeds = list(range(a.lanes))
    cuda = a.device.startswith("cuda")

    def run(precision: str) -> None:
        options = {"epochs": a.epochs, "device": a.device, "precision": precision}
        if a.method == "cfr":
            options["reference_epochs"] = a.epochs
        run_methods(a.method, features, seeds, [options] * len(seeds))
        if cuda:
            torch.cuda.synchronize()

    batch = getattr(make_options(a.method), "batch_size", 128)
    steps = a.epochs * -(-len(features.splits["train"]) // batch)
    for precision in a.precision:
        run(precision)
        best = min(_timed(lambda p=precision: run(p)) for _ in range(a.repeats))
        print(
            f"{a.method} on {a.dataset} ({len(features.splits['train'])} training samples), {a.lanes} lanes, "
            f"{a.epochs} epochs, {a.device}, {precision}, {torch.get_num_threads()} threads: {best:.2f} s, "
            f"{best / steps * 1e3:.2f} ms per step, {best / steps / a.lanes * 1e3:.2f} ms per lane-step"
        )
    if cuda:  # every host synchronisation inside the pass (a step should have none; an epoch's end reads metrics)
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(a.precision[0])
        torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        print(f"host synchronisations in one pass of {steps} steps: {len(syncs)}")
        for msg in sorted({str(w.message).splitlines()[0] for w in syncs})[:10]:
            print("  ", msg)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=a.by_shape) as prof:
        run(a.precision[0])
    table = prof.key_averages(group_by_input_shape=a.by_shape)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(table.table(sort_by=sort, row_limit=a.rows, max_name_column_width=30))


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
