"""Attribution maps for CLIP: M2IB (Wang, Rudner & Wilson, NeurIPS 2023), Grad-CAM, raw attention and rollout.

Every map answers "which pixels make this image's embedding match this text?".  They share one set of hooks on
a tower's layers (:class:`Tower`), so a map of the zero-shot model and a map of a model whose image projection
was recalibrated (CFR's ``W``) differ only in the projection the gradients pass through.

**M2IB** follows the authors' release (YingWANGG/M2IB, ``scripts/iba.py`` and ``scripts/methods.py``, the
latest version):

- a bottleneck on the output of block ``layer`` of the tower (the release reads ``hidden_states[layer + 1]``
  and wraps ``resblocks[layer]``): ``Z = λ ⊙ R + (1 − λ) ⊙ ε`` with ``ε ~ N(0, 1)`` and ``λ = sigmoid(α)`` per
  entry (token × feature), ``α`` initialised at 5;
- the capacity per entry is ``KL[N(λR, (1−λ)²) ‖ N(0, 1)]``; the loss is ``β · mean(capacity) −
  mean(cos(image embedding, text embedding))`` over a batch of ``batch_size`` copies of the input (each with
  its own noise);
- Adam, lr 1, 10 steps, ``α`` reset per input;
- the map is the capacity of the last step's forward pass summed over features, the CLS token dropped,
  reshaped to the patch grid, bilinearly upsampled to the image and min-max normalised (``get_heatmap``).

Release defaults for CLIP ViT-B/32 (``eval.py``): ``β = 0.1``, ``var = 1``, layer 9 of 12, for both towers.
Departures, each documented on :class:`M2IBOptions`: ``var`` scales the entries as the earlier release did
(``R / σ`` into the bottleneck, ``σ ·`` out); with the default ``var = 1`` this is the latest release exactly.
Several images are explained in one batched pass with one ``α`` each; Adam is element-wise and the loss is the
sum of the images' losses, so each image gets the map of its own run (the test compares them).  Each image's
noise comes from its own generator seeded ``seed``, so a map does not depend on which images share its batch.

**Grad-CAM** (Selvaraju et al. 2017) on a ViT as ``pytorch-grad-cam`` does it (its ViT tutorial hooks
``blocks[-1].norm1``): activations ``A`` at the input of block ``layer``'s attention (``ln_1``'s output),
gradients of the image-text cosine, channel weights = gradients averaged over the patch tokens, map =
``relu(Σ_c w_c A_c)`` over the patch tokens.

**Attention** (the CLS token's attention to the patches in the last block, heads averaged) and **rollout**
(Abnar & Zuidema 2020: per block ``0.5 · A + 0.5 · I`` with heads averaged, multiplied from the first block to
the last, the CLS row) read the attention weights of every block; they do not depend on the text.

Shapes: images ``[n, 3, H, W]``, text embeddings ``[n, d]`` or ``[d]``; maps ``[n, H, W]`` float32 in
``[0, 1]``.  A ResNet tower (RN50) supports M2IB and Grad-CAM at a stage's output ``[n, C, h, w]``; attention
maps need a ViT.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calib.clip.models import UnsupportedModelError, _tower_kind, _without_projection, projection_params
from calib.core.logs import progress

log = logging.getLogger(__name__)

METHODS = ("m2ib", "gradcam", "attention", "rollout")


@dataclass
class Tower:
    """The hookable layers of one tower and how to turn its activations into a spatial map.

    ``blocks``: the layers in order (ViT residual blocks or ResNet stages).  ``layout``: ``"tokens"``
    (activations ``[n, T, D]``, or ``[T, n, D]`` when not ``batch_first``) or ``"spatial"`` (``[n, C, h, w]``).
    ``prefix``: tokens before the patch grid (1: the CLS token); ``grid``: the patch grid ``(h, w)`` (``None``
    for a text tower: the map is per token).  ``encode``: inputs -> embeddings ``[n, d]``, differentiable.
    """

    blocks: Sequence[nn.Module]
    layout: str
    encode: Callable[[torch.Tensor], torch.Tensor]
    prefix: int = 1
    grid: tuple[int, int] | None = None
    batch_first: bool = True
    module: nn.Module | None = None  # the model the tower belongs to (its parameters are frozen while mapping)

    def default_layer(self) -> int:
        """Block 9 of a 12-block tower, the release's choice (three quarters of the depth), and never the last
        block of a token tower (nothing reads its patch outputs when the CLS token is pooled)."""
        n = len(self.blocks)
        layer = (3 * n) // 4
        return min(layer, n - 2) if self.layout == "tokens" and n > 1 else min(layer, n - 1)

    def to_batch_first(self, act: torch.Tensor) -> torch.Tensor:
        return act if self.layout != "tokens" or self.batch_first else act.transpose(0, 1)

    def from_batch_first(self, act: torch.Tensor) -> torch.Tensor:
        return self.to_batch_first(act)  # a transpose is its own inverse


def image_tower(model: nn.Module, projection: tuple[torch.Tensor, torch.Tensor] | None = None) -> Tower:
    """The image tower of an open_clip CLIP (ViT or ModifiedResNet).

    ``projection``: ``(W [d_h, d], b [d])`` replacing the tower's last linear map, e.g. a CFR-calibrated
    projection (:func:`method_projection`); ``None`` keeps the model's own.
    """
    visual = model.visual
    kind = _tower_kind(visual)
    W, b = projection if projection is not None else projection_params(model)
    W, b = torch.as_tensor(W, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)

    def encode(images: torch.Tensor) -> torch.Tensor:
        with _without_projection(visual):
            h = visual(images)
        h = h[0] if isinstance(h, tuple) else h
        return h.float() @ W.to(h.device) + b.to(h.device)

    if kind == "vit":
        blocks = list(visual.transformer.resblocks)
        grid = tuple(visual.grid_size)
        prefix = 0 if getattr(visual, "class_embedding", None) is None else 1
        first = getattr(visual.transformer, "batch_first", True)
        return Tower(blocks, "tokens", encode, prefix, grid, first, model)
    stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    return Tower(stages, "spatial", encode, 0, None, module=model)


def text_tower(model: nn.Module) -> Tower:
    """The text tower of an open_clip CLIP: maps are per token ``[n, L]``."""
    if not hasattr(model, "transformer") or not hasattr(model, "encode_text"):
        raise UnsupportedModelError(f"{type(model).__name__} has no open_clip text transformer")
    return Tower(
        list(model.transformer.resblocks),
        "tokens",
        lambda tokens: model.encode_text(tokens).float(),
        prefix=0,
        grid=None,
        batch_first=getattr(model.transformer, "batch_first", True),
        module=model,
    )


def method_projection(method) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [d_h, d], b [d])`` of a trained projection method (CFR, CLIP+ERM, ...): its single lane."""
    head = getattr(method, "head", None)
    if head is None or not hasattr(head, "W"):
        raise ValueError(f"{type(method).__name__} has no trained projection head (fit it first)")
    return head.W[0].detach().float().cpu(), head.b[0, 0].detach().float().cpu()


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model's parameters need no gradients while a map is computed (the maps' values are unchanged)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _upsample(scores: torch.Tensor, tower: Tower, size: tuple[int, int]) -> np.ndarray:
    """Patch scores ``[n, P]`` (tokens) or ``[n, h, w]`` (spatial) -> min-max normalised maps ``[n, H, W]``.

    A constant map (no location preferred) becomes all ones.
    """
    if tower.layout == "tokens":
        gh, gw = tower.grid
        scores = scores.reshape(len(scores), 1, gh, gw)
    else:
        scores = scores[:, None]
    up = F.interpolate(scores.float(), size=size, mode="bilinear").squeeze(1)
    return _minmax(up).cpu().numpy().astype(np.float32)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(len(x), -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).view(-1, *[1] * (x.dim() - 1))
    out = (x - lo.view_as(span)) / span.clamp_min(1e-12)
    return torch.where(span > 1e-12, out, torch.ones_like(x))


