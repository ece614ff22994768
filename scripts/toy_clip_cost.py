"""What one toy-CLIP training step costs on this machine: matrix-product FLOPs, seconds, and the fraction of the GEMM
peak measured in the same run; then what the cold ``./run_all.sh`` spends on toy-CLIP pretraining at that rate.

Usage (docs/speed.md quotes its output):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/toy_clip_cost.py --threads 1
    OMP_NUM_THREADS=2 .venv/bin/python scripts/toy_clip_cost.py --threads 2

It runs the shipped ``calib.clip.toyclip.train_toy_clip`` (the default preset's model, batch and optimiser) twice on one
corpus, for ``--short`` and ``--long`` steps, and charges a step the difference divided by the extra steps, so model
creation, tokenisation and saving cancel.  FLOPs are counted the same way by ``torch.utils.flop_counter`` in separate
runs (counting slows the step).  The text tower encodes each distinct caption of a batch once, so a step's FLOPs vary
a little with the batch; the difference gives their mean over the extra steps.
"""

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from calib.clip.toyclip import TOY_PRESETS, make_corpus, train_toy_clip
from calib.experiments.bench import gemm_peak
from calib.studies.pretraining import DEFAULT_SOURCES

# toy CLIPs a cold ./run_all.sh pretrains, each with the toy CLIP's budget: the toy CLIP, then notebook 08's default
# sources other than the reference (which is the toy CLIP itself)
COLD_RUN_CLIPS = 1 + sum(name != "reference" for name in DEFAULT_SOURCES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--pairs", type=int, default=2000, help="corpus size (a step does not depend on it)")
    ap.add_argument("--short", type=int, default=10)
    ap.add_argument("--long", type=int, default=40)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    preset = TOY_PRESETS["toy"]
    cfg = dataclasses.replace(preset, n_pairs=a.pairs)
    images, captions, _ = make_corpus(cfg)

    def train(steps: int, count: bool) -> float:
        """Seconds (or FLOPs, when ``count``) of a whole training run of ``steps`` steps."""
        run_cfg = dataclasses.replace(cfg, steps=steps, warmup=min(cfg.warmup, steps))
        with tempfile.TemporaryDirectory() as out:
            if count:
                with FlopCounterMode(display=False) as counter:
                    train_toy_clip(run_cfg, Path(out), (images, captions))
                return float(counter.get_total_flops())
            t0 = time.perf_counter()
            train_toy_clip(run_cfg, Path(out), (images, captions))
            return time.perf_counter() - t0

    extra = a.long - a.short
    train(a.short, False)  # warm-up: first-touch memory, thread pools
    flop = (train(a.long, True) - train(a.short, True)) / extra
    seconds = min(train(a.long, False) - train(a.short, False) for _ in range(2)) / extra
    peak = gemm_peak() * 1e9
    rate = flop / seconds
    per_clip = seconds * preset.steps
    print(
        f"toy CLIP step (batch {preset.batch_size}, {a.threads} threads): {flop / 1e9:.2f} GFLOP, "
        f"{seconds * 1e3:.1f} ms, {rate / 1e9:.1f} GFLOP/s = {rate / peak:.0%} of the {peak / 1e9:.1f} GFLOP/s "
        f"GEMM peak measured now"
    )
    print(
        f"one toy CLIP ({preset.steps} steps): {flop * preset.steps / 1e12:.2f} TFLOP, {per_clip:.0f} s at this rate; "
        f"the {COLD_RUN_CLIPS} of a cold run_all: {COLD_RUN_CLIPS * per_clip:.0f} s with {a.threads} thread(s) at this "
        f"rate, {COLD_RUN_CLIPS * flop * preset.steps / peak:.0f} s at the peak"
    )


if __name__ == "__main__":
    main()
