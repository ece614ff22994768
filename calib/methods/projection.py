"""Training the image tower's last linear map on cached pre-projection features.

:class:`ProjectionHead` is the trainable part CFR and CLIP+ERM share: ``W [d_h, d]`` and ``b [d]``
start at the pretrained ``W0``, ``b0``; the text prototypes are frozen; the logit scale ``s`` is
optionally trainable.  ``logits(h) = s * dropout(norm(h @ W + b)) @ T^T``.  It holds ``S`` such heads
as lanes (:mod:`calib.methods.lanes`), so several seeds or settings train in one pass.

:func:`fit_head` runs epochs of SGD (or Adam) over the training split with a caller-supplied per-lane
loss and selects an epoch per lane by one of :data:`SELECTION_RULES`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from calib.clip.features import FeatureSet, SplitFeatures
from calib.core.metrics import group_accuracy, worst_class_accuracy, worst_group_accuracy
from calib.methods.base import Method, option, register
from calib.methods.lanes import LaneModule, lane_cross_entropy, lane_dropout, lane_generators, unit
from calib.methods.precision import check_precision, forward_autocast, training_precision

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


# samples per forward pass when scoring every lane on a split: memory O(S * chunk * d), not O(S * n * d)
# (splits up to this size are scored in one pass, as before)
EVAL_CHUNK = 16384


def lane_predictions(head: LaneModule, x: torch.Tensor) -> np.ndarray:
    """Each lane's predicted class on inputs ``x [n, d_in]``: ``[S, n]``, scored :data:`EVAL_CHUNK` rows at a time."""
    return torch.cat([head(x[i : i + EVAL_CHUNK]).argmax(-1) for i in range(0, len(x), EVAL_CHUNK)], 1).cpu().numpy()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ProjectionHead(LaneModule):
    """Trainable final projections (``S`` lanes) with a frozen zero-shot text head.

    Args:
        W0: ``[d_h, d]`` pretrained projection; b0: ``[d]`` its bias (zeros for ViT).
        text: ``[C, d]`` normalised class prototypes (frozen buffer shared by the lanes).
        logit_scale: initial ``s`` (one per lane, or one for all); trained in log space when ``train_scale``.
        dropout: dropout rate on the normalised image feature per lane (or one for all), training only;
            lane s draws its masks from ``generators[s]`` (set by :func:`fit_head`).
        lanes: ``S``, the number of lanes (every lane starts at ``W0``).

    Parameters: ``W [S, d_h, d]``, ``b [S, 1, d]``, ``log_s [S]``.  ``embed(h)`` maps ``h [n, d_h]`` (shared) or
    ``[S, n, d_h]`` to ``[S, n, d]``; ``forward`` gives logits ``[S, n, C]``.  A trained method keeps its own
    lane alone (``S = 1``).  The bias trains only when the tower has one (RN50's ``attnpool.c_proj``); a ViT's
    ``proj`` has none (``b0`` all zeros), and the release trains no bias there, so neither does calib.
    """

    shared = ("text",)

    def __init__(
        self,
        W0: np.ndarray,
        b0: np.ndarray,
        text: np.ndarray,
        logit_scale: float | Sequence[float],
        train_scale: bool = True,
        dropout: float | Sequence[float] = 0.0,
        lanes: int = 1,
    ):
        super().__init__()
        scales = [float(logit_scale)] * lanes if np.isscalar(logit_scale) else [float(v) for v in logit_scale]
        lanes = len(scales)
        W = torch.as_tensor(W0, dtype=torch.float32)
        b = torch.as_tensor(b0, dtype=torch.float32)
        self.W = nn.Parameter(W.expand(lanes, *W.shape).clone())
        self.b = nn.Parameter(b.expand(lanes, 1, *b.shape).clone(), requires_grad=bool(np.any(b0)))
        self.register_buffer("text", torch.as_tensor(text, dtype=torch.float32).clone())
        log_s = torch.log(torch.tensor(scales, dtype=torch.float32))
        self.log_s = nn.Parameter(log_s, requires_grad=train_scale)
        self.dropout_p = [float(dropout)] * lanes if np.isscalar(dropout) else [float(v) for v in dropout]
        self.generators: list | None = None

    @classmethod
    def for_features(
        cls,
        data: FeatureSet,
        logit_scale_init: str | Sequence[str],
        train_scale: bool = True,
        dropout: float | Sequence[float] = 0.0,
    ) -> ProjectionHead:
        """Heads at the pretrained ``W0`` of ``data``, one lane per entry of ``logit_scale_init`` (each
        chosen by :func:`initial_logit_scale`)."""
        inits = [logit_scale_init] if isinstance(logit_scale_init, str) else list(logit_scale_init)
        scales = [initial_logit_scale(data, r) for r in inits]
        return cls(data.W0, data.b0, data.text, scales, train_scale, dropout)

    def extra_lane_state_select(self, index: torch.Tensor) -> None:
        self.dropout_p = [self.dropout_p[i] for i in index.tolist()]
        self.generators = None if self.generators is None else [self.generators[i] for i in index.tolist()]

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised ``h @ W + b``: ``[n, d_h]`` or ``[S, n, d_h]`` -> ``[S, n, d]``."""
        if h.dim() == 2:
            h = h.expand(self.W.shape[0], *h.shape)
        return torch.baddbmm(self.b, h, self.W)

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings ``[S, n, d]`` of pre-projection features ``h``."""
        return unit(self.project(h))

    def dropout(self, e: torch.Tensor) -> torch.Tensor:
        """Each lane's dropout on features ``e [S, n, d]`` (identity in eval mode)."""
        return lane_dropout(e, self.dropout_p, self.generators or [None] * len(self.dropout_p), self.training)

    def scale(self) -> torch.Tensor:
        """``s`` per lane, ``[S, 1, 1]``."""
        return self.log_s.exp()[:, None, None]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``[S, n, C]``."""
        return self.scale() * self.dropout(self.embed(h)) @ self.text.T


@dataclass
class ProjectionOptions:
    """Optimisation of the projection: the CFR release's settings (SGD, lr 1e-4, 100 epochs)."""

    epochs: int = option(100, ge=1)  # passes over the training split
    batch_size: int = option(128, ge=1)  # training samples per step
    lr: float = option(1e-4, gt=0)  # SGD learning rate
    momentum: float = option(0.9, ge=0, lt=1)  # SGD momentum
    weight_decay: float = option(1e-5, ge=0)  # SGD weight decay
    train_logit_scale: bool = True  # also learn s
    dropout: float = option(0.0, ge=0, lt=1)  # dropout on the normalised image feature, training only
    selection: str = "val_wga"  # epoch selection: val_wga | val_worst_class | last
    device: str = "auto"  # cuda when present
    precision: str = "fp32"  # training arithmetic: fp32 | tf32 | bf16 (calib.methods.precision; scoring is fp32)


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


