"""CFR: each component against its definition, and the released behaviours."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calib.experiments.bench import synthetic_features
from calib.methods import run_method
from calib.methods.cfr import CFROptions, calibration_set, loss_weight, reference_erm
from calib.methods.heads import normalize
from calib.methods.losses import TSCLoss, info_nce, key_logsumexp, simplex_targets, supcon_loss
from calib.methods.projection import ProjectionHead

FAST = {"epochs": 3, "reference_epochs": 3}


@pytest.fixture(scope="module")
def synth():
    """Waterbirds-shaped problem (5% scale) with a known spurious direction, small dims."""
    return synthetic_features(d_h=32, d=16, scale=0.05, seed=1)


@pytest.fixture(scope="module")
def cfr_zs(synth):
    return run_method("cfr", synth, seed=0, options={**FAST, "reference": "zeroshot"})


def test_calibration_set_is_the_zero_shot_errors(synth, cfr_zs):
    zs = run_method("zeroshot", synth).instance
    pred = zs.logits(synth.splits["train"]).argmax(1)
    np.testing.assert_array_equal(cfr_zs.instance.calibration_idx, np.flatnonzero(pred != synth.splits["train"].y))


def test_calibration_set_is_the_erm_reference_errors(synth):
    run = run_method("cfr", synth, seed=0, options=FAST)
    opts = CFROptions(**FAST).projection_options(3, 0.0)
    ref, _ = reference_erm(synth, opts, 0)
    with torch.no_grad():
        pred = ref(torch.tensor(synth.splits["train"].h))[0].argmax(1).numpy()
    np.testing.assert_array_equal(run.instance.calibration_idx, np.flatnonzero(pred != synth.splits["train"].y))


def test_calibration_set_concentrates_on_minority_groups(synth, cfr_zs):
    """Misclassified samples come mostly from the groups where class and background disagree,
    although no group label was read to build the set."""
    tr = synth.splits["train"]
    cal = cfr_zs.instance.calibration_idx
    minority = np.isin(tr.g, [1, 2])
    assert minority[cal].mean() > 3 * minority.mean()


def test_low_margin_rule_by_hand():
    logits = np.array([[2.0, 0.0], [0.1, 0.0], [0.0, 3.0], [1.0, 1.5]])
    y = np.array([0, 0, 1, 1])  # margins: 2.0, 0.1, 3.0, 0.5
    np.testing.assert_array_equal(calibration_set(logits, y, "low_margin", 0.5), [1, 3])
    # no error at all: fall back to the low-margin rule rather than an empty calibration set
    np.testing.assert_array_equal(calibration_set(logits, y, "misclassified", 0.5), [1, 3])
    wrong = np.array([[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_array_equal(calibration_set(wrong, np.array([0, 0]), "misclassified", 0.5), [0])


def test_hard_negatives_are_the_nearest_other_class_samples(synth, cfr_zs):
    tr = synth.splits["train"]
    emb = normalize(tr.h @ synth.W0 + synth.b0)  # zero-shot reference space
    inst = cfr_zs.instance
    for row, anchor in list(enumerate(inst.calibration_idx))[:10]:
        others = np.flatnonzero(tr.y != tr.y[anchor])
        sims = emb[others] @ emb[anchor]
        expected = set(others[np.argsort(-sims)[:16]].tolist())
        assert set(inst.hard_negatives[row].tolist()) == expected
        negs = inst.sample_negatives(torch.tensor([row]))[0].numpy()
        assert set(negs.tolist()) == expected
        pos = inst.sample_positives(torch.tensor([row]))[0].numpy()
        assert (tr.y[pos] == tr.y[anchor]).all()


def test_only_the_projection_and_scale_learn(synth, cfr_zs):
    head = cfr_zs.instance.head
    # a ViT's proj has no bias (b0 = 0): the release trains none, nor does calib; RN50's c_proj has one
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {"W", "log_s"}
    np.testing.assert_array_equal(head.b.detach().numpy(), 0)
    with_bias = ProjectionHead(synth.W0, np.ones(16, np.float32), synth.text, 14.3)
    assert {n for n, p in with_bias.named_parameters() if p.requires_grad} == {"W", "b", "log_s"}
    np.testing.assert_array_equal(head.text.numpy(), synth.text)
    assert not np.allclose(head.W.detach().numpy(), synth.W0)
    assert list(TSCLoss(16, 2).parameters()) == []  # the regulariser has buffers, nothing trainable


def test_faithful_release_reproduces_the_three_behaviours(synth):
    fixed = run_method("cfr", synth, seed=0, options={**FAST, "reference": "zeroshot"}).instance
    rel = run_method("cfr", synth, seed=0, options={**FAST, "reference": "zeroshot", "faithful_release": True}).instance
    tr = synth.splits["train"]
    rows = torch.arange(len(rel.calibration_idx))
    anchors_y = tr.y[rel.calibration_idx]
    # 1. negatives: random samples of the anchor's own class instead of nearest other-class ones
    assert (tr.y[rel.sample_negatives(rows).numpy()] == anchors_y[:, None]).all()
    assert (tr.y[fixed.sample_negatives(rows).numpy()] != anchors_y[:, None]).all()
    # 2. dropout left on at evaluation: two predictions of the same split differ
    test = synth.splits["test"]
    assert not np.allclose(rel.logits(test), rel.logits(test))
    np.testing.assert_array_equal(fixed.logits(test), fixed.logits(test))
    # 3. the loss weight stuck at 1.5 instead of the cosine schedule
    o = CFROptions()
    assert [loss_weight(e, 100, o) for e in (0, 25, 50)] == pytest.approx([1.5, 1.0, 0.5])
    rel_o = dataclasses.replace(o, faithful_release=True)
    assert [loss_weight(e, 100, rel_o) for e in (0, 25, 50)] == [1.5, 1.5, 1.5]


def test_cfr_is_deterministic_and_validates_options(synth):
    a = run_method("cfr", synth, seed=4, options={**FAST, "reference": "zeroshot"})
    b = run_method("cfr", synth, seed=4, options={**FAST, "reference": "zeroshot"})
    np.testing.assert_array_equal(a.instance.head.W.detach().numpy(), b.instance.head.W.detach().numpy())
    with pytest.raises(ValueError, match="allowed"):
        run_method("cfr", synth, options={"regularizer": "l2"})


def test_info_nce_by_hand():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    n = torch.tensor([[[-1.0, 0.0]]])
    # positive 1: -log(e^1 / (e^1 + e^-1)); positive 2: -log(e^0 / (e^0 + e^-1))
    expected = (np.log(1 + np.exp(-2)) + np.log(1 + np.exp(-1))) / 2
    assert info_nce(a, p, n, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_simplex_targets_are_maximally_spread():
    for c, d in ((2, 16), (3, 16), (5, 8)):
        t = simplex_targets(c, d, seed=0)
        cos = (t @ t.T).numpy()
        np.testing.assert_allclose(np.diag(cos), 1, atol=1e-5)
        np.testing.assert_allclose(cos[~np.eye(c, dtype=bool)], -1 / (c - 1), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_key_logsumexp_matches_torch(dtype):
    """The exp2 log-sum-exp with its saved softmax against torch.logsumexp, values and gradients, lanes kept."""
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 7, 16, generator=gen, dtype=dtype), dim=-1).requires_grad_()
    keys = F.normalize(torch.randn(3, 40, 16, generator=gen, dtype=dtype), dim=-1)
    w = torch.randn(3, 7, generator=gen, dtype=dtype)  # a non-uniform upstream gradient
    t = 0.07
    ours = key_logsumexp(q, keys, t)
    ref = torch.logsumexp((q / t) @ keys.transpose(1, 2), dim=-1)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-5}
    torch.testing.assert_close(ours, ref, **tol)
    g_ours = torch.autograd.grad((w * ours).sum(), q)[0]
    g_ref = torch.autograd.grad((w * ref).sum(), q)[0]
    torch.testing.assert_close(g_ours, g_ref, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: key_logsumexp(x, keys, t), (q,))
    with pytest.raises(ValueError, match="constants"):
        key_logsumexp(q, keys.clone().requires_grad_(), t)


def test_tsc_matches_a_dense_reference():
    torch.manual_seed(0)
    m = TSCLoss(16, 2, queue=64, seed=0)
    m.queue_labels[0, :40] = torch.randint(0, 2, (40,))
    q = F.normalize(torch.randn(8, 16), dim=1).requires_grad_()
    y = torch.randint(0, 2, (8,))
    import copy

    ref_m = copy.deepcopy(m)
    (loss,) = m(q, y)
    target = ref_m._assign(q.detach()[None], y[None])[0]
    keys = torch.cat([ref_m.queue[0], ref_m.targets[0]])
    logits = torch.cat([(q * q).sum(1, keepdim=True), q @ keys.T], 1) / ref_m.temperature
    lp = logits - torch.logsumexp(logits, 1, keepdim=True)
    cp = (y[:, None] == ref_m.queue_labels[0][None]).float()
    tp = F.one_hot(target[y], 2).float()
    den = 1 + cp.sum(1) + tp.sum(1)
    # the release's class mask (TSC.py: mask_pos_view_class) has a 1 in the self column as well
    ref = (
        -(((cp * lp[:, 1:65]).sum(1) + lp[:, 0]) / den).mean()
        + 0.2 * -((tp * lp[:, 65:]).sum(1) / den).mean()
        - lp[:, 0].mean()
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    g1 = torch.autograd.grad(loss, q, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, q)[0]
    torch.testing.assert_close(g1, g2)
    assert (m.queue[0, :8] == q.detach()).all() and (m.queue_labels[0, :8] == y).all()  # the batch entered the queue


@pytest.mark.parametrize("n_classes", [2, 3, 5, 8])
def test_tsc_assignment_is_the_hungarian_one(n_classes):
    """The on-device enumeration (C <= 6) and the scipy fallback both give scipy's optimal assignment."""
    from scipy.optimize import linear_sum_assignment

    m = TSCLoss(16, n_classes, queue=32, seed=[0, 1, 2])
    q = F.normalize(torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    y = torch.arange(40).repeat(3, 1) % n_classes
    got = m._assign(q, y)
    for lane in range(3):
        rows, cols = linear_sum_assignment(-(m.centroids[lane] @ m.targets[lane].T).numpy())
        assert got[lane].tolist() == cols[np.argsort(rows)].tolist()


def test_supcon_pulls_same_class_together():
    x = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [-0.9, -0.1]]), dim=1)
    y = torch.tensor([0, 0, 1, 1])
    assert supcon_loss(x, y, 0.1) < supcon_loss(x, torch.tensor([0, 1, 0, 1]), 0.1)


