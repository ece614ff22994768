"""Contrastive losses used by CFR and the contrastive adapter.

All take L2-normalised features.  Shapes: ``B`` anchors, ``P`` positives, ``N`` negatives, ``d`` dims.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn


def info_nce(anchor: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over anchors and positives of InfoNCE(anchor, one positive vs all negatives).

    ``anchor [B, d]``, ``positives [B, P, d]``, ``negatives [B, N, d]``: for positive j,
    ``-log exp(a.p_j / tau) / (exp(a.p_j / tau) + sum_n exp(a.n / tau))``.
    """
    s_pos = torch.einsum("bd,bpd->bp", anchor, positives) / tau  # [B, P]
    s_neg = torch.einsum("bd,bnd->bn", anchor, negatives) / tau  # [B, N]
    neg_lse = torch.logsumexp(s_neg, dim=1, keepdim=True)  # [B, 1]
    return (torch.logaddexp(s_pos, neg_lse) - s_pos).mean()


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
    """Targeted supervised contrastive loss (Li et al., CVPR 2022) as the CFR release uses it.

    The query is its own key (as in the release, which passes one feature batch twice).  Keys: a queue
    of past features with their labels, plus the class targets (a maximally spread simplex).  Each
    class is matched to a target by the Hungarian assignment between EMA class centroids and the
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
        seed: int = 0,
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed + 7)
        self.temperature, self.target_weight, self.n_classes = temperature, target_weight, n_classes
        self.register_buffer("targets", simplex_targets(n_classes, dim, seed))
        self.register_buffer("queue", F.normalize(torch.randn(queue, dim, generator=gen), dim=1))
        self.register_buffer("queue_labels", torch.full((queue,), -1, dtype=torch.long))
        self.register_buffer("centroids", F.normalize(torch.randn(n_classes, dim, generator=gen), dim=1))
        self.ptr = 0

    @torch.no_grad()
    def _assign(self, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Target index of every class, after updating the EMA centroids with this batch."""
        for c in labels.unique():
            batch_mean = F.normalize(q[labels == c].mean(0), dim=0)
            self.centroids[c] = F.normalize(0.9 * self.centroids[c] + 0.1 * batch_mean, dim=0)
        rows, cols = linear_sum_assignment(-(self.centroids @ self.targets.T).cpu().numpy())
        out = torch.empty(self.n_classes, dtype=torch.long, device=q.device)
        out[torch.as_tensor(rows)] = torch.as_tensor(cols, device=q.device)
        return out

    def forward(self, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``q [B, d]`` normalised features, ``labels [B]``."""
        target_of_class = self._assign(q.detach(), labels)
        t = self.temperature
        keys = torch.cat([self.queue, self.targets]).detach()
        self_logit = (q * q).sum(1) / t  # [B]
        lse = torch.logsumexp(torch.cat([self_logit[:, None], q @ keys.T / t], dim=1), dim=1)  # [B], over 1+K+C
        # log_prob = logit - lse, so each sum over positives is one masked matmul minus count * lse
        class_pos = (labels[:, None] == self.queue_labels[None, :]).float()  # [B, K]
        n_class = class_pos.sum(1)
        # the release's class mask has a 1 in the self column too: the self log-prob counts among the
        # class positives *and* again as the separate self term (loss_logit) below
        sum_class = (q * (class_pos @ self.queue) / t).sum(1) - n_class * lse + (self_logit - lse)
        target = self.targets[target_of_class[labels]]  # [B, d]: each sample's class target
        sum_target = (q * target).sum(1) / t - lse
        denom = 2.0 + n_class  # self + queue positives + the target
        loss_class = -(sum_class / denom).mean()
        loss_target = -(sum_target / denom).mean()
        loss_self = -(self_logit - lse).mean()
        self._enqueue(q.detach(), labels)
        return loss_class + self.target_weight * loss_target + loss_self

    @torch.no_grad()
    def _enqueue(self, q: torch.Tensor, labels: torch.Tensor) -> None:
        n = min(len(q), len(self.queue))
        slots = (self.ptr + torch.arange(n)) % len(self.queue)
        self.queue[slots] = q[:n]
        self.queue_labels[slots] = labels[:n]
        self.ptr = int((self.ptr + n) % len(self.queue))
