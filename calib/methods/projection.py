"""Training the image tower's last linear map on cached pre-projection features.

:class:`ProjectionHead` is the trainable part CFR and CLIP+ERM share: ``W [d_h, d]`` and ``b [d]``
start at the pretrained ``W0``, ``b0``; the text prototypes are frozen; the logit scale ``s`` is
optionally trainable.  ``logits(h) = s * dropout(norm(h @ W + b)) @ T^T``.

:func:`fit_projection` runs epochs of SGD over the training split with a caller-supplied loss and
selects an epoch by one of :data:`SELECTION_RULES`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calib.features import FeatureSet, SplitFeatures
from calib.methods.base import Method, register
from calib.metrics import group_accuracy, worst_class_accuracy, worst_group_accuracy

log = logging.getLogger(__name__)

# rule -> group labels it reads
SELECTION_RULES = {"val_wga": "val_groups", "val_worst_class": "none", "last": "none"}

# The CFR release classifies through its own wrapper (models/clip.py, ZeroShotCLIP), whose trainable
# logit scale starts at CLIP's *initial* value log(1/0.07), not at the pretrained s (100 for OpenAI CLIP).
RELEASE_LOGIT_SCALE = 1 / 0.07
LOGIT_SCALE_INITS = ("release", "pretrained")


def initial_logit_scale(data: FeatureSet, rule: str) -> float:
    """The head's starting ``s``: ``"release"`` (1/0.07, as the CFR code) or ``"pretrained"`` (the model's)."""
    if rule == "release":
        return RELEASE_LOGIT_SCALE
    if rule == "pretrained":
        return float(data.logit_scale)
    raise ValueError(f"logit_scale_init={rule!r}; allowed: {list(LOGIT_SCALE_INITS)}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ProjectionHead(nn.Module):
    """Trainable final projection with a frozen zero-shot text head.

    Args:
        W0: ``[d_h, d]`` pretrained projection; b0: ``[d]`` its bias (zeros for ViT).
        text: ``[C, d]`` normalised class prototypes (frozen buffer).
        logit_scale: initial ``s``; trained in log space when ``train_scale``.
        dropout: dropout on the normalised image feature, active in training mode only.

    The bias trains only when the tower has one (RN50's ``attnpool.c_proj``); a ViT's ``proj`` has
    none (``b0`` all zeros), and the release trains no bias there, so neither does calib.
    """

    def __init__(
        self,
        W0: np.ndarray,
        b0: np.ndarray,
        text: np.ndarray,
        logit_scale: float,
        train_scale: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.W = nn.Parameter(torch.as_tensor(W0, dtype=torch.float32).clone())
        self.b = nn.Parameter(torch.as_tensor(b0, dtype=torch.float32).clone(), requires_grad=bool(np.any(b0)))
        self.register_buffer("text", torch.as_tensor(text, dtype=torch.float32).clone())
        log_s = torch.tensor(math.log(logit_scale), dtype=torch.float32)
        self.log_s = nn.Parameter(log_s) if train_scale else nn.Parameter(log_s, requires_grad=False)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def for_features(
        cls, data: FeatureSet, logit_scale_init: str, train_scale: bool = True, dropout: float = 0.0
    ) -> ProjectionHead:
        """A head at the pretrained ``W0`` of ``data``, its scale chosen by :func:`initial_logit_scale`."""
        return cls(data.W0, data.b0, data.text, initial_logit_scale(data, logit_scale_init), train_scale, dropout)

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings ``[n, d]`` of pre-projection features ``h [n, d_h]``."""
        return F.normalize(h @ self.W + self.b, dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, C]``."""
        return self.log_s.exp() * self.dropout(self.embed(h)) @ self.text.T


@dataclass
class ProjectionOptions:
    """Optimisation of the projection: the CFR release's settings (SGD, lr 1e-4, 100 epochs)."""

    epochs: int = 100  # passes over the training split
    batch_size: int = 128  # training samples per step
    lr: float = 1e-4  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-5  # SGD weight decay
    train_logit_scale: bool = True  # also learn s
    dropout: float = 0.0  # dropout on the normalised image feature, training only
    selection: str = "val_wga"  # epoch selection: val_wga | val_worst_class | last
    device: str = "auto"  # cuda when present


@dataclass
class ClipERMOptions(ProjectionOptions):
    """CLIP+ERM (CFR's step 1): the projection options plus the zero-shot head's starting scale."""

    logit_scale_init: str = "release"  # initial s: "release" (1/0.07, the CFR code's own scale) or "pretrained"


def selection_score(rule: str, pred: np.ndarray, split: SplitFeatures, n_groups: int, n_classes: int) -> float:
    """The validation score an epoch is selected by (higher is better)."""
    if rule == "val_wga":
        return worst_group_accuracy(pred, split.y, split.g, n_groups)
    if rule == "val_worst_class":
        return worst_class_accuracy(pred, split.y, n_classes)
    raise ValueError(f"unknown selection rule {rule!r}; known: {sorted(SELECTION_RULES)}")


def fit_projection(
    data: FeatureSet,
    opts: ClipERMOptions,
    seed: int,
    step_loss: Callable[[ProjectionHead, torch.Tensor, int], torch.Tensor],
    head: ProjectionHead | None = None,
) -> tuple[ProjectionHead, list[dict]]:
    """Train a projection head on ``h``; return the selected head and per-epoch history.

    ``step_loss(head, batch_idx, epoch)`` returns the loss of one step given the indices of a
    training mini-batch (the caller holds the tensors).  Deterministic under ``seed``.
    """
    torch.manual_seed(seed)
    if head is None:
        head = ProjectionHead.for_features(data, opts.logit_scale_init, opts.train_logit_scale, opts.dropout)
    return fit_head(head, data, opts, seed, step_loss, lambda split: split.h)


def fit_head(
    head: nn.Module,
    data: FeatureSet,
    opts: ProjectionOptions,
    seed: int,
    step_loss: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
    inputs: Callable[[SplitFeatures], np.ndarray],
    optimizer: str = "sgd",
    epoch_size: int | None = None,
    epoch_end: Callable[[nn.Module, int], dict] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """The one training loop: epochs of mini-batches over the training split, epoch selection.

    ``head(inputs(split))`` gives logits ``[n, C]``; ``optimizer`` is ``"sgd"`` (with ``opts``'
    momentum) or ``"adam"``.  Returns the head at the selected epoch and the per-epoch history
    (loss, mean gradient norm, val WGA and per-group accuracy, val worst-class accuracy, val accuracy;
    ``selected`` marks the chosen epoch).  ``epoch_end(head, epoch)`` (head in eval mode) may add diagnostics to each
    epoch's record.  An epoch is a shuffled pass over ``range(epoch_size)`` (default: the training
    split's size).
    """
    if opts.selection not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {opts.selection!r}; known: {sorted(SELECTION_RULES)}")
    if opts.epochs < 1:
        raise ValueError("epochs must be >= 1")
    device = resolve_device(opts.device)
    head = head.to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'sgd' or 'adam'")
    n = epoch_size or len(data.splits["train"])
    gen = torch.Generator().manual_seed(seed)
    val = data.splits.get("val")
    h_val = torch.as_tensor(inputs(val), device=device) if val is not None else None
    if opts.selection != "last" and val is None:
        raise ValueError(f"selection {opts.selection!r} needs a validation split")
    best = {rule: (-np.inf, None, 0) for rule in SELECTION_RULES}  # rule -> (score, state, epoch)
    history = []
    for epoch in range(opts.epochs):
        head.train()
        loss_sum = torch.zeros((), device=device)
        grad_sum = torch.zeros((), device=device)
        batches = torch.randperm(n, generator=gen).split(opts.batch_size)
        for idx in batches:
            loss = step_loss(head, idx.to(device), epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():  # accumulated on the device: no host sync inside the step
                loss_sum += loss.detach()
                grad_sum += torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])
                )
            opt.step()
        head.eval()
        rec = {"epoch": epoch, "loss": float(loss_sum) / len(batches), "grad_norm": float(grad_sum) / len(batches)}
        if val is not None:
            with torch.no_grad():
                pred = head(h_val).argmax(1).cpu().numpy()
            val_groups = group_accuracy(pred, val.y, val.g, data.n_groups)
            rec["val_wga"] = float(np.nanmin(val_groups))
            rec["val_group_acc"] = val_groups.tolist()
            rec["val_worst_class"] = worst_class_accuracy(pred, val.y, data.n_classes)
            rec["val_acc"] = float(np.mean(pred == val.y))
        if epoch_end is not None:
            with torch.no_grad():
                rec.update(epoch_end(head, epoch))
        history.append(rec)
        for rule in SELECTION_RULES:  # every rule's choice is kept: a protocol change needs no re-training
            if rule != "last" and val is None:
                continue
            score = epoch if rule == "last" else rec[rule]
            if score > best[rule][0]:  # strict: ties keep the earlier epoch
                best[rule] = (score, copy.deepcopy(head.state_dict()), epoch)
    head.selected_states = {rule: (state, epoch) for rule, (_, state, epoch) in best.items() if state is not None}
    select_state(head, history, opts.selection)
    return head, history


