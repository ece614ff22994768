"""Label-free methods that read the dataset's prompt file (:class:`calib.clip.prompts.PromptBank`) on frozen
embeddings: Orth-Cali / Orth-Proj, RoboShot and TIE*.  Each is told the spurious attribute in words (``§``).

Every one classifies zero-shot, by the cosine of an image embedding to class prompts, after changing the text side
(Orth-Cali) or the image side (RoboShot, TIE*).  ``class_prompts="authors"`` uses the class prompts of the method's
own code (the prompt file's section); ``"ensemble"`` uses calib's 80-template class prototypes instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calib.clip.features import FeatureSet, SplitFeatures
from calib.methods.base import Method, option, register
from calib.methods.heads import normalize

COSINE_SCALE = 100.0  # the authors' softmax(100 * cos): a fixed temperature, irrelevant to the argmax
CLASS_PROMPTS = ("authors", "ensemble")


def class_embeddings(data: FeatureSet, section: str, which: str) -> np.ndarray:
    """Unit class embeddings ``[C, d]``: the class prompts of ``section`` of the prompt file (``"authors"``) or
    the 80-template prototypes of the zero-shot head (``"ensemble"``)."""
    if which == "authors":
        return data.prompts.embed(data.prompts.section(section)["class_prompts"], normalized=True)
    if which == "ensemble":
        return normalize(np.asarray(data.text, np.float64))
    raise ValueError(f"class_prompts={which!r}; allowed: {list(CLASS_PROMPTS)}")


def cosine_logits(x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``100 * cos(x, class)``: ``x [n, d]``, ``classes [C, d]`` -> ``[n, C]``."""
    return COSINE_SCALE * normalize(x) @ normalize(classes).T


# ----------------------------------------------------------------------------------------------- Orth-Cali


def orth_projection(spurious: np.ndarray) -> np.ndarray:
    """``P0 = I - V V^T`` ``[d, d]``: the projection onto the orthogonal complement of the span of the rows of
    ``spurious [k, d]`` (debias_vl's ``get_proj_matrix``: a truncated SVD with as many components as prompts, so V
    spans exactly those rows)."""
    u, s, vt = np.linalg.svd(np.asarray(spurious, np.float64), full_matrices=False)
    basis = vt[s > s.max() * 1e-10]  # [r, d] orthonormal rows spanning the prompts
    return np.eye(spurious.shape[1]) - basis.T @ basis


def calibration_matrix(candidates: np.ndarray, pairs: list[list[int]]) -> np.ndarray:
    """``M = mean over pairs (i, j) of (z_i - z_j)(z_i - z_j)^T`` ``[d, d]`` (debias_vl's ``get_M``), from unit
    candidate embeddings ``[n, d]``."""
    diffs = np.stack([candidates[i] - candidates[j] for i, j in pairs])
    return diffs.T @ diffs / len(pairs)


def orth_cali_matrix(spurious: np.ndarray, candidates: np.ndarray, pairs: list[list[int]], lam: float) -> np.ndarray:
    """debias_vl's ``P = P0 (lam M + I)^{-1}`` ``[d, d]``; ``lam = 0`` gives the projection alone (Orth-Proj)."""
    P0 = orth_projection(spurious)
    if lam == 0:
        return P0
    return P0 @ np.linalg.inv(lam * calibration_matrix(candidates, pairs) + np.eye(len(P0)))


@dataclass
class OrthCaliOptions:
    calibrate: bool = True  # False: Orth-Proj, the projection alone (the release's --lam 0)
    lam: float = option(1000.0, ge=0)  # lambda of (lambda M + I)^-1 (the release's --lam default)
    class_prompts: str = "authors"  # "authors": the release's class prompts; "ensemble": the 80-template prototypes


