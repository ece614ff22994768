"""Bootstrap confidence intervals over the test set, and paired comparisons between methods.

Every result row stores which test samples its method got right (:func:`pack_correct`: one bit per test
sample, samples ordered by group).  A bootstrap replicate resamples the test samples with replacement
within each group (group sizes stay fixed) and the seeds with replacement; the same replicate is applied
to every method compared, so a difference between two methods is paired on the same samples and seeds.
Intervals are the 2.5th and 97.5th percentiles of the replicates (percentile bootstrap), in percent.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

import numpy as np

N_BOOT = 1000  # replicates per interval
CI_SEED = 0  # the bootstrap's own random stream: the same rows always give the same interval


def pack_correct(correct: np.ndarray, g: np.ndarray) -> str:
    """``[n]`` booleans -> base64 of their bits, samples in group order (stable), for a result row."""
    order = np.argsort(np.asarray(g), kind="stable")
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)[order])).decode("ascii")


def unpack_correct(bits: str, group_n: Sequence[int]) -> list[np.ndarray]:
    """The inverse of :func:`pack_correct`: per group, a ``[n_g]`` boolean array."""
    n = int(sum(group_n))
    flat = np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8))[:n].astype(bool)
    return np.split(flat, np.cumsum(group_n)[:-1])


Correct = Mapping[int, list[np.ndarray]]  # seed -> per-group correctness


def replicates(methods: Mapping[str, Correct], n_boot: int = N_BOOT, seed: int = CI_SEED) -> dict[str, dict]:
    """Bootstrap replicates of the mean-over-seeds WGA and plain average accuracy of each method.

    ``methods`` maps a name to ``{seed: [correct of group 0, ...]}``; all share the seeds and the test
    set (groups of equal sizes).  Returns ``{name: {"wga": [B], "avg_acc": [B]}}`` (fractions), every
    method drawn on the same replicates.
    """
    names = list(methods)
    seeds = sorted(methods[names[0]])
    if any(sorted(methods[m]) != seeds for m in names):
        raise ValueError("bootstrap: the methods compared must share their seeds")
    group_n = [len(c) for c in methods[names[0]][seeds[0]]]
    rng = np.random.default_rng(seed)
    # acc[m][b, s, g]: accuracy of method m, seed s on group g of replicate b
    acc = {m: np.zeros((n_boot, len(seeds), len(group_n))) for m in names}
    for gi, n_g in enumerate(group_n):
        if n_g == 0:
            for m in names:
                acc[m][:, :, gi] = np.nan
            continue
        weights = rng.multinomial(n_g, np.full(n_g, 1.0 / n_g), size=n_boot).astype(np.float64)  # [B, n_g]
        for m in names:
            c = np.stack([methods[m][s][gi] for s in seeds], 1).astype(np.float64)  # [n_g, S]
            acc[m][:, :, gi] = weights @ c / n_g
    pick = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))  # seeds resampled, shared by every method
    n = np.asarray(group_n, dtype=np.float64)
    out = {}
    for m in names:
        wga = np.nanmin(acc[m], axis=2)  # [B, S]
        avg = np.nansum(acc[m] * n, axis=2) / n.sum()
        rows = np.arange(n_boot)[:, None]
        out[m] = {"wga": wga[rows, pick].mean(1), "avg_acc": avg[rows, pick].mean(1)}
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap ``samples``."""
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def format_interval(lo: float, hi: float, scale: float = 100.0) -> str:
    return f"[{lo * scale:.1f}, {hi * scale:.1f}]"


def correct_by_seed(part, split: str = "test") -> dict[int, list[np.ndarray]] | None:
    """``{seed: per-group correctness}`` from result rows (a flattened frame); None when a row lacks the bits
    (rows written before they were stored)."""
    if "correct" not in part or f"{split}.group_n" not in part:
        return None
    out = {}
    for seed, bits, group_n in zip(part["seed"], part["correct"], part[f"{split}.group_n"]):
        if not isinstance(bits, dict) or split not in bits or not isinstance(group_n, list):
            return None
        out[int(seed)] = unpack_correct(bits[split], group_n)
    return out or None


def method_intervals(part, split: str = "test") -> dict[str, str]:
    """95% intervals of the mean-over-seeds WGA and average accuracy of one method's rows, formatted
    (``"—"`` without stored correctness)."""
    correct = correct_by_seed(part, split)
    if correct is None:
        return {"wga": "—", "avg_acc": "—"}
    reps = replicates({"m": correct})["m"]
    return {k: format_interval(*interval(v)) for k, v in reps.items()}


def paired_difference(a, b, metric: str = "wga", split: str = "test") -> dict | None:
    """Mean over the shared seeds of ``metric(a) - metric(b)`` with its paired 95% interval, or None."""
    ca, cb = correct_by_seed(a, split), correct_by_seed(b, split)
    if ca is None or cb is None:
        return None
    seeds = sorted(set(ca) & set(cb))
    if not seeds:
        return None
    reps = replicates({"a": {s: ca[s] for s in seeds}, "b": {s: cb[s] for s in seeds}})
    diff = reps["a"][metric] - reps["b"][metric]
    point = np.mean([_metric(ca[s], metric) - _metric(cb[s], metric) for s in seeds])
    lo, hi = interval(diff)
    return {"diff": float(point), "lo": lo, "hi": hi, "seeds": len(seeds)}


def _metric(groups: list[np.ndarray], metric: str) -> float:
    accs = [c.mean() for c in groups if len(c)]
    if metric == "wga":
        return float(min(accs))
    return float(np.concatenate(groups).mean())
