"""Heads on frozen final embeddings: zero-shot CLIP and the linear probe."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from calib.clip.features import FeatureSet, SplitFeatures
from calib.methods.base import Method, option, register


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, ``[n, d] -> [n, d]``."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def zero_shot_logits(z: np.ndarray, text: np.ndarray, scale: float) -> np.ndarray:
    """``s * <norm(z), t_c>``: ``z [n, d]``, ``text [C, d]`` (normalised) -> ``[n, C]``."""
    return scale * normalize(z) @ text.T


@register
class ZeroShot(Method):
    """Zero-shot CLIP: cosine to the prompt-ensembled class prototypes (80 ImageNet templates)."""

    name = "zeroshot"
    summary = "zero-shot CLIP with the 80-template prompt ensemble"
    uses = ("z", "text")

    def fit(self, data: FeatureSet, seed: int) -> None:
        self.text, self.scale = data.text, data.logit_scale

    def logits(self, split: SplitFeatures) -> np.ndarray:
        return zero_shot_logits(split.z, self.text, self.scale)


@dataclass
class LinearProbeOptions:
    C: float = option(1.0, gt=0)  # inverse L2 regularisation strength of the logistic regression
    max_iter: int = option(2000, ge=1)  # lbfgs iterations


class LogisticHead(Method):
    """Base for methods whose result is a scikit-learn classifier ``self.clf`` on normalised embeddings."""

    def logits(self, split: SplitFeatures) -> np.ndarray:
        # log-probabilities [n, C]; columns follow clf.classes_, which are 0..C-1 after fit
        return self.clf.predict_log_proba(normalize(split.z))


@register
class LinearProbe(LogisticHead):
    """Linear-probe ERM: L2 logistic regression on normalised CLIP embeddings of the training set."""

    name = "linear_probe"
    Options = LinearProbeOptions
    summary = "logistic regression (ERM) on normalised frozen embeddings"
    uses = ("z", "train")

    def fit(self, data: FeatureSet, seed: int) -> None:
        tr = data.splits["train"]
        self.clf = LogisticRegression(C=self.options.C, max_iter=self.options.max_iter, random_state=seed)
        self.clf.fit(normalize(tr.z), tr.y)
