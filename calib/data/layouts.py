"""Writers of the paper datasets' exact on-disk release layouts, for fixtures and for the full-scale rehearsal.

Each writer produces what the real download holds (file names, CSV quirks, folder nesting), so that the loaders
read them through their real code path: the test fixtures (``tests/fixtures.py``) write a few images per group,
the rehearsal (:mod:`calib.experiments.rehearse`) a stated fraction of each dataset at its images' real sizes
(:func:`write_synthetic_release`).  ``image(path, ...)`` callbacks draw each image; by default a flat grey square.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

WATERBIRDS_HEADER = "img_id,img_filename,y,split,place,place_filename"
CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
    "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
    "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
    "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
METASHIFT_FOLDERS = {  # folder -> (y, a), as calib.data.metashift reads them
    "train/cat/cat(indoor)": (1, 1),
    "train/dog/dog(outdoor)": (0, 0),
    "test/cat/cat(outdoor)": (1, 0),
    "test/dog/dog(indoor)": (0, 1),
}
CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
# the demographics table's PRIMARY_RACE spellings (the loader maps "*White*" -> White, "*Black*" -> Black, else Other)
CHEXPERT_RACES = ["White", "White, non-Hispanic", "Black or African American", "Asian", "Black, non-Hispanic", "Other"]

# (width, height) of each dataset's images as released, for the rehearsal's JPEGs: CelebA's aligned crops are exactly
# 178 x 218; the others vary image by image and these are typical sizes (CUB and Visual Genome photos, the
# downsampled CheXpert-v1.0-small radiographs, greyscale)
RELEASE_IMAGE_SIZES = {
    "waterbirds": (500, 375),
    "celeba": (178, 218),
    "metashift": (500, 375),
    "chexpert": (390, 320),
}


def grey_image(path: Path, value: int = 100, size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value % 256, np.uint8)).save(path)


def write_waterbirds(
    root: Path, rows: Sequence[tuple[int, str, int, int, int]], image: Callable[[Path, int], None] | None = None
) -> Path:
    """The group-DRO release: ``metadata.csv`` exactly as its tarball writes it (rows ``(img_id, img_filename, y,
    split, place)``), and each image drawn by ``image(path, img_id)``."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [WATERBIRDS_HEADER]
    for img_id, fname, y, split, place in rows:
        lines.append(f"{img_id},{fname},{y},{split},{place},/b/bamboo_forest/00000{img_id}.jpg")
        if image is not None:
            (root / fname).parent.mkdir(parents=True, exist_ok=True)
            image(root / fname, img_id)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def celeba_attr_values(blond: int, male: int) -> list[int]:
    vals = [-1] * 40
    vals[CELEBA_ATTRS.index("Blond_Hair")], vals[CELEBA_ATTRS.index("Male")] = blond, male
    return vals


def write_celeba(root: Path, rows: Sequence[tuple[str, int, int, int]], image: Callable | None = None) -> Path:
    """The official release: whitespace-separated ``list_attr_celeba.txt`` and ``list_eval_partition.txt``, rows
    ``(file, Blond_Hair ±1, Male ±1, partition)``; ``image(path, row, index)`` draws each image."""
    root.mkdir(parents=True)
    lines = [str(len(rows)), " ".join(CELEBA_ATTRS) + " "]
    for k, (f, b, m, _) in enumerate(rows):  # the release right-aligns values: "-1" and " 1" -> runs of spaces
        lines.append(f + " " + " ".join(f"{v:2d}" for v in celeba_attr_values(b, m)))
        (image or (lambda p, r, i: grey_image(p)))(root / "img_align_celeba" / f, rows[k], k)
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, _, _, p in rows))
    return root


def write_metashift(root: Path, n: int | Sequence[int] = 10, image: Callable | None = None) -> Path:
    """The CFR release's MetaShift-Cat-Dog-indoor-outdoor folders, ``n`` images each (or ``n[k]`` in folder k of
    :data:`METASHIFT_FOLDERS`); ``image(path, folder_index, i)`` draws each image (default: grey level ``10 k + i``)."""
    counts = [n] * len(METASHIFT_FOLDERS) if isinstance(n, int) else list(n)
    width = max(3, len(str(max(counts, default=0))))
    for k, folder in enumerate(METASHIFT_FOLDERS):
        for i in range(counts[k]):
            path = root / folder / f"{k}_{i:0{width}d}.jpg"
            image(path, k, i) if image else grey_image(path, 10 * k + i)
    return root