def select_state(head: nn.Module, history: list[dict], rule: str) -> None:
    """Load the epoch ``rule`` chose during :func:`fit_head` and mark it ``selected`` in ``history``."""
    if rule not in head.selected_states:
        raise ValueError(f"selection {rule!r} was not tracked (no validation split?)")
    state, epoch = head.selected_states[rule]
    head.load_state_dict(state)
    head.eval()
    for rec in history:
        rec.pop("selected", None)
    history[epoch]["selected"] = True


class ProjectionMethod(Method):
    """Shared prediction for methods whose result is a trained torch head (``self.head``)."""

    uses = ("h", "text", "train")

    def required_labels(self) -> str:
        return SELECTION_RULES[self.options.selection] if self.label_needs == "none" else self.label_needs

    def reselect(self, rule: str) -> None:
        """Switch to the epoch another selection rule chose in the same training run."""
        select_state(self.head, self.history, rule)
        self.options = dataclasses.replace(self.options, selection=rule)

    def inputs(self, split: SplitFeatures) -> np.ndarray:
        """What the trained head consumes: pre-projection features ``h``."""
        return split.h

    def logits(self, split: SplitFeatures) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(self.inputs(split), device=next(self.head.parameters()).device)
            return self.head(x).cpu().numpy()


@register
class ClipERM(ProjectionMethod):
    """CLIP+ERM: fine-tune the image projection (and s) with cross-entropy through the zero-shot head."""

    name = "clip_erm"
    Options = ClipERMOptions
    summary = "CE fine-tuning of the image projection through the zero-shot head (CFR step 1)"

    def fit(self, data: FeatureSet, seed: int) -> None:
        device = resolve_device(self.options.device)
        tr = data.splits["train"]
        h = torch.tensor(tr.h, device=device)
        y = torch.tensor(tr.y, device=device)

        def ce(head: ProjectionHead, idx: torch.Tensor, epoch: int) -> torch.Tensor:
            return F.cross_entropy(head(h[idx]), y[idx])

        self.head, self.history = fit_projection(data, self.options, seed, ce)
