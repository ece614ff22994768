"""A batched run (several seeds or settings as lanes of one pass) gives each lane the numbers of its own run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calib.experiments.bench import synthetic_features
from calib.methods import get_method_class, make_options, run_method, run_methods
from calib.methods.lanes import lane_cross_entropy, lane_dropout
from calib.methods.projection import ProjectionHead


@pytest.fixture(scope="module")
def synth():
    return synthetic_features(d_h=32, d=16, scale=0.08, seed=3)


def _assert_same_run(batched, single) -> None:
    """Every number of every epoch to float tolerance, and the same predictions."""
    assert len(batched.history) == len(single.history)
    for epoch, (b, s) in enumerate(zip(batched.history, single.history)):
        assert b.keys() == s.keys(), epoch
        for key, value in s.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (epoch, key)
            else:
                assert b[key] == value, (epoch, key)
    for split, pred in single.predictions.items():
        np.testing.assert_array_equal(batched.predictions[split], pred)


CFR_FAST = {"epochs": 4, "reference_epochs": 4, "batch_size": 32}
CASES = {
    "clip_erm": [{"epochs": 4, "batch_size": 32}] * 3,
    "groupdro": [{"epochs": 4, "batch_size": 32}] * 3,
    "contrastive_adapter": [{"epochs": 30}] * 3,
    "cfr": [CFR_FAST] * 3,
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_seeds_as_lanes_match_their_single_runs(synth, method):
    options = CASES[method]
    seeds = [0, 1, 2]
    batched = run_methods(method, synth, seeds, options)
    assert [r.lanes for r in batched] == [3, 3, 3]  # one pass
    for r, seed, opts in zip(batched, seeds, options):
        _assert_same_run(r, run_method(method, synth, seed, opts))


def test_cfr_settings_as_lanes_match_their_single_runs(synth):
    """Ablation-style lanes: references, regularisers, rules, temperatures and dropout differ lane by lane."""
    options = [
        CFR_FAST,
        {**CFR_FAST, "regularizer": "ce", "temperature": 0.1},
        {**CFR_FAST, "regularizer": "none", "reference": "zeroshot"},
        {**CFR_FAST, "faithful_release": True, "dropout": 0.3},
        {**CFR_FAST, "regularizer": "supcon", "positive_rule": "nearest", "logit_scale_init": "pretrained"},
        {**CFR_FAST, "calibration": "low_margin", "weight_schedule": "constant", "contrastive_weight": 0.0},
    ]
    seeds = [0, 1, 0, 2, 0, 1]
    batched = run_methods("cfr", synth, seeds, options)
    assert {r.lanes for r in batched} == {6}
    for r, seed, opts in zip(batched, seeds, options):
        _assert_same_run(r, run_method("cfr", synth, seed, opts))


def test_runs_that_cannot_share_a_pass_run_apart(synth):
    cls = get_method_class("cfr")
    base = make_options("cfr", CFR_FAST)
    assert cls.lane_key(base) == cls.lane_key(make_options("cfr", {**CFR_FAST, "regularizer": "ce"}))
    assert cls.lane_key(base) != cls.lane_key(make_options("cfr", {**CFR_FAST, "lr": 1e-3}))  # the optimiser differs
    assert cls.lane_key(make_options("cfr", {"epoch_unit": "calibration"})) is None  # epoch = own calibration set
    runs = run_methods("cfr", synth, [0, 0], [CFR_FAST, {**CFR_FAST, "negatives": 4}])
    assert [r.lanes for r in runs] == [1, 1]
    assert get_method_class("dfr").lane_key(make_options("dfr")) is None  # not a trained head: one at a time


def test_lane_dropout_is_each_lanes_own_f_dropout():
    x = torch.randn(3, 5, 7)
    gens = [torch.Generator().manual_seed(s) for s in (4, 5, 6)]
    out = lane_dropout(x, [0.1, 0.0, 0.5], gens)
    for lane, (seed, p) in enumerate(zip((4, 5, 6), (0.1, 0.0, 0.5))):
        torch.manual_seed(seed)
        torch.testing.assert_close(out[lane], F.dropout(x[lane], p, training=True), rtol=0, atol=0)
    assert gens[1].initial_seed() == 5 and torch.equal(  # a lane with p = 0 drew nothing from its stream
        torch.rand(3, generator=gens[1]), torch.rand(3, generator=torch.Generator().manual_seed(5))
    )
    assert lane_dropout(x, [0.5] * 3, gens, training=False) is x


def test_lane_cross_entropy_is_per_lane_mean():
    logits, y = torch.randn(2, 6, 3), torch.randint(0, 3, (2, 6))
    got = lane_cross_entropy(logits, y)
    torch.testing.assert_close(got, torch.stack([F.cross_entropy(logits[i], y[i]) for i in range(2)]))


def test_projection_lanes_are_independent(synth):
    """A lane's gradient is its own loss's: lanes never mix."""
    head = ProjectionHead(synth.W0, synth.b0, synth.text, [10.0, 20.0])
    h = torch.as_tensor(synth.splits["train"].h[:8])
    loss = head(h).logsumexp(-1).mean(-1)  # [S]
    loss[1].backward()
    assert torch.all(head.W.grad[0] == 0) and head.W.grad[1].abs().sum() > 0
    one = head.select([1])
    assert one.lanes == 1 and float(one.log_s.detach().exp()) == pytest.approx(20.0)
    torch.testing.assert_close(one(h)[0], head(h)[1])


def test_deduplicated_rows_embed_as_the_plain_gather(synth):
    from calib.methods.cfr import embed_rows

    head = ProjectionHead(synth.W0, synth.b0, synth.text, [10.0, 20.0])
    with torch.no_grad():
        head.W[1].mul_(1.5)  # the lanes' projections differ
    h = torch.as_tensor(synth.splits["train"].h)
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, 10, (2, 6), generator=gen), torch.randint(0, len(h), (2, 6, 3), generator=gen)]
    for got, want in zip(embed_rows(head, h, parts), embed_rows(head, h, parts, dedupe=False)):
        assert got.shape == want.shape == (*parts[0].shape[:1], *want.shape[1:])
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(embed_rows(head, h, parts)[1][1, 2, 0], head.embed(h[parts[1][1, 2, 0]][None])[1, 0])