@dataclass
class Step:
    """One training step of :func:`fit_head`, for every lane at once."""

    idx: torch.Tensor  # [S, B] indices (into range(epoch_size)) of each lane's mini-batch
    epoch: int
    start: int  # position of the mini-batch within the epoch's order


StepLoss = Callable[[LaneModule, Step], torch.Tensor]  # -> per-lane loss [S]


def fit_head(
    head: LaneModule,
    data: FeatureSet,
    opts: ProjectionOptions,
    seeds: Sequence[int],
    step_loss: StepLoss,
    inputs: Callable[[SplitFeatures], np.ndarray],
    optimizer: str = "sgd",
    epoch_size: int | None = None,
    epoch_end: Callable[[LaneModule, int], list[dict]] | None = None,
    selection: Sequence[str] | None = None,
) -> tuple[list[LaneModule], list[list[dict]]]:
    """The one training loop: epochs of mini-batches over the training split, epoch selection, for the
    ``S = len(seeds)`` lanes of ``head`` at once.

    Lane s shuffles with its own generator (seeded ``seeds[s]``) and draws its dropout masks from another
    (also seeded ``seeds[s]``, the stream ``torch.manual_seed(seed)`` gave a single run).  ``step_loss``
    returns the per-lane loss ``[S]``; the optimiser (``"sgd"`` with ``opts``' momentum, or ``"adam"``) steps
    on its sum, which updates each lane by its own loss only.  ``head(inputs(split))`` gives logits
    ``[S, n, C]``.  An epoch is a shuffled pass over ``range(epoch_size)`` (default: the training split).

    Returns, per lane, the head holding that lane alone (``S = 1``) at the epoch its rule (``selection[s]``,
    default ``opts.selection``) chose, and its per-epoch history (loss, mean gradient norm, val WGA and
    per-group accuracy, val worst-class accuracy, val accuracy; ``selected`` marks the chosen epoch;
    ``epoch_end(head, epoch)``, head in eval mode, may add per-lane diagnostics).  Every rule's choice is
    kept (``head.selected_states``), so a protocol change needs no re-training.  No host sync inside a step:
    losses and gradient norms accumulate on the device and are read once per epoch.
    """
    selection = list(selection or [opts.selection] * len(seeds))
    if len(selection) != len(seeds):
        raise ValueError(f"{len(seeds)} lanes but {len(selection)} selection rules")
    for rule in selection:
        if rule not in SELECTION_RULES:
            raise ValueError(f"unknown selection rule {rule!r}; known: {sorted(SELECTION_RULES)}")
    if opts.epochs < 1:
        raise ValueError("epochs must be >= 1")
    device = resolve_device(opts.device)
    precision = check_precision(opts.precision)
    head = head.to(device)
    S = len(seeds)
    if head.lanes != S:
        raise ValueError(f"the head has {head.lanes} lanes for {S} seeds")
    params = [p for p in head.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'sgd' or 'adam'")
    n = epoch_size or len(data.splits["train"])
    order_gens = lane_generators(seeds)
    head.generators = lane_generators(seeds, device=device)  # dropout masks
    val = data.splits.get("val")
    h_val = torch.as_tensor(inputs(val), device=device) if val is not None else None
    if val is None and any(rule != "last" for rule in selection):
        raise ValueError(f"selection {selection} needs a validation split")
    rules = [r for r in SELECTION_RULES if r == "last" or val is not None]
    best = [{rule: (-np.inf, None, 0) for rule in rules} for _ in range(S)]  # lane -> rule -> (score, state, epoch)
    history: list[list[dict]] = [[] for _ in range(S)]
    for epoch in range(opts.epochs):
        head.train()
        order = torch.stack([torch.randperm(n, generator=g) for g in order_gens]).to(device)  # [S, n]
        loss_sum = torch.zeros(S, device=device)
        grad_sum = torch.zeros(S, device=device)
        starts = range(0, n, opts.batch_size)
        for start in starts:
            with training_precision(precision, device):
                with forward_autocast(precision, device):
                    loss = step_loss(head, Step(order[:, start : start + opts.batch_size], epoch, start)).float()
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
            with torch.no_grad():  # accumulated on the device: no host sync inside the step
                loss_sum += loss.detach()
                grad_sum += lane_grad_norm(params, S)
            opt.step()
        head.eval()
        losses, grads = (loss_sum / len(starts)).tolist(), (grad_sum / len(starts)).tolist()
        recs = [{"epoch": epoch, "loss": losses[s], "grad_norm": grads[s]} for s in range(S)]
        if val is not None:
            with torch.no_grad():
                preds = lane_predictions(head, h_val)
            for rec, pred in zip(recs, preds):
                val_groups = group_accuracy(pred, val.y, val.g, data.n_groups)
                rec["val_wga"] = float(np.nanmin(val_groups))
                rec["val_group_acc"] = val_groups.tolist()
                rec["val_worst_class"] = worst_class_accuracy(pred, val.y, data.n_classes)
                rec["val_acc"] = float(np.mean(pred == val.y))
        if epoch_end is not None:
            with torch.no_grad():
                for rec, extra in zip(recs, epoch_end(head, epoch)):
                    rec.update(extra)
        for s, rec in enumerate(recs):
            history[s].append(rec)
            for rule in rules:
                score = epoch if rule == "last" else rec[rule]
                if score > best[s][rule][0]:  # strict: ties keep the earlier epoch; a copy only on improvement
                    best[s][rule] = (score, head.lane_state(s), epoch)
    heads = []
    for s in range(S):
        lane = head.select([s])
        lane.generators = None
        lane.selected_states = {rule: (state, epoch) for rule, (_, state, epoch) in best[s].items()}
        select_state(lane, history[s], selection[s])
        heads.append(lane)
    return heads, history


def fit_methods(
    methods: list[Method],
    head: LaneModule,
    data: FeatureSet,
    opts: ProjectionOptions,
    seeds: Sequence[int],
    step_loss: StepLoss,
    inputs: Callable[[SplitFeatures], np.ndarray],
    **kwargs: Any,
) -> None:
    """:func:`fit_head` for one lane per instance in ``methods`` (each selecting by its own ``selection``
    option); every instance gets its lane's ``head`` and ``history``."""
    heads, histories = fit_head(
        head, data, opts, seeds, step_loss, inputs, selection=[m.options.selection for m in methods], **kwargs
    )
    for m, lane, history in zip(methods, heads, histories):
        m.head, m.history = lane, history


def lane_grad_norm(params: list[torch.Tensor], lanes: int) -> torch.Tensor:
    """Per-lane gradient norm over all parameters, ``[S]``."""
    norms = [torch.linalg.vector_norm(p.grad.reshape(lanes, -1), dim=1) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


def select_state(head: LaneModule, history: list[dict], rule: str) -> None:
    """Load the epoch ``rule`` chose during :func:`fit_head` into the one-lane ``head`` and mark it
    ``selected`` in ``history``."""
    if rule not in head.selected_states:
        raise ValueError(f"selection {rule!r} was not tracked (no validation split?)")
    state, epoch = head.selected_states[rule]
    head.load_lane_state(0, state)
    head.eval()
    for rec in history:
        rec.pop("selected", None)
    history[epoch]["selected"] = True


class ProjectionMethod(Method):
    """Shared prediction and lane batching for methods whose result is a trained torch head (``self.head``,
    one lane).  Subclasses implement :meth:`fit_lanes`; ``fit`` is its one-lane case."""

    uses = ("h", "text", "train")
    input_field: ClassVar[str] = "h"  # what the head consumes: "h" (pre-projection features) or "z" (embeddings)
    optimizer: ClassVar[str] = "sgd"  # fit_head's optimiser: "sgd" (momentum: one state tensor) or "adam" (two)
    # options that must agree for runs to train as lanes of one pass (the others may differ lane by lane)
    shared_options: ClassVar[tuple[str, ...]] = (
        "epochs",
        "batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "train_logit_scale",
        "device",
        "precision",
    )

    @classmethod
    def lane_key(cls, options: Any) -> Hashable | None:
        return tuple(getattr(options, k) for k in cls.shared_options if hasattr(options, k))

    def fit(self, data: FeatureSet, seed: int) -> None:
        type(self).fit_lanes([self], data, [seed])

    def required_labels(self) -> str:
        return SELECTION_RULES[self.options.selection] if self.label_needs == "none" else self.label_needs

    def reselect(self, rule: str) -> None:
        """Switch to the epoch another selection rule chose in the same training run."""
        select_state(self.head, self.history, rule)
        self.options = dataclasses.replace(self.options, selection=rule)

    def inputs(self, split: SplitFeatures) -> np.ndarray:
        """What the trained head consumes (:attr:`input_field`): ``[n, d_in]``."""
        return getattr(split, self.input_field)

    @classmethod
    def lane_params(cls, data: FeatureSet, options: Any) -> int:
        """Trainable parameters of one lane (default: a ``[d_in, d]`` projection and its bias)."""
        d_in = getattr(data.splits["train"], cls.input_field).shape[1]
        return d_in * data.text.shape[1] + data.text.shape[1] + 1

    @classmethod
    def step_rows(cls, options: Any) -> int:
        """Input rows one lane embeds per mini-batch sample in a training step (CFR: the regular sample, its
        anchor, the anchor's positives and negatives)."""
        return 1

    @classmethod
    def lane_extra_bytes(cls, data: FeatureSet, options: Any) -> int:
        """Per-lane memory beyond parameters, step and scoring (CFR: its sampler's index tables)."""
        return 0

    @classmethod
    def lane_memory(cls, data: FeatureSet, options: Any) -> tuple[str, int, int]:
        """``(device, shared, per lane)`` bytes a pass holds at most on its device, counted from the shapes.

        Shared: the training and validation inputs (fp32).  Per lane: the parameters with their gradient, optimiser
        state (Adam two, SGD one) and one saved state per selection rule; a training step's gathered inputs and the
        activations autograd keeps (six ``[rows, d]`` fp32 buffers per row: projection, normalised, dropped-out, and
        their gradients); scoring :data:`EVAL_CHUNK` samples (projection, normalised copy, logits); and
        :meth:`lane_extra_bytes`.  ``tests/test_gpu.py`` checks it bounds the measured peak on a GPU."""
        tr, val = data.splits["train"], data.splits.get("val")
        d_in = getattr(tr, cls.input_field).shape[1]
        d, C = data.text.shape[1], data.n_classes
        n_val = len(val) if val is not None else 0
        shared = 4 * (len(tr) + n_val) * d_in
        copies = 2 + (2 if cls.optimizer == "adam" else 1) + len(SELECTION_RULES)
        rows = options.batch_size * cls.step_rows(options)
        step = 4 * rows * (d_in + 6 * d)
        scoring = 4 * min(max(len(tr), n_val), EVAL_CHUNK) * (3 * d + C)
        per_lane = 4 * cls.lane_params(data, options) * copies + step + scoring + cls.lane_extra_bytes(data, options)
        return str(resolve_device(options.device)), shared, per_lane

    def logits(self, split: SplitFeatures) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(self.inputs(split), device=next(self.head.parameters()).device)
            return self.head(x)[0].cpu().numpy()


@register
class ClipERM(ProjectionMethod):
    """CLIP+ERM: fine-tune the image projection (and s) with cross-entropy through the zero-shot head."""

    name = "clip_erm"
    Options = ClipERMOptions
    summary = "CE fine-tuning of the image projection through the zero-shot head (CFR step 1)"

    @classmethod
    def fit_lanes(cls, methods: list[Method], data: FeatureSet, seeds: list[int]) -> None:
        o = methods[0].options
        device = resolve_device(o.device)
        tr = data.splits["train"]
        h = torch.tensor(tr.h, device=device)
        y = torch.tensor(tr.y, device=device)
        head = ProjectionHead.for_features(
            data,
            [m.options.logit_scale_init for m in methods],
            o.train_logit_scale,
            [m.options.dropout for m in methods],
        )

        def ce(head: ProjectionHead, step: Step) -> torch.Tensor:
            return lane_cross_entropy(head(h[step.idx]), y[step.idx])

        fit_methods(methods, head, data, o, seeds, ce, lambda split: split.h)
