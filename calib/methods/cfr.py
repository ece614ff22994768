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

from calib.features import FeatureSet, SplitFeatures
from calib.methods.base import register
from calib.methods.diagnostics import direction_weights
from calib.methods.losses import TSCLoss, info_nce, supcon_loss
from calib.methods.projection import (
    LOGIT_SCALE_INITS,
    SELECTION_RULES,
    ClipERMOptions,
    ProjectionHead,
    ProjectionMethod,
    fit_head,
    fit_projection,
    resolve_device,
)
from calib.metrics import group_accuracy

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
    reference_epochs: int = 100  # epochs of the CLIP+ERM reference (same optimiser settings as below)
    calibration: str = "misclassified"  # calibration rule: "misclassified" or "low_margin"
    calibration_fraction: float = 0.1  # q, the low-margin fraction (used by "low_margin" only)
    positives: int = 16  # P positives per anchor
    negatives: int = 16  # N negatives per anchor
    positive_rule: str = "random"  # "random" (fresh each step) or "nearest" (reference-space neighbours)
    negative_rule: str = "hard"  # "hard" (nearest other-class) or "random_same_class" (as released)
    negative_space: str = "reference"  # where "hard" means nearest: "reference" embeddings or frozen "pre_projection" h
    temperature: float = 1.0  # tau of the InfoNCE term
    anchor_ce_weight: float = 1.0  # a: weight of the anchor CE inside c(e) * (...) (1 in the release)
    contrastive_weight: float = 1.0  # k: weight of InfoNCE inside c(e) * (...) (1 in the release)
    regularizer: str = "tsc"  # L_reg on the regular batch: "tsc" (released), "ce", "supcon", "none"
    tsc_temperature: float = 0.07  # TSC / SupCon temperature
    tsc_target_weight: float = 0.2  # TSC weight of the class-target positive
    tsc_queue: int = 1280  # TSC feature-queue length (128 * 2 * 5 in the release)
    weight: float = 1.5  # c: constant value, and the cosine schedule's value at epoch 0
    weight_schedule: str = "cosine"  # "cosine": 1 + 0.5 cos(2 pi e / E); "constant": c
    dropout: float = 0.1  # dropout on the normalised image feature, training only
    epochs: int = 100  # passes over the training set (or the calibration set, see epoch_unit)
    epoch_unit: str = "train"  # "train": an epoch pairs every training batch with anchors (the release);
    # "calibration": an epoch is one pass over the anchors, regular batches drawn at random (far fewer steps)
    batch_size: int = 128  # regular samples per step (and as many anchors)
    lr: float = 1e-4  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-5  # SGD weight decay
    train_logit_scale: bool = True  # also learn the logit scale s
    logit_scale_init: str = "release"  # initial s: "release" (1/0.07, the CFR code's own scale) or "pretrained"
    selection: str = "val_wga"  # epoch selection: val_wga | val_worst_class | last
    faithful_release: bool = False  # reproduce the released negatives / eval dropout / stuck schedule
    device: str = "auto"  # cuda when present

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
            logit_scale_init=self.logit_scale_init,
        )


_REFERENCES: dict[tuple, tuple[dict, list[dict]]] = {}


def reference_erm(data: FeatureSet, opts: ClipERMOptions, seed: int) -> tuple[ProjectionHead, list[dict]]:
    """The CLIP+ERM reference head, trained once per (features, options, seed) in this process."""
    key = (
        data.meta.get("weights"),
        data.meta.get("dataset_version"),
        id(data) if not data.meta else None,
        tuple(sorted(asdict(opts).items())),
        seed,
    )
    device = resolve_device(opts.device)
    if key not in _REFERENCES:
        tr = data.splits["train"]
        h, y = torch.tensor(tr.h, device=device), torch.tensor(tr.y, device=device)
        head, hist = fit_projection(data, opts, seed, lambda hd, idx, epoch: F.cross_entropy(hd(h[idx]), y[idx]))
        if len(_REFERENCES) >= 8:  # bounded memory; enough for ablations over a few seeds
            _REFERENCES.pop(next(iter(_REFERENCES)))
        _REFERENCES[key] = ({k: v.detach().clone() for k, v in head.state_dict().items()}, hist)
    state, hist = _REFERENCES[key]
    head = ProjectionHead.for_features(data, opts.logit_scale_init, opts.train_logit_scale).to(device)
    head.load_state_dict(state)
    return head.eval(), hist


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