@register
class OrthCali(Method):
    """Orth-Cali (Chuang et al. 2023, "Debiasing Vision-Language Models via Biased Prompts"), as the authors'
    ``discriminative/main.py`` (chingyaoc/debias_vl) computes it on the text side only:

    - every prompt embedding (class, spurious, candidate) is L2-normalised, one prompt each (no template ensemble);
    - ``P0 = I - V V^T`` removes the span of the spurious prompts (:func:`orth_projection`);
    - ``M`` averages ``(z_i - z_j)(z_i - z_j)^T`` over the candidate pairs (same class, other spurious attribute)
      and ``P = P0 (lam M + I)^{-1}``, ``lam = 1000`` (:func:`orth_cali_matrix`);
    - class embeddings ``t'_c = normalize(P t_c)``; an image is classified by its cosine to them.

    ``calibrate=False`` is Orth-Proj (the release's ``--lam 0``), its own table row.  Departures: the release's
    randomized truncated SVD is an exact SVD here (the same span); on MetaShift, CheXpert and the toy the prompts are
    calib's, written in the authors' style (``calib/data/prompts/``).
    """

    name = "orth_cali"
    Options = OrthCaliOptions
    summary = "Orth-Cali: project the spurious prompts' span out of the class prompts, calibrate with prompt pairs"
    uses = ("z", "prompts")
    names_spurious = True
    table_variants = {"orth_cali": {"calibrate": True}, "orth_cali (projection only)": {"calibrate": False}}

    @classmethod
    def row_label(cls, options: dict) -> str:
        return cls.name if options.get("calibrate", True) else f"{cls.name} (projection only)"

    def fit(self, data: FeatureSet, seed: int) -> None:
        o = self.options
        section = data.prompts.section("orth_cali")
        spurious = data.prompts.embed(section["spurious_prompts"], normalized=True)
        candidates = data.prompts.embed(section["candidate_prompts"], normalized=True)
        self.P = orth_cali_matrix(spurious, candidates, section["candidate_pairs"], o.lam if o.calibrate else 0.0)
        self.classes = normalize(class_embeddings(data, "orth_cali", o.class_prompts) @ self.P.T)

    def logits(self, split: SplitFeatures) -> np.ndarray:
        return cosine_logits(split.z, self.classes)


# ----------------------------------------------------------------------------------------------- RoboShot


def concept_basis(pairs: np.ndarray) -> np.ndarray:
    """Orthonormal directions ``[K, d]`` of concept pairs ``[K, 2, d]`` (raw embeddings): the reduced QR of the
    differences ``emb(first) - emb(second)`` stacked as columns (RoboShot's ``np.linalg.qr(U.T)``)."""
    diffs = pairs[:, 0] - pairs[:, 1]
    q, _ = np.linalg.qr(diffs.T)
    return q.T


def roboshot_embed(z: np.ndarray, reject: np.ndarray, accept: np.ndarray) -> np.ndarray:
    """RoboShot's image side: ``x = normalize(z)``; for each spurious direction ``v``: ``x = normalize(x - <x,v> v)``;
    then for each helpful one: ``x = normalize(x + <x,v> v)``.  ``z [n, d]``, ``reject [Ks, d]``,
    ``accept [Kh, d]`` (orthonormal rows) -> ``[n, d]``."""
    x = normalize(np.asarray(z, np.float64))
    for v in reject:
        x = normalize(x - (x @ v)[:, None] * v)
    for v in accept:
        x = normalize(x + (x @ v)[:, None] * v)
    return x


@dataclass
class RoboShotOptions:
    reject: bool = True  # remove the spurious concept directions (the authors' "QR Rejection")
    accept: bool = True  # boost the helpful ones (the authors' "QR Accept"; both: the full RoboShot)
    class_prompts: str = "authors"  # "authors": RoboShot's class prompts; "ensemble": the 80-template prototypes


