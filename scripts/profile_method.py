"""Where a projection-trained method's step spends its time: wall time per lane-step, then torch.profiler's op table.

Usage (docs/speed.md quotes its output):
    OMP_NUM_THREADS=2 .venv/bin/python scripts/profile_method.py --dataset toy --method cfr --lanes 5 --epochs 4
    OMP_NUM_THREADS=2 .venv/bin/python scripts/profile_method.py --dataset synthetic --method clip_erm --lanes 1
Add ``--by-shape`` to split each op by its input shapes.  The first pass is a warm-up (CFR memoises its
CLIP+ERM references), the timed passes are the best of ``--repeats``, and the profiled pass comes last.
"""

import argparse
import logging
import time

import torch
from torch.profiler import ProfilerActivity, profile

from calib.clip.features import prepare_features
from calib.experiments.bench import synthetic_features
from calib.methods import make_options, run_methods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="toy", help="'synthetic' (Waterbirds-sized) or a dataset with cached features")
    ap.add_argument("--model", default="calib-toy-vit")
    ap.add_argument("--pretrained", default="toy")
    ap.add_argument("--method", default="cfr")
    ap.add_argument("--lanes", type=int, default=5, help="seeds 0..lanes-1, trained as lanes of one pass")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", type=int, default=30, help="rows of the op table")
    ap.add_argument("--by-shape", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    features = synthetic_features() if a.dataset == "synthetic" else prepare_features(a.dataset, a.model, a.pretrained)
    options = {"epochs": a.epochs} | ({"reference_epochs": a.epochs} if a.method == "cfr" else {})
    seeds = list(range(a.lanes))

    def run() -> None:
        run_methods(a.method, features, seeds, [options] * len(seeds))

    run()
    best = min(_timed(run) for _ in range(a.repeats))
    batch = getattr(make_options(a.method, options), "batch_size", 128)
    steps = a.epochs * -(-len(features.splits["train"]) // batch)
    print(
        f"{a.method} on {a.dataset}, {a.lanes} lanes, {a.epochs} epochs, {torch.get_num_threads()} threads: "
        f"{best:.2f} s, {best / steps * 1e3:.2f} ms per step, {best / steps / a.lanes * 1e3:.2f} ms per lane-step"
    )
    with profile(activities=[ProfilerActivity.CPU], record_shapes=a.by_shape) as prof:
        run()
    table = prof.key_averages(group_by_input_shape=a.by_shape)
    print(table.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=30))


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