def test_geometry_trains_once_then_reads_its_cache(synth, tmp_path, monkeypatch):
    from calib import methods
    from calib.studies.geometry import cfr_geometry

    opts = {**FAST, "reference": "zeroshot"}
    first = cfr_geometry(synth, 0, opts, cache_dir=tmp_path)
    assert first["after"].shape == (len(synth.splits["test"]), 16)
    np.testing.assert_allclose(np.linalg.norm(first["after"], axis=1), 1, rtol=1e-5)
    monkeypatch.setattr(methods, "run_method", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = cfr_geometry(synth, 0, opts, cache_dir=tmp_path)
    np.testing.assert_array_equal(again["after"], first["after"])
    assert again["calibration_groups"] == first["calibration_groups"]


def test_infonce_anchor_is_the_dropped_out_feature(synth, monkeypatch):
    """As released: the anchor passed to InfoNCE is normalize(dropout(e)), with the CE's dropout draw."""
    from calib.methods import cfr

    seen = []
    real = cfr.info_nce

    def spy(anchor, positives, negatives, tau):
        seen.append(anchor.detach()[0].clone())  # lane 0 (the only lane): [B, d]
        return real(anchor, positives, negatives, tau)

    monkeypatch.setattr(cfr, "info_nce", spy)
    run_method("cfr", synth, seed=0, options={"epochs": 1, "reference": "zeroshot", "dropout": 0.5})
    a = torch.cat(seen)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(len(a)))  # re-normalised
    zeros = (a == 0).float().mean().item()
    assert 0.4 < zeros < 0.6  # half the coordinates dropped