@register
class RoboShot(Method):
    """RoboShot (Adila et al., ICLR 2024), as the authors' ``run.py`` (SprocketLab/roboshot) computes it with
    their cached concepts (``libs/cached_concepts.py``, the ``-reuse`` path):

    - each concept pair ``[first, second]`` is embedded unnormalised (open_clip ``encode_text``) and gives the
      direction ``emb(first) - emb(second)``; the spurious and the helpful directions are each orthonormalised by
      QR (:func:`concept_basis`), not against each other;
    - images: normalised, each spurious direction rejected, then each helpful one boosted, renormalising after
      every step (:func:`roboshot_embed`); then the cosine to the class prompts.

    The authors cache no concepts for MetaShift or CheXpert; there, and on the toy, the pairs are calib's, in
    their style (``calib/data/prompts/``).  No departure on Waterbirds and CelebA.
    """

    name = "roboshot"
    Options = RoboShotOptions
    summary = "RoboShot: reject spurious concept directions and boost helpful ones in the image embeddings"
    uses = ("z", "prompts")
    names_spurious = True

    def fit(self, data: FeatureSet, seed: int) -> None:
        o = self.options
        section = data.prompts.section("roboshot")
        d = data.prompts.vectors.shape[1]

        def basis(key: str, on: bool) -> np.ndarray:
            pairs = section[key]
            if not on or not pairs:
                return np.zeros((0, d))
            emb = data.prompts.embed([t for pair in pairs for t in pair]).reshape(len(pairs), 2, d)
            return concept_basis(emb)

        self.reject, self.accept = basis("reject", o.reject), basis("accept", o.accept)
        self.classes = class_embeddings(data, "roboshot", o.class_prompts)

    def logits(self, split: SplitFeatures) -> np.ndarray:
        return cosine_logits(roboshot_embed(split.z, self.reject, self.accept), self.classes)


# ----------------------------------------------------------------------------------------------- TIE*


def tie_scales(z_train: np.ndarray, attributes: np.ndarray) -> np.ndarray:
    """TIE*'s translation scale per spurious-attribute value ``[A]``: the mean cosine between the training images
    the zero-shot attribute classifier assigns to value a and a's unit text direction (0 for a value it assigns
    no training image to).  ``z_train [n, d]``, ``attributes [A, d]`` unit rows."""
    x = normalize(np.asarray(z_train, np.float64))
    cos = x @ attributes.T  # [n, A]
    inferred = cos.argmax(1)
    return np.array([cos[inferred == a, a].mean() if (inferred == a).any() else 0.0 for a in range(len(attributes))])


def tie_translate(z: np.ndarray, attributes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """TIE*'s image side: ``e = normalize(z)``, ``a = argmax_a <e, u_a>`` (zero-shot), ``e - scale_a u_a``
    ``[n, d]``."""
    e = normalize(np.asarray(z, np.float64))
    a = (e @ attributes.T).argmax(1)
    return e - scales[a][:, None] * attributes[a]


@dataclass
class TIEOptions:
    class_prompts: str = "authors"  # "authors": the TIE notebooks' class prompts; "ensemble": 80-template prototypes


@register
class TIEStar(Method):
    """TIE* (Lu et al., ICLR 2025, "Mitigating Spurious Correlations in Zero-Shot Multimodal Models"; lu876/TIE,
    ``Table1-WB.ipynb`` / ``Table2-CelebA.ipynb`` with ``a = False``): label-free text-guided translation.

    - ``u_a``: the unit text direction of each spurious-attribute value (one prompt per value in the authors' files;
      several are ensembled, :meth:`calib.clip.prompts.PromptBank.ensemble`);
    - every image's attribute is inferred zero-shot, ``argmax_a <x, u_a>``;
    - ``scale_a``: the mean cosine of the training images inferred as a to ``u_a`` (:func:`tie_scales`);
    - an image is translated ``normalize(x) - scale_a u_a`` along its inferred value's direction and classified by
      its cosine to the class prompts.

    Departures: every training image enters the scales (the Waterbirds notebook's loader drops the last partial
    batch, 187 images); every dataset subtracts from the normalised embedding, as the paper and the Waterbirds
    notebook do (the CelebA notebook subtracts from the raw one).
    """

    name = "tie_star"
    Options = TIEOptions
    summary = "TIE*: infer the spurious attribute zero-shot, translate each image along its text direction"
    uses = ("z", "prompts", "train")
    names_spurious = True

    def fit(self, data: FeatureSet, seed: int) -> None:
        section = data.prompts.section("tie")
        self.attributes = data.prompts.ensemble(section["spurious_prompts"])
        self.scales = tie_scales(data.splits["train"].z, self.attributes)
        self.classes = class_embeddings(data, "tie", self.options.class_prompts)

    def logits(self, split: SplitFeatures) -> np.ndarray:
        return cosine_logits(tie_translate(split.z, self.attributes, self.scales), self.classes)
