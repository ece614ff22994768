"""What a trained projection does to known directions of the pre-projection space.

For a binary zero-shot head the decision is ``sign((h @ W + b) . (t_1 - t_0))``, so the effective
linear classifier in h-space is ``v = W (t_1 - t_0)`` (``[d_h]``; normalising ``z`` rescales it
per sample but never flips it).  A unit step along a direction ``u`` moves the logit difference
by ``u . v``: that is the direction's *logit weight*.  On the testbed (``calib.studies.testbed``),
where ``h`` carries a core and a spurious direction, a good recalibration drives the spurious
weight to zero and keeps the core weight positive; ``spurious_ratio = w_spurious / w_core``.
"""

from __future__ import annotations

import numpy as np


def direction_weights(W: np.ndarray, text: np.ndarray, directions: dict[str, np.ndarray]) -> dict[str, float]:
    """``{"w_<name>": u . W (t_1 - t_0)}`` for each direction, plus ``spurious_ratio`` when both
    ``core`` and ``spurious`` are present.  ``W [d_h, d]``, ``text [2, d]``, each ``u [d_h]``."""
    if text.shape[0] != 2:
        raise ValueError(f"direction weights are defined for two classes; the head has {text.shape[0]}")
    v = np.asarray(W, dtype=np.float64) @ (np.asarray(text[1], np.float64) - np.asarray(text[0], np.float64))
    out = {f"w_{name}": float(np.asarray(u, np.float64) @ v) for name, u in directions.items()}
    if "w_core" in out and "w_spurious" in out:
        out["spurious_ratio"] = out["w_spurious"] / out["w_core"] if out["w_core"] != 0 else float("inf")
    return out
