"""Loading CLIP models through open_clip, and splitting the image tower at its last linear map.

:func:`load_clip` accepts any open_clip ``(model name, pretrained)`` pair where ``pretrained`` is

- an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...), read from the Hugging Face cache;
- a local checkpoint file (``.pt``, ``.bin``, ``.safetensors``);
- ``"local-dir:<folder>"`` holding ``open_clip_config.json`` and weights;
- ``"toy"``: calib's own toy CLIP (trained on first use, see :mod:`calib.clip.toyclip`;
  ``"toy-quick"`` is a seconds-long version for tests);
- ``None`` / ``"random"`` / ``"random:<seed>"``: randomly initialised weights (tests, throughput, smoke
  runs of the paper profile), drawn from a fixed seed (0 unless given) so that the same spelling always
  gives the same weights and hence the same feature cache.

Without network and without the weights on disk it fails at once with one message saying what to
download and how to point calib at it (open_clip alone would retry for ~46 s first).

CFR trains only the image tower's final linear map ``z = h @ W + b``.  :func:`encode_pre_projection`
returns ``h`` (ViT: pooled token after ``ln_post``; RN50: attention-pool output before ``c_proj``)
and ``z``; :func:`projection_params` returns ``W`` (``[d_h, d]``) and ``b`` (``[d]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calib.clip.toyclip import ASSETS, TOY_MODEL_NAME, TOY_PRESETS, ensure_toy_clip, register_calib_models  # noqa: F401
from calib.core.logs import expected_random_init

log = logging.getLogger(__name__)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable; the message says what to fetch."""


class CheckpointError(ValueError):
    """A local weights file exists but cannot be read as this model's weights; the message names the file."""


class UnsupportedModelError(ValueError):
    """The image tower is of a kind whose final linear map calib does not know how to split."""


@dataclass
class LoadedClip:
    """An open_clip model ready for feature extraction."""

    model: nn.Module
    preprocess: Callable  # PIL image -> float tensor [3, H, W]
    tokenizer: Callable  # list[str] -> long tensor [n, context_length]
    name: str
    pretrained: str  # as given (tag, path, local-dir:..., toy, random)
    fingerprint: str  # hash of the weights actually loaded: part of every feature-cache key
    device: str

    @property
    def preprocess_id(self) -> str:
        """A stable description of the image preprocessing (part of the feature-cache key)."""
        return " | ".join(repr(t) for t in getattr(self.preprocess, "transforms", [self.preprocess]))