def test_pre_projection_negatives_are_nearest_in_h(synth):
    """negative_space="pre_projection": hard negatives ranked by cosine in the frozen h (where the release
    computes them), not in the reference embedding."""
    run = run_method(
        "cfr", synth, seed=0, options={**FAST, "reference": "zeroshot", "negative_space": "pre_projection"}
    )
    tr = synth.splits["train"]
    hn = normalize(tr.h)
    inst = run.instance
    for row, anchor in list(enumerate(inst.calibration_idx))[:10]:
        others = np.flatnonzero(tr.y != tr.y[anchor])
        expected = set(others[np.argsort(-(hn[others] @ hn[anchor]))[:16]].tolist())
        assert set(inst.hard_negatives[row].tolist()) == expected


def test_reference_memo_tells_feature_sets_apart():
    """Two feature sets whose meta agree (the same synthetic 'weights' and version) but whose backbones differ get
    their own reference heads: the memo keys on the dataset, the model and the shapes too (a rehearsal with two
    backbones in one process once loaded a 1024 x 768 reference into a 2048 x 1024 head)."""
    from calib.methods.cfr import reference_heads

    a = synthetic_features(d_h=16, d=8, scale=0.01, seed=0)
    b = synthetic_features(d_h=24, d=12, scale=0.01, seed=0)
    b.meta = dict(a.meta)  # as the rehearsal's synthetic sets had: one meta for every backbone
    opts = CFROptions(epochs=1, reference_epochs=1, device="cpu").projection_options(1, 0.0)
    ((head_a, _),) = reference_heads(a, [opts], [0])
    ((head_b, _),) = reference_heads(b, [opts], [0])
    assert head_a.W.shape == (1, 16, 8) and head_b.W.shape == (1, 24, 12)
    ((again, _),) = reference_heads(a, [opts], [0])  # still memoised for the first
    torch.testing.assert_close(again.W, head_a.W, rtol=0, atol=0)
