"""TPT: test-time prompt tuning (Shu et al., NeurIPS 2022), as the authors' ``tpt_classification.py`` does it.

Per test image, reading no label:

1. a batch of ``views`` images: the original (the model's usual preprocessing) and ``views - 1`` random
   resized crops with horizontal flips of the raw image (the release's branch for natural distribution
   shifts, ``AugMixAugmenter(augmix=False)``);
2. a context of 4 token embeddings initialised from "a photo of a", shared by the classes, followed by each
   class name and "." (CoOp's prompt learner, class token at the end); the text tower runs from token
   embeddings (:func:`encode_text_from_embeddings`);
3. the ``selection_p`` lowest-entropy views are kept (chosen at the first step);
4. the loss is the entropy of their probability averaged in probability space (logsumexp of log-probs
   minus log N), minimised by ``steps`` AdamW steps (lr 5e-3, torch's default weight decay) on the context;
5. the original view is predicted with the tuned prompt; the context and the optimiser start afresh for the
   next image.

Departures, all documented: AugMix views (the release's choice for fine-grained sets) are not implemented,
so ``augment`` has the one value ``"crop"``; computation is fp32 (the release uses fp16 autocast on GPU);
the image tower's features of the views are computed once per image (the release recomputes them under
``no_grad`` each step: the same values); at least one view is kept when ``views * selection_p < 1`` (the
release would average over none); each image's augmentations come from its own seed (seed, image
id), so a prediction does not depend on the order images are processed in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calib.clip.features import SplitFeatures
from calib.methods.base import Method, option, register
from calib.methods.projection import resolve_device

log = logging.getLogger(__name__)


@dataclass
class TPTOptions:
    # images per test image: the original and views - 1 augmented ones (release: batch size 64)
    views: int = option(64, ge=1)
    selection_p: float = option(0.1, gt=0, le=1)  # fraction of lowest-entropy views kept (release: selection_p)
    lr: float = option(5e-3, gt=0)  # AdamW learning rate (release default)
    steps: int = option(1, ge=0)  # AdamW steps per image (release: tta_steps)
    ctx_init: str = "a photo of a"  # the context's initial words (release: ctx_init a_photo_of_a, n_ctx 4)
    augment: str = "crop"  # random resized crop + flip, the release's views for natural distribution shifts
    max_images: int = option(0, ge=0)  # per-image work: evaluate a seeded subsample of this many test images (0: all)
    device: str = "auto"  # "auto" (GPU when present), "cpu" or "cuda"


def encode_text_from_embeddings(model: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` from token embeddings ``x [C, L, width]`` instead of token ids:
    + positional embedding, the transformer with the causal mask, ``ln_final``, the EOT position (of
    ``tokens [C, L]``), ``text_projection``.  Unnormalised ``[C, d]``."""
    from open_clip.transformer import text_global_pool

    if not hasattr(model, "transformer") or not hasattr(model, "token_embedding"):
        raise ValueError(
            f"TPT needs an open_clip CLIP text tower (token_embedding, transformer); "
            f"{type(model).__name__} has another kind"
        )
    cast = model.transformer.get_cast_dtype()
    x = x.to(cast) + model.positional_embedding.to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


class PromptLearner(nn.Module):
    """CoOp's prompt learner (class token at the end): ``[SOS] ctx_1..ctx_n <class name> . [EOS]``."""

    def __init__(self, model: nn.Module, tokenizer, class_names: list[str], ctx_init: str):
        super().__init__()
        n_ctx = len(ctx_init.split())
        names = [c.replace("_", " ") for c in class_names]
        self.prompts = [f"{ctx_init} {name}." for name in names]
        device = model.token_embedding.weight.device
        tokens = tokenizer(self.prompts).to(device)
        with torch.no_grad():
            emb = model.token_embedding(tokens)
            ctx = model.token_embedding(tokenizer([ctx_init]).to(device))[0, 1 : 1 + n_ctx]
        self.register_buffer("tokens", tokens)
        self.register_buffer("prefix", emb[:, :1].clone())  # SOS
        self.register_buffer("suffix", emb[:, 1 + n_ctx :].clone())  # class name, ".", EOS, padding
        self.register_buffer("ctx_init_state", ctx.clone())
        self.ctx = nn.Parameter(ctx.clone())

    def reset(self) -> None:
        with torch.no_grad():
            self.ctx.copy_(self.ctx_init_state)

    def forward(self) -> torch.Tensor:
        """Token embeddings of every class's prompt ``[C, L, width]``."""
        ctx = self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)


