"""FairerCLIP without labels (Dehdashtian et al., ICLR 2024; human-analysis/FairerCLIP): debias CLIP's image and
text embeddings with closed-form kernel maps fitted on zero-shot pseudo-labels."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from calib.clip.features import FeatureSet, SplitFeatures
from calib.methods.base import Method, option, register
from calib.methods.heads import normalize
from calib.methods.prompted import COSINE_SCALE, class_embeddings

log = logging.getLogger(__name__)

# The authors' configs (configs/debias_{waterbird,celeba}{,_RN50}.yaml), one row per (dataset, backbone family).
# rff_dim serves both the x and the z kernel; sample ratios: the shares of pseudo-class 1 and class 0 kept (of the
# smaller class's count where balance = 1, the CelebA configs' "balance sampling").
CONFIG_KEYS = (
    "iters", "rff_dim", "gamma_i", "gamma_t", "tau_i", "tau_z_i", "tau_t", "tau_z_t", "sample_ratio1", "sample_ratio2",
    "balance",
)  # fmt: skip
CONFIGS: dict[str, dict[str, float]] = {
    name: dict(zip(CONFIG_KEYS, row))
    for name, row in {
        "waterbirds-vit": (2, 3000, 3e-4, 2e-4, 0.7, 0.7, 0.1, 0.1, 1.0, 1.0, 0),
        "waterbirds-rn": (4, 3000, 6e-4, 1e-5, 0.7, 0.3, 0.1, 0.1, 0.4, 0.9, 0),
        "celeba-vit": (3, 4000, 3e-5, 3e-4, 0.7, 0.3, 0.1, 0.1, 0.8, 0.8, 1),
        "celeba-rn": (1, 4000, 1e-4, 2e-4, 0.5, 0.25, 0.1, 0.1, 1.0, 0.06, 1),
    }.items()
}
SIGMA_ROWS = 4000  # sigma_numel_max: rows the median heuristic looks at
DIM_Z = 1  # dim_z of every config
ENERGY = 0.95  # the solver's eigenvalue-energy threshold for the rank


def config_for(dataset: str, model: str) -> str:
    """The authors' config a run uses (a rule fixed before any result was seen): CelebA's for CelebA, Waterbirds'
    for every other dataset (the toy is a Waterbirds miniature; MetaShift and CheXpert have no config); the RN50
    one for ResNet towers, the ViT-L/14 one for the rest (the toy CLIP is a ViT)."""
    family = "rn" if model.upper().startswith("RN") else "vit"
    return f"{'celeba' if dataset == 'celeba' else 'waterbirds'}-{family}"


class RandomFourier:
    """Gaussian-kernel random Fourier features, drawn at the first call and kept (the authors' ``RFFGaussian``):
    ``sigma = sqrt(0.5 median ||x_i - x_j||^2)`` over distinct pairs of the first ``SIGMA_ROWS`` rows,
    ``W ~ N(0, sigma^-2 I)`` ``[D, p]``, ``b ~ U[0, 2 pi)`` ``[D]``, ``phi(x) = sqrt(2/D) cos(x W^T + b)``."""

    def __init__(self, dim: int, rng: np.random.Generator):
        self.dim, self.rng = dim, rng
        self.W: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.W is None:
            self.sigma = median_sigma(x[:SIGMA_ROWS])
            self.W = self.rng.normal(0.0, 1.0 / self.sigma, (self.dim, x.shape[1]))
            self.b = self.rng.uniform(0.0, 2 * math.pi, self.dim)
        return math.sqrt(2.0 / self.dim) * np.cos(x @ self.W.T + self.b)


def median_sigma(x: np.ndarray) -> float:
    """``sqrt(0.5 * median)`` of the positive squared distances between distinct rows of ``x`` (the lower median,
    as ``torch.median``); 1 when all rows coincide."""
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * x @ x.T
    upper = d2[np.triu_indices(len(x), k=1)]
    upper = upper[upper > 1e-12]
    if not len(upper):
        return 1.0
    return math.sqrt(0.5 * float(np.sort(upper)[(len(upper) - 1) // 2]))


def signed_onehot(labels: np.ndarray, n: int) -> np.ndarray:
    """``2 * onehot - 1`` ``[len(labels), n]``: the authors' label encoding."""
    return 2.0 * np.eye(n)[labels] - 1.0


def centered(x: np.ndarray) -> np.ndarray:
    return x - x.mean(0)


def top_singular_value(R: np.ndarray, L: np.ndarray) -> float:
    """``||R^T L||_2`` (``R [n, D]``, ``L [n, m]``) without forming ``R^T L`` when it is large (Lanczos)."""
    if min(R.shape[1], L.shape[1]) <= 64:
        return float(np.linalg.norm(R.T @ L, 2))
    op = scipy.sparse.linalg.LinearOperator(
        (R.shape[1], L.shape[1]), matvec=lambda v: R.T @ (L @ v), rmatvec=lambda u: L.T @ (R @ u), dtype=np.float64
    )
    return float(scipy.sparse.linalg.svds(op, k=1, v0=np.ones(R.shape[1]), return_singular_vectors=False)[0])


class KernelMap:
    """One modality's closed-form encoder (the authors' ``KernelMethodY.solver``): maximise
    ``dep(f, Y) + tz/(1-tz) dep(f, Z) - ts/(1-ts) dep(f, S)`` (each dependence ``B_k = (R^T L_k)(R^T L_k)^T`` divided
    by its spectral norm, ``R`` the random features ``[n, D]``, ``L_k`` centred labels or codes) under
    ``C = R_c^T R_c + n gamma I``: the top eigenvector of ``C^-1 B`` (``B v = lambda C v``), of unit 2-norm,
    ``Theta = sqrt(n) v``, ``f(x) = phi(x) Theta``; zero when the top eigenvalue is not positive (the authors'
    rank rule with ``dim_z = 1``).

    Solved as a symmetric problem, ``L^-1 B L^-T`` with ``C = L L^T`` (Cholesky), by Lanczos on matrix-vector
    products, without forming the ``D x D`` dependence matrices, or, with fewer samples than features, as the
    equivalent ``n x n`` problem in sample space: the same top eigenvector as the authors' ``eig(inv(C) @ B)`` (up
    to its sign, which :meth:`solve` fixes against the other modality, as theirs does).
    """

    def __init__(self, rff_dim: int, tau_s: float, tau_z: float, gamma: float, rng: np.random.Generator):
        self.phi_x, self.phi_z = RandomFourier(rff_dim, rng), RandomFourier(rff_dim, rng)
        self.tau_s, self.tau_z, self.gamma = tau_s, tau_z, gamma
        self.theta: np.ndarray | None = None

    def solve(self, x: np.ndarray, y: np.ndarray, s: np.ndarray, z: np.ndarray | None = None) -> None:
        n = len(x)
        R = self.phi_x(x)
        terms = [(1.0, centered(y))]
        if z is not None:
            terms.append((self.tau_z / (1 - self.tau_z), centered(self.phi_z(z))))
        if self.tau_s > 0:
            terms.append((-self.tau_s / (1 - self.tau_s), centered(s)))
        norms = [top_singular_value(R, L) for _, L in terms]
        # a term whose labels or codes are constant depends on nothing (the authors' code divides 0 by 0 there)
        terms = [(coef / norm**2, L) for (coef, L), norm in zip(terms, norms) if norm > 1e-12]
        if not terms:
            self.theta, self.top_eigenvalue = np.zeros((R.shape[1], DIM_Z)), 0.0
            return
        values, v = (self._top_dual if n < R.shape[1] else self._top_primal)(R, terms)
        self.top_eigenvalue = float(values[-1])
        self.theta = math.sqrt(n) * v if self._rank(values[::-1]) else np.zeros_like(v)
        # align with the other modality's codes (the authors test f(x) / z < 0: the same signs, no 0 / 0)
        if z is not None and np.mean(self(x) * z < 0) > 0.5:
            self.theta = -self.theta

    def _top_primal(self, R: np.ndarray, terms: list) -> tuple[np.ndarray, np.ndarray]:
        """Top eigenpair of ``C^-1 B`` in feature space (``n >= D``): Lanczos on ``L^-1 B L^-T``, ``C = L L^T``."""
        n, D = R.shape
        Rc = centered(R)
        C = Rc.T @ Rc + n * self.gamma * np.eye(D)
        chol = scipy.linalg.cholesky((C + C.T) / 2, lower=True)

        def standard(w: np.ndarray) -> np.ndarray:  # L^-1 B L^-T w
            u = scipy.linalg.solve_triangular(chol.T, w, lower=False)
            Ru = R @ u
            Bu = sum(coef * (R.T @ (L @ (L.T @ Ru))) for coef, L in terms)
            return scipy.linalg.solve_triangular(chol, Bu, lower=True)

        op = scipy.sparse.linalg.LinearOperator((D, D), matvec=standard, dtype=np.float64)
        values, vectors = scipy.sparse.linalg.eigsh(op, k=DIM_Z, which="LA", v0=np.ones(D))
        v = scipy.linalg.solve_triangular(chol.T, vectors, lower=False)
        return values, v / np.linalg.norm(v, axis=0)

    def _top_dual(self, R: np.ndarray, terms: list) -> tuple[np.ndarray, np.ndarray]:
        """The same eigenpair in the row space of ``R`` (used when ``n < D``): with ``R = U S V^T`` (rank r), every
        eigenvector with a nonzero eigenvalue is ``v = V b`` (``B`` vanishes and ``C`` is ``n gamma I`` off that
        space), so ``B v = lambda C v`` becomes the ``r x r`` problem
        ``(V^T B V) b = lambda (S U^T H U S + n gamma I) b`` (``H`` the centring matrix)."""
        n = len(R)
        U, S, Vt = np.linalg.svd(R, full_matrices=False)
        keep = S > S.max() * 1e-10
        U, S, Vt = U[:, keep], S[keep], Vt[keep]
        US = U * S  # [n, r]: R = US @ Vt
        A = sum(coef * (US.T @ L) @ (US.T @ L).T for coef, L in terms)
        USc = centered(US)
        M = USc.T @ USc + n * self.gamma * np.eye(len(S))
        r = len(S)
        values, b = scipy.linalg.eigh((A + A.T) / 2, (M + M.T) / 2, subset_by_index=[r - DIM_Z, r - 1])
        v = Vt.T @ b
        return values, v / np.linalg.norm(v, axis=0)

    def _rank(self, values: np.ndarray) -> int:
        """The authors' rank rule (``build_kernel.py``), for eigenvalues in descending order."""
        if self.tau_s == 0:
            return DIM_Z
        if self.tau_s >= 0.999999999:
            return 0
        positive = values[values > 0][:DIM_Z]
        if not len(positive):
            return 0
        energy = np.cumsum(positive**2) / np.sum(positive**2)
        return int(np.argmax(energy >= ENERGY) + 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Codes ``[n, DIM_Z]``."""
        return self.phi_x(x) @ self.theta


def code_cosine(codes: np.ndarray, class_codes: np.ndarray) -> np.ndarray:
    """``cos(code_i, class_code_c)`` ``[n, C]`` (0 where a code is zero)."""
    a = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-300)
    b = class_codes / np.maximum(np.linalg.norm(class_codes, axis=1, keepdims=True), 1e-300)
    return a @ b.T


@dataclass
class FairerCLIPOptions:
    config: str = "auto"  # the authors' config: auto (calib.methods.fairerclip.config_for) or one of CONFIGS
    iters: int | None = option(None, ge=1)  # label-free passes (None: the config's)
    rff_dim: int | None = option(None, ge=1)  # random Fourier features D (None: the config's)
    class_prompts: str = "authors"  # "authors": train.py's class prompts; "ensemble": the 80-template prototypes


@register
class FairerCLIP(Method):
    """FairerCLIP in its label-free mode (``--opts nolabel True``), as the authors' ``train.py``, ``base.py`` and
    ``build_kernel.py`` compute it, on the raw image embeddings of the training split:

    1. zero-shot pseudo-labels: the class by the cosine to the class prompts, the spurious attribute by the cosine to
       the attribute prompts (ensembled per value);
    2. subsample the training set by pseudo-class with the config's ratios (CelebA: of the smaller class's count);
    3. image map ``f_I`` solved without codes; then ``iters`` passes of: (from the second pass on, pseudo-classes
       refreshed as ``argmax_c cos(f_I(x), f_T(t_c))``), text map ``f_T`` on each sample's class-prompt embedding
       aligned to ``f_I``'s codes, image map aligned to ``f_T``'s codes (:class:`KernelMap`); the attribute labels are
       never refreshed;
    4. classify by the cosine of ``f_I(x)`` to ``f_T(t_c)`` (one dimension: the sign agreement).

    Hyperparameters: the authors' per-(dataset, backbone) configs (:data:`CONFIGS`, :func:`config_for`).
    Departures: the authors' zero-shot attribute prompts are not published, so calib uses debias_vl's spurious
    prompts grouped per attribute value (the features FairerCLIP uses follow debias_vl), ensembled
    (``calib/data/prompts/``); the random features come from NumPy seeded by the run's seed (theirs: torch seeded 2);
    the generalised eigenproblem is solved with a symmetric solver (``scipy.linalg.eigh(B, C)``), whose top
    eigenvector is theirs (``eig(C^-1 B)``) up to a sign that the alignment step fixes.
    """

    name = "fairerclip"
    Options = FairerCLIPOptions
    summary = "FairerCLIP (label-free): kernel maps of image and text fitted on zero-shot pseudo-labels"
    uses = ("z", "prompts", "train")
    names_spurious = True

    def settings(self, data: FeatureSet) -> dict[str, float]:
        o = self.options
        key = (
            config_for(str(data.meta.get("dataset", "")), str(data.meta.get("model", "")))
            if o.config == "auto"
            else o.config
        )
        if key not in CONFIGS:
            raise ValueError(f"FairerCLIP config {o.config!r}; known: auto, {', '.join(CONFIGS)}")
        cfg = dict(CONFIGS[key], config=key)
        for name in ("iters", "rff_dim"):
            if getattr(o, name) is not None:
                cfg[name] = getattr(o, name)
        return cfg

    def fit(self, data: FeatureSet, seed: int) -> None:
        cfg = self.settings(data)
        self.config = cfg
        rng = np.random.default_rng(seed)
        section = data.prompts.section("fairerclip")
        classes = class_embeddings(data, "fairerclip", self.options.class_prompts)  # [C, d] unit
        attributes = data.prompts.ensemble(section["spurious_prompts"])  # [A, d] unit
        x = np.asarray(data.splits["train"].z, np.float64)
        y = (normalize(x) @ classes.T).argmax(1)
        s = (normalize(x) @ attributes.T).argmax(1)
        for what, labels in (("class", y), ("spurious attribute", s)):
            if len(np.unique(labels)) < 2:
                log.warning(
                    "FairerCLIP: zero-shot assigns every training image the same %s; that dependence term is "
                    "dropped (the authors' code would divide by zero)",
                    what,
                )
        keep = subsample(y, cfg, rng, len(classes))
        x, y, s = x[keep], y[keep], s[keep]
        C, A = len(classes), len(attributes)
        S = signed_onehot(s, A)
        image = KernelMap(int(cfg["rff_dim"]), cfg["tau_i"], cfg["tau_z_i"], cfg["gamma_i"], rng)
        text = KernelMap(int(cfg["rff_dim"]), cfg["tau_t"], cfg["tau_z_t"], cfg["gamma_t"], rng)
        image.solve(x, signed_onehot(y, C), S)
        for it in range(int(cfg["iters"])):
            if it > 0:
                y = code_cosine(image(x), text(classes)).argmax(1)
            Y = signed_onehot(y, C)
            text.solve(classes[y], Y, S, image(x))
            image.solve(x, Y, S, text(classes[y]))
        self.image, self.class_codes = image, text(classes)
        self.n_fit = len(keep)

    def logits(self, split: SplitFeatures) -> np.ndarray:
        return COSINE_SCALE * code_cosine(self.image(split.z), self.class_codes)


def subsample(y: np.ndarray, cfg: dict, rng: np.random.Generator, n_classes: int) -> np.ndarray:
    """Training rows kept (sorted): of pseudo-class 1 ``sample_ratio1``, of class 0 ``sample_ratio2`` (CelebA
    configs: shares of the smaller class's count, "balance sampling"); more classes: class 0's ratio for each
    class but the last.  ``np.random.permutation`` order as the authors' loader, here from the run's generator."""
    groups = [np.flatnonzero(y == c) for c in range(n_classes)]
    base = min(len(g) for g in groups if len(g)) if cfg["balance"] else None
    keep = []
    for c, idx in enumerate(groups):
        ratio = cfg["sample_ratio1"] if c == len(groups) - 1 else cfg["sample_ratio2"]
        count = int((base if base is not None else len(idx)) * ratio)
        keep.append(rng.permutation(idx)[:count])
    return np.sort(np.concatenate(keep))
