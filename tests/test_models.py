"""Loading open_clip models: real architectures with random weights, checkpoints, offline errors."""

import json
import time

import open_clip
import pytest
import torch

from calib.clip.models import (
    WeightsUnavailableError,
    encode_pre_projection,
    load_clip,
    projection_params,
    text_prototypes,
)


@pytest.fixture(scope="module")
def rn50():
    torch.manual_seed(0)
    return load_clip("RN50", "random", device="cpu")


@pytest.fixture(scope="module")
def vitb32():
    torch.manual_seed(0)
    return load_clip("ViT-B-32", "random", device="cpu")


@pytest.mark.parametrize("which, d_h, d", [("rn50", 2048, 1024), ("vitb32", 768, 512)])
def test_real_architectures_encode(which, d_h, d, request):
    loaded = request.getfixturevalue(which)
    x = torch.randn(2, 3, 224, 224)
    h, z = encode_pre_projection(loaded.model, x)
    assert h.shape == (2, d_h) and z.shape == (2, d)
    with torch.no_grad():
        ref = loaded.model.encode_image(x)
    torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-4)  # h @ W + b is the tower's own output
    W, b = projection_params(loaded.model)
    assert W.shape == (d_h, d) and b.shape == (d,)
    protos = text_prototypes(loaded, ["landbird", "waterbird"], ["a photo of a {}.", "a {}."])
    assert protos.shape == (2, d)
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(2))
    # the tower is restored after the pre-projection pass
    assert loaded.model.visual.__class__.__name__ in ("ModifiedResNet", "VisionTransformer")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(x), ref)


def test_rn50_bias_is_used(rn50):
    _, b = projection_params(rn50.model)
    assert torch.count_nonzero(b) > 0  # attnpool.c_proj has a bias; ViT proj does not


def test_vit_l14_builds():
    model = open_clip.create_model("ViT-L-14", pretrained=None, device="cpu")
    W, b = projection_params(model)
    assert W.shape == (1024, 768)
    del model


def test_checkpoint_roundtrip(tmp_path):
    from safetensors.torch import save_file

    a = load_clip("calib-toy-vit", "random:3", device="cpu")
    f = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, str(f))
    b = load_clip("calib-toy-vit", str(f), device="cpu")
    assert a.fingerprint == b.fingerprint
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(encode_pre_projection(a.model, x)[1], encode_pre_projection(b.model, x)[1])
    # and through open_clip's local-dir: convention
    d = tmp_path / "dir"
    d.mkdir()
    (d / "open_clip_model.safetensors").write_bytes(f.read_bytes())
    cfg = {"model_cfg": open_clip.get_model_config("calib-toy-vit")}
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    c = load_clip("calib-toy-vit", f"local-dir:{d}", device="cpu")
    assert c.fingerprint == a.fingerprint
    other = load_clip("calib-toy-vit", "random:4", device="cpu")
    assert other.fingerprint != a.fingerprint


def test_random_weights_are_seeded_and_leave_the_callers_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_clip("calib-toy-vit", "random", device="cpu")
    torch.testing.assert_close(torch.rand(3), expected_next)  # loading drew nothing from the caller's stream
    assert load_clip("calib-toy-vit", "random:0", device="cpu").fingerprint == a.fingerprint
    assert load_clip("calib-toy-vit", "random:1", device="cpu").fingerprint != a.fingerprint
    with pytest.raises(ValueError, match="random:<integer seed>"):
        load_clip("calib-toy-vit", "random:x", device="cpu")


def test_offline_missing_weights_fail_fast_and_say_what_to_do():
    t0 = time.time()
    with pytest.raises(WeightsUnavailableError) as err:
        load_clip("RN50", "openai", device="cpu")
    assert time.time() - t0 < 10
    msg = str(err.value)
    assert "timm/resnet50_clip.openai" in msg  # what to download
    assert "pretrained=" in msg and "HF_HUB_CACHE" in msg  # how to point calib at it


def test_unknown_names_list_options(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model 'RN5O'"):
        load_clip("RN5O", "openai")
    with pytest.raises(ValueError, match="known tags"):
        load_clip("RN50", "laion-nope")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_clip("RN50", str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsUnavailableError, match="open_clip_config.json"):
        load_clip("RN50", f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match="only for model"):
        load_clip("RN50", "toy")