def _check_layer(tower: Tower, layer: int | None) -> int:
    n = len(tower.blocks)
    layer = tower.default_layer() if layer is None else layer
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} does not exist: the tower has {n} blocks (0..{n - 1})")
    return layer % n


def _text_targets(text: torch.Tensor, n: int, device) -> torch.Tensor:
    text = torch.as_tensor(text, dtype=torch.float32, device=device)
    text = text.expand(n, -1) if text.dim() == 1 else text
    if text.shape[0] != n:
        raise ValueError(f"{text.shape[0]} text embeddings for {n} inputs: give one per input or one for all")
    return text


# --- M2IB ---------------------------------------------------------------------------------------------------


@dataclass
class M2IBOptions:
    """M2IB's settings: the release's defaults for CLIP ViT-B/32 (``scripts/eval.py``, ``scripts/iba.py``)."""

    beta: float = 0.1  # weight of the compression (KL) term against the cosine fitting term (release: 0.1)
    var: float = 1.0  # variance of the bottleneck's reference Gaussian per entry (release: 1; at 1 the latest
    # release's bottleneck exactly; other values scale the entries by 1/sqrt(var) as the earlier release did)
    layer: int | None = None  # block whose output is compressed; None: Tower.default_layer (9 for 12 blocks)
    steps: int = 10  # Adam steps per input (release: train_steps 10)
    lr: float = 1.0  # Adam learning rate (release: 1)
    batch_size: int = 10  # noisy copies of each input per step (release: batch_size 10)
    init: float = 5.0  # initial alpha: lambda = sigmoid(5) = 0.993, almost no noise at the start (release)
    seed: int = 0  # each input's noise generator is seeded with this


