"""The paper profile: what ``./run_all.sh --profile paper --data-dir DIR`` runs, and what it costs.

Datasets are looked for at ``DIR/<name>`` (``waterbirds``, ``celeba``, ``metashift``, ``chexpert``);
a missing or malformed one is skipped with one line saying why.  Every notebook runs over every
present dataset x backbone with every method and 5 seeds.

The cost estimate uses *assumed* single-GPU numbers (bf16, pipeline-bound extraction; method
seconds scaled by training-set size from a Waterbirds-sized run), not measurements: replace them
with ``python -m calib bench throughput`` / ``bench methods`` results from your machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from calib.data import LOADERS, DatasetLayoutError
from calib.studies.ablations import CFR_ABLATIONS
from calib.studies.dynamics import CFR_DYNAMICS

log = logging.getLogger(__name__)

PAPER_DATASETS = ("waterbirds", "celeba", "metashift", "chexpert")
# the paper's backbones as the release loads them (charlesyou999648/CFR code/models/initializer.py: the ViT is
# clip.load('ViT-L/14@336px')); open_clip's -quickgelu configurations are what OpenAI's weights need
PAPER_BACKBONES = (("RN50-quickgelu", "openai"), ("ViT-L-14-336-quickgelu", "openai"))
OPTIONAL_BACKBONES = (("ViT-L-14-quickgelu", "openai"),)  # the 224-px ViT-L/14, on request (--backbones)
PAPER_SEEDS = (0, 1, 2, 3, 4)
# assumptions (one recent datacenter GPU): extraction images/s and method seconds on 4,795 training samples
ASSUMED_IMG_S = {"RN50-quickgelu": 2000.0, "ViT-L-14-quickgelu": 600.0, "ViT-L-14-336-quickgelu": 250.0}
ASSUMED_METHOD_S = {
    "cfr": 60.0,
    "clip_erm": 15.0,
    "groupdro": 5.0,
    "contrastive_adapter": 5.0,
    "umfc": 2.0,
    "dfr": 2.0,
    "jtt": 2.0,
    "afr": 5.0,
    "fairerclip": 30.0,
    "ppa": 2.0,
    "orth_cali": 0.1,
    "roboshot": 0.1,
    "tie_star": 0.1,
    "linear_probe": 1.0,
    "zeroshot": 0.1,
}
WATERBIRDS_TRAIN = 4795
# notebook -> methods it trains per (dataset, backbone, seed); 03 runs both protocols from one training run
NOTEBOOK_METHODS = {
    "01_spurious_correlation": ["zeroshot", "clip_erm"],
    "02_last_layer_retraining": ["zeroshot", "linear_probe", "clip_erm", "dfr"],
    "03_main_results": list(ASSUMED_METHOD_S),
    "04_ablations": ["cfr"] * (len(CFR_ABLATIONS) - 2),  # the two selection variants reuse a training run
    "05_feature_geometry": ["cfr"],
    "06_cfr_dynamics": ["cfr"] * len(CFR_DYNAMICS),
}


@dataclass
class PlanRow:
    dataset: str
    model: str
    pretrained: str
    images: int
    train: int
    extraction_h: float
    methods_h: float


@dataclass
class Plan:
    rows: list[PlanRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seeds: int = len(PAPER_SEEDS)  # seeds per method, for the run count and the estimate

    @property
    def gpu_hours(self) -> float:
        return sum(r.extraction_h + r.methods_h for r in self.rows)

    def render(self) -> str:
        lines = [f"skip {s}" for s in self.skipped]
        if self.rows:
            lines.append(
                f"{'dataset':11s} {'backbone':24s} {'images':>8s} {'train':>7s} {'extract h':>9s} {'methods h':>9s}"
            )
            for r in self.rows:
                lines.append(
                    f"{r.dataset:11s} {r.model + '/' + r.pretrained:24s} {r.images:8d} {r.train:7d} "
                    f"{r.extraction_h:9.2f} {r.methods_h:9.2f}"
                )
        runs = sum(len(m) for m in NOTEBOOK_METHODS.values()) * self.seeds
        lines.append(f"notebooks 01-06 per dataset x backbone: {runs} method runs ({self.seeds} seeds)")
        unknown = sorted({r.model for r in self.rows if r.model not in ASSUMED_IMG_S})
        if unknown:
            lines.append(f"no assumed speed for {', '.join(unknown)}: costed at the ViT-L-14 speed")
        lines.append(
            f"estimated total: {self.gpu_hours:.1f} GPU hours (assumed single-GPU speeds, see "
            "calib/experiments/plan.py)"
        )
        return "\n".join(lines)


def parse_backbones(text: str) -> tuple[tuple[str, str], ...]:
    """``"RN50-quickgelu:openai,ViT-B-32:/ckpt.pt"`` -> ``(("RN50-quickgelu", "openai"), ("ViT-B-32", "/ckpt.pt"))``.

    Each comma-separated item is ``MODEL:PRETRAINED``, split at its first colon (so ``local-dir:<folder>``
    and ``random:<seed>`` keep theirs).
    """
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        model, sep, pretrained = item.partition(":")
        if not sep or not model or not pretrained:
            raise ValueError(f"backbone {item!r}: expected MODEL:PRETRAINED, e.g. RN50-quickgelu:openai")
        pairs.append((model, pretrained))
    if not pairs:
        raise ValueError("no backbone given: expected MODEL:PRETRAINED[,MODEL:PRETRAINED...]")
    return tuple(pairs)


def _img_s(model: str) -> float:
    return ASSUMED_IMG_S.get(model, ASSUMED_IMG_S["ViT-L-14-quickgelu"])


def method_seconds(n_train: int, seeds: int = len(PAPER_SEEDS)) -> float:
    """Assumed seconds of every notebook's method runs for one (dataset, backbone)."""
    per_seed = sum(ASSUMED_METHOD_S[m] for ms in NOTEBOOK_METHODS.values() for m in ms)
    return per_seed * seeds * n_train / WATERBIRDS_TRAIN


