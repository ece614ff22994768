"""Methods through the registry: zero-shot by hand, linear probe, CLIP+ERM behaviour."""

import dataclasses

import numpy as np
import pytest

from calib.clip.features import FeatureSet, SplitFeatures
from calib.methods import REGISTRY, create, describe_methods, run_method
from calib.methods.heads import normalize, zero_shot_logits
from calib.methods.projection import ProjectionHead, initial_logit_scale
from tests.fixtures import synthetic_prompt_bank


def test_registry_lists_label_needs():
    names = {m["name"]: m for m in describe_methods()}
    assert {"zeroshot", "linear_probe", "clip_erm"} <= set(names)
    assert names["zeroshot"]["label_needs"] == "none"
    assert names["clip_erm"]["label_needs"] == "val_groups"  # default selection reads val groups
    assert create("clip_erm", selection="val_worst_class").required_labels() == "none"


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="known methods"):
        create("cfr_plus_plus")
    with pytest.raises(ValueError, match="has no option"):
        create("clip_erm", learning_rate=1.0)


def test_zero_shot_by_hand():
    z = np.array([[3.0, 4.0], [0.0, -2.0]])
    text = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(zero_shot_logits(z, text, 10.0), [[6.0, 8.0], [0.0, -10.0]])


def _synthetic(n=400, seed=0) -> FeatureSet:
    """2 classes, 4 groups; h = class signal + spurious signal + noise, identity projection."""
    rng = np.random.default_rng(seed)

    def split(n, corr):
        y = rng.integers(0, 2, n)
        a = np.where(rng.random(n) < corr, y, 1 - y)
        h = np.zeros((n, 4), np.float32)
        h[:, 0] = (2 * y - 1) * 1.0 + rng.normal(0, 0.8, n)
        h[:, 1] = (2 * a - 1) * 2.0 + rng.normal(0, 0.3, n)
        h[:, 2:] = rng.normal(0, 1, (n, 2))
        return SplitFeatures(z=h[:, :3].copy(), y=y, g=2 * y + a, a=a, ids=np.arange(n), h=h)

    W0 = np.eye(4, 3, dtype=np.float32)
    text = normalize(np.array([[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]], np.float32))  # leans on the spurious axis
    return FeatureSet(
        splits={"train": split(n, 0.95), "val": split(n // 2, 0.5), "test": split(n, 0.5)},
        text=text,
        logit_scale=10.0,
        n_groups=4,
        class_names=["c0", "c1"],
        group_names=["0/0", "0/1", "1/0", "1/1"],
        W0=W0,
        b0=np.zeros(3, np.float32),
        prompts=synthetic_prompt_bank(),
    )


def test_every_method_runs_and_is_deterministic():
    data = _synthetic()
    for name in [n for n, c in REGISTRY.items() if not c.needs_images()]:  # TPT: tests/test_tpt.py
        opts = {"epochs": 3} if "epochs" in {f.name for f in dataclasses.fields(REGISTRY[name].Options)} else {}
        a = run_method(name, data, seed=1, options=opts)
        b = run_method(name, data, seed=1, options=opts)
        assert set(a.metrics) == {"train", "val", "test"}
        np.testing.assert_array_equal(a.predictions["test"], b.predictions["test"])
        assert 0.0 <= a.metrics["test"]["wga"] <= a.metrics["test"]["avg_acc"] <= 1.0


def test_clip_erm_trains_only_projection_and_scale():
    data = _synthetic()
    run = run_method("clip_erm", data, seed=0, options={"epochs": 5, "lr": 0.05, "selection": "last"})
    head: ProjectionHead = run.instance.head
    trainable = {"W", "log_s"} | ({"b"} if np.any(data.b0) else set())  # a bias only where the tower has one
    assert {n for n, p in head.named_parameters() if p.requires_grad} == trainable
    assert not np.allclose(head.W.detach().numpy(), data.W0)
    # the head starts at the release's scale 1/0.07 (ZeroShotCLIP.logit_scale), not the pretrained one
    first = ProjectionHead(data.W0, data.b0, data.text, initial_logit_scale(data, "release"))
    assert float(first.log_s.detach().exp()) == pytest.approx(1 / 0.07)
    assert initial_logit_scale(data, "pretrained") == pytest.approx(data.logit_scale)
    with pytest.raises(ValueError, match="allowed"):
        initial_logit_scale(data, "clip")
    np.testing.assert_array_equal(head.text.numpy(), data.text)  # the text side stays frozen
    assert len(run.history) == 5 and run.history[-1]["selected"]


def test_clip_erm_fixes_the_zero_shot_bias():
    """Zero-shot leans on the spurious axis; CE fine-tuning on the training set moves the head
    towards the class axis and raises average accuracy."""
    data = _synthetic(n=1000)
    zs = run_method("zeroshot", data).metrics["test"]
    erm = run_method("clip_erm", data, seed=0, options={"epochs": 30, "lr": 0.05, "selection": "last"}).metrics["test"]
    assert erm["avg_acc"] > zs["avg_acc"] + 0.05


def test_selection_rules():
    data = _synthetic()
    run = run_method("clip_erm", data, seed=0, options={"epochs": 6, "lr": 0.05, "selection": "val_wga"})
    scores = [h["val_wga"] for h in run.history]
    chosen = [h["epoch"] for h in run.history if h.get("selected")]
    assert chosen == [int(np.argmax(scores))]  # first epoch with the best val WGA
    with pytest.raises(ValueError, match="unknown selection rule"):
        run_method("clip_erm", data, options={"selection": "test_wga"})


def test_methods_on_toy_features(toy_features):
    for name in ("zeroshot", "linear_probe", "clip_erm"):
        run = run_method(name, toy_features, seed=0, options={"epochs": 2} if name == "clip_erm" else None)
        assert run.metrics["test"]["group_n"] == np.bincount(toy_features.splits["test"].g, minlength=4).tolist()


def _umfc_case() -> FeatureSet:
    """Three clusters on the axes of R^3 (two images at e1, one at e2, one at e3), two prompts e1, e2."""
    e = np.eye(3, dtype=np.float32)
    z = np.stack([e[0], e[0], e[1], e[2]])
    split = SplitFeatures(z=z, y=np.array([0, 0, 1, 1]), g=np.array([0, 0, 1, 1]))
    return FeatureSet(
        splits={"train": split, "val": split, "test": split},
        text=e[:2].copy(),
        logit_scale=10.0,
        n_groups=2,
        class_names=["a", "b"],
        group_names=["a", "b"],
    )


def test_umfc_matches_a_hand_computed_case():
    from calib.methods.adapters import umfc_text_shift

    data = _umfc_case()
    m = create("umfc", n_clusters=3, alpha=0.9, beta=0.3)
    m.fit(data, seed=0)
    # mu = (.5, .25, .25); per cluster normalize(mu - mu_k): (-.8165, .4082, .4082), (.5345, -.8018, .2673),
    # (.5345, .2673, -.8018); their sum (.2525, -.1263, -.1263) normalised:
    d = np.array([0.8165, -0.4082, -0.4082])
    np.testing.assert_allclose(umfc_text_shift(data.splits["train"].z, m.km.labels_, 3)[0], d, atol=1e-4)
    # t' = normalize(t - 0.3 d): (.75505, .12247, .12247)/.77466 and (-.24495, 1.12247, .12247)/1.15540
    np.testing.assert_allclose(m.text, [[0.97469, 0.15810, 0.15810], [-0.21200, 0.97150, 0.10600]], atol=1e-4)
    # e3's cluster has zero mean zero-shot logits, so its calibrated logits are s * t'[:, 2]
    np.testing.assert_allclose(
        m.logits(SplitFeatures(z=np.eye(3, dtype=np.float32)[2:], y=np.array([1]), g=np.array([1]))),
        [[1.5810, 1.0600]],
        atol=1e-3,
    )
    # an image at e1 loses alpha x its cluster's mean logits (10, 0)
    e1 = m.logits(SplitFeatures(z=np.eye(3, dtype=np.float32)[:1], y=np.array([0]), g=np.array([0])))
    np.testing.assert_allclose(e1, [[10 * 0.97469 - 9.0, 10 * -0.21200]], atol=1e-3)


def test_umfc_two_clusters_cancel_and_beta_zero_is_image_side_only():
    """With K = 2 the normalised directions are opposite, so the text shift vanishes (the old unnormalised
    sum did not); with beta = 0 the prototypes are the zero-shot ones."""
    from calib.methods.adapters import umfc_text_shift

    rng = np.random.default_rng(0)
    z = normalize(rng.normal(size=(50, 5)))
    labels = (z[:, 0] > 0).astype(int)
    np.testing.assert_allclose(umfc_text_shift(z, labels, 2), 0.0, atol=1e-3)  # rounding only (eps 1e-12)
    data = _synthetic()
    m = create("umfc", beta=0.0)
    m.fit(data, seed=0)
    np.testing.assert_allclose(m.text, normalize(data.text), atol=1e-6)


def test_umfc_modes_fit_where_they_say_and_label_their_rows():
    from calib.methods.adapters import UMFC

    data = _synthetic()
    fit = create("umfc", mode="train-fit")
    fit.fit(data, seed=0)
    trans = create("umfc", mode="transductive")
    trans.fit(data, seed=0)
    assert len(fit.km.labels_) == len(data.splits["train"].y)
    assert len(trans.km.labels_) == len(data.splits["test"].y)
    assert (trans.km.predict(normalize(data.splits["test"].z)) == trans.km.labels_).all()
    assert UMFC.row_label({"mode": "transductive"}) == "umfc (transductive)"
    with pytest.raises(ValueError, match="not one of"):
        create("umfc", mode="test").fit(data, seed=0)
