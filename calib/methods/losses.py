"""Contrastive losses used by CFR and the contrastive adapter.

All take L2-normalised features.  Shapes: ``B`` anchors, ``P`` positives, ``N`` negatives, ``d`` dims.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn


def info_nce(
    anchor: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, tau: float | torch.Tensor
) -> torch.Tensor:
    """Mean over anchors and positives of InfoNCE(anchor, one positive vs all negatives).

    ``anchor [..., B, d]``, ``positives [..., B, P, d]``, ``negatives [..., B, N, d]``: for positive j,
    ``-log exp(a.p_j / tau) / (exp(a.p_j / tau) + sum_n exp(a.n / tau))``.  Leading dimensions (lanes)
    are kept: the result is ``[...]``; ``tau`` may be a tensor broadcasting against ``[..., B, 1]``.
    """
    s_pos = torch.einsum("...bd,...bpd->...bp", anchor, positives) / tau  # [..., B, P]
    s_neg = torch.einsum("...bd,...bnd->...bn", anchor, negatives) / tau  # [..., B, N]
    neg_lse = torch.logsumexp(s_neg, dim=-1, keepdim=True)  # [..., B, 1]
    return (torch.logaddexp(s_pos, neg_lse) - s_pos).mean((-2, -1))


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) within a batch ``features [B, d]``.

    Anchors without any same-class partner in the batch are left out.
    """
    n = len(features)
    logits = features @ features.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    has = pos.any(1)
    if not has.any():
        return features.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(1)[has]) / pos.sum(1)[has]
    return per_anchor.mean()


LOG2E = 1.0 / math.log(2.0)


class _KeyLogSumExp(torch.autograd.Function):
    """``logsumexp(q @ keys^T / t, -1)`` with its softmax kept for the backward; no gradient to the keys.

    Why not ``torch.logsumexp``: on this project's CPU its ``exp`` runs at about 1.4 G elements/s, while
    ``exp2`` runs about 4.7 times faster, and autograd computes the exponentials a second time in the backward.
    Here the logits are made in log2 units (the factor ``log2(e) / t`` scales the small query, not the
    ``[S, B, K]`` logits), exponentiated once with ``exp2``, and normalised in place into the softmax that
    the backward reuses.  The values agree with ``torch.logsumexp`` to float rounding
    (``tests/test_cfr.py``); docs/speed.md has the timings.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, keys: torch.Tensor, t: float) -> torch.Tensor:
        z = torch.matmul(q * (LOG2E / t), keys.transpose(-1, -2))  # [..., B, K], log2 units
        m = z.amax(-1, keepdim=True)
        p = z.sub_(m).exp2_()
        s = p.sum(-1, keepdim=True)
        p.div_(s)  # the softmax
        ctx.save_for_backward(p, keys)
        ctx.t, ctx.q_dtype = t, q.dtype
        return (m + s.log2()).squeeze(-1) / LOG2E

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        p, keys = ctx.saved_tensors
        # under bf16 autocast the softmax is bf16 and the keys may be fp32: one dtype for the product (a no-op in fp32)
        dtype = torch.promote_types(p.dtype, keys.dtype)
        grad = torch.matmul((p * (g / ctx.t).unsqueeze(-1)).to(dtype), keys.to(dtype))
        return grad.to(ctx.q_dtype), None, None


def key_logsumexp(q: torch.Tensor, keys: torch.Tensor, t: float) -> torch.Tensor:
    """``logsumexp(q @ keys^T / t, dim=-1)``: ``q [..., B, d]``, ``keys [..., K, d]`` (constants) -> ``[..., B]``.

    Gradients flow to ``q`` only; ``t`` is a positive float.
    """
    if keys.requires_grad:
        raise ValueError("key_logsumexp treats the keys as constants; pass keys.detach()")
    return _KeyLogSumExp.apply(q, keys, float(t))


def simplex_targets(n_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``[C, d]`` unit vectors with every pairwise cosine ``-1/(C-1)``: the vertices of a regular
    simplex, the maximal spread of C points on the sphere (needs ``C <= d + 1``), randomly rotated."""
    if n_classes > dim + 1:
        raise ValueError(f"cannot spread {n_classes} targets maximally in {dim} dimensions")
    centred = np.eye(n_classes) - 1.0 / n_classes  # rows: simplex vertices in R^C, centred at 0
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    coords = (u * s)[:, : n_classes - 1] if n_classes > 1 else np.ones((1, 1))  # same geometry in R^(C-1)
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    t = coords @ basis[: coords.shape[1]]
    return F.normalize(torch.as_tensor(t, dtype=torch.float32), dim=1)