def write_chexpert(
    root: Path,
    n: int = 48,
    image: Callable | None = None,
    labels: Callable[[int], tuple[int, int, int]] | None = None,
) -> Path:
    """CheXpert-v1.0-small's ``train.csv`` / ``valid.csv`` plus the registration-only ``CHEXPERT DEMO.csv``, ``n``
    patients with one frontal view each; ``image(path, i)`` draws each image (default: grey level ``i``).
    ``labels(i) -> (no_finding, male, race)`` (race 0 White, 1 Black, 2 Other) sets each patient's group; by
    default the fixtures' pattern (every third patient No Finding, alternate sexes, races drawn)."""
    rng = np.random.default_rng(0)
    rows: dict[str, list[str]] = {"train.csv": [], "valid.csv": []}
    demo = ["PATIENT,GENDER,AGE_AT_CXR,PRIMARY_RACE,ETHNICITY"]
    for i in range(n):
        patient = f"patient{i + 1:05d}"
        split = "valid" if i % 8 == 0 else "train"
        rel = f"{split}/{patient}/study1/view1_frontal.jpg"
        image(root / rel, i) if image else grey_image(root / rel, i)
        if labels is None:
            sex = "Male" if i % 2 else "Female"
            finding = "1.0" if i % 3 == 0 else ("" if i % 3 == 1 else "0.0")  # blank means 0
            race = CHEXPERT_RACES[rng.integers(len(CHEXPERT_RACES))] if i % 4 else CHEXPERT_RACES[i % 6]
        else:
            y, male, race_id = labels(i)
            sex = "Male" if male else "Female"
            finding = "1.0" if y else ("" if i % 2 else "0.0")
            race = ("White", "Black or African American", "Asian")[race_id]
        age = 50 + i if labels is None else 50 + i % 40  # the fixtures' ages as they always were; real ones below 90
        rows[f"{split}.csv"].append(f"CheXpert-v1.0-small/{rel},{sex},{age},Frontal,AP,{finding}" + ",0.0" * 13)
        demo.append(f'{patient},{sex},{age},"{race}",Unknown')  # quoted: races contain commas
    for fname, lines in rows.items():
        (root / fname).write_text("\n".join([CHEXPERT_HEADER, *lines]) + "\n")
    (root / "CHEXPERT DEMO.csv").write_text("\n".join(demo) + "\n")
    return root


def smooth_jpeg(size: tuple[int, int], seed: int, grey: bool = False) -> Callable[[Path], None]:
    """A writer of one JPEG of ``size`` (width, height): a random 8 x 8 colour field upsampled bicubically, plus mild
    noise, saved at quality 90 (closer to a photo's file size and decoding cost than a flat or white-noise image)."""

    def write(path: Path) -> None:
        rng = np.random.default_rng(seed)
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        arr = np.asarray(small.resize(size, Image.BICUBIC), dtype=np.int16)
        arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        path.parent.mkdir(parents=True, exist_ok=True)
        (img.convert("L") if grey else img).save(path, quality=90)

    return write


def write_synthetic_release(name: str, root: Path, group_sizes: dict[str, Sequence[int]], seed: int = 0) -> Path:
    """``name``'s release layout under ``root`` with ``group_sizes[split][g]`` images of group ``g`` (MetaShift and
    CheXpert pool their splits: the loader re-splits them, so only the per-group totals count), each a
    :func:`smooth_jpeg` at the dataset's :data:`RELEASE_IMAGE_SIZES`."""
    size = RELEASE_IMAGE_SIZES[name]
    root = Path(root)

    def draw(path: Path, i: int) -> None:
        smooth_jpeg(size, seed * 1_000_003 + i, grey=name == "chexpert")(path)

    splits = list(group_sizes)
    if name == "waterbirds":
        species = {
            1: "001.Black_footed_Albatross/Black_Footed_Albatross",
            0: "010.Red_winged_Blackbird/Red_Winged_Blackbird",
        }
        rows, i = [], 0
        for s, split in enumerate(splits):
            for g, count in enumerate(group_sizes[split]):
                for _ in range(count):
                    i += 1
                    rows.append((i, f"{species[g // 2]}_{i:06d}_{1000 + i}.jpg", g // 2, s, g % 2))
        return write_waterbirds(root, rows, draw)
    if name == "celeba":
        rows, i = [], 0
        for s, split in enumerate(splits):
            for g, count in enumerate(group_sizes[split]):
                for _ in range(count):
                    i += 1
                    rows.append((f"{i:06d}.jpg", 1 if g // 2 else -1, 1 if g % 2 else -1, s))
        return write_celeba(root, rows, lambda p, r, k: draw(p, k))
    totals = np.sum([list(group_sizes[s]) for s in splits], axis=0).astype(int).tolist()
    if name == "metashift":  # folder k holds group g = 2 y + a of METASHIFT_FOLDERS[k]
        by_folder = [totals[2 * y + a] for y, a in METASHIFT_FOLDERS.values()]
        return write_metashift(root, by_folder, lambda p, k, j: draw(p, 1_000_000 * k + j))
    if name == "chexpert":  # g = 6 y + 3 male + race
        groups = np.repeat(np.arange(len(totals)), totals)
        groups = np.random.default_rng(seed).permutation(groups)  # groups interleaved across train.csv / valid.csv
        root.mkdir(parents=True, exist_ok=True)
        return write_chexpert(root, len(groups), draw, lambda i: (groups[i] // 6, groups[i] % 6 // 3, groups[i] % 3))
    raise ValueError(f"no release layout for {name!r}; known: {sorted(RELEASE_IMAGE_SIZES)}")
