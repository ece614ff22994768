"""Last-layer baselines on frozen embeddings that reweight training samples: JTT, AFR, GroupDRO.

All work on L2-normalised CLIP embeddings ``z``.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

from calib.clip.features import FeatureSet, SplitFeatures
from calib.methods.base import Method, option, register
from calib.methods.heads import LogisticHead, normalize
from calib.methods.lanes import LaneModule
from calib.methods.projection import (
    SELECTION_RULES,
    ProjectionMethod,
    ProjectionOptions,
    Step,
    fit_methods,
    resolve_device,
)

# lambda_up of the authors' README commands (anniesch/jtt): Waterbirds 100, CelebA 50
JTT_UPWEIGHTS = {"waterbirds": 100.0, "celeba": 50.0}


@dataclass
class JTTOptions:
    # inverse L2 strength of the identification model (stands in for JTT's early stopping at epoch T)
    id_C: float = option(0.01, gt=0)
    # lambda_up: extra copies of each error (None: the authors' value for the dataset, JTT_UPWEIGHTS; Waterbirds'
    # for datasets they did not run)
    upweight: float | None = option(None, ge=0)
    C: float = option(1.0, gt=0)  # inverse L2 strength of the retrained head
    max_iter: int = option(2000, ge=1)  # lbfgs iterations


@register
class JTT(LogisticHead):
    """JTT (Liu et al., 2021) on embeddings, checked against the authors' code (anniesch/jtt: ``run_expt.py``,
    ``process_training.py``, ``generate_downstream.py``):

    - error set: the training samples an identification model misclassifies;
    - the retrained model sees each error ``1 + lambda_up`` times (the authors append ``lambda_up`` copies of the
      error set to the training set), here as a sample weight ``1 + lambda_up``, which gives the same loss;
    - ``lambda_up``: the authors' 100 (Waterbirds) and 50 (CelebA); Waterbirds' value elsewhere.

    Departures the embedding setting forces: the authors' identification model is an ERM network stopped at epoch
    ``T`` (Waterbirds 60, CelebA 1) whose on-the-fly training predictions define the errors; frozen embeddings have
    no such trajectory, so a strongly regularised logistic regression (``id_C``) stands in for the early stop, and
    the errors are its predictions after fitting.  The retrained model is a fresh logistic regression fitted to
    convergence (theirs: a fresh network trained 300 / 50 epochs with the epoch chosen by validation worst-group
    accuracy); nothing is selected with group labels here, so JTT stays label-free.
    """

    name = "jtt"
    Options = JTTOptions
    summary = "Just Train Twice: upweight the training errors of a first head, retrain"
    uses = ("z", "train")

    def fit(self, data: FeatureSet, seed: int) -> None:
        tr = data.splits["train"]
        x = normalize(tr.z)
        up = self.options.upweight
        self.upweight = (
            JTT_UPWEIGHTS.get(str(data.meta.get("dataset", "")), JTT_UPWEIGHTS["waterbirds"]) if up is None else up
        )
        first = LogisticRegression(C=self.options.id_C, max_iter=self.options.max_iter, random_state=seed).fit(x, tr.y)
        self.errors = np.flatnonzero(first.predict(x) != tr.y)
        weights = np.ones(len(tr.y))
        weights[self.errors] = 1.0 + self.upweight
        self.clf = LogisticRegression(C=self.options.C, max_iter=self.options.max_iter, random_state=seed)
        self.clf.fit(x, tr.y, sample_weight=weights)


# The authors' notebooks (AndPotap/afr notebooks/wb_celeba.ipynb): grid and full-batch schedule per dataset.
AFR_PRESETS: dict[str, dict] = {
    "waterbirds": dict(gammas=tuple(np.linspace(4, 20, 33).tolist()), lambdas=(0.0, 0.1, 0.2, 0.3), lr=1e-2, steps=500),
    "celeba": dict(gammas=tuple(np.linspace(1, 3, 10).tolist()), lambdas=(1e-3, 1e-2, 1e-1), lr=2e-2, steps=1000),
}


def afr_preset(dataset: str) -> str:
    """The authors' preset a dataset uses (a rule fixed before any result was seen): CelebA's for CelebA, the
    Waterbirds one for every other dataset (the toy is a Waterbirds miniature; the authors have none for MetaShift
    or CheXpert)."""
    return "celeba" if dataset == "celeba" else "waterbirds"


def afr_split(n: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """AFR's two parts of the training split: the indices ``0..n-1`` shuffled by Python's ``random.Random(seed)``
    (the authors' ``random.seed(21); random.shuffle``), the first ``int(n (1 - fraction))`` for the base head, the
    last ``int(n fraction)`` held out for reweighting."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    order = np.asarray(order)
    return order[: int(n * (1 - fraction))], order[n - int(n * fraction) :]


def afr_weights(p_true: np.ndarray, y: np.ndarray, gamma: float | np.ndarray) -> np.ndarray:
    """AFR's sample weights ``w_i = exp(-gamma p_i) / N_{y_i}``, normalised to sum 1 (``losses/__init__.py``,
    ``utils/supervised_utils.py``).  ``p_true [n]``: the base head's probability of the true class; ``gamma``
    a number or ``[G]`` (then ``[G, n]``, one row per gamma)."""
    gammas = np.atleast_1d(np.asarray(gamma, np.float64))
    counts = np.bincount(y)
    w = np.exp(-gammas[:, None] * p_true[None, :]) / counts[y][None, :]
    w = w / w.sum(1, keepdims=True)
    return w[0] if np.ndim(gamma) == 0 else w


def afr_step(
    W: torch.Tensor,
    b: torch.Tensor,
    W0: torch.Tensor,
    b0: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    lam: torch.Tensor,
    lr: float,
    clip: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One full-batch SGD step of AFR's second stage for ``G`` lanes (grid points) at once.

    Loss per lane: ``sum_i w_i CE(x_i W^T + b, y_i) + lam (||W - W0||^2 + ||b - b0||^2)``; the gradient is clipped to
    joint norm ``clip`` per lane (``clip_grad_norm_(params, 1.0)``), then ``theta -= lr * grad``.
    ``W [G, C, d]``, ``b [G, C]``, ``W0 [C, d]``, ``b0 [C]``, ``x [n, d]``, ``y [n]``, ``w [G, n]``, ``lam [G]``.
    Returns the new ``W``, ``b`` and the losses ``[G]``.
    """
    logits = torch.einsum("nd,gcd->gnc", x, W) + b[:, None, :]
    logp = torch.log_softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(y, W.shape[1]).to(x.dtype)
    dW_reg, db_reg = W - W0, b - b0
    loss = -(w * (logp * onehot).sum(-1)).sum(1) + lam * ((dW_reg**2).sum((1, 2)) + (db_reg**2).sum(1))
    dlogits = w[..., None] * (logp.exp() - onehot)  # [G, n, C]
    gW = torch.einsum("gnc,nd->gcd", dlogits, x) + 2 * lam[:, None, None] * dW_reg
    gb = dlogits.sum(1) + 2 * lam[:, None] * db_reg
    norm = torch.sqrt((gW**2).sum((1, 2)) + (gb**2).sum(1))
    scale = torch.clamp(clip / (norm + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s coefficient
    return W - lr * scale[:, None, None] * gW, b - lr * scale[:, None] * gb, loss


@dataclass
class AFROptions:
    heldout_fraction: float = option(0.2, gt=0, lt=1)  # share of train held out for reweighting (the authors' 20%)
    split_seed: int = 21  # the authors' fixed shuffle (random.seed(21)): the same split for every run seed
    base_C: float = option(1.0, gt=0)  # inverse L2 strength of the base head (ERM logistic regression)
    preset: str = "auto"  # the authors' grid and schedule: auto (by dataset, calib.methods.reweighting.afr_preset),
    #                       "waterbirds" or "celeba"
    gammas: tuple[float, ...] | None = None  # gamma grid (None: the preset's)
    lambdas: tuple[float, ...] | None = None  # lambda grid (None: the preset's)
    lr: float | None = option(None, gt=0)  # full-batch SGD step size (None: the preset's)
    steps: int | None = option(None, ge=1)  # full-batch steps (None: the preset's)
    # step and (gamma, lambda) selection: val_wga (the authors') | val_worst_class | last (last step, first grid point)
    selection: str = "val_wga"
    device: str = "auto"  # cuda when present


@register
class AFR(Method):
    """AFR (Qiu et al., ICML 2023), the authors' second stage (AndPotap/afr: ``train_embeddings.py``,
    ``losses/__init__.py``, ``utils/supervised_utils.py``, the ``wb_celeba`` notebook's sweep) on normalised
    embeddings:

    - the training split is shuffled once with the authors' fixed seed 21 (:func:`afr_split`): the base head is
      trained on the first 80%, the last 20% are held out;
    - base head ``theta_base = (W0, b0)``: ERM on the first part (here an L2 logistic regression; theirs is the
      network's own last layer after ERM fine-tuning, which frozen embeddings have no counterpart of);
    - weights on the held-out part ``w_i = exp(-gamma p_true) / N_{y_i}``, normalised (:func:`afr_weights`);
    - full-batch SGD from ``theta_base`` (the script's start; the notebooks add a small random offset), loss
      ``sum w_i CE_i + lambda ||theta - theta_base||^2``, gradient clipped to norm 1 (:func:`afr_step`);
    - every (gamma, lambda) of the authors' grid (:data:`AFR_PRESETS`) runs as a lane; the step and the grid point
      are selected by validation worst-group accuracy (``selection="val_wga"``, the authors'; reads validation
      group labels) or, label-free, by validation worst-class accuracy.

    Deterministic: the split seed is fixed and the fit has no randomness, so every run seed gives the same numbers.
    A binary base head ``w`` becomes ``W0 = [-w/2, w/2]`` (the same probabilities, the symmetric parametrisation).
    """

    name = "afr"
    Options = AFROptions
    summary = (
        "Automatic Feature Reweighting: base head on 80% of train, retrained from it on the held-out 20% "
        "weighted by exp(-gamma p_true)"
    )
    uses = ("z", "train")

    def required_labels(self) -> str:
        return SELECTION_RULES[self.options.selection]

    def settings(self, data: FeatureSet) -> dict:
        o = self.options
        key = afr_preset(str(data.meta.get("dataset", ""))) if o.preset == "auto" else o.preset
        if key not in AFR_PRESETS:
            raise ValueError(f"AFR preset {o.preset!r}; known: auto, {', '.join(AFR_PRESETS)}")
        out = dict(AFR_PRESETS[key], preset=key)
        out.update({k: getattr(o, k) for k in ("gammas", "lambdas", "lr", "steps") if getattr(o, k) is not None})
        return out

    def fit(self, data: FeatureSet, seed: int) -> None:
        o = self.options
        if o.selection not in SELECTION_RULES:
            raise ValueError(f"unknown selection rule {o.selection!r}; known: {sorted(SELECTION_RULES)}")
        cfg = self.settings(data)
        self.config = cfg
        device = resolve_device(o.device)
        tr, val = data.splits["train"], data.splits.get("val")
        if val is None and o.selection != "last":
            raise ValueError(f"AFR selection {o.selection!r} needs a validation split")
        x = normalize(np.asarray(tr.z, np.float64))
        base, held = afr_split(len(x), o.split_seed, o.heldout_fraction)
        C = data.n_classes
        clf = LogisticRegression(C=o.base_C, max_iter=2000).fit(x[base], tr.y[base])
        W0, b0 = np.zeros((C, x.shape[1])), np.zeros(C)
        if C == 2 and clf.coef_.shape[0] == 1:
            W0[0], W0[1], b0[:] = -clf.coef_[0] / 2, clf.coef_[0] / 2, [-clf.intercept_[0] / 2, clf.intercept_[0] / 2]
        else:
            W0[clf.classes_], b0[clf.classes_] = clf.coef_, clf.intercept_
        z = x[held] @ W0.T + b0
        p = np.exp(z - z.max(1, keepdims=True))
        p_true = (p / p.sum(1, keepdims=True))[np.arange(len(held)), tr.y[held]]
        grid = [(g, lam) for g in cfg["gammas"] for lam in cfg["lambdas"]]  # the notebook's sweep order
        weights = afr_weights(p_true, tr.y[held], np.array([g for g, _ in grid]))
        self.grid = grid
        t = lambda a, dt=torch.float32: torch.as_tensor(np.asarray(a), dtype=dt, device=device)  # noqa: E731
        G = len(grid)
        W, b = t(W0).expand(G, -1, -1).clone(), t(b0).expand(G, -1).clone()
        W0_t, b0_t, xh, yh = t(W0), t(b0), t(x[held]), t(tr.y[held], torch.long)
        w, lam = t(weights), t([lam_ for _, lam_ in grid])
        xv = t(normalize(np.asarray(val.z, np.float64))) if val is not None else None
        rules = [r for r in SELECTION_RULES if r == "last" or val is not None]
        best = {r: (-np.inf, None) for r in rules}  # rule -> (score, (lane, step, W, b))
        members_of = {}  # rule -> [n_val, k] one-hot membership of the groups (classes) present in val
        if val is not None:
            yv = t(val.y, torch.long)
            for rule, labels in (("val_wga", val.g), ("val_worst_class", val.y)):
                present = np.unique(labels)
                members_of[rule] = t(labels[:, None] == present[None, :])
        self.history = []
        for step in range(cfg["steps"]):
            W, b, loss = afr_step(W, b, W0_t, b0_t, xh, yh, w, lam, cfg["lr"])
            rec = {"epoch": step, "loss": float(loss.min())}
            if xv is not None:  # scored after each step, as the notebook; one host sync per step
                correct = ((torch.einsum("nd,gcd->gnc", xv, W) + b[:, None, :]).argmax(-1) == yv).to(xv.dtype)
                for r, members in members_of.items():  # worst accuracy over the groups (classes) present
                    sc = ((correct @ members) / members.sum(0)).min(1).values.cpu().numpy()
                    lane = int(np.argmax(sc))  # first grid point with the best score at this step
                    if sc[lane] > best[r][0]:  # strict: the earliest step keeps a tie
                        best[r] = (sc[lane], (lane, step, W[lane].cpu().numpy(), b[lane].cpu().numpy()))
                    rec[f"best_{r}"] = float(sc[lane])
            self.history.append(rec)
        best["last"] = (0.0, (0, cfg["steps"] - 1, W[0].cpu().numpy(), b[0].cpu().numpy()))
        self.base = (W0, b0)
        self.selected = {r: v for r, (_, v) in best.items()}
        self.reselect(o.selection)

    def reselect(self, rule: str) -> None:
        """Switch to the step and grid point another selection rule chose in the same run."""
        lane, step, W, b = self.selected[rule]
        self.W, self.b = W, b
        self.gamma, self.lam = self.grid[lane]
        self.selected_step = step
        self.options = dataclasses.replace(self.options, selection=rule)

    def logits(self, split: SplitFeatures) -> np.ndarray:
        return normalize(np.asarray(split.z, np.float64)) @ self.W.T.astype(np.float64) + self.b


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
    input_field = "z"
    optimizer = "adam"

    @classmethod
    def lane_params(cls, data: FeatureSet, options: GroupDROOptions) -> int:
        return (data.text.shape[1] + 1) * data.n_classes

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
        fit_methods(methods, head, data, o, seeds, loss, lambda split: split.z, optimizer=cls.optimizer)
        for m, weights in zip(methods, q.cpu().numpy().tolist()):
            m.group_weights = weights
