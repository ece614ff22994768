"""TPT (calib.methods.tpt): the text tower from token embeddings, zero steps = single-prompt zero-shot, the
context reset between images, no labels read, and the runner's plumbing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calib.clip.features import build_feature_set
from calib.clip.models import load_clip
from calib.data import ToyConfig, load_waterbirds, make_toy_waterbirds
from calib.methods import run_method
from calib.methods.base import RunContext
from calib.methods.tpt import encode_text_from_embeddings


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = make_toy_waterbirds(tmp_path_factory.mktemp("tpt") / "toy", ToyConfig(scale=0.002, seed=11))
    ds = load_waterbirds(root, name="tpt-test")
    clip = load_clip("calib-toy-vit", "random:3", device="cpu")
    feats = build_feature_set(clip, ds, cache_dir=tmp_path_factory.mktemp("cache"), num_workers=0)
    return ds, clip, feats


@pytest.mark.parametrize("name", ["calib-toy-vit", "ViT-B-32"])
def test_text_tower_from_token_embeddings_equals_encode_text(name):
    clip = load_clip(name, "random:0", device="cpu")
    tokens = clip.tokenizer(["a photo of a landbird.", "a photo of a waterbird."])
    with torch.no_grad():
        ours = encode_text_from_embeddings(clip.model, clip.model.token_embedding(tokens), tokens)
        theirs = clip.model.encode_text(tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_zero_steps_is_the_single_prompt_zero_shot_classifier(toy):
    from PIL import Image

    ds, clip, feats = toy
    run = run_method("tpt", feats, seed=0, options={"steps": 0, "views": 8}, context=RunContext(ds, clip))
    test = ds.splits["test"]
    with torch.no_grad():
        images = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in test.paths])
        img = F.normalize(clip.model.encode_image(images), dim=-1)
        txt = F.normalize(
            clip.model.encode_text(clip.tokenizer([f"a photo of a {c}." for c in ds.class_names])), dim=-1
        )
        expected = (clip.model.logit_scale.exp() * img @ txt.T).argmax(1).numpy()
    np.testing.assert_array_equal(run.predictions["test"], expected)
    tpt = run.instance
    logits = tpt.logits(feats.splits["test"])
    np.testing.assert_allclose(logits, (clip.model.logit_scale.exp() * img @ txt.T).numpy(), rtol=1e-5, atol=1e-5)
    assert list(run.metrics) == ["test"]  # per-image work: the test split only


def test_context_resets_between_images_and_order_does_not_matter(toy):
    import dataclasses

    ds, clip, feats = toy
    run = run_method("tpt", feats, seed=0, options={"views": 16, "selection_p": 0.25}, context=RunContext(ds, clip))
    tpt = run.instance
    init = tpt.learner.ctx_init_state
    assert len(tpt.context_at_start) == len(feats.splits["test"].y)
    assert all(torch.equal(c, init) for c in tpt.context_at_start)  # every image starts from "a photo of a"
    assert not torch.equal(tpt.learner.ctx.detach(), init)  # and the step moved it
    test = feats.splits["test"]
    both = tpt.logits(test)
    last = dataclasses.replace(test, z=test.z[-1:], y=test.y[-1:], g=test.g[-1:], a=None, ids=test.ids[-1:], h=None)
    np.testing.assert_allclose(tpt.logits(last), both[-1:], rtol=1e-6, atol=1e-6)  # alone == after the others


def test_no_label_is_read_and_the_subsample_is_seeded(toy):
    import dataclasses

    ds, clip, feats = toy
    ctx = RunContext(ds, clip)
    a = run_method("tpt", feats, seed=1, options={"views": 8, "max_images": 3}, context=ctx)
    test = feats.splits["test"]
    flipped = dataclasses.replace(feats, splits={**feats.splits, "test": dataclasses.replace(test, y=1 - test.y)})
    b = run_method("tpt", flipped, seed=1, options={"views": 8, "max_images": 3}, context=ctx)
    np.testing.assert_array_equal(a.predictions["test"], b.predictions["test"])
    assert len(a.predictions["test"]) == 3


def test_tpt_without_images_says_what_it_needs(toy):
    _, _, feats = toy
    with pytest.raises(ValueError, match="works on the images with the CLIP model"):
        run_method("tpt", feats)
