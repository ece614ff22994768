"""A known-answer testbed for CFR at feature level: pre-projection features with known directions.

Every sample's pre-projection feature is (``y`` the class, ``a`` the spurious attribute, both 0/1)::

    h = mu_core (2y - 1) u_core + mu_spur (2a - 1) u_spur + sigma_nuis * sum_j xi_j u_nuis_j + sigma * eps

with ``u_core``, ``u_spur`` and the nuisance directions orthonormal in ``R^{d_h}`` and ``xi``, ``eps``
standard normal.  Group sizes are Waterbirds' (train 95% correlated; val/test background-balanced
within each class).  The "pretrained" projection ``W0 [d_h, d]`` is an isometry of a random
d-dimensional subspace that contains ``u_core``, ``u_spur`` and the nuisance directions (it drops
the rest of ``h``, as a CLIP projection drops part of its input), and the text prototypes are::

    t_c = normalize((2c - 1) (alpha u_core + beta u_spur) @ W0)

so the zero-shot head's effective classifier in h-space is ``v = W0 (t_1 - t_0) ∝ alpha u_core +
beta u_spur`` exactly, and on paper (normalising ``z`` never flips a sign)::

    accuracy of group (y, a) = Phi((alpha mu_core + beta mu_spur s) / (sigma sqrt(alpha^2 + beta^2))),

with ``s = +1`` when class and attribute agree and ``-1`` when they disagree (:func:`group_accuracy_on_paper`).

**What a good recalibration does to W** (see docs/cfr_testbed.md): with ``v = W (t_1 - t_0)``, the
minority groups' margin is ``mu_core (u_core . v) - mu_spur |u_spur . v|``.  Worst-group accuracy is
maximal when the spurious weight ``u_spur . v`` goes to 0 while the core weight ``u_core . v`` stays
positive (and ``v`` gains no weight on noise): then every group is at ``Phi(mu_core / sigma)``.
:func:`calib.methods.diagnostics.direction_weights` reads these weights off any trained ``W``.

The defaults were fixed before CFR was run on the testbed, from two targets: the core direction is
linearly decodable but weaker than the spurious one (``mu_core = 1 < mu_spur = 2``, ``sigma = 0.5``:
a balanced probe on ``u_core`` alone reaches Phi(2) = 97.7%), and zero-shot leans on the spurious
direction about as much as CLIP does on Waterbirds (``beta / alpha = 0.65``: worst-group accuracy
Phi(-0.503) = 30.7% on paper).  Dimensions are the toy CLIP's (96 -> 64).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from calib.clip.features import FeatureSet, SplitFeatures
from calib.core.hashing import stable_hash
from calib.data.toy import WATERBIRDS_GROUP_SIZES


@dataclass(frozen=True)
class TestbedConfig:
    """The testbed's geometry (defaults fixed before any CFR run; see the module docstring)."""

    d_h: int = 96  # pre-projection width (the toy CLIP's)
    d: int = 64  # embedding width (the toy CLIP's)
    mu_core: float = 1.0  # class signal along u_core
    mu_spur: float = 2.0  # spurious (background) signal along u_spur: stronger than the core one
    sigma: float = 0.5  # isotropic noise per dimension
    n_nuisance: int = 8  # label-free directions of larger variance (pose, colour, ...)
    sigma_nuisance: float = 1.0  # their standard deviation
    alpha: float = 1.0  # the text prototypes' weight on the core direction
    beta: float = 0.65  # their weight on the spurious direction (zero-shot leans on the background)
    scale: float = 1.0  # fraction of Waterbirds' group sizes
    seed: int = 0  # draws the directions, W0 and every sample

    __test__ = False  # not a pytest class

    @property
    def name(self) -> str:
        """``"testbed"``, or e.g. ``"testbed-mu_core0.5"``, naming every field that differs from the default
        (usable as a file name)."""
        default = TestbedConfig()
        return "testbed" + "".join(
            f"-{k}{v:g}" if isinstance(v, float) else f"-{k}{v}"
            for k, v in asdict(self).items()
            if v != getattr(default, k)
        )


