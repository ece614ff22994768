"""Training precision as a setting recorded in every row, and passes of lanes split to fit the device (issue 20,
item 4, CPU side; the CUDA side is in tests/test_gpu.py)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

import calib.methods.adapters as adapters
import calib.methods.projection as projection
from calib.experiments.bench import synthetic_features
from calib.experiments.runner import RunSpec, run_experiment
from calib.methods import get_method_class, make_options, run_method, run_methods
from calib.methods.base import MEMORY_MARGIN, split_passes
from calib.methods.precision import PRECISIONS, training_precision

FAST = {"epochs": 3, "batch_size": 32, "device": "cpu"}


@pytest.fixture(scope="module")
def synth():
    return synthetic_features(d_h=32, d=16, scale=0.08, seed=3)


def test_precision_default_is_fp32_and_bad_values_are_refused(synth):
    for method in ("clip_erm", "cfr", "contrastive_adapter", "groupdro"):
        assert make_options(method).precision == "fp32"
    assert PRECISIONS == ("fp32", "tf32", "bf16")
    with pytest.raises(ValueError, match=r"precision='fp16'; allowed: \['fp32', 'tf32', 'bf16'\]"):
        run_method("clip_erm", synth, 0, {**FAST, "precision": "fp16"})


def test_tf32_on_a_cpu_is_fp32_exactly(synth):
    fp32 = run_method("clip_erm", synth, 0, FAST)
    tf32 = run_method("clip_erm", synth, 0, {**FAST, "precision": "tf32"})
    assert [r["loss"] for r in tf32.history] == [r["loss"] for r in fp32.history]
    np.testing.assert_array_equal(tf32.predictions["test"], fp32.predictions["test"])
    flags = torch.backends.cuda.matmul.allow_tf32
    with training_precision("tf32", torch.device("cpu")):
        assert torch.backends.cuda.matmul.allow_tf32 == flags  # nothing to switch on a CPU


def test_bf16_trains_close_to_fp32_but_not_identically(synth):
    fp32 = run_method("cfr", synth, 0, {**FAST, "reference_epochs": 3})
    bf16 = run_method("cfr", synth, 0, {**FAST, "reference_epochs": 3, "precision": "bf16"})
    a = np.array([r["loss"] for r in fp32.history])
    b = np.array([r["loss"] for r in bf16.history])
    assert not np.array_equal(a, b)  # autocast really ran the forward pass in bf16
    np.testing.assert_allclose(b, a, rtol=0.05)  # bf16 keeps ~3 significant digits
    agree = np.mean(fp32.predictions["test"] == bf16.predictions["test"])
    assert agree >= 0.9, agree


def test_every_row_records_how_it_was_computed(synth):
    spec = RunSpec("precision_rows", ["zeroshot", "clip_erm"], [0], options={"clip_erm": {**FAST, "precision": "tf32"}})
    df = run_experiment(spec, synth, write=False, reuse=False)
    rows = df.set_index("method")
    assert rows.loc["clip_erm", "compute.precision"] == "tf32"
    assert rows.loc["clip_erm", "compute.device"] == "cpu"
    assert pd.isna(rows.loc["zeroshot", "compute.precision"])  # no training, no setting
    assert not rows["compute.tf32_global"].any()


def test_lane_memory_counts_the_shapes(synth):
    cls = get_method_class("clip_erm")
    opts = make_options("clip_erm", {"batch_size": 4, "device": "cpu"})
    small = synthetic_features(d_h=8, d=4, scale=0.004, seed=0)
    n_tr, n_val = len(small.splits["train"]), len(small.splits["val"])
    device, shared, per_lane = cls.lane_memory(small, opts)
    assert device == "cpu"
    assert shared == 4 * (n_tr + n_val) * 8
    params = 8 * 4 + 4 + 1
    copies = 2 + 1 + 3  # param, grad, SGD momentum, three selection rules
    step = 4 * 4 * 1 * (8 + 6 * 4)
    scoring = 4 * max(n_tr, n_val) * (3 * 4 + 2)
    assert per_lane == 4 * params * copies + step + scoring
    cfr = get_method_class("cfr")
    o = make_options("cfr", {"batch_size": 4, "device": "cpu"})
    _, _, cfr_lane = cfr.lane_memory(small, o)
    rows = 2 + o.positives + o.negatives
    extra = 8 * n_tr * (rows + 1) * 2 + 4 * params
    assert cfr_lane == 4 * params * copies + 4 * 4 * rows * (8 + 6 * 4) + scoring + extra


def test_a_pass_that_does_not_fit_is_split_and_said(synth, monkeypatch, caplog):
    seeds = [0, 1, 2, 3, 4]
    whole = run_methods("clip_erm", synth, seeds, [FAST] * 5)
    assert {r.lanes for r in whole} == {5}
    cls = get_method_class("clip_erm")
    _, shared, per_lane = cls.lane_memory(synth, make_options("clip_erm", FAST))
    monkeypatch.setenv("CALIB_LANE_MEMORY_GIB", str(MEMORY_MARGIN * (shared + 2.5 * per_lane) / 2**30))
    with caplog.at_level(logging.WARNING):
        split = run_methods("clip_erm", synth, seeds, [FAST] * 5)
    assert [r.lanes for r in split] == [2, 2, 2, 2, 1]
    assert "clip_erm: 5 lanes need about" in caplog.text and "split into 3 passes of at most 2 lanes" in caplog.text
    for a, b in zip(whole, split):  # lanes are independent: the split changes the time, not the numbers
        np.testing.assert_array_equal(a.predictions["test"], b.predictions["test"])
        assert [r["loss"] for r in b.history] == pytest.approx([r["loss"] for r in a.history], rel=1e-5)


def test_split_passes_keeps_a_pass_that_fits(synth, monkeypatch):
    cls = get_method_class("cfr")
    methods = [cls(make_options("cfr", FAST)) for _ in range(4)]
    monkeypatch.setenv("CALIB_LANE_MEMORY_GIB", "1000")
    assert split_passes(cls, synth, methods, [0, 1, 2, 3]) == [[0, 1, 2, 3]]
    monkeypatch.setenv("CALIB_LANE_MEMORY_GIB", "1e-9")  # not even one lane fits: one lane a pass, still runs
    assert split_passes(cls, synth, methods, [0, 1, 2, 3]) == [[0], [1], [2], [3]]
    dfr = get_method_class("dfr")  # not a trained head: no estimate, never split
    assert split_passes(dfr, synth, [dfr(make_options("dfr"))] * 2, [0, 1]) == [[0, 1]]


def test_scoring_in_chunks_equals_one_pass(synth, monkeypatch):
    head = projection.ProjectionHead(synth.W0, synth.b0, synth.text, [10.0, 20.0, 30.0])
    with torch.no_grad():
        head.W.add_(0.05 * torch.randn(head.W.shape, generator=torch.Generator().manual_seed(0)))
    x = torch.as_tensor(synth.splits["train"].h)
    whole = head(x).argmax(-1).numpy()
    monkeypatch.setattr(projection, "EVAL_CHUNK", 7)
    np.testing.assert_array_equal(projection.lane_predictions(head, x), whole)


def test_adapter_neighbours_in_chunks_equal_the_whole_matrix(synth, monkeypatch):
    tr = synth.splits["train"]
    zn = torch.nn.functional.normalize(torch.as_tensor(tr.z), dim=1)
    y = torch.as_tensor(tr.y)
    anchors = torch.arange(0, len(zn), 3)
    whole = adapters.nearest_neighbours(zn, y, anchors, 4, 6)
    monkeypatch.setattr(adapters, "NEIGHBOUR_CHUNK_ELEMENTS", 5 * len(zn))  # 5 anchors a chunk
    chunked = adapters.nearest_neighbours(zn, y, anchors, 4, 6)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sim = zn[anchors] @ zn.T  # by hand: the nearest other-class sample of the first anchor
    other = torch.where(y != y[anchors[0]])[0]
    assert int(whole[1][0, 0]) == int(other[sim[0, other].argmax()])
