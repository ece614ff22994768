"""Label-free baselines that keep CLIP's zero-shot head: the contrastive adapter and UMFC."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from calib.clip.features import FeatureSet, SplitFeatures
from calib.methods.base import Method, option, register
from calib.methods.heads import normalize, zero_shot_logits
from calib.methods.lanes import LaneModule
from calib.methods.losses import info_nce
from calib.methods.projection import ProjectionMethod, ProjectionOptions, Step, fit_methods, resolve_device


class Adapter(LaneModule):
    """Residual bottleneck MLPs on embeddings (``S`` lanes); classify by cosine to the frozen class prompts.

    Lane s is ``z -> normalize(z + W2 relu(W1 z + b1) + b2)`` with ``W1 [S, d, hidden]``, ``W2 [S, hidden, d]``.
    Each lane's first layer is initialised as ``nn.Linear`` does under ``torch.manual_seed(seeds[s])``; the
    last layer starts at zero, so training starts from the zero-shot classifier.  ``forward`` maps
    ``[n, d]`` or ``[S, n, d]`` to logits ``[S, n, C]``.
    """

    shared = ("text",)

    def __init__(self, text: np.ndarray, scale: float, hidden_ratio: float, seeds: list[int] | None = None):
        super().__init__()
        d = text.shape[1]
        hidden = max(1, int(d * hidden_ratio))
        first = []
        for seed in seeds or [0]:
            torch.manual_seed(seed)  # the stream a single run's nn.Linear initialisation reads
            first.append(nn.Linear(d, hidden))
        self.w1 = nn.Parameter(torch.stack([f.weight.detach().T for f in first]).contiguous())
        self.b1 = nn.Parameter(torch.stack([f.bias.detach()[None] for f in first]))
        self.w2 = nn.Parameter(torch.zeros(len(first), hidden, d))
        self.b2 = nn.Parameter(torch.zeros(len(first), 1, d))
        self.register_buffer("text", torch.as_tensor(text, dtype=torch.float32))
        self.scale = scale

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` or ``[S, n, d]`` -> adapted normalised embeddings ``[S, n, d]``."""
        if z.dim() == 2:
            z = z.expand(self.w1.shape[0], *z.shape)
        z = F.normalize(z, dim=-1)
        return F.normalize(z + torch.baddbmm(self.b2, F.relu(torch.baddbmm(self.b1, z, self.w1)), self.w2), dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * self.embed(z) @ self.text.T


# anchors whose similarities to the training set are held at once: [chunk, n] floats, about 1 GiB at CelebA size
# (the toy's anchors fit in one chunk)
NEIGHBOUR_CHUNK_ELEMENTS = 2**28


def nearest_neighbours(
    zn: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor, positives: int, negatives: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each anchor (indices into ``zn [n, d]``, unit rows), its ``positives`` most similar same-class samples
    (itself excluded) and its ``negatives`` most similar other-class samples: ``[k, P]``, ``[k, N]``.  Anchors are
    taken in chunks so the ``[k, n]`` similarity matrix is never held whole."""
    n = len(zn)
    chunk = max(1, NEIGHBOUR_CHUNK_ELEMENTS // n)
    pos, neg = [], []
    for start in range(0, len(anchors), chunk):
        part = anchors[start : start + chunk]
        sim = zn[part] @ zn.T
        same = y[part][:, None] == y[None, :]
        sim_pos = sim.masked_fill(~same, -2.0)
        sim_pos[torch.arange(len(part)), part] = -2.0  # not itself
        pos.append(sim_pos.topk(min(positives, n - 1), dim=1).indices)
        neg.append(sim.masked_fill(same, -2.0).topk(min(negatives, n), dim=1).indices)
    return torch.cat(pos), torch.cat(neg)


@dataclass
class AdapterOptions(ProjectionOptions):
    hidden_ratio: float = option(0.25, gt=0)  # bottleneck width as a fraction of the embedding size
    # anchors: this fraction of training samples farthest from their class prompt
    hard_fraction: float = option(0.2, gt=0, le=1)
    positives: int = option(4, ge=1)  # nearest same-class samples per anchor (plus the class prompt)
    negatives: int = option(16, ge=1)  # nearest other-class samples per anchor (plus the other prompts)
    temperature: float = option(0.1, gt=0)  # InfoNCE temperature
    lr: float = option(1e-3, gt=0)  # Adam learning rate
    weight_decay: float = option(1e-4, ge=0)  # Adam weight decay
    epochs: int = option(20, ge=1)  # passes over the anchors
    selection: str = "val_worst_class"  # no group labels by default


@register
class ContrastiveAdapter(ProjectionMethod):
    """Contrastive adapter (Zhang & Re, 2022), on embeddings: a residual MLP adapter trained with
    InfoNCE on the training samples the zero-shot model embeds farthest from their class prompt,
    with nearest same-class samples and the class prompt as positives and nearest other-class
    samples and prompts as negatives; predicts by cosine to the class prompts.

    Checked against: the authors publish no repository; the code checked is ``saswat0/Contrastive-Adapter``
    (a 2023 re-upload of the paper's supplementary code: ``main.py``, ``network/adapter.py``,
    ``datasets/contrastive_embeddings.py``, ``train/contrastive.py``).  It departs from that code in:

    - the adapter: theirs is ``Linear(d, 128, no bias) -> BatchNorm -> ReLU -> Linear(128, d)`` without a residual;
      here a residual bottleneck of ``d / 4`` whose last layer starts at zero (training starts at zero-shot);
    - the anchors: theirs are the training samples whose UMAP + k-means cluster (aligned with the true labels)
      disagrees with their class, here the ``hard_fraction`` farthest from their class prompt (no clustering, no
      umap dependency, no training label used to align clusters);
    - positives and negatives: theirs 2048 same-class "correct" samples and 2048 other-class samples among the 4096
      nearest neighbours, no text prototypes in the loss; here the ``positives`` / ``negatives`` nearest ones plus
      the class prompts;
    - the schedule: theirs alternates contrastive epochs with cross-entropy epochs on inferred-group-balanced
      resamples (SGD lr 1e-3, momentum 0.9, 100 epochs on Waterbirds) and keeps the epoch with the best validation
      worst-group accuracy; here Adam over the anchors with calib's selection rules (label-free by default).
    """

    name = "contrastive_adapter"
    Options = AdapterOptions
    summary = "contrastive adapter on frozen embeddings (hard zero-shot samples as anchors)"
    uses = ("z", "text", "train")
    shared_options = ProjectionMethod.shared_options + ("hidden_ratio", "hard_fraction", "positives", "negatives")
    input_field = "z"
    optimizer = "adam"

    @classmethod
    def lane_params(cls, data: FeatureSet, options: AdapterOptions) -> int:
        d = data.text.shape[1]
        hidden = max(1, int(d * options.hidden_ratio))
        return 2 * d * hidden + hidden + d

    @classmethod
    def step_rows(cls, options: AdapterOptions) -> int:
        return 1 + options.positives + options.negatives

    @classmethod
    def fit_lanes(cls, methods: list[ContrastiveAdapter], data: FeatureSet, seeds: list[int]) -> None:
        o = methods[0].options
        device = resolve_device(o.device)
        tr = data.splits["train"]
        zn = torch.as_tensor(normalize(tr.z), device=device)
        y = torch.tensor(tr.y, device=device)
        text = torch.as_tensor(data.text, device=device)
        true_cos = (zn * text[y]).sum(1)
        k = max(1, int(round(o.hard_fraction * len(zn))))
        hard = torch.argsort(true_cos)[:k]  # farthest from their own class prompt
        pos_all, neg_all = nearest_neighbours(zn, y, hard, o.positives, o.negatives)
        orders = [torch.randperm(k, generator=torch.Generator().manual_seed(seed)).to(device) for seed in seeds]
        anchors = torch.stack([hard[order] for order in orders])  # [S, k]: each lane's anchor order
        pos = torch.stack([pos_all[order] for order in orders])  # [S, k, P]
        neg = torch.stack([neg_all[order] for order in orders])  # [S, k, N]
        tau = torch.tensor([m.options.temperature for m in methods], device=device)[:, None, None]
        S, d, C = len(methods), zn.shape[1], data.n_classes

        def loss(head: Adapter, step: Step) -> torch.Tensor:
            # an "epoch" of fit_head iterates over len(train) indices; map them onto the anchor list
            rows = step.idx % k
            a_idx = anchors.gather(1, rows)
            a = head.embed(zn[a_idx])
            b = rows.shape[1]
            p = head.embed(zn[pos.gather(1, rows[..., None].expand(-1, -1, pos.shape[2])).flatten(1)])
            n = head.embed(zn[neg.gather(1, rows[..., None].expand(-1, -1, neg.shape[2])).flatten(1)])
            cls_ = y[a_idx]  # [S, b]
            p = torch.cat([p.view(S, b, -1, d), text[cls_][:, :, None]], dim=2)  # the class prompt is a positive
            others = torch.stack([text[(cls_ + j) % C] for j in range(1, C)], 2)
            n = torch.cat([n.view(S, b, -1, d), others], dim=2)  # the other prompts are negatives
            return info_nce(a, p, n, tau)

        scaled = ProjectionOptions(**{f: getattr(o, f) for f in ProjectionOptions.__dataclass_fields__})
        # anchors are few: scale epochs so the adapter sees each anchor `epochs` times
        scaled.epochs = max(1, int(np.ceil(o.epochs * k / len(zn))))
        head = Adapter(data.text, data.logit_scale, o.hidden_ratio, list(seeds))
        fit_methods(methods, head, data, scaled, seeds, loss, lambda split: split.z, optimizer=cls.optimizer)
        groups = np.bincount(tr.g[hard.cpu().numpy()], minlength=data.n_groups).tolist()
        for m in methods:
            m.anchor_groups = groups


UMFC_MODES = {"train-fit": "train", "transductive": "test"}  # mode -> split the clusters are fit on


@dataclass
class UMFCOptions:
    n_clusters: int = option(4, ge=1)  # K k-means clusters (fixed a priori; never tuned on test)
    alpha: float = 0.9  # weight of the cluster's mean zero-shot logits subtracted (UMFC release default)
    beta: float = 0.3  # weight of the text-prototype shift (UMFC release default)
    mode: str = "train-fit"  # "train-fit": clusters fit on the training images, a test image takes the nearest
    #                          centroid; "transductive": clusters fit on the test images themselves
    max_iter: int = option(500, ge=1)  # k-means iterations (the release's preprocess_cluster.py)


def umfc_text_shift(z: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """UMFC's text-bias direction ``d = normalize(sum_k normalize(mu - mu_k))`` ``[1, D]``.

    ``z``: ``[n, D]`` L2-normalised image embeddings; ``labels``: ``[n]`` cluster of each; ``mu`` is
    the mean of all of ``z`` and ``mu_k`` cluster k's mean (release: ``get_image_bias`` then
    ``calibrate_logits`` with ``CALIBRATE_TEXT='norm_ensemble'``).  Empty clusters add nothing.
    """
    mu = z.mean(0)
    per_cluster = [normalize((mu - z[labels == k].mean(0))[None]) for k in range(n_clusters) if (labels == k).any()]
    return normalize(np.sum(per_cluster, axis=0))


@register
class UMFC(Method):
    """UMFC (Liang et al., 2024), training-free, as the authors' ``trainers/umfc_UC.py`` (class ``UMFC``,
    ``CALIBRATE_TEXT='norm_ensemble'``) computes it:

    - k-means (K clusters, 500 iterations) on L2-normalised image embeddings of the unlabeled split;
    - image bias ``b_k``: the mean zero-shot logits of cluster k's samples ``[K, C]``;
    - text bias ``d`` (:func:`umfc_text_shift`) and calibrated prototypes
      ``t'_c = normalize(normalize(t_c) - beta * d)``;
    - ``logits(x) = s * normalize(x) @ t'.T - alpha * b_{k(x)}``.

    The release's image-feature and text-logit bias terms are initialised to zero and never set by
    ``get_image_bias``, so they drop out.  ``mode`` picks the authors' two settings: ``"train-fit"``
    (clusters and statistics from the training images; a test image takes its nearest centroid) or
    ``"transductive"`` (from the test images).  Departure: k-means uses ``n_init=10`` and ``random_state=seed``
    (the release leaves both at scikit-learn's defaults of its time, unseeded) so runs are reproducible.
    """

    name = "umfc"
    Options = UMFCOptions
    summary = "training-free feature calibration with k-means clusters (alpha, beta fixed, never tuned on test)"
    uses = ("z", "text")
    table_variants = {f"umfc ({m})": {"mode": m} for m in UMFC_MODES}

    @classmethod
    def row_label(cls, options: dict) -> str:
        return f"{cls.name} ({options.get('mode', UMFCOptions.mode)})"

    def fit(self, data: FeatureSet, seed: int) -> None:
        o = self.options
        if o.mode not in UMFC_MODES:
            raise ValueError(f"UMFC mode {o.mode!r} is not one of {sorted(UMFC_MODES)}")
        split = UMFC_MODES[o.mode]
        if split not in data.splits:
            raise ValueError(
                f"UMFC mode {o.mode!r} fits clusters on the {split!r} split, but the features have "
                f"splits {sorted(data.splits)}"
            )
        z = normalize(data.splits[split].z)
        self.km = KMeans(n_clusters=o.n_clusters, n_init=10, max_iter=o.max_iter, random_state=seed).fit(z)
        labels = self.km.labels_
        self.scale = data.logit_scale
        text = normalize(data.text)
        self.text = normalize(text - o.beta * umfc_text_shift(z, labels, o.n_clusters))
        zs = zero_shot_logits(z, text, self.scale)
        self.cluster_bias = np.stack(
            [zs[labels == k].mean(0) if (labels == k).any() else np.zeros(zs.shape[1]) for k in range(o.n_clusters)]
        )  # [K, C]

    def logits(self, split: SplitFeatures) -> np.ndarray:
        z = normalize(split.z)
        k = self.km.predict(z)
        return zero_shot_logits(z, self.text, self.scale) - self.options.alpha * self.cluster_bias[k]
