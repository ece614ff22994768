"""PPA (Zhu et al., CVPR 2025, "Project-Probe-Aggregate: Efficient Fine-Tuning for Group Robustness"), built from
what the paper states: no code by the authors is reachable here.  Marked "from the paper" in every table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from calib.clip.features import FeatureSet, SplitFeatures
from calib.methods.base import Method, option, register
from calib.methods.heads import normalize


def null_space_projection(prototypes: np.ndarray) -> np.ndarray:
    """``I - T^T (T T^T)^+ T`` ``[d, d]``: the projection onto the null space of the class prototypes ``T [C, d]``."""
    T = np.asarray(prototypes, np.float64)
    return np.eye(T.shape[1]) - T.T @ np.linalg.pinv(T @ T.T) @ T


def fit_adjusted_linear(
    x: np.ndarray, y: np.ndarray, n_out: int, prior: np.ndarray, C: float, tau: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with logit adjustment: minimise
    ``mean_i CE(x_i W^T + b + tau log prior, y_i) + ||W||^2 / (2 C n)`` (the L2 strength of scikit-learn's ``C``,
    as calib's linear probe) by full-batch L-BFGS in float64 from zero.  Returns ``W [n_out, d]``, ``b [n_out]``;
    the adjustment is used in training only (Menon et al. 2021)."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.tensor(np.asarray(y), dtype=torch.long)
    offset = torch.as_tensor(tau * np.log(prior), dtype=torch.float64)
    W = torch.zeros(n_out, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_out, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    n = len(y)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ W.T + b + offset, yt) + (W * W).sum() / (2 * C * n)
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def aggregate_groups(
    Wg: np.ndarray, bg: np.ndarray, present: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """PPA's aggregation: class c's weights ``[C, d]`` and bias ``[C]`` are the sums over its pseudo-groups.
    ``Wg [G, d]``, ``bg [G]`` for the pseudo-groups ``present [G]`` (numbered ``2 c + wrong``)."""
    owner = present // 2
    return (
        np.stack([Wg[owner == c].sum(0) for c in range(n_classes)]),
        np.array([bg[owner == c].sum() for c in range(n_classes)]),
    )


@dataclass
class PPAOptions:
    # every constant below was fixed before any result was seen; the paper gives no embedding-level values for them
    tau: float = option(1.0, ge=0)  # logit-adjustment strength of both probes (1: the standard prior correction)
    C: float = option(1.0, gt=0)  # inverse L2 strength of both probes (as calib's linear probe)
    max_iter: int = option(500, ge=1)  # L-BFGS iterations per probe


@register
class PPA(Method):
    """PPA, from the paper (no released code reachable), on L2-normalised frozen embeddings:

    1. project the embeddings onto the null space of the class prototypes (the zero-shot head's ``T``), so a probe
       on them can only use what is not the class text direction (:func:`null_space_projection`);
    2. train a biased linear probe on the projected embeddings with the class-prior logit-adjusted loss;
    3. pseudo-groups ``(class, probe correct or not)``: ``2C`` groups, those with no training sample dropped;
    4. train a group classifier on the (unprojected) embeddings with the group-prior logit-adjusted loss;
    5. the class classifier sums its group weights (and biases) within each class.

    Constants chosen here, not by the paper (:class:`PPAOptions`): ``tau = 1`` for both adjustments, L2 strength
    ``C = 1`` as the linear probe, full-batch L-BFGS from zero (500 iterations); the projected embeddings are not
    renormalised.  Deterministic: the seed changes nothing.
    """

    name = "ppa"
    Options = PPAOptions
    summary = "PPA (from the paper): biased probe in the class null space, pseudo-groups, group logit adjustment"
    uses = ("z", "text", "train")

    @classmethod
    def row_label(cls, options: dict) -> str:
        return f"{cls.name} (from the paper)"

    def fit(self, data: FeatureSet, seed: int) -> None:
        o = self.options
        tr = data.splits["train"]
        x = normalize(np.asarray(tr.z, np.float64))
        C = data.n_classes
        self.projection = null_space_projection(data.text)
        class_prior = np.bincount(tr.y, minlength=C) / len(tr.y)
        Wb, bb = fit_adjusted_linear(
            x @ self.projection, tr.y, C, np.maximum(class_prior, 1e-12), o.C, o.tau, o.max_iter
        )
        wrong = ((x @ self.projection) @ Wb.T + bb).argmax(1) != tr.y
        groups = 2 * tr.y + wrong  # pseudo-group (class, probe wrong)
        present = np.flatnonzero(np.bincount(groups, minlength=2 * C))
        index = np.searchsorted(present, groups)  # pseudo-groups renumbered 0..G-1
        prior = np.bincount(index, minlength=len(present)) / len(index)
        Wg, bg = fit_adjusted_linear(x, index, len(present), prior, o.C, o.tau, o.max_iter)
        self.W, self.b = aggregate_groups(Wg, bg, present, C)
        self.pseudo_groups = np.bincount(groups, minlength=2 * C).tolist()

    def logits(self, split: SplitFeatures) -> np.ndarray:
        return normalize(np.asarray(split.z, np.float64)) @ self.W.T + self.b