class _Bottleneck(nn.Module):
    """Per-input, per-entry ``α`` for ``n`` inputs, each seen as ``copies`` noisy copies."""

    def __init__(self, shape: tuple[int, ...], n: int, copies: int, opts: M2IBOptions, device):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((n, 1, *shape), opts.init, device=device))
        self.n, self.copies, self.sigma = n, copies, float(np.sqrt(opts.var))
        self.generators = [torch.Generator(device=device).manual_seed(opts.seed) for _ in range(n)]
        self.capacity: torch.Tensor | None = None  # [n, copies, *shape] from the last forward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [n * copies, *shape]`` (input-major) -> the noisy ``Z`` of the same shape."""
        lam = torch.sigmoid(self.alpha)  # [n, 1, *shape]
        x = x.reshape(self.n, self.copies, *x.shape[1:]) / self.sigma
        mu = x * lam
        var = (1 - lam) ** 2
        self.capacity = -0.5 * (1 + torch.log(var) - mu**2 - var)
        eps = torch.stack(
            [torch.randn(mu.shape[1:], generator=g, device=mu.device, dtype=mu.dtype) for g in self.generators]
        )
        z = (mu + var.sqrt() * eps) * self.sigma
        return z.reshape(self.n * self.copies, *z.shape[2:])