def avg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the views' probabilities averaged in probability space (the release's ``avg_entropy``)."""
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    avg = logp.logsumexp(dim=0) - np.log(logits.shape[0])
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(-1)


def _view_transform(preprocess):
    """(size, the random crop + flip, the tensor conversion and normalisation) from open_clip's preprocessing."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
    norm = next((t for t in steps if isinstance(t, T.Normalize)), None)
    if crop is None or norm is None:
        raise ValueError("TPT needs a preprocessing with CenterCrop and Normalize (open_clip's image transform)")
    size = crop.size
    tail = T.Compose([T.ToTensor(), T.Normalize(norm.mean, norm.std)])
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()]), tail


@register
class TPT(Method):
    """TPT: per test image, tune a shared prompt context on its augmented views by minimising the entropy of
    their averaged prediction (one AdamW step), then predict it; no label is read (see the module docstring)."""

    name = "tpt"
    Options = TPTOptions
    summary = "test-time prompt tuning: per image, 1 AdamW step on a 4-token context (64 views, 10% most confident)"
    uses = ("images", "clip")
    eval_splits = ("test",)

    @classmethod
    def row_label(cls, options: dict) -> str:
        n = options.get("max_images", 0)
        return f"{cls.name} ({n} test images)" if n else cls.name

    def fit(self, data, seed: int) -> None:
        if self.options.augment != "crop":
            raise ValueError(f"TPT augment {self.options.augment!r}: only 'crop' is implemented (AugMix is not)")
        ctx = self.context
        self.seed = seed
        self.device = resolve_device(self.options.device)
        self.model = ctx.clip.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.learner = PromptLearner(self.model, ctx.clip.tokenizer, data.class_names, self.options.ctx_init)
        self.augment, self.to_tensor = _view_transform(ctx.clip.preprocess)
        self.scale = float(self.model.logit_scale.exp())
        self.context_at_start: list[torch.Tensor] = []  # the context each image started from (tests)

    def image_logits(self, path, image_id: int) -> torch.Tensor:
        """Class scores ``[1, C]`` of one image after its test-time step (the rehearsal times this)."""
        from PIL import Image

        o = self.options
        with Image.open(path) as im:
            img = im.convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + int(image_id))
            n_aug = o.views - 1 if o.steps > 0 else 0  # with no step the views are never used
            views = [self.context.clip.preprocess(img)] + [self.to_tensor(self.augment(img)) for _ in range(n_aug)]
        with torch.no_grad():
            f = F.normalize(self.model.encode_image(torch.stack(views).to(self.device)), dim=-1)
        self.learner.reset()  # every image starts from the initial context and a fresh optimiser
        self.context_at_start.append(self.learner.ctx.detach().clone())
        opt = torch.optim.AdamW([self.learner.ctx], lr=o.lr)
        keep = None
        for _ in range(o.steps):
            text = F.normalize(encode_text_from_embeddings(self.model, self.learner(), self.learner.tokens), dim=-1)
            logits = self.scale * f @ text.T
            if keep is None:  # confidence selection, once, at the first step (as released)
                entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
                keep = torch.argsort(entropy)[: max(1, int(len(logits) * o.selection_p))]  # >= 1 view
            loss = avg_entropy(logits[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            text = F.normalize(encode_text_from_embeddings(self.model, self.learner(), self.learner.tokens), dim=-1)
            return self.scale * f[:1] @ text.T

    def logits(self, split: SplitFeatures) -> np.ndarray:
        """Class scores ``[n, C]`` of the split's images (found in the bound dataset by their ids)."""
        from calib.core.logs import progress

        paths = self.context.paths_of(split.ids)
        out = [
            self.image_logits(p, i) for p, i in zip(progress(paths, desc="TPT", unit="img", mininterval=5), split.ids)
        ]
        return torch.cat(out).cpu().numpy()