def weights_fingerprint(model: nn.Module, length: int = 16) -> str:
    """A hash of every parameter's name, shape and leading values: changes whenever the weights do."""
    import hashlib

    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1)[:4096].float().cpu().numpy()
        h.update(np.ascontiguousarray(flat).tobytes())
    return h.hexdigest()[:length]


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _check_tag_available(name: str, tag: str, cache_dir: str | None) -> None:
    """Raise :class:`WeightsUnavailableError` at once when ``(name, tag)`` cannot be had."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    hf = cfg.get("hf_hub", "")
    url = cfg.get("url", "")
    sources = []
    if hf:
        from huggingface_hub import try_to_load_from_cache

        model_id, filename = os.path.split(hf)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for fn in names:
            hit = try_to_load_from_cache(model_id, fn, cache_dir=cache_dir)
            if isinstance(hit, str):
                return
        sources.append(f"https://huggingface.co/{model_id} (file {' or '.join(names)})")
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if target.is_file():
            return
        sources.append(url)
    if not _offline() and _network_reachable():
        return  # open_clip will download it
    raise WeightsUnavailableError(
        f"The weights for open_clip model {name!r} with pretrained tag {tag!r} are not on this machine "
        f"and cannot be downloaded (offline).\n"
        f"Download them on a machine with network from: {'; '.join(sources) or 'the open_clip model zoo'}\n"
        "then either pass the file itself, e.g. "
        f"load_clip({name!r}, pretrained='/path/to/open_clip_model.safetensors') "
        f"(notebooks: the `pretrained` parameter), or place it in the Hugging Face cache "
        f"(HF_HUB_CACHE; e.g. `huggingface-cli download {hf.rstrip('/') if hf else '<repo>'}` on a connected machine, "
        f"then copy its cache folder here)."
    )


def _resolve(name: str, pretrained: str | None, cache_dir: str | None) -> str | None:
    """Turn calib's ``pretrained`` spellings into what open_clip takes, checking availability."""
    import open_clip

    register_calib_models()
    if name not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        raise ValueError(
            f"unknown open_clip model {name!r}; did you mean one of {close}? (`open_clip.list_models()` lists all)"
        )
    if random_seed(pretrained) is not None:
        return None
    if pretrained in ("toy", "toy-quick"):
        if name != TOY_MODEL_NAME:
            raise ValueError(f"pretrained={pretrained!r} exists only for model {TOY_MODEL_NAME!r}, not {name!r}")
        return str(ensure_toy_clip(TOY_PRESETS[pretrained]))
    if pretrained.startswith("local-dir:"):
        folder = Path(pretrained[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise WeightsUnavailableError(f"{pretrained}: expected {folder}/open_clip_config.json and a weights file")
        return f"local-dir:{folder.resolve()}"
    as_path = Path(pretrained).expanduser()
    if as_path.suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained:
        if not as_path.is_file():
            raise WeightsUnavailableError(f"checkpoint file {as_path} does not exist")
        return str(as_path.resolve())
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ValueError(
            f"unknown pretrained tag {pretrained!r} for model {name!r}; known tags: {tags} "
            "(or pass a checkpoint file, 'local-dir:<folder>', 'random')"
        )
    _check_tag_available(name, pretrained, cache_dir)
    return pretrained


def check_weights(name: str, pretrained: str | None, cache_dir: str | None = None) -> None:
    """Raise at once, building nothing, when ``load_clip(name, pretrained)`` could not load here: an unknown model
    or tag (``ValueError``) or weights neither on this machine nor downloadable (:class:`WeightsUnavailableError`).
    The toy CLIP's tags always pass: calib trains them on demand."""
    if pretrained in ("toy", "toy-quick") and name == TOY_MODEL_NAME:
        return
    _resolve(name, pretrained, cache_dir)


def random_seed(pretrained: str | None) -> int | None:
    """The seed of a random-weights spelling (``None``, ``"random"``, ``"random:7"``), else ``None``."""
    if pretrained in (None, "", "random", "none"):
        return 0
    if pretrained.startswith("random:"):
        try:
            return int(pretrained[len("random:") :])
        except ValueError:
            raise ValueError(f"pretrained={pretrained!r}: expected 'random:<integer seed>'") from None
    return None


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str | None = None,
    cache_dir: str | None = None,
    **model_kwargs: Any,
) -> LoadedClip:
    """Load an open_clip model in eval mode on ``device`` (GPU when present).

    ``model_kwargs`` go to ``open_clip.create_model_and_transforms`` (e.g. ``force_image_size``).
    Raises :class:`WeightsUnavailableError` (what to download, how to point calib at it) or
    ``ValueError`` (unknown model or tag, listing the valid ones).
    """
    import open_clip

    from calib.core.runtime import default_device

    device = device or default_device()
    resolved = _resolve(name, pretrained, cache_dir)
    # open_clip reads a local-dir: folder (config + weights) through the model-name argument
    ident, weights = (resolved, None) if resolved and resolved.startswith("local-dir:") else (name, resolved)
    seed = random_seed(pretrained)
    # random weights come from their own seed, and the caller's RNG streams are left as they were
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        if seed is not None:
            torch.manual_seed(seed)
        quiet = expected_random_init() if seed is not None else contextlib.nullcontext()
        try:
            with quiet:  # random:N asks for random weights: open_clip's warning about them is expected
                model, _, preprocess = open_clip.create_model_and_transforms(
                    ident, pretrained=weights, device=device, cache_dir=cache_dir, **model_kwargs
                )
        except Exception as err:
            local = next((p for p in (weights, ident) if p and Path(str(p).removeprefix("local-dir:")).exists()), None)
            if local is None:
                raise
            detail = (str(err).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(
                f"cannot read the weights file {local} for model {name!r} ({type(err).__name__}: {detail}). "
                "Expected an open_clip / OpenAI checkpoint (.pt, .bin, a state dict) or a .safetensors file saved "
                f"from a {name!r} model; a truncated download or another architecture gives this error."
            ) from err
    model.eval()
    tokenizer = open_clip.get_tokenizer(ident)
    return LoadedClip(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=name,
        pretrained=str(pretrained),
        fingerprint=weights_fingerprint(model),
        device=str(device),
    )


# --- the image tower's last linear map --------------------------------------------------------


def _tower_kind(visual: nn.Module) -> str:
    if hasattr(visual, "attnpool") and hasattr(visual.attnpool, "c_proj"):
        return "resnet"
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        if getattr(visual, "attn_pool", None) is not None:
            raise UnsupportedModelError("ViTs with an attentional pooler (CoCa-style) are not supported")
        return "vit"
    raise UnsupportedModelError(
        f"cannot locate the final linear projection of image tower {type(visual).__name__}; "
        "supported: open_clip VisionTransformer (visual.proj) and ModifiedResNet (visual.attnpool.c_proj)"
    )


def projection_params(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` of the image tower's last linear map, ``z = h @ W + b``: ``W [d_h, d]``, ``b [d]``.

    Returned as detached float32 CPU copies (ViT has no bias: ``b`` is zeros).
    """
    visual = model.visual
    if _tower_kind(visual) == "vit":
        W = visual.proj.detach().float().cpu().clone()
        return W, torch.zeros(W.shape[1])
    c_proj = visual.attnpool.c_proj
    return c_proj.weight.detach().float().cpu().T.contiguous(), c_proj.bias.detach().float().cpu().clone()


@contextmanager
def _without_projection(visual: nn.Module) -> Iterator[None]:
    """Temporarily make the tower's last linear map the identity, so ``visual(x)`` returns ``h``."""
    kind = _tower_kind(visual)
    if kind == "vit":
        saved = visual.proj
        visual.proj = None
        try:
            yield
        finally:
            visual.proj = saved
    else:
        pool = visual.attnpool
        saved = pool.c_proj
        width = saved.in_features
        ident = nn.Linear(width, width).to(device=saved.weight.device, dtype=saved.weight.dtype)
        with torch.no_grad():
            ident.weight.copy_(torch.eye(width))
            ident.bias.zero_()
        pool.c_proj = ident
        try:
            yield
        finally:
            pool.c_proj = saved


@torch.no_grad()
def encode_pre_projection(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features before and after the last linear map.

    Args:
        images: preprocessed batch ``[n, 3, H, W]`` on the model's device.
    Returns:
        ``h [n, d_h]`` (input of the final projection) and ``z [n, d]`` (= ``model.encode_image``),
        both float32, unnormalised.
    """
    visual = model.visual
    with _without_projection(visual):
        h = visual(images)
    if isinstance(h, tuple):  # towers configured to also return tokens
        h = h[0]
    h = h.float()
    W, b = projection_params(model)
    z = h @ W.to(h.device) + b.to(h.device)
    return h, z


@torch.no_grad()
def text_prototypes(loaded: LoadedClip, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot class prototypes ``[n_classes, d]``: per class, the normalised mean over
    templates of the normalised text embeddings, as in CLIP's prompt ensembling."""
    protos = []
    for cname in class_names:
        tokens = loaded.tokenizer([t.format(cname) for t in templates]).to(loaded.device)
        emb = loaded.model.encode_text(tokens).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        protos.append(mean / mean.norm())
    return torch.stack(protos).cpu()


def logit_scale(model: nn.Module) -> float:
    """The model's learned logit scale ``s = exp(logit_scale)``."""
    return float(model.logit_scale.detach().exp().cpu())
