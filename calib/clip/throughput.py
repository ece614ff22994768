"""Feature-extraction throughput: model-bound (in-memory tensors) and pipeline-bound (JPEG files).

``python -m calib bench throughput --model RN50 --pretrained random`` reports images per second
for the pre-projection pass calib caches, the FLOPs per image (counted by
``torch.utils.flop_counter``), the achieved TFLOP/s and, for GPUs whose dense bf16 peak is known,
the fraction of that peak.  Random weights are fine: throughput does not depend on them.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from calib.clip.features import ImageFiles
from calib.clip.models import LoadedClip, encode_pre_projection

log = logging.getLogger(__name__)

# dense bf16 peak TFLOP/s by device-name substring (vendor data sheets; SXM parts where both exist)
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


@dataclass
class Throughput:
    model: str
    device: str
    device_name: str
    batch_size: int
    image_size: int
    amp: bool
    model_bound_img_s: float
    pipeline_bound_img_s: float
    gflop_per_image: float
    achieved_tflops: float
    peak_bf16_tflops: float | None
    fraction_of_peak: float | None


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return platform.processor() or platform.machine()


def peak_bf16(name: str) -> float | None:
    """Dense bf16 peak of a known GPU, else None (CPUs: not listed)."""
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


@torch.no_grad()
def flops_per_image(loaded: LoadedClip, size: int) -> float:
    """FLOPs of one image's pre-projection pass (multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size, device=loaded.device)
    with FlopCounterMode(display=False) as counter:
        encode_pre_projection(loaded.model, x)
    return float(counter.get_total_flops())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
@torch.no_grad()  # as in extraction: timing with autograd on would build graphs and undercount
def model_bound(loaded: LoadedClip, batch_size: int, size: int, amp: bool, seconds: float = 10.0) -> float:
    """Images/s of the model alone on a batch already on the device."""
    dev = torch.device(loaded.device)
    x = torch.randn(batch_size, 3, size, size, device=dev)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
        for _ in range(2):
            encode_pre_projection(loaded.model, x)
        _sync(loaded.device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            encode_pre_projection(loaded.model, x)
            n += 1
        _sync(loaded.device)
    return n * batch_size / (time.perf_counter() - t0)


def write_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Path]:
    """``n`` textured JPEGs of Waterbirds/CUB-like size (smooth noise, quality 90)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BILINEAR)
        p = folder / f"img_{i:05d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


@torch.no_grad()
def pipeline_bound(loaded: LoadedClip, files: list[Path], batch_size: int, num_workers: int, amp: bool) -> float:
    """Images/s from JPEG files: decode, preprocess, transfer (pinned memory on GPU) and the model."""
    dev = torch.device(loaded.device)
    loader = DataLoader(
        ImageFiles(files, loaded.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=num_workers > 0,
    )
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
        for i, (x, _) in enumerate(loader):  # warm-up pass over the first batches
            encode_pre_projection(loaded.model, x.to(dev, non_blocking=True))
            if i == 1:
                break
        _sync(loaded.device)
        t0, n = time.perf_counter(), 0
        for x, _ in loader:
            encode_pre_projection(loaded.model, x.to(dev, non_blocking=True))
            n += len(x)
        _sync(loaded.device)
    return n / (time.perf_counter() - t0)


def measure(
    loaded: LoadedClip,
    batch_size: int = 64,
    n_files: int = 512,
    num_workers: int | None = None,
    amp: bool | None = None,
    seconds: float = 10.0,
) -> Throughput:
    """Both throughputs of ``loaded`` on its device, and the FLOP accounting."""
    from calib.clip.features import default_num_workers

    dev = loaded.device
    amp = dev.startswith("cuda") if amp is None else amp
    size = loaded.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mb = model_bound(loaded, batch_size, size, amp, seconds)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_jpegs(Path(tmp), n_files)
        pb = pipeline_bound(
            loaded, files, batch_size, default_num_workers() if num_workers is None else num_workers, amp
        )
    flops = flops_per_image(loaded, size)
    name = device_name(dev)
    peak = peak_bf16(name) if dev.startswith("cuda") else None
    achieved = mb * flops / 1e12
    return Throughput(
        model=loaded.name,
        device=dev,
        device_name=name,
        batch_size=batch_size,
        image_size=size,
        amp=amp,
        model_bound_img_s=mb,
        pipeline_bound_img_s=pb,
        gflop_per_image=flops / 1e9,
        achieved_tflops=achieved,
        peak_bf16_tflops=peak,
        fraction_of_peak=achieved / peak if peak else None,
    )


def as_dict(t: Throughput) -> dict:
    return asdict(t)
