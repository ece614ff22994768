"""Last-layer baselines on frozen embeddings that reweight training samples: JTT, AFR, GroupDRO.

All work on L2-normalised CLIP embeddings ``z``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

from calib.clip.features import FeatureSet, SplitFeatures
from calib.methods.base import option, register
from calib.methods.heads import LogisticHead, normalize
from calib.methods.lanes import LaneModule
from calib.methods.projection import ProjectionMethod, ProjectionOptions, Step, fit_methods, resolve_device


@dataclass
class JTTOptions:
    # inverse L2 strength of the identification model (stands in for JTT's early stopping)
    id_C: float = option(0.01, gt=0)
    # lambda_up: weight of the identification model's training errors (JTT, Waterbirds)
    upweight: float = option(100.0, gt=0)
    C: float = option(1.0, gt=0)  # inverse L2 strength of the retrained head
    max_iter: int = option(2000, ge=1)  # lbfgs iterations


@register
class JTT(LogisticHead):
    """JTT (Liu et al., 2021) on embeddings: fit a strongly regularised head, upweight its training
    errors by lambda, refit.  Hyperparameters fixed (not selected with group labels)."""

    name = "jtt"
    Options = JTTOptions
    summary = "Just Train Twice: upweight the training errors of a first head, retrain"
    uses = ("z", "train")

    def fit(self, data: FeatureSet, seed: int) -> None:
        tr = data.splits["train"]
        x = normalize(tr.z)
        first = LogisticRegression(C=self.options.id_C, max_iter=self.options.max_iter, random_state=seed).fit(x, tr.y)
        self.errors = np.flatnonzero(first.predict(x) != tr.y)
        weights = np.ones(len(tr.y))
        weights[self.errors] = self.options.upweight
        self.clf = LogisticRegression(C=self.options.C, max_iter=self.options.max_iter, random_state=seed)
        self.clf.fit(x, tr.y, sample_weight=weights)


@dataclass
class AFROptions:
    # share of the training set held out for reweighting (the rest trains the base head)
    heldout_fraction: float = option(0.2, gt=0, lt=1)
    gamma: float = option(4.0, ge=0)  # weights exp(-gamma * p_true) of the held-out samples
    C: float = option(1.0, gt=0)  # inverse L2 strength of both heads
    max_iter: int = option(2000, ge=1)  # lbfgs iterations


@register
class AFR(LogisticHead):
    """AFR (Qiu et al., 2023) on embeddings: a base head on part of the training set; the last layer
    retrained on the held-out part with weights exp(-gamma p_true), class-balanced."""

    name = "afr"
    Options = AFROptions
    summary = "Automatic Feature Reweighting: retrain on held-out training data weighted by exp(-gamma p_true)"
    uses = ("z", "train")

    def fit(self, data: FeatureSet, seed: int) -> None:
        o = self.options
        tr = data.splits["train"]
        x = normalize(tr.z)
        order = np.random.default_rng(seed).permutation(len(x))
        n_held = max(2, int(round(o.heldout_fraction * len(x))))
        held, base = order[:n_held], order[n_held:]
        base_clf = LogisticRegression(C=o.C, max_iter=o.max_iter, random_state=seed).fit(x[base], tr.y[base])
        proba = base_clf.predict_proba(x[held])
        p_true = proba[np.arange(n_held), np.searchsorted(base_clf.classes_, tr.y[held])]
        w = np.exp(-o.gamma * p_true)
        for c in np.unique(tr.y[held]):  # equal total weight per class
            m = tr.y[held] == c
            w[m] /= w[m].sum()
        self.weights = w
        self.clf = LogisticRegression(C=o.C, max_iter=o.max_iter, random_state=seed)
        self.clf.fit(x[held], tr.y[held], sample_weight=w * len(w))


class LinearHead(LaneModule):
    """Linear classifiers on normalised embeddings (``S`` lanes), trained from zero (a head started at the
    zero-shot ``s * T`` saturates the loss when ``s`` is CLIP's 100 and barely moves).

    ``weight [S, C, d]``, ``bias [S, 1, C]``; ``forward`` maps ``[n, d]`` or ``[S, n, d]`` to ``[S, n, C]``.
    """

    def __init__(self, n_classes: int, dim: int, lanes: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(lanes, n_classes, dim))
        self.bias = nn.Parameter(torch.zeros(lanes, 1, n_classes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            z = z.expand(self.weight.shape[0], *z.shape)
        return torch.baddbmm(self.bias, F.normalize(z, dim=-1), self.weight.transpose(1, 2))


@dataclass
class GroupDROOptions(ProjectionOptions):
    eta: float = option(0.01, ge=0)  # step size of the group weights (GroupDRO's eta_q)
    lr: float = option(1e-3, gt=0)  # Adam learning rate of the head
    weight_decay: float = option(1e-4, ge=0)  # L2 (GroupDRO relies on strong regularisation)
    epochs: int = option(50, ge=1)  # passes over the training set


@register
class GroupDRO(ProjectionMethod):
    """GroupDRO (Sagawa et al., 2020) on a linear head over embeddings.  Reads *training* group
    labels: an oracle upper reference, not a label-free method."""

    name = "groupdro"
    Options = GroupDROOptions
    label_needs = "train_groups"
    uses = ("z", "train")
    summary = "GroupDRO on the head (oracle: uses training group labels)"

    def inputs(self, split: SplitFeatures) -> np.ndarray:
        return split.z

    @classmethod
    def fit_lanes(cls, methods: list[GroupDRO], data: FeatureSet, seeds: list[int]) -> None:
        o = methods[0].options
        device = resolve_device(o.device)
        tr = data.splits["train"]
        z = torch.as_tensor(tr.z, device=device)
        y = torch.tensor(tr.y, device=device)
        g = torch.tensor(tr.g, device=device)
        S, G = len(methods), data.n_groups
        q = torch.ones(S, G, device=device) / G  # each lane's group weights
        eta = torch.tensor([m.options.eta for m in methods], device=device)[:, None]

        def loss(head: nn.Module, step: Step) -> torch.Tensor:
            nonlocal q
            idx = step.idx
            logits = head(z[idx])  # [S, B, C]
            per = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="none").view(idx.shape)
            onehot = F.one_hot(g[idx], G).to(per.dtype)  # [S, B, G]
            counts = onehot.sum(1)  # [S, G]
            group_loss = (onehot * per[..., None]).sum(1) / counts.clamp(min=1)
            with torch.no_grad():  # exponentiated-gradient ascent on the group weights
                q = q * torch.exp(eta * group_loss.detach() * (counts > 0))
                q = q / q.sum(1, keepdim=True)
            return (q * group_loss).sum(1)

        head = LinearHead(data.n_classes, z.shape[1], S)
        fit_methods(methods, head, data, o, seeds, loss, lambda split: split.z, optimizer="adam")
        for m, weights in zip(methods, q.cpu().numpy().tolist()):
            m.group_weights = weights
