"""Seeds and devices: seeding every generator calib and its libraries draw from, choosing the device."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy's legacy global state and torch; return a fresh ``default_rng(seed)``.

    Code in calib draws from the returned generator (or one derived from it), never from numpy's
    global state; the global seeding only tames third-party code.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    import torch

    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def torch_generator(seed: int, device: str | None = None):
    """A ``torch.Generator`` seeded with ``seed`` (on ``device``, default CPU)."""
    import torch

    gen = torch.Generator(device=device or "cpu")
    gen.manual_seed(seed)
    return gen


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, otherwise ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