@contextlib.contextmanager
def _replace_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    handle = module.register_forward_hook(lambda _m, _i, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


def m2ib(tower: Tower, inputs: torch.Tensor, targets: torch.Tensor, opts: M2IBOptions | None = None) -> torch.Tensor:
    """M2IB's capacity per entry of block ``opts.layer``'s output, summed over features.

    Args:
        inputs: ``[n, ...]`` images or tokens for ``tower``; targets: the other modality's embeddings ``[n, d]``
            or ``[d]`` (the fitting term is their cosine with ``tower.encode`` of the compressed input).
    Returns:
        ``[n, T]`` per token (tokens layout, all tokens including CLS) or ``[n, h, w]`` (spatial layout).
    """
    opts = opts or M2IBOptions()
    layer = _check_layer(tower, opts.layer)
    n, copies = len(inputs), opts.batch_size
    targets = _text_targets(targets, n, inputs.device)
    batch = inputs.repeat_interleave(copies, dim=0)  # input-major: copies of input i are rows i*copies...
    with torch.no_grad():  # the layer's activation shape (the release reads it from one forward pass)
        shape: list = []
        with _replace_output(tower.blocks[layer], lambda out: shape.append(tower.to_batch_first(out).shape[1:])):
            tower.encode(inputs[:1])
    bottleneck = _Bottleneck(tuple(shape[0]), n, copies, opts, inputs.device)
    optimiser = torch.optim.Adam(bottleneck.parameters(), lr=opts.lr)

    def hook(out: torch.Tensor) -> torch.Tensor:
        return tower.from_batch_first(bottleneck(tower.to_batch_first(out)))

    with _replace_output(tower.blocks[layer], hook), torch.enable_grad():
        for _ in range(opts.steps):
            optimiser.zero_grad()
            emb = tower.encode(batch).reshape(n, copies, -1)
            fit = F.cosine_similarity(emb, targets[:, None, :], dim=-1, eps=1e-6).mean(1)  # [n]
            compression = bottleneck.capacity.reshape(n, -1).mean(1)  # [n]
            # the images' losses are summed: each alpha gets exactly its own image's gradient
            (opts.beta * compression - fit).sum().backward()
            optimiser.step()
    capacity = bottleneck.capacity.detach().mean(1)  # [n, *shape], mean over the copies, as the release
    if tower.layout == "tokens":
        return torch.nansum(capacity, -1)
    return torch.nansum(capacity, 1)


def m2ib_image_maps(
    tower: Tower, images: torch.Tensor, text: torch.Tensor, opts: M2IBOptions | None = None
) -> np.ndarray:
    """M2IB maps ``[n, H, W]`` of ``images [n, 3, H, W]`` for text embeddings ``text [n, d]`` (or ``[d]``)."""
    scores = m2ib(tower, images, text, opts)
    if tower.layout == "tokens":
        scores = scores[:, tower.prefix :]  # the CLS token is discarded
    return _upsample(scores, tower, tuple(images.shape[-2:]))


def m2ib_text_maps(
    tower: Tower, tokens: torch.Tensor, image_emb: torch.Tensor, opts: M2IBOptions | None = None
) -> np.ndarray:
    """M2IB relevance per token ``[n, L]`` (min-max normalised) of ``tokens [n, L]`` for image embeddings."""
    return _minmax(m2ib(tower, tokens, image_emb, opts)).cpu().numpy().astype(np.float32)


# --- Grad-CAM -----------------------------------------------------------------------------------------------


def gradcam_maps(tower: Tower, images: torch.Tensor, text: torch.Tensor, layer: int | None = -1) -> np.ndarray:
    """Grad-CAM maps ``[n, H, W]`` for the image-text cosine.

    ViT: at the input of block ``layer``'s attention (its ``ln_1`` output; default the last block, as
    pytorch-grad-cam's ViT tutorial).  ResNet: at stage ``layer``'s output (default ``layer4``).
    """
    n = len(images)
    idx = _check_layer(tower, -1 if layer is None else layer)
    block = tower.blocks[idx]
    site = block.ln_1 if tower.layout == "tokens" else block
    targets = _text_targets(text, n, images.device)
    saved: list[torch.Tensor] = []

    def keep(_m, _i, out):
        out = out if out.requires_grad else out.requires_grad_(True)
        out.retain_grad()
        saved.append(out)

    handle = site.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            emb = tower.encode(images)
            F.cosine_similarity(emb, targets, dim=-1).sum().backward()
    finally:
        handle.remove()
    act, grad = saved[-1].detach(), saved[-1].grad.detach()
    if tower.layout == "tokens":
        act, grad = tower.to_batch_first(act)[:, tower.prefix :], tower.to_batch_first(grad)[:, tower.prefix :]
        weights = grad.mean(1, keepdim=True)  # [n, 1, D]
        cam = F.relu((weights * act).sum(-1))  # [n, P]
    else:
        weights = grad.mean((2, 3), keepdim=True)  # [n, C, 1, 1]
        cam = F.relu((weights * act).sum(1))  # [n, h, w]
    return _upsample(cam, tower, tuple(images.shape[-2:]))


# --- attention and rollout ----------------------------------------------------------------------------------


def attention_weights(tower: Tower, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention weights, heads averaged: a list of ``[n, T, T]`` (rows: queries)."""
    if tower.layout != "tokens":
        raise UnsupportedModelError("attention maps need a transformer tower (a ViT); this tower is a ResNet")
    weights: list[torch.Tensor] = []
    busy = [False]

    def hook(module: nn.MultiheadAttention, args, kwargs, _out):
        if busy[0]:
            return
        busy[0] = True
        try:
            q, k, v = (list(args) + [kwargs.get(x) for x in ("query", "key", "value")])[:3]
            _, w = module(q, k, v, need_weights=True, average_attn_weights=True, attn_mask=kwargs.get("attn_mask"))
            weights.append(w.detach())
        finally:
            busy[0] = False

    handles = [b.attn.register_forward_hook(hook, with_kwargs=True) for b in tower.blocks]
    try:
        with torch.no_grad():
            tower.encode(images)
    finally:
        for h in handles:
            h.remove()
    return weights


def rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout ``[n, T, T]`` of per-block weights ``[n, T, T]`` (first block first): the product of
    ``0.5 · A + 0.5 · I`` (rows still sum to one) from the first block to the last."""
    result = None
    for a in attentions:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def attention_maps(tower: Tower, images: torch.Tensor, kind: str = "rollout") -> np.ndarray:
    """``kind="attention"``: the CLS token's attention to the patches in the last block; ``"rollout"``: its
    row of the rollout.  ``[n, H, W]``."""
    attn = attention_weights(tower, images)
    if tower.prefix < 1:
        raise UnsupportedModelError("attention maps read the CLS token's row; this tower has no CLS token")
    mat = attn[-1] if kind == "attention" else rollout(attn)
    return _upsample(mat[:, 0, tower.prefix :], tower, tuple(images.shape[-2:]))


def applicable_methods(tower: Tower, methods: Sequence[str] = METHODS) -> tuple[str, ...]:
    """The methods of ``methods`` that ``tower`` supports: attention maps need a transformer with a CLS token
    (a ResNet tower has M2IB and Grad-CAM only)."""
    attention_ok = tower.layout == "tokens" and tower.prefix >= 1
    return tuple(m for m in methods if attention_ok or m not in ("attention", "rollout"))


# --- one entry point and the mass summary -------------------------------------------------------------------


def image_maps(
    method: str,
    tower: Tower,
    images: torch.Tensor,
    text: torch.Tensor | None = None,
    m2ib_options: M2IBOptions | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Maps ``[n, H, W]`` of ``images [n, 3, H, W]`` by ``method`` (one of :data:`METHODS`), in batches.

    ``text``: the target embeddings ``[n, d]`` or ``[d]`` (M2IB and Grad-CAM; ignored by the attention maps).
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose from {', '.join(METHODS)}")
    if method in ("m2ib", "gradcam") and text is None:
        raise ValueError(f"{method} explains an image-text match: pass the text embeddings")
    n = len(images)
    if text is not None:
        text = _text_targets(text, n, images.device)
    out = []
    starts = range(0, n, batch_size)
    bar = progress(starts, desc=f"{method} maps", unit="batch", disable=len(starts) < 2, mininterval=2)
    with _frozen(tower.module if tower.module is not None else nn.ModuleList(tower.blocks)):
        for s in bar:
            x = images[s : s + batch_size]
            t = None if text is None else text[s : s + batch_size]
            if method == "m2ib":
                out.append(m2ib_image_maps(tower, x, t, m2ib_options))
            elif method == "gradcam":
                out.append(gradcam_maps(tower, x, t))
            else:
                out.append(attention_maps(tower, x, method))
    return np.concatenate(out) if out else np.zeros((0, *images.shape[-2:]), np.float32)


def mass_inside(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Fraction of each map's total attribution inside its mask: ``maps [n, H, W] >= 0``, ``masks [n, H, W]``
    bool -> ``[n]``.  A map with no mass at all gives NaN."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.shape != np.shape(masks):
        raise ValueError(f"maps {maps.shape} and masks {np.shape(masks)} differ in shape")
    total = maps.sum(axis=(1, 2))
    inside = (maps * masks).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)
