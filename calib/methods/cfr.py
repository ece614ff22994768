"""CFR: Contrastive Feature Recalibration (You et al., CVPR 2024), on cached pre-projection features.

Steps (see ../shared/docs/method.md; every line is checked against the released code in
docs/cfr_fidelity.md):

1. Reference model: CLIP+ERM (``reference="erm"``) or the pretrained projection (``"zeroshot"``).
2. Calibration set: the training samples the reference misclassifies (``"misclassified"``) or the
   fraction ``calibration_fraction`` with the smallest true-class margin (``"low_margin"``). Group
   labels are never read; the set's group composition is recorded only as a diagnostic.
3. For each anchor of class y: ``positives`` correctly classified class-y samples (uniformly random
   each step, or nearest in reference-embedding space) and ``negatives`` other-class samples nearest
   to the anchor (``negative_rule="hard"``; in reference-embedding space, or in the frozen
   pre-projection space where the release computes them).  All three pass through the *current*
   projection and are L2-normalised at every step, so gradients reach ``W`` through all.
4. Per step, B regular training samples paired with B anchors (the release pairs training sample i
   with calibration sample i mod |cal|; an epoch is one pass over the training set)::

       L = c(e) * (a * CE(anchors) + k * L_con) + L_reg(regular batch)

   As in the release, dropout acts on the normalised image feature of the regular batch and of the
   anchors (not of positives and negatives); the anchor CE uses the dropped-out feature, InfoNCE its
   re-normalisation.  ``L_con``: mean over positives of InfoNCE(anchor, positive vs the negatives,
   temperature tau); ``L_reg``: TSC (as released), CE, SupCon or none; ``c(e) = 1 + 0.5 cos(2 pi e / E)``
   (the intended schedule) or the constant 1.5 that the release actually ran; ``a = k = 1`` (the
   release; the term weights exist to take CFR apart).  The logit scale starts at the release's
   1/0.07 and trains (``logit_scale_init``).
5. Epoch selection: ``val_wga`` / ``val_worst_class`` / ``last``.  6. Predict with the zero-shot head.

``faithful_release=True`` reproduces three behaviours of the released code: negatives overwritten
by random *same-class* samples, dropout left on at evaluation, and the loss weight stuck at 1.5.

``history`` holds, per epoch, each loss term, ``c``, the gradient norm, ``||W - W0||``, the logit
scale, training accuracy per group (validation per group comes from :func:`fit_head`; diagnostics only:
no label-free protocol reads them), the calibration set's accuracy and, on features with known
directions (the testbed), the logit weight of each direction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from calib.clip.features import FeatureSet, SplitFeatures
from calib.core.metrics import group_accuracy
from calib.methods.base import option, register
from calib.methods.diagnostics import direction_weights
from calib.methods.lanes import lane_cross_entropy, lane_dropout, unit
from calib.methods.losses import TSCLoss, info_nce, supcon_loss
from calib.methods.projection import (
    LOGIT_SCALE_INITS,
    SELECTION_RULES,
    ClipERMOptions,
    ProjectionHead,
    ProjectionMethod,
    Step,
    fit_methods,
    lane_predictions,
    resolve_device,
)

log = logging.getLogger(__name__)

CHOICES = {
    "reference": ("erm", "zeroshot"),
    "calibration": ("misclassified", "low_margin"),
    "positive_rule": ("random", "nearest"),
    "negative_rule": ("hard", "random_same_class"),
    "negative_space": ("reference", "pre_projection"),
    "logit_scale_init": LOGIT_SCALE_INITS,
    "regularizer": ("tsc", "ce", "supcon", "none"),
    "weight_schedule": ("cosine", "constant"),
    "epoch_unit": ("train", "calibration"),
    "selection": tuple(SELECTION_RULES),
}


@dataclass
class CFROptions:
    """CFR options: defaults are the released settings with the released defects fixed."""

    reference: str = "erm"  # reference model: "erm" (CLIP+ERM, default) or "zeroshot"
    reference_epochs: int = option(100, ge=1)  # epochs of the CLIP+ERM reference (same optimiser settings as below)
    calibration: str = "misclassified"  # calibration rule: "misclassified" or "low_margin"
    calibration_fraction: float = option(0.1, gt=0, le=1)  # q, the low-margin fraction (used by "low_margin" only)
    positives: int = option(16, ge=1)  # P positives per anchor
    negatives: int = option(16, ge=1)  # N negatives per anchor
    positive_rule: str = "random"  # "random" (fresh each step) or "nearest" (reference-space neighbours)
    negative_rule: str = "hard"  # "hard" (nearest other-class) or "random_same_class" (as released)
    negative_space: str = "reference"  # where "hard" means nearest: "reference" embeddings or frozen "pre_projection" h
    temperature: float = option(1.0, gt=0)  # tau of the InfoNCE term
    anchor_ce_weight: float = option(1.0, ge=0)  # a: weight of the anchor CE inside c(e) * (...) (1 in the release)
    contrastive_weight: float = option(1.0, ge=0)  # k: weight of InfoNCE inside c(e) * (...) (1 in the release)
    regularizer: str = "tsc"  # L_reg on the regular batch: "tsc" (released), "ce", "supcon", "none"
    tsc_temperature: float = option(0.07, gt=0)  # TSC / SupCon temperature
    tsc_target_weight: float = option(0.2, ge=0)  # TSC weight of the class-target positive
    tsc_queue: int = option(1280, ge=1)  # TSC feature-queue length (128 * 2 * 5 in the release)
    weight: float = option(1.5, ge=0)  # c: constant value, and the cosine schedule's value at epoch 0
    weight_schedule: str = "cosine"  # "cosine": 1 + 0.5 cos(2 pi e / E); "constant": c
    dropout: float = option(0.1, ge=0, lt=1)  # dropout on the normalised image feature, training only
    epochs: int = option(100, ge=1)  # passes over the training set (or the calibration set, see epoch_unit)
    epoch_unit: str = "train"  # "train": an epoch pairs every training batch with anchors (the release);
    # "calibration": an epoch is one pass over the anchors, regular batches drawn at random (far fewer steps)
    batch_size: int = option(128, ge=1)  # regular samples per step (and as many anchors)
    lr: float = option(1e-4, gt=0)  # SGD learning rate
    momentum: float = option(0.9, ge=0, lt=1)  # SGD momentum
    weight_decay: float = option(1e-5, ge=0)  # SGD weight decay
    train_logit_scale: bool = True  # also learn the logit scale s
    logit_scale_init: str = "release"  # initial s: "release" (1/0.07, the CFR code's own scale) or "pretrained"
    selection: str = "val_wga"  # epoch selection: val_wga | val_worst_class | last
    faithful_release: bool = False  # reproduce the released negatives / eval dropout / stuck schedule
    device: str = "auto"  # cuda when present
    precision: str = "fp32"  # training arithmetic: fp32 | tf32 | bf16 (calib.methods.precision; scoring is fp32)

    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"CFR option {name}={getattr(self, name)!r}; allowed: {list(allowed)}")
        if self.positives < 1 or self.negatives < 1 or self.epochs < 1:
            raise ValueError("CFR needs positives >= 1, negatives >= 1 and epochs >= 1")
        if self.anchor_ce_weight < 0 or self.contrastive_weight < 0:
            raise ValueError("CFR term weights anchor_ce_weight and contrastive_weight must be >= 0")

    def projection_options(self, epochs: int, dropout: float) -> ClipERMOptions:
        return ClipERMOptions(
            epochs=epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            train_logit_scale=self.train_logit_scale,
            dropout=dropout,
            selection=self.selection,
            device=self.device,
            precision=self.precision,
            logit_scale_init=self.logit_scale_init,
        )


_REFERENCES: dict[tuple, tuple[dict, list[dict]]] = {}


def _reference_key(data: FeatureSet, opts: ClipERMOptions, seed: int) -> tuple:
    # the features' identity: weights and dataset version, and (for feature sets whose meta is thin, e.g. the
    # rehearsal's synthetic ones) the dataset and model names and the shapes the head is built from
    return (
        data.meta.get("weights"),
        data.meta.get("dataset_version"),
        data.meta.get("dataset"),
        data.meta.get("model"),
        tuple(data.W0.shape),
        len(data.splits["train"]),
        id(data) if not data.meta else None,
        tuple(sorted(asdict(opts).items())),
        seed,
    )


def reference_heads(
    data: FeatureSet, opts: list[ClipERMOptions], seeds: list[int]
) -> list[tuple[ProjectionHead, list[dict]]]:
    """The CLIP+ERM reference head of each ``(opts[i], seeds[i])``, trained once per (features, options,
    seed) in this process; the missing ones train together as lanes (:meth:`ClipERM.fit_lanes`)."""
    from calib.methods.projection import ClipERM

    keys = [_reference_key(data, o, s) for o, s in zip(opts, seeds)]
    todo = {k: (o, s) for k, o, s in zip(keys, opts, seeds) if k not in _REFERENCES}
    passes: dict = {}
    for k, (o, _) in todo.items():
        passes.setdefault(ClipERM.lane_key(o), []).append(k)
    fresh = {}
    for members in passes.values():
        erms = [ClipERM(todo[k][0]) for k in members]
        ClipERM.fit_lanes(erms, data, [todo[k][1] for k in members])
        for k, erm in zip(members, erms):
            fresh[k] = (erm.head.lane_state(0), erm.history)
    for k, v in fresh.items():
        if len(_REFERENCES) >= 32:  # bounded memory; enough for ablations over a few seeds
            _REFERENCES.pop(next(iter(_REFERENCES)))
        _REFERENCES[k] = v
    out = []
    for k, o in zip(keys, opts):
        state, hist = fresh[k] if k in fresh else _REFERENCES[k]
        head = ProjectionHead.for_features(data, o.logit_scale_init, o.train_logit_scale)
        head = head.to(resolve_device(o.device))
        head.load_lane_state(0, state)
        out.append((head.eval(), hist))
    return out


def clear_reference_cache() -> None:
    """Forget the memoised reference heads (timings and FLOP counts that must include their training)."""
    _REFERENCES.clear()


def reference_erm(data: FeatureSet, opts: ClipERMOptions, seed: int) -> tuple[ProjectionHead, list[dict]]:
    """The CLIP+ERM reference head of one seed (one lane), memoised like :func:`reference_heads`."""
    return reference_heads(data, [opts], [seed])[0]


def loss_weight(epoch: int, epochs: int, opts: CFROptions) -> float:
    """c(e): the cosine schedule, or the constant (always the constant under ``faithful_release``)."""
    if opts.weight_schedule == "constant" or opts.faithful_release:
        return opts.weight
    return opts.weight - 0.5 + 0.5 * math.cos(2 * math.pi * epoch / epochs)


def calibration_set(logits: np.ndarray, y: np.ndarray, rule: str, fraction: float) -> np.ndarray:
    """Indices of the calibration set from reference logits ``[n, C]`` (no group label is read)."""
    if rule == "misclassified":
        idx = np.flatnonzero(logits.argmax(1) != y)
        if len(idx):
            return idx
        log.warning(
            "the reference model classifies every training sample correctly; "
            "using the %.0f%% lowest-margin samples instead",
            100 * fraction,
        )
    true = logits[np.arange(len(y)), y]
    other = np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits).max(1)
    k = max(1, int(round(fraction * len(y))))
    return np.sort(np.argsort(true - other, kind="stable")[:k])


def nearest(query: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """For each normalised query row, indices (into ``keys``) of its ``k`` most cosine-similar keys."""
    k = min(k, len(keys))
    out = [(query[i : i + chunk] @ keys.T).topk(k, dim=1).indices for i in range(0, len(query), chunk)]
    return torch.cat(out)


class AnchorSampler:
    """One lane's calibration set and its positives and negatives (steps 2 and 3), with the lane's own
    sampling stream (a generator seeded ``seed + 1``, separate from the batch order).

    ``epoch(n, batch_size)`` draws a whole epoch's anchors, positives and negatives at its start, in
    exactly the order a step-by-step draw would take them from the stream.
    """

    def __init__(self, data: FeatureSet, o: CFROptions, seed: int, ref_head: ProjectionHead, device: torch.device):
        tr = data.splits["train"]
        self.o, self.n_train, self.device = o, len(tr), device
        h = torch.tensor(tr.h, device=device)
        y = torch.tensor(tr.y, device=device)
        self.gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            ref_logits = ref_head(h)[0].cpu().numpy()
            ref_emb = ref_head.embed(h)[0]
        ref_pred = ref_logits.argmax(1)

        # 2. calibration set (diagnostic composition only)
        cal = calibration_set(ref_logits, tr.y, o.calibration, o.calibration_fraction)
        self.cal = cal
        self.groups = np.bincount(tr.g[cal], minlength=data.n_groups).tolist()
        log.info(
            "CFR calibration set: %d of %d training samples (per-group diagnostic: %s)", len(cal), len(tr), self.groups
        )

        # 3. positives and negatives, indexed in the training split
        correct = ref_pred == tr.y
        pools = {
            c: torch.as_tensor(np.flatnonzero(correct & (tr.y == c)), device=device) for c in range(data.n_classes)
        }
        for c, pool in pools.items():
            if len(pool) == 0:
                pools[c] = torch.as_tensor(np.flatnonzero(tr.y == c), device=device)  # no correct sample: any
                log.warning("no correctly classified training sample of class %d; positives drawn from the class", c)
        self.cal_t = torch.as_tensor(cal, device=device)
        self.cal_y = y[self.cal_t]
        # the release ranks negatives by cosine in the frozen backbone's pre-projection space (then overwrites them)
        neg_space = ref_emb if o.negative_space == "reference" else F.normalize(h, dim=-1)
        self.hard_negatives = torch.empty(len(cal), o.negatives, dtype=torch.long, device=device)
        self.nearest_positives = torch.empty(len(cal), o.positives, dtype=torch.long, device=device)
        for c in range(data.n_classes):
            rows = torch.nonzero(self.cal_y == c).flatten()
            if len(rows) == 0:
                continue
            others = torch.nonzero(y != c).flatten()
            nn_idx = nearest(neg_space[self.cal_t[rows]], neg_space[others], o.negatives)
            self.hard_negatives[rows] = others[_pad(nn_idx, o.negatives, self.gen)]
            if o.positive_rule == "nearest":
                pool = pools[c]
                pos_idx = nearest(ref_emb[self.cal_t[rows]], ref_emb[pool], o.positives)
                self.nearest_positives[rows] = pool[_pad(pos_idx, o.positives, self.gen)]
        # uniform draws from per-class pools, vectorised: pool c is flat[offset[c] : offset[c] + size[c]]
        self.pos_pools = _flatten_pools([pools[c] for c in range(data.n_classes)])
        self.same_pools = _flatten_pools([torch.nonzero(y == c).flatten() for c in range(data.n_classes)])
        self.random_positives = o.positive_rule != "nearest"
        self.random_negatives = o.negative_rule != "hard" or o.faithful_release
        # calib's first CFR drew one anchor order here that no epoch used; the draw stays so that every
        # seed keeps its numbers (the stream, not the order, is what it preserves)
        torch.randperm(len(cal), generator=self.gen)

    def _pick(self, pools: tuple, cls: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        flat, off, size = pools
        return flat[off[cls, None] + (u.to(self.device) * size[cls, None]).long().clamp(max=size[cls, None] - 1)]

    def positives_for(self, rows: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """Positives ``[len(rows), P]`` (training indices) of calibration-set ``rows``."""
        if not self.random_positives:
            return self.nearest_positives[rows]
        u = torch.rand(len(rows), self.o.positives, generator=self.gen) if u is None else u
        return self._pick(self.pos_pools, self.cal_y[rows], u)

    def negatives_for(self, rows: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """Negatives ``[len(rows), N]``: the hard ones, or (as released) random same-class samples."""
        if not self.random_negatives:
            return self.hard_negatives[rows]
        u = torch.rand(len(rows), self.o.negatives, generator=self.gen) if u is None else u
        return self._pick(self.same_pools, self.cal_y[rows], u)

    def epoch(self, n: int, batch_size: int) -> dict[str, torch.Tensor]:
        """One epoch of ``n`` steps' worth of anchors: ``anchors [n]``, ``anchor_y [n]``, ``positives [n, P]``,
        ``negatives [n, N]`` and (``epoch_unit="calibration"``) the regular batch ``regular [n]``.

        The stream order is the per-step one: [regular batch], [at the first step: the anchor order],
        positives, negatives; anchors cycle through the order (training sample i meets anchor i mod |cal|).
        """
        o, gen = self.o, self.gen
        regular, pos_u, neg_u, order = [], [], [], None
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            if o.epoch_unit == "calibration":
                regular.append(torch.randint(self.n_train, (b,), generator=gen))
            if order is None:
                order = torch.randperm(len(self.cal_t), generator=gen)
            if self.random_positives:
                pos_u.append(torch.rand(b, o.positives, generator=gen))
            if self.random_negatives:
                neg_u.append(torch.rand(b, o.negatives, generator=gen))
        rows = order[torch.arange(n) % len(self.cal_t)].to(self.device)
        out = {
            "anchors": self.cal_t[rows],
            "anchor_y": self.cal_y[rows],
            "positives": self.positives_for(rows, torch.cat(pos_u) if pos_u else None),
            "negatives": self.negatives_for(rows, torch.cat(neg_u) if neg_u else None),
        }
        if regular:
            out["regular"] = torch.cat(regular).to(self.device)
        return out


def embed_rows(
    head: ProjectionHead, h: torch.Tensor, parts: list[torch.Tensor], dedupe: bool | None = None
) -> list[torch.Tensor]:
    """Embeddings of training rows through each lane's projection: ``parts[i] [S, ...]`` (indices into ``h``)
    -> ``[S, ..., d]``.

    With ``dedupe`` (default: on the CPU) each lane projects each distinct row once (the same result with fewer
    FLOPs: on the toy about 2,400 distinct rows of the 4,352 a step needs; lanes are padded to the largest
    distinct count); the parts are then gathered from the distinct rows' embeddings.  On a GPU the default
    projects every needed row: finding the distinct ones needs data-dependent sizes, i.e. a device-to-host
    sync in every step, and the FLOPs it saves are cheap there.
    """
    S = parts[0].shape[0]
    need = torch.cat([p.reshape(S, -1) for p in parts], dim=1)  # [S, M]
    if dedupe is None:
        dedupe = need.device.type == "cpu"
    if dedupe:
        n = len(h)
        flat_need = (need + n * torch.arange(S, device=need.device)[:, None]).reshape(-1)  # lane-offset rows
        # the distinct rows by marking, not sorting: O(S n) cheap passes instead of a sort of S M indices
        marked = torch.zeros(S * n, dtype=torch.bool, device=need.device)
        marked[flat_need] = True
        uniq = torch.nonzero(marked).flatten()  # sorted, so each lane's rows are contiguous
        inverse = (torch.cumsum(marked, 0) - 1)[flat_need].view(S, -1)
        lane = uniq // n
        counts = torch.bincount(lane, minlength=S)
        width = int(counts.max())  # the padded width (a host read: free on the CPU)
        slot = torch.arange(len(uniq), device=need.device) - (torch.cumsum(counts, 0) - counts)[lane]
        rows = torch.zeros(S, width, dtype=torch.long, device=need.device)
        rows[lane, slot] = uniq % n
        flat = head.embed(_rows(h, rows)).reshape(S * width, -1)
        where = (lane * width + slot)[inverse]  # [S, M]: each needed row's place in `flat`
    else:
        flat = head.embed(_rows(h, need)).reshape(S * need.shape[1], -1)
        where = torch.arange(flat.shape[0], device=need.device).view(S, -1)
    out, start = [], 0
    for p in parts:  # one gather per part (index_select: its backward is index_add, not a serial index_put)
        size = p[0].numel()
        out.append(flat.index_select(0, where[:, start : start + size].reshape(-1)).view(*p.shape, -1))
        start += size
    return out


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` for an index tensor of any shape (``index_select``: a row copy, several times faster on CPU
    than advanced indexing)."""
    return x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])