@register
class CFR(ProjectionMethod):
    """CFR: recalibrate the image projection with a contrastive loss on a label-free calibration set."""

    name = "cfr"
    Options = CFROptions
    summary = "Contrastive Feature Recalibration of the image projection (You et al., CVPR 2024)"

    def fit(self, data: FeatureSet, seed: int) -> None:
        o = self.options
        o.validate()
        device = resolve_device(o.device)
        tr = data.splits["train"]
        h = torch.tensor(tr.h, device=device)
        y = torch.tensor(tr.y, device=device)
        gen = torch.Generator().manual_seed(seed + 1)  # sampling stream, separate from the batch order

        # 1. reference model (memoised: it is exactly the CLIP+ERM run of this seed and these settings)
        if o.reference == "erm":
            ref_head, self.reference_history = reference_erm(data, o.projection_options(o.reference_epochs, 0.0), seed)
        else:
            ref_head = ProjectionHead(data.W0, data.b0, data.text, data.logit_scale).to(device).eval()
            self.reference_history = []
        with torch.no_grad():
            ref_logits = ref_head(h).cpu().numpy()
            ref_emb = ref_head.embed(h)
        ref_pred = ref_logits.argmax(1)

        # 2. calibration set (diagnostic composition only)
        cal = calibration_set(ref_logits, tr.y, o.calibration, o.calibration_fraction)
        self.calibration_idx = cal
        self.calibration_groups = np.bincount(tr.g[cal], minlength=data.n_groups).tolist()
        log.info(
            "CFR calibration set: %d of %d training samples (per-group diagnostic: %s)",
            len(cal),
            len(tr),
            self.calibration_groups,
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
        cal_t = torch.as_tensor(cal, device=device)
        cal_y = y[cal_t]
        # the release ranks negatives by cosine in the frozen backbone's pre-projection space (then overwrites them)
        neg_space = ref_emb if o.negative_space == "reference" else F.normalize(h, dim=-1)
        self.hard_negatives = torch.empty(len(cal), o.negatives, dtype=torch.long, device=device)
        self.nearest_positives = torch.empty(len(cal), o.positives, dtype=torch.long, device=device)
        for c in range(data.n_classes):
            rows = torch.nonzero(cal_y == c).flatten()
            if len(rows) == 0:
                continue
            others = torch.nonzero(y != c).flatten()
            nn_idx = nearest(neg_space[cal_t[rows]], neg_space[others], o.negatives)
            self.hard_negatives[rows] = others[_pad(nn_idx, o.negatives, gen)]
            if o.positive_rule == "nearest":
                pool = pools[c]
                pos_idx = nearest(ref_emb[cal_t[rows]], ref_emb[pool], o.positives)
                self.nearest_positives[rows] = pool[_pad(pos_idx, o.positives, gen)]

        # uniform draws from per-class pools, vectorised: pool c is flat[offset[c] : offset[c] + size[c]]
        pos_flat, pos_off, pos_size = _flatten_pools([pools[c] for c in range(data.n_classes)])
        same_flat, same_off, same_size = _flatten_pools(
            [torch.nonzero(y == c).flatten() for c in range(data.n_classes)]
        )

        def draw(flat: torch.Tensor, off: torch.Tensor, size: torch.Tensor, cls: torch.Tensor, k: int) -> torch.Tensor:
            u = torch.rand(len(cls), k, generator=gen).to(device)
            return flat[off[cls, None] + (u * size[cls, None]).long().clamp(max=size[cls, None] - 1)]

        def positives_for(anchor_rows: torch.Tensor) -> torch.Tensor:
            if o.positive_rule == "nearest":
                return self.nearest_positives[anchor_rows]
            return draw(pos_flat, pos_off, pos_size, cal_y[anchor_rows], o.positives)

        def negatives_for(anchor_rows: torch.Tensor) -> torch.Tensor:
            if o.negative_rule == "hard" and not o.faithful_release:
                return self.hard_negatives[anchor_rows]
            # the release computes hard negatives, then overwrites them with random same-class samples
            return draw(same_flat, same_off, same_size, cal_y[anchor_rows], o.negatives)

        # kept for inspection: (calibration-set rows) -> training indices [rows, P] / [rows, N]
        self.sample_positives, self.sample_negatives = positives_for, negatives_for

        # 4. the loss
        tsc = (
            TSCLoss(data.text.shape[1], data.n_classes, o.tsc_queue, o.tsc_temperature, o.tsc_target_weight, seed).to(
                device
            )
            if o.regularizer == "tsc"
            else None
        )
        n_cal = len(cal)
        big_projection = data.W0.size >= 1 << 16
        cal_order = {"perm": torch.randperm(n_cal, generator=gen), "epoch": -1}

        def step_loss(head: ProjectionHead, idx: torch.Tensor, epoch: int) -> torch.Tensor:
            if o.epoch_unit == "calibration":  # idx indexes anchors; the regular batch is drawn at random
                idx = torch.randint(len(h), (len(idx),), generator=gen).to(device)
            if cal_order["epoch"] != epoch:  # a fresh anchor order each epoch; anchors cycle (i mod |cal|)
                cal_order["perm"], cal_order["epoch"], cal_order["pos"] = torch.randperm(n_cal, generator=gen), epoch, 0
            start = cal_order["pos"]
            rows = cal_order["perm"][torch.arange(start, start + len(idx)) % n_cal].to(device)
            cal_order["pos"] = start + len(idx)
            anchors = cal_t[rows]
            pos, neg = positives_for(rows), negatives_for(rows)
            need = torch.cat([idx, anchors, pos.flatten(), neg.flatten()])
            if big_projection:  # project each distinct row once (same result, fewer FLOPs for real CLIP sizes)
                uniq, inverse = torch.unique(need, return_inverse=True)
                emb = head.embed(h[uniq])[inverse]
            else:  # small maps: the gather-and-scatter costs more than the duplicate rows
                emb = head.embed(h[need])
            b, p_n = len(idx), pos.numel()
            e_reg, e_anc = emb[:b], emb[b : 2 * b]
            e_pos = emb[2 * b : 2 * b + p_n].view(*pos.shape, -1)
            e_neg = emb[2 * b + p_n :].view(*neg.shape, -1)
            scale = head.log_s.exp()
            d_anc = head.dropout(e_anc)  # as released: one dropout draw feeds the anchor CE and InfoNCE
            ce_anchor = F.cross_entropy(scale * d_anc @ head.text.T, y[anchors])
            l_con = info_nce(F.normalize(d_anc, dim=-1), e_pos, e_neg, o.temperature)
            c = loss_weight(epoch, o.epochs, o)
            loss = c * (o.anchor_ce_weight * ce_anchor + o.contrastive_weight * l_con)
            if o.regularizer == "ce":
                l_reg = F.cross_entropy(scale * head.dropout(e_reg) @ head.text.T, y[idx])
            elif o.regularizer == "supcon":
                l_reg = supcon_loss(head.dropout(e_reg), y[idx], o.tsc_temperature)
            elif o.regularizer == "tsc":
                l_reg = tsc(F.normalize(head.dropout(e_reg), dim=-1), y[idx])
            else:
                l_reg = torch.zeros((), device=device)
            terms["anchor_ce"] += ce_anchor.detach()
            terms["contrastive"] += l_con.detach()
            terms["regularizer"] += l_reg.detach()
            terms["steps"] += 1
            return loss + l_reg

        terms = {k: torch.zeros((), device=device) for k in ("anchor_ce", "contrastive", "regularizer", "steps")}
        W0 = torch.as_tensor(data.W0, dtype=torch.float32, device=device)
        w0_norm = float(torch.linalg.matrix_norm(W0))

        def epoch_end(hd: ProjectionHead, epoch: int) -> dict:
            """Diagnostics of one epoch (read by no selection rule)."""
            steps = max(1.0, float(terms["steps"]))
            rec = {f"loss_{k}": float(terms[k]) / steps for k in ("anchor_ce", "contrastive", "regularizer")}
            for v in terms.values():
                v.zero_()
            shift = float(torch.linalg.matrix_norm(hd.W - W0))
            rec.update(
                c=loss_weight(epoch, o.epochs, o),
                w_shift=shift,
                w_shift_rel=shift / w0_norm,
                logit_scale=float(hd.log_s.exp()),
            )
            pred = hd(h).argmax(1).cpu().numpy()
            rec["train_group_acc"] = group_accuracy(pred, tr.y, tr.g, data.n_groups).tolist()
            rec["calibration_acc"] = float(np.mean(pred[cal] == tr.y[cal]))
            if data.directions:
                rec.update(direction_weights(hd.W.cpu().numpy(), data.text, data.directions))
            return rec

        # the trainable projection starts at the pretrained W0 (not at the reference)
        head = ProjectionHead.for_features(data, o.logit_scale_init, o.train_logit_scale, o.dropout)
        epoch_size = n_cal if o.epoch_unit == "calibration" else None
        torch.manual_seed(seed)
        self.head, self.history = fit_head(
            head,
            data,
            o.projection_options(o.epochs, o.dropout),
            seed,
            step_loss,
            lambda split: split.h,
            epoch_size=epoch_size,
            epoch_end=epoch_end,
        )
        self.eval_gen = torch.Generator().manual_seed(seed + 2)

    def logits(self, split: SplitFeatures) -> np.ndarray:
        if not self.options.faithful_release:
            return super().logits(split)
        # the release left dropout active at evaluation: predictions are stochastic (seeded here)
        with torch.no_grad():
            head = self.head
            h = torch.as_tensor(split.h, device=head.W.device)
            e = head.embed(h)
            keep = (torch.rand(e.shape, generator=self.eval_gen) >= head.dropout.p).to(e.device)
            e = e * keep / (1 - head.dropout.p)
            return (head.log_s.exp() * e @ head.text.T).cpu().numpy()


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
