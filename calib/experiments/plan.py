"""The paper profile: what ``./run_all.sh --profile paper --data-dir DIR`` runs, and what it costs.

Datasets are looked for at ``DIR/<name>`` (``waterbirds``, ``celeba``, ``metashift``, ``chexpert``);
a missing or malformed one is skipped with one line saying why.  Every notebook runs over every
present dataset x backbone with every method and 5 seeds.

The cost estimate uses *assumed* single-GPU numbers (bf16, pipeline-bound extraction; method
seconds scaled by training-set size from a Waterbirds-sized run), not measurements: replace them
with ``python -m calib bench throughput`` / ``bench methods`` results from your machine.
"""

from __future__ import annotations

import json
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
# the per-image methods (assumed seconds per image on one GPU, where no rehearsal report measured them): TPT in
# notebook 03 (64 views through the image tower, one step through the text tower) on TPT_IMAGES test images per seed,
# and notebook 07's maps (M2IB's 10 x 10 passes dominate) on ATTRIBUTION_PER_GROUP images a group, under two towers
ASSUMED_TPT_S_PER_IMG = 0.5
ASSUMED_MAPS_S_PER_IMG = 1.0
TPT_IMAGES = 500
ATTRIBUTION_PER_GROUP = 50
ATTRIBUTION_TOWERS = 2  # the pretrained projection and CFR's
N_GROUPS = {"waterbirds": 4, "celeba": 4, "metashift": 4, "chexpert": 12}
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
    source: str = "assumed"  # "measured" (a rehearsal report) or "assumed" (the constants above)


SPEEDS_DIR = Path(__file__).resolve().parent / "speeds"  # rehearsal reports (python -m calib rehearse --out)


@dataclass
class Speeds:
    """Rates measured by a rehearsal (:mod:`calib.experiments.rehearse`) on one device."""

    path: Path
    report: dict

    @property
    def device_name(self) -> str:
        return self.report["stamp"]["device_name"]

    def img_s(self, model: str) -> float | None:
        """Pipeline-bound extraction images/s of ``model``, None when the report did not measure it."""
        for r in self.report["records"]:
            if r["stage"] == "images" and r["backbone"] == model:
                return float(r["pipeline_bound_img_s"])
        return None

    def methods_seconds(self, dataset: str, model: str, n_train: int, seeds: int, epochs: int = 100) -> float | None:
        """Seconds of every notebook's method runs for ``(dataset, model)`` at ``n_train`` training images,
        ``seeds`` seeds and ``epochs`` epochs: the measured seconds scaled linearly by training size, seeds and
        epochs where the rehearsal ran fewer (an upper bound: fixed costs and lanes grow less than linearly).
        None when the report did not rehearse that pair."""
        recs = [
            r
            for r in self.report["records"]
            if r["stage"] == "methods" and (r["dataset"], r["backbone"]) == (dataset, model)
        ]
        if not recs:
            return None
        scale = n_train / recs[0]["train"] * seeds / len(self.report["seeds"]) * epochs / self.report["epochs"]
        return sum(r["seconds"] for r in recs) * scale

    def image_rates(self, dataset: str, model: str) -> tuple[float, float] | None:
        """``(TPT, every attribution map)`` seconds per image for ``(dataset, model)``; None when not measured."""
        for r in self.report["records"]:
            if r["stage"] == "dataset_images" and (r["dataset"], r["backbone"]) == (dataset, model):
                return float(r["tpt_s_per_img"]), float(sum(r["attribution_s_per_img"].values()))
        return None

    def describe(self) -> str:
        st, rep = self.report["stamp"], self.report
        scaled = rep["fraction"] < 1 or rep["epochs"] != 100 or len(rep["seeds"]) != len(PAPER_SEEDS)
        return (
            f"measured on {st['device_name']} by {self.path.name} (commit {st['commit']}, fraction {rep['fraction']}, "
            f"{len(rep['seeds'])} seeds, {rep['epochs']} epochs"
            + ("; scaled linearly to the full size, seeds and epochs: an upper bound)" if scaled else ")")
        )


def current_device_name() -> str:
    """The name rehearsal reports record for the device this process would run on (the GPU when present)."""
    import torch

    from calib.clip.throughput import device_name

    return device_name("cuda" if torch.cuda.is_available() else "cpu")