def paper_plan(
    data_dir: Path, backbones: tuple = PAPER_BACKBONES, check_files: bool = False, seeds: int = len(PAPER_SEEDS)
) -> Plan:
    """Which datasets are present under ``data_dir`` and the estimated cost of the paper profile."""
    plan = Plan(seeds=seeds)
    for name in PAPER_DATASETS:
        root = Path(data_dir) / name
        if not root.exists():
            plan.skipped.append(f"{name}: not found at {root}")
            continue
        try:
            ds = LOADERS[name](root, check_files=check_files)
        except DatasetLayoutError as err:
            plan.skipped.append(f"{name}: {str(err).splitlines()[0]}")
            continue
        n_images = sum(len(t) for t in ds.splits.values())
        n_train = len(ds.splits["train"])
        for model, pretrained in backbones:
            plan.rows.append(
                PlanRow(
                    dataset=name,
                    model=model,
                    pretrained=pretrained,
                    images=n_images,
                    train=n_train,
                    extraction_h=n_images / _img_s(model) / 3600,
                    methods_h=method_seconds(n_train, seeds) / 3600,
                )
            )
    return plan


def full_size_plan(backbones: tuple = PAPER_BACKBONES, seeds: int = len(PAPER_SEEDS)) -> Plan:
    """The plan with every paper dataset present at its published size (for the cost estimate)."""
    # (images, training images): Waterbirds and CelebA exact; MetaShift and CheXpert approximate (they depend
    # on the construction: CheXpert-small has 223,648 rows before the demographics join)
    sizes = {
        "waterbirds": (11788, 4795),
        "celeba": (202599, 162770),
        "metashift": (3447, 2275),
        "chexpert": (223648, 167700),
    }
    plan = Plan(seeds=seeds)
    for name, (n, n_train) in sizes.items():
        for model, pretrained in backbones:
            plan.rows.append(
                PlanRow(
                    name, model, pretrained, n, n_train, n / _img_s(model) / 3600, method_seconds(n_train, seeds) / 3600
                )
            )
    return plan