@register
class CFR(ProjectionMethod):
    """CFR: recalibrate the image projection with a contrastive loss on a label-free calibration set."""

    name = "cfr"
    Options = CFROptions
    summary = "Contrastive Feature Recalibration of the image projection (You et al., CVPR 2024)"
    # a pass's lanes share the step's shapes and the optimiser; everything else may differ lane by lane
    shared_options = (
        "epochs",
        "epoch_unit",
        "batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "train_logit_scale",
        "positives",
        "negatives",
        "tsc_queue",
        "tsc_temperature",
        "tsc_target_weight",
        "device",
        "precision",
    )

    @classmethod
    def step_rows(cls, options: CFROptions) -> int:
        return 2 + options.positives + options.negatives

    @classmethod
    def lane_extra_bytes(cls, data: FeatureSet, options: CFROptions) -> int:
        # the epoch's draws (int64: regular row, anchor, its label, positives, negatives per step sample), the
        # sampler's per-anchor tables (at most the training set), and the frozen reference head's parameters
        n = len(data.splits["train"])
        k = 3 + options.positives + options.negatives
        return 8 * n * k * 2 + 4 * cls.lane_params(data, options)

    @classmethod
    def lane_key(cls, options: CFROptions):
        if options.epoch_unit == "calibration":  # an epoch is the lane's own calibration set: runs alone
            return None
        return super().lane_key(options)

    @classmethod
    def fit_lanes(cls, methods: list[CFR], data: FeatureSet, seeds: list[int]) -> None:
        opts = [m.options for m in methods]
        for o in opts:
            o.validate()
        o0, S = opts[0], len(methods)
        device = resolve_device(o0.device)
        tr = data.splits["train"]
        h = torch.tensor(tr.h, device=device)
        y = torch.tensor(tr.y, device=device)

        # 1. reference models (memoised: each is exactly the CLIP+ERM run of its seed and settings)
        erm_lanes = [i for i, o in enumerate(opts) if o.reference == "erm"]
        refs = reference_heads(
            data,
            [opts[i].projection_options(opts[i].reference_epochs, 0.0) for i in erm_lanes],
            [seeds[i] for i in erm_lanes],
        )
        samplers = []
        for i, (m, o, seed) in enumerate(zip(methods, opts, seeds)):
            if o.reference == "erm":
                ref_head, m.reference_history = refs[erm_lanes.index(i)]
            else:
                ref_head = ProjectionHead(data.W0, data.b0, data.text, data.logit_scale).to(device).eval()
                m.reference_history = []
            # 2-3. calibration set, positives and negatives
            sampler = AnchorSampler(data, o, seed, ref_head, device)
            m.calibration_idx, m.calibration_groups = sampler.cal, sampler.groups
            m.hard_negatives, m.nearest_positives = sampler.hard_negatives, sampler.nearest_positives
            # kept for inspection: (calibration-set rows) -> training indices [rows, P] / [rows, N]
            m.sample_positives, m.sample_negatives = sampler.positives_for, sampler.negatives_for
            samplers.append(sampler)

        # 4. the loss, per lane
        kinds: dict[str, list[int]] = {}
        for i, o in enumerate(opts):
            kinds.setdefault(o.regularizer, []).append(i)
        tsc_lanes = kinds.get("tsc", [])
        tsc = (
            TSCLoss(
                data.text.shape[1],
                data.n_classes,
                o0.tsc_queue,
                o0.tsc_temperature,
                o0.tsc_target_weight,
                [seeds[i] for i in tsc_lanes],
            ).to(device)
            if tsc_lanes
            else None
        )
        lane_tensor = {k: torch.as_tensor(v, device=device) for k, v in kinds.items()}
        a = torch.tensor([o.anchor_ce_weight for o in opts], device=device)
        k_con = torch.tensor([o.contrastive_weight for o in opts], device=device)
        tau = torch.tensor([o.temperature for o in opts], device=device)[:, None, None]
        epoch_draws: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        terms = torch.zeros(3, S, device=device)  # anchor CE, InfoNCE, regulariser, summed over the epoch's steps
        n_steps = torch.zeros((), device=device)
        n_epoch = len(tr) if o0.epoch_unit == "train" else len(samplers[0].cal_t)

        def step_loss(head: ProjectionHead, step: Step) -> torch.Tensor:
            if step.start == 0:  # the epoch's anchors, positives and negatives, drawn at once per lane
                draws = [sp.epoch(n_epoch, o0.batch_size) for sp in samplers]
                epoch_draws.update({key: torch.stack([d[key] for d in draws]) for key in draws[0]})
                c = [loss_weight(step.epoch, o.epochs, o) for o in opts]
                weights["c"] = torch.tensor(c, device=device)
            part = slice(step.start, step.start + step.idx.shape[1])
            idx = epoch_draws["regular"][:, part] if "regular" in epoch_draws else step.idx
            anchors, pos, neg = (epoch_draws[key][:, part] for key in ("anchors", "positives", "negatives"))
            e_reg, e_anc, e_pos, e_neg = embed_rows(head, h, [idx, anchors, pos, neg])
            scale = head.scale()
            d_anc = head.dropout(e_anc)  # as released: one dropout draw feeds the anchor CE and InfoNCE
            ce_anchor = lane_cross_entropy(scale * d_anc @ head.text.T, epoch_draws["anchor_y"][:, part])
            l_con = info_nce(unit(d_anc), e_pos, e_neg, tau)
            loss = weights["c"] * (a * ce_anchor + k_con * l_con)
            # the regular batch's dropout: drawn only in lanes with a regulariser (as a single run draws it)
            p_reg = [p if opts[i].regularizer != "none" else 0.0 for i, p in enumerate(head.dropout_p)]
            d_reg = lane_dropout(e_reg, p_reg, head.generators, head.training)
            y_reg = y[idx]
            l_reg = None
            for kind, lanes in kinds.items():
                ix = lane_tensor[kind]
                if kind == "ce":
                    val = lane_cross_entropy(scale[ix] * d_reg[ix] @ head.text.T, y_reg[ix])
                elif kind == "supcon":
                    val = torch.stack([supcon_loss(d_reg[i], y_reg[i], opts[i].tsc_temperature) for i in lanes])
                elif kind == "tsc":
                    val = tsc(unit(d_reg[ix]), y_reg[ix])
                else:
                    val = torch.zeros(len(lanes), device=device)
                if len(lanes) == S:
                    l_reg = val
                else:
                    l_reg = (torch.zeros(S, device=device) if l_reg is None else l_reg).index_put((ix,), val)
            with torch.no_grad():
                terms.add_(torch.stack([ce_anchor, l_con, l_reg]).detach())
                n_steps.add_(1)
            return loss + l_reg

        W0 = torch.as_tensor(data.W0, dtype=torch.float32, device=device)
        w0_norm = float(torch.linalg.matrix_norm(W0))

        def epoch_end(hd: ProjectionHead, epoch: int) -> list[dict]:
            """Diagnostics of one epoch per lane (read by no selection rule)."""
            means = (terms / n_steps.clamp(min=1)).tolist()
            terms.zero_()
            n_steps.zero_()
            shifts = torch.linalg.matrix_norm(hd.W - W0).tolist()
            scales = hd.log_s.exp().tolist()
            preds = lane_predictions(hd, h)
            out = []
            for i, o in enumerate(opts):
                rec = {f"loss_{k}": means[j][i] for j, k in enumerate(("anchor_ce", "contrastive", "regularizer"))}
                rec.update(
                    c=loss_weight(epoch, o.epochs, o),
                    w_shift=shifts[i],
                    w_shift_rel=shifts[i] / w0_norm,
                    logit_scale=scales[i],
                )
                rec["train_group_acc"] = group_accuracy(preds[i], tr.y, tr.g, data.n_groups).tolist()
                cal = samplers[i].cal
                rec["calibration_acc"] = float(np.mean(preds[i][cal] == tr.y[cal]))
                if data.directions:
                    rec.update(direction_weights(hd.W[i].cpu().numpy(), data.text, data.directions))
                out.append(rec)
            return out

        # the trainable projection starts at the pretrained W0 (not at the reference)
        head = ProjectionHead.for_features(
            data, [o.logit_scale_init for o in opts], o0.train_logit_scale, [o.dropout for o in opts]
        )
        fit_methods(
            methods,
            head,
            data,
            o0.projection_options(o0.epochs, o0.dropout),
            seeds,
            step_loss,
            lambda split: split.h,
            epoch_size=n_epoch,
            epoch_end=epoch_end,
        )
        for m, seed in zip(methods, seeds):
            m.eval_gen = torch.Generator().manual_seed(seed + 2)

    def logits(self, split: SplitFeatures) -> np.ndarray:
        if not self.options.faithful_release:
            return super().logits(split)
        # the release left dropout active at evaluation: predictions are stochastic (seeded here)
        with torch.no_grad():
            head = self.head
            h = torch.as_tensor(split.h, device=head.W.device)
            e = head.embed(h)[0]
            p = head.dropout_p[0]
            keep = (torch.rand(e.shape, generator=self.eval_gen) >= p).to(e.device)
            e = e * keep / (1 - p)
            return (head.log_s.exp()[0] * e @ head.text.T).cpu().numpy()


def _flatten_pools(pools: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate index pools; return (flat, offsets [C], sizes [C])."""
    sizes = torch.tensor([len(p) for p in pools], device=pools[0].device)
    offsets = torch.cumsum(sizes, 0) - sizes
    return torch.cat(pools), offsets, sizes


def _pad(idx: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Repeat columns (at random) when fewer than ``k`` candidates exist."""
    if idx.shape[1] >= k:
        return idx[:, :k]
    extra = torch.randint(idx.shape[1], (idx.shape[0], k - idx.shape[1]), generator=gen).to(idx.device)
    return torch.cat([idx, idx.gather(1, extra)], dim=1)
