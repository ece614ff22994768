"""The arithmetic precision of the trained heads, decided explicitly (issue 20, item 4).

Three settings, the ``precision`` option of every projection-training method (CLIP+ERM, CFR and its reference,
the contrastive adapter, GroupDRO's head):

- ``"fp32"`` (the default): every matrix product in fp32, TF32 left off.  Chosen because the toy tables must stay
  byte-identical, CFR must agree between the CPU and a GPU within the tolerances of ``tests/test_gpu.py``, and the
  heads are small: at CelebA size with ViT-L/14 a CFR step is a few GEMMs of ``[S * 4 * 128, 1024] x [1024, 768]``
  per lane group, so precision is not what bounds the step on an H200 (launch overhead is).
- ``"tf32"``: fp32 storage, TF32 tensor-core matrix products on CUDA (``allow_tf32`` for the step only).  On a CPU
  there is no TF32; it computes exactly as ``"fp32"``.
- ``"bf16"``: the forward pass under bf16 autocast (on CUDA, and on a CPU where torch supports it); parameters,
  gradients and the optimiser state stay fp32.

Selection and evaluation always run in fp32, so a setting changes how a head is trained, never how it is scored.
Every result row records the setting, the training device and the global TF32 flag
(:func:`compute_record`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {list(PRECISIONS)}")
    return precision


@contextmanager
def training_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Flags for one training step (forward and backward) at ``precision`` on ``device``; restored on exit."""
    check_precision(precision)
    if precision != "tf32" or device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def forward_autocast(precision: str, device: torch.device):
    """The autocast context of a training forward pass (bf16 only; a no-op context otherwise)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def compute_record(options: dict[str, Any], features_precision: str | None) -> dict[str, Any]:
    """What a result row records of how it was computed: the training ``device`` (resolved from the method's
    ``device`` option; ``None`` for methods without one, which run on the CPU in NumPy or on the features' device),
    the training ``precision`` (``None`` for methods without the option), whether TF32 matrix products were
    globally enabled, and the precision the features were extracted at."""
    device = options.get("device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "precision": options.get("precision"),
        "tf32_global": bool(torch.backends.cuda.matmul.allow_tf32),
        "features": features_precision,
    }
