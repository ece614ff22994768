"""Label-free baselines that keep CLIP's zero-shot head: the contrastive adapter and UMFC."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from calib.features import FeatureSet, SplitFeatures
from calib.methods.base import Method, register
from calib.methods.heads import normalize, zero_shot_logits
from calib.methods.losses import info_nce
from calib.methods.projection import ProjectionMethod, ProjectionOptions, fit_head, resolve_device


class Adapter(nn.Module):
    """Residual bottleneck MLP on embeddings; classifies by cosine to the frozen class prompts.

    The last layer starts at zero, so training starts from the zero-shot classifier.
    """

    def __init__(self, text: np.ndarray, scale: float, hidden_ratio: float):
        super().__init__()
        d = text.shape[1]
        hidden = max(1, int(d * hidden_ratio))
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.register_buffer("text", torch.as_tensor(text, dtype=torch.float32))
        self.scale = scale

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z, dim=-1)
        return F.normalize(z + self.mlp(z), dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * self.embed(z) @ self.text.T


@dataclass
class AdapterOptions(ProjectionOptions):
    hidden_ratio: float = 0.25  # bottleneck width as a fraction of the embedding size
    hard_fraction: float = 0.2  # anchors: this fraction of training samples farthest from their class prompt
    positives: int = 4  # nearest same-class samples per anchor (plus the class prompt)
    negatives: int = 16  # nearest other-class samples per anchor (plus the other prompts)
    temperature: float = 0.1  # InfoNCE temperature
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-4  # Adam weight decay
    epochs: int = 20  # passes over the anchors
    selection: str = "val_worst_class"  # no group labels by default


@register
class ContrastiveAdapter(ProjectionMethod):
    """Contrastive adapter (Zhang & Re, 2022), on embeddings: a residual MLP adapter trained with
    InfoNCE on the training samples the zero-shot model embeds farthest from their class prompt,
    with nearest same-class samples and the class prompt as positives and nearest other-class
    samples and prompts as negatives; predicts by cosine to the class prompts."""

    name = "contrastive_adapter"
    Options = AdapterOptions
    summary = "contrastive adapter on frozen embeddings (hard zero-shot samples as anchors)"
    uses = ("z", "text", "train")

    def inputs(self, split: SplitFeatures) -> np.ndarray:
        return split.z

    def fit(self, data: FeatureSet, seed: int) -> None:
        o = self.options
        device = resolve_device(o.device)
        tr = data.splits["train"]
        zn = torch.as_tensor(normalize(tr.z), device=device)
        y = torch.tensor(tr.y, device=device)
        text = torch.as_tensor(data.text, device=device)
        true_cos = (zn * text[y]).sum(1)
        k = max(1, int(round(o.hard_fraction * len(zn))))
        anchors = torch.argsort(true_cos)[:k]  # farthest from their own class prompt
        sim = zn[anchors] @ zn.T
        same = y[anchors][:, None] == y[None, :]
        sim_pos = sim.masked_fill(~same, -2.0)
        sim_pos[torch.arange(k), anchors] = -2.0  # not itself
        pos = sim_pos.topk(min(o.positives, len(zn) - 1), dim=1).indices
        neg = sim.masked_fill(same, -2.0).topk(min(o.negatives, len(zn)), dim=1).indices
        order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        anchors, pos, neg = anchors[order], pos[order], neg[order]
        # an "epoch" of fit_head iterates over len(train) indices; map them onto the anchor list
        n_train = len(zn)

        def loss(head: Adapter, idx: torch.Tensor, epoch: int) -> torch.Tensor:
            rows = idx % k
            a = head.embed(zn[anchors[rows]])
            p = head.embed(zn[pos[rows]].reshape(-1, zn.shape[1])).view(len(rows), -1, zn.shape[1])
            n = head.embed(zn[neg[rows]].reshape(-1, zn.shape[1])).view(len(rows), -1, zn.shape[1])
            cls = y[anchors[rows]]
            p = torch.cat([p, text[cls][:, None]], dim=1)  # the class prompt is a positive
            others = torch.stack([text[(cls + j) % data.n_classes] for j in range(1, data.n_classes)], 1)
            n = torch.cat([n, others], dim=1)  # the other prompts are negatives
            return info_nce(a, p, n, o.temperature)

        torch.manual_seed(seed)
        scaled = ProjectionOptions(**{f: getattr(o, f) for f in ProjectionOptions.__dataclass_fields__})
        # anchors are few: scale epochs so the adapter sees each anchor `epochs` times
        scaled.epochs = max(1, int(np.ceil(o.epochs * k / n_train)))
        self.head, self.history = fit_head(Adapter(data.text, data.logit_scale, o.hidden_ratio), data, scaled,
                                           seed, loss, self.inputs, optimizer="adam")
        self.anchor_groups = np.bincount(tr.g[anchors.cpu().numpy()], minlength=data.n_groups).tolist()


@dataclass
class UMFCOptions:
    n_clusters: int = 4  # K k-means clusters (fixed a priori; never tuned on test)
    alpha: float = 0.9  # weight of the cluster's mean zero-shot logits subtracted (UMFC release default)
    beta: float = 0.3  # weight of the text-prototype shift (UMFC release default)
    fit_on: str = "train"  # unlabeled images the clusters are estimated on: "train" or "test" (transductive)


@register
class UMFC(Method):
    """UMFC (Liang et al., 2024), training-free: k-means the image embeddings into K clusters;
    subtract alpha x the cluster's mean zero-shot logits; shift the text prototypes by beta x the
    normalised sum of (global mean - cluster mean) directions."""

    name = "umfc"
    Options = UMFCOptions
    summary = "training-free feature calibration with k-means clusters (alpha, beta fixed, never tuned on test)"
    uses = ("z", "text")

    def fit(self, data: FeatureSet, seed: int) -> None:
        o = self.options
        if o.fit_on not in data.splits:
            raise ValueError(f"UMFC fit_on={o.fit_on!r} but the features have splits {sorted(data.splits)}")
        z = normalize(data.splits[o.fit_on].z)
        self.km = KMeans(n_clusters=o.n_clusters, n_init=10, random_state=seed).fit(z)
        centers = np.stack([z[self.km.labels_ == k].mean(0) for k in range(o.n_clusters)])
        shift = normalize((z.mean(0)[None] - centers).sum(0, keepdims=True))
        self.text = normalize(data.text + o.beta * shift)
        self.scale = data.logit_scale
        self.cluster_bias = np.stack([zero_shot_logits(z[self.km.labels_ == k], data.text, self.scale).mean(0)
                                      for k in range(o.n_clusters)])  # [K, C]

    def logits(self, split: SplitFeatures) -> np.ndarray:
        z = normalize(split.z)
        k = self.km.predict(z)
        return zero_shot_logits(z, self.text, self.scale) - self.options.alpha * self.cluster_bias[k]