class TSCLoss(nn.Module):
    """Targeted supervised contrastive loss (Li et al., CVPR 2022) as the CFR release uses it, for ``S``
    lanes at once (one per seed in ``seeds``; each lane has its own queue, centroids and targets).

    The query is its own key (as in the release, which passes one feature batch twice).  Keys: a queue
    of past features with their labels, plus the class targets (a maximally spread simplex).  Each
    class is matched to a target by the optimal assignment between EMA class centroids and the
    targets.  Loss = SupCon over the queue positives + ``target_weight`` x the target term + the
    cross-entropy of the self-positive; then the batch enters the queue.
    """

    def __init__(
        self,
        dim: int,
        n_classes: int,
        queue: int = 1280,
        temperature: float = 0.07,
        target_weight: float = 0.2,
        seed: int | list[int] = 0,
    ):
        super().__init__()
        seeds = [seed] if isinstance(seed, int) else list(seed)
        self.temperature, self.target_weight, self.n_classes = temperature, target_weight, n_classes
        queues, centroids = [], []
        for s in seeds:
            gen = torch.Generator().manual_seed(s + 7)
            queues.append(F.normalize(torch.randn(queue, dim, generator=gen), dim=1))
            centroids.append(F.normalize(torch.randn(n_classes, dim, generator=gen), dim=1))
        self.register_buffer("targets", torch.stack([simplex_targets(n_classes, dim, s) for s in seeds]))  # [S, C, d]
        self.register_buffer("queue", torch.stack(queues))  # [S, K, d]
        self.register_buffer("queue_labels", torch.full((len(seeds), queue), -1, dtype=torch.long))  # [S, K]
        self.register_buffer("centroids", torch.stack(centroids))  # [S, C, d]
        self.ptr = 0
        # the optimal assignment by enumeration when C! is small (on the device, no host sync), else scipy
        self.register_buffer(
            "perms",
            torch.tensor(list(itertools.permutations(range(n_classes))), dtype=torch.long)
            if n_classes <= 6
            else torch.empty(0, n_classes, dtype=torch.long),
        )

    @torch.no_grad()
    def _assign(self, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Target index of every class ``[S, C]``, after updating the EMA centroids with this batch."""
        onehot = F.one_hot(labels, self.n_classes).to(q.dtype)  # [S, B, C]
        counts = onehot.sum(1)  # [S, C]
        batch_mean = F.normalize(onehot.transpose(1, 2) @ q / counts.clamp(min=1)[..., None], dim=-1)
        updated = F.normalize(0.9 * self.centroids + 0.1 * batch_mean, dim=-1)
        self.centroids.copy_(torch.where(counts[..., None] > 0, updated, self.centroids))
        sim = self.centroids @ self.targets.transpose(1, 2)  # [S, C, C]: class x target
        if len(self.perms):  # maximise the total similarity over all class -> target permutations
            C = self.n_classes
            total = sim[:, torch.arange(C, device=q.device), self.perms].sum(-1)  # [S, C!]
            return self.perms[total.argmax(1)]
        out = []
        for lane in sim.cpu().numpy():
            rows, cols = linear_sum_assignment(-lane)
            out.append(torch.as_tensor(cols[np.argsort(rows)], device=q.device))
        return torch.stack(out)

    def forward(self, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``q [S, B, d]`` (or ``[B, d]`` for one lane) normalised features, ``labels [S, B]`` -> loss ``[S]``."""
        if q.dim() == 2:
            return self.forward(q[None], labels[None])
        target_of_class = self._assign(q.detach(), labels)  # [S, C]
        t = self.temperature
        keys = torch.cat([self.queue, self.targets], dim=1).detach()  # [S, K + C, d]
        self_logit = (q * q).sum(-1) / t  # [S, B]
        # log-sum-exp over [self, queue, targets] without materialising their concatenation (key_logsumexp:
        # exp2, one exponential pass, the softmax reused in the backward)
        lse = torch.logaddexp(key_logsumexp(q, keys, t), self_logit)
        # log_prob = logit - lse, so each sum over positives is a sum of queue features minus count * lse;
        # the queue features of class c sum once per lane ([S, C, d]) instead of once per sample
        queue_onehot = F.one_hot(self.queue_labels.clamp(min=0), self.n_classes).to(q.dtype)
        queue_onehot = queue_onehot * (self.queue_labels >= 0)[..., None]  # unfilled slots (label -1) count nowhere
        class_sum = queue_onehot.transpose(1, 2) @ self.queue  # [S, C, d]
        class_count = queue_onehot.sum(1)  # [S, C]
        n_class = class_count.gather(1, labels)  # [S, B]
        pos_sum = class_sum.gather(1, labels[..., None].expand(-1, -1, q.shape[-1]))  # [S, B, d]
        # the release's class mask has a 1 in the self column too: the self log-prob counts among the
        # class positives *and* again as the separate self term (loss_logit) below
        sum_class = (q * pos_sum / t).sum(-1) - n_class * lse + (self_logit - lse)
        target = self.targets.gather(1, target_of_class.gather(1, labels)[..., None].expand(-1, -1, q.shape[-1]))
        sum_target = (q * target).sum(-1) / t - lse
        denom = 2.0 + n_class  # self + queue positives + the target
        loss_class = -(sum_class / denom).mean(1)
        loss_target = -(sum_target / denom).mean(1)
        loss_self = -(self_logit - lse).mean(1)
        self._enqueue(q.detach(), labels)
        return loss_class + self.target_weight * loss_target + loss_self

    @torch.no_grad()
    def _enqueue(self, q: torch.Tensor, labels: torch.Tensor) -> None:
        K = self.queue.shape[1]
        n = min(q.shape[1], K)
        slots = ((self.ptr + torch.arange(n)) % K).to(q.device)
        self.queue[:, slots] = q[:, :n].to(self.queue.dtype)  # bf16 training keeps an fp32 queue
        self.queue_labels[:, slots] = labels[:, :n]
        self.ptr = int((self.ptr + n) % K)
