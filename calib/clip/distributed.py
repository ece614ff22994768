"""torch.distributed set-up for feature extraction under ``torchrun`` (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def distributed_context(device: str | None = None) -> Iterator[tuple[int, int, str]]:
    """Yield ``(rank, world size, device)``; initialise a process group when launched by torchrun.

    Outside torchrun (no ``WORLD_SIZE`` > 1) nothing is initialised: ``(0, 1, device)``.
    Each rank uses GPU ``LOCAL_RANK`` when GPUs are present.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1, device or ("cuda" if torch.cuda.is_available() else "cpu")
        return
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if use_cuda else "cpu"
    finally:
        dist.barrier()
        dist.destroy_process_group()