def group_accuracy_on_paper(cfg: TestbedConfig, w_core: float, w_spur: float) -> np.ndarray:
    """Expected accuracy of groups (landbird/land, landbird/water, waterbird/land, waterbird/water)
    ``[4]`` for a linear decision with logit weights ``w_core`` and ``w_spur`` and no other weight."""
    noise = cfg.sigma * math.hypot(w_core, w_spur)
    out = []
    for g in range(4):
        ys, as_ = 2 * (g // 2) - 1, 2 * (g % 2) - 1  # +-1 class and attribute
        margin = ys * (cfg.mu_core * w_core * ys + cfg.mu_spur * w_spur * as_)  # signed towards the true class
        out.append(0.5 * (1 + math.erf(margin / (noise * math.sqrt(2)))))
    return np.array(out)


def make_testbed(cfg: TestbedConfig | None = None) -> FeatureSet:
    """The testbed's :class:`FeatureSet` (splits train/val/test with ``h``, ``z``, labels and groups),
    with ``directions = {"core": u_core, "spurious": u_spur}`` (``[d_h]`` each)."""
    cfg = cfg or TestbedConfig()
    if cfg.d < 2 + cfg.n_nuisance or cfg.d > cfg.d_h:
        raise ValueError(
            f"testbed needs 2 + n_nuisance <= d <= d_h; got d={cfg.d}, d_h={cfg.d_h}, n_nuisance={cfg.n_nuisance}"
        )
    rng = np.random.default_rng(cfg.seed)
    Q, _ = np.linalg.qr(rng.normal(size=(cfg.d_h, cfg.d_h)))
    u_core, u_spur, nuis = Q[:, 0], Q[:, 1], Q[:, 2 : 2 + cfg.n_nuisance]
    R, _ = np.linalg.qr(rng.normal(size=(cfg.d, cfg.d)))
    W0 = Q[:, : cfg.d] @ R  # an isometry of span(Q[:, :d]) onto R^d; the other d_h - d directions are dropped
    splits = {}
    for split, sizes in WATERBIRDS_GROUP_SIZES.items():
        g = np.repeat(np.arange(4), [max(2, int(round(n * cfg.scale))) for n in sizes])
        y, a = g // 2, g % 2
        h = (
            np.outer(cfg.mu_core * (2 * y - 1), u_core)
            + np.outer(cfg.mu_spur * (2 * a - 1), u_spur)
            + cfg.sigma_nuisance * rng.normal(size=(len(g), cfg.n_nuisance)) @ nuis.T
            + cfg.sigma * rng.normal(size=(len(g), cfg.d_h))
        ).astype(np.float32)
        splits[split] = SplitFeatures(
            z=h @ W0.astype(np.float32),
            y=y.astype(np.int64),
            g=g.astype(np.int64),
            a=a.astype(np.int64),
            ids=np.arange(len(g)),
            h=h,
        )
    lean = (cfg.alpha * u_core + cfg.beta * u_spur) @ W0
    text = np.stack([-lean, lean]) / np.linalg.norm(lean)
    return FeatureSet(
        splits=splits,
        text=text.astype(np.float32),
        logit_scale=100.0,
        n_groups=4,
        class_names=["landbird", "waterbird"],
        group_names=["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"],
        attr_names=["land", "water"],
        W0=W0.astype(np.float32),
        b0=np.zeros(cfg.d, np.float32),
        meta={
            "dataset": cfg.name,
            "model": "testbed",
            "pretrained": "none",
            "weights": f"testbed-{stable_hash(asdict(cfg), 10)}",
            "dataset_version": stable_hash(asdict(cfg), 10),
            "device": "cpu",
        },
        directions={"core": u_core, "spurious": u_spur},
    )