def latest_speeds(device_name: str | None = None, folder: Path = SPEEDS_DIR) -> Speeds | None:
    """The newest rehearsal report in ``folder`` measured on ``device_name`` (default: this machine's device)."""
    name = device_name or current_device_name()
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            report = json.loads(path.read_text())
            if report["stamp"]["device_name"] == name:
                found.append((report["stamp"]["time"], path, report))
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("rehearsal report %s cannot be read (%s); ignored", path, err)
    if not found:
        return None
    _, path, report = max(found, key=lambda t: t[0])
    return Speeds(path, report)


@dataclass
class Plan:
    rows: list[PlanRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seeds: int = len(PAPER_SEEDS)  # seeds per method, for the run count and the estimate
    speeds: Speeds | None = None  # the rehearsal report the measured rows come from

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
        lines.append(
            f"notebooks 01-06 per dataset x backbone: {runs} method runs ({self.seeds} seeds), plus TPT in 03 "
            "and the maps of 07"
        )
        unknown = sorted({r.model for r in self.rows if r.model not in ASSUMED_IMG_S})
        if unknown:
            lines.append(f"no assumed speed for {', '.join(unknown)}: costed at the ViT-L-14 speed")
        measured = [r for r in self.rows if r.source == "measured"]
        if self.speeds is not None and measured:
            lines.append(f"speeds {self.speeds.describe()}")
        if len(measured) < len(self.rows):
            lines.append(
                f"{len(self.rows) - len(measured)} row(s) costed at assumed single-GPU speeds (calib/experiments/"
                "plan.py: ASSUMED_IMG_S, ASSUMED_METHOD_S), not measured: no rehearsal report for this device"
                + (" covers them" if self.speeds is not None else "")
            )
        where = f"hours on {self.speeds.device_name}" if measured else "GPU hours, assumed"
        lines.append(f"estimated total: {self.gpu_hours:.1f} {where}")
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


def image_method_seconds(dataset: str, seeds: int, rates: tuple[float, float] | None) -> float:
    """Seconds of TPT (notebook 03, every seed) and the attribution maps (notebook 07) for one (dataset, backbone),
    from measured ``rates`` (TPT, maps: seconds per image) or the assumed ones."""
    tpt, maps = rates or (ASSUMED_TPT_S_PER_IMG, ASSUMED_MAPS_S_PER_IMG)
    return tpt * TPT_IMAGES * seeds + maps * ATTRIBUTION_PER_GROUP * N_GROUPS.get(dataset, 4) * ATTRIBUTION_TOWERS


def plan_row(
    dataset: str, model: str, pretrained: str, images: int, train: int, seeds: int, speeds: Speeds | None
) -> PlanRow:
    """One (dataset, backbone)'s cost: measured rates where ``speeds`` has them, the assumed constants otherwise."""
    img_s = speeds.img_s(model) if speeds else None
    method_s = speeds.methods_seconds(dataset, model, train, seeds) if speeds else None
    rates = speeds.image_rates(dataset, model) if speeds else None
    measured = img_s is not None and method_s is not None and rates is not None
    return PlanRow(
        dataset,
        model,
        pretrained,
        images,
        train,
        images / (img_s if measured else _img_s(model)) / 3600,
        ((method_s if measured else method_seconds(train, seeds)) + image_method_seconds(dataset, seeds, rates)) / 3600,
        "measured" if measured else "assumed",
    )


def paper_plan(
    data_dir: Path,
    backbones: tuple = PAPER_BACKBONES,
    check_files: bool = False,
    seeds: int = len(PAPER_SEEDS),
    speeds: Speeds | None = None,
) -> Plan:
    """Which datasets are present under ``data_dir`` and the estimated cost of the paper profile (measured rates
    from ``speeds``, a rehearsal report, where it has them)."""
    plan = Plan(seeds=seeds, speeds=speeds)
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
            plan.rows.append(plan_row(name, model, pretrained, n_images, n_train, seeds, speeds))
    return plan


def full_size_plan(
    backbones: tuple = PAPER_BACKBONES, seeds: int = len(PAPER_SEEDS), speeds: Speeds | None = None
) -> Plan:
    """The plan with every paper dataset present at its published size (for the cost estimate)."""
    # (images, training images): Waterbirds and CelebA exact; MetaShift and CheXpert approximate (they depend
    # on the construction: CheXpert-small has 223,648 rows before the demographics join)
    sizes = {
        "waterbirds": (11788, 4795),
        "celeba": (202599, 162770),
        "metashift": (3447, 2275),
        "chexpert": (223648, 167700),
    }
    plan = Plan(seeds=seeds, speeds=speeds)
    for name, (n, n_train) in sizes.items():
        for model, pretrained in backbones:
            plan.rows.append(plan_row(name, model, pretrained, n, n_train, seeds, speeds))
    return plan
