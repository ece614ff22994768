"""Checks that need a CUDA GPU (issue 20, item 5); skipped where there is none (CI, this 2-core machine).

On the GPU machine ``scripts/gpu_rehearsal.sh`` runs these together with ``tests/test_lanes.py``, whose methods
resolve ``device="auto"`` to the GPU there (the lane-vs-single equalities then hold on CUDA or fail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calib.experiments.bench import synthetic_features
from calib.methods import run_method
from calib.methods.projection import resolve_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# stated tolerances of CFR on the same features, CPU against GPU (fp32, TF32 off for matrix products)
LOSS_REL = 1e-3  # per-epoch training loss, relative
PRED_AGREE = 0.99  # share of test samples predicted alike
WGA_PP = 1.0  # test worst-group accuracy, percentage points


def test_auto_device_is_the_gpu():
    assert resolve_device("auto").type == "cuda"
    assert not torch.backends.cuda.matmul.allow_tf32  # fp32 matrix products stay fp32 unless calib says otherwise


def test_cfr_agrees_between_cpu_and_gpu():
    synth = synthetic_features(d_h=64, d=32, scale=0.2, seed=5)
    opts = {"epochs": 5, "reference_epochs": 5, "batch_size": 32}
    cpu = run_method("cfr", synth, 0, {**opts, "device": "cpu"})
    gpu = run_method("cfr", synth, 0, {**opts, "device": "cuda"})
    for a, b in zip(cpu.history, gpu.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_REL), a["epoch"]
    agree = np.mean(cpu.predictions["test"] == gpu.predictions["test"])
    assert agree >= PRED_AGREE, agree
    assert abs(cpu.metrics["test"]["wga"] - gpu.metrics["test"]["wga"]) * 100 <= WGA_PP


@pytest.mark.parametrize("model", ["RN50-quickgelu", "ViT-L-14-336-quickgelu"])
def test_bf16_extraction_matches_fp32(model):
    from calib.clip.models import encode_pre_projection, load_clip

    torch.manual_seed(0)
    loaded = load_clip(model, "random", device="cuda")
    size = loaded.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    x = torch.randn(8, 3, size, size, device="cuda")
    with torch.no_grad():
        _, z32 = encode_pre_projection(loaded.model, x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, z16 = encode_pre_projection(loaded.model, x)
    cos = torch.nn.functional.cosine_similarity(z16.float(), z32, dim=1)
    assert (cos >= 0.999).all(), cos.tolist()


def test_tf32_is_switched_on_for_the_training_step_only():
    from calib.methods.precision import training_precision

    before = torch.backends.cuda.matmul.allow_tf32
    with training_precision("tf32", torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_faster_precisions_train_cfr_close_to_fp32(precision):
    synth = synthetic_features(d_h=64, d=32, scale=0.2, seed=5)
    opts = {"epochs": 5, "reference_epochs": 5, "batch_size": 32, "device": "cuda"}
    fp32 = run_method("cfr", synth, 0, opts)
    fast = run_method("cfr", synth, 0, {**opts, "precision": precision})
    for a, b in zip(fp32.history, fast.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05), a["epoch"]
    assert np.mean(fp32.predictions["test"] == fast.predictions["test"]) >= 0.9


def test_lane_memory_bounds_the_measured_peak():
    from calib.methods import get_method_class, make_options, run_methods
    from calib.methods.base import MEMORY_MARGIN

    synth = synthetic_features(d_h=1024, d=768, scale=0.5, seed=0)
    opts = {"epochs": 2, "reference_epochs": 2, "device": "cuda"}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_methods("cfr", synth, [0, 1, 2, 3], [opts] * 4)
    peak = torch.cuda.max_memory_allocated() - base
    _, shared, per_lane = get_method_class("cfr").lane_memory(synth, make_options("cfr", opts))
    assert peak <= MEMORY_MARGIN * (shared + 4 * per_lane), (peak, shared, per_lane)
