"""Tiny datasets in the exact on-disk layouts of the real releases, shared by the tests.

Each writer produces what the real download or release holds (file names, CSV quirks, folder nesting), so
the loaders are tested against the format, not against calib's own idea of it.
"""

from pathlib import Path

import numpy as np
from PIL import Image

HEADER = "img_id,img_filename,y,split,place,place_filename"


def write_waterbirds_fixture(root, rows, make_images=True):
    """A tiny Waterbirds release: metadata.csv exactly as the group-DRO tarball writes it, plus images."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for img_id, fname, y, split, place in rows:
        lines.append(f"{img_id},{fname},{y},{split},{place},/b/bamboo_forest/00000{img_id}.jpg")
        if make_images:
            (root / fname).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 * img_id % 255, np.uint8)).save(root / fname)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


ROWS = [
    (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, 0, 1),
    (2, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 1, 0, 0),
    (3, "010.Red_winged_Blackbird/Red_Winged_Blackbird_0017_583.jpg", 0, 1, 0),
    (4, "010.Red_winged_Blackbird/Red_Winged_Blackbird_0040_5.jpg", 0, 2, 1),
    (5, "011.Rusty_Blackbird/Rusty_Blackbird_0015_6885.jpg", 0, 2, 0),
]


CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
    "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
    "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
    "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
# (file, Blond_Hair, Male, partition)
CELEBA_ROWS = [
    ("000001.jpg", -1, -1, 0),
    ("000002.jpg", -1, 1, 0),
    ("000003.jpg", 1, -1, 0),
    ("000004.jpg", 1, 1, 0),
    ("000005.jpg", 1, -1, 1),
    ("000006.jpg", -1, 1, 2),
    ("000007.jpg", 1, 1, 2),
]


def _img(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)


def _attr_values(blond, male):
    vals = [-1] * 40
    vals[CELEBA_ATTRS.index("Blond_Hair")], vals[CELEBA_ATTRS.index("Male")] = blond, male
    return vals


def celeba_original(root, rows=CELEBA_ROWS, image=None):
    """The official release: whitespace-separated ``list_attr_celeba.txt`` and ``list_eval_partition.txt``.
    ``image(path, row, index)`` draws each image (default: a flat grey square)."""
    root.mkdir(parents=True)
    lines = [str(len(rows)), " ".join(CELEBA_ATTRS) + " "]
    for k, (f, b, m, _) in enumerate(rows):  # the release right-aligns values: "-1" and " 1" -> runs of spaces
        lines.append(f + " " + " ".join(f"{v:2d}" for v in _attr_values(b, m)))
        (image or (lambda p, r, i: _img(p)))(root / "img_align_celeba" / f, rows[k], k)
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, _, _, p in rows))
    return root


def celeba_kaggle(root):
    """The Kaggle mirror: CSV attribute and partition files, images in a doubled folder."""
    root.mkdir(parents=True)
    lines = ["image_id," + ",".join(CELEBA_ATTRS)]
    for f, b, m, _ in CELEBA_ROWS:
        lines.append(f + "," + ",".join(str(v) for v in _attr_values(b, m)))
        _img(root / "img_align_celeba" / "img_align_celeba" / f)  # Kaggle's doubled folder
    (root / "list_attr_celeba.csv").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.csv").write_text(
        "image_id,partition\n" + "".join(f"{f},{p}\n" for f, _, _, p in CELEBA_ROWS)
    )
    return root


def metashift(root, n=10, image=None):
    """The CFR release's MetaShift-Cat-Dog-indoor-outdoor folders, ``n`` images each;
    ``image(path, folder_index, i)`` draws each image (default: grey level ``10 k + i``)."""
    for k, folder in enumerate(
        ["train/cat/cat(indoor)", "train/dog/dog(outdoor)", "test/cat/cat(outdoor)", "test/dog/dog(indoor)"]
    ):
        for i in range(n):
            path = root / folder / f"{k}_{i:03d}.jpg"
            image(path, k, i) if image else _img(path, 10 * k + i)
    return root


CHEX_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
RACES = ["White", "White, non-Hispanic", "Black or African American", "Asian", "Black, non-Hispanic", "Other"]


def chexpert(root, n=48, image=None):
    """CheXpert-v1.0-small's train.csv / valid.csv plus the registration-only ``CHEXPERT DEMO.csv``;
    ``image(path, i)`` draws each image (default: grey level ``i``)."""
    rng = np.random.default_rng(0)
    rows = {"train.csv": [], "valid.csv": []}
    demo = ["PATIENT,GENDER,AGE_AT_CXR,PRIMARY_RACE,ETHNICITY"]
    for i in range(n):
        patient = f"patient{i + 1:05d}"
        split = "valid" if i % 8 == 0 else "train"
        rel = f"{split}/{patient}/study1/view1_frontal.jpg"
        image(root / rel, i) if image else _img(root / rel, i % 256)
        sex = "Male" if i % 2 else "Female"
        finding = "1.0" if i % 3 == 0 else ("" if i % 3 == 1 else "0.0")  # blank means 0
        rows[f"{split}.csv"].append(f"CheXpert-v1.0-small/{rel},{sex},{50 + i},Frontal,AP,{finding}" + ",0.0" * 13)
        race = RACES[rng.integers(len(RACES))] if i % 4 else RACES[i % 6]
        demo.append(f'{patient},{sex},{50 + i},"{race}",Unknown')  # quoted: races contain commas
    for fname, lines in rows.items():
        (root / fname).write_text("\n".join([CHEX_HEADER, *lines]) + "\n")
    (root / "CHEXPERT DEMO.csv").write_text("\n".join(demo) + "\n")
    return root


# --- a whole paper data directory --------------------------------------------------------------------------


def _scene(path, label: int, attr: int, i: int):
    """A small image whose colour carries the label and whose texture carries the attribute (and a per-image
    shift), so that even random-weight features separate the groups a little."""
    rng = np.random.default_rng(i)
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., label % 3] = 150 + 40 * label
    img[:: 2 if attr else 4, :, (attr + 1) % 3] = 220
    img = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def write_paper_data_dir(root, per_group: int = 6):
    """``root/{waterbirds,celeba,metashift,chexpert}`` in the exact release layouts, ``per_group`` images per
    (class, attribute) group and split (CheXpert: 8 * 12 * ``per_group`` images in all, some sex x race groups
    sparse; with fewer, its stratified re-split leaves a training group out of validation, which the input checks
    refuse, unlike the real data, whose every group has thousands).  Returns ``root``."""
    root = Path(root)
    species = {
        1: "001.Black_footed_Albatross/Black_Footed_Albatross",
        0: "010.Red_winged_Blackbird/Red_Winged_Blackbird",
    }
    rows, i = [], 0
    for split in (0, 1, 2):
        for y in (0, 1):
            for place in (0, 1):
                for _ in range(per_group):
                    i += 1
                    rows.append((i, f"{species[y]}_{i:04d}_{1000 + i}.jpg", y, split, place))
    write_waterbirds_fixture(root / "waterbirds", rows, make_images=False)
    for img_id, fname, y, _, place in rows:
        _scene(root / "waterbirds" / fname, y, place, img_id)
    celeba_rows, i = [], 0
    for part in (0, 1, 2):
        for blond in (-1, 1):
            for male in (-1, 1):
                for _ in range(per_group):
                    i += 1
                    celeba_rows.append((f"{i:06d}.jpg", blond, male, part))
    celeba_original(root / "celeba", celeba_rows, image=lambda p, r, k: _scene(p, int(r[1] > 0), int(r[2] > 0), k))
    metashift(root / "metashift", n=4 * per_group, image=lambda p, k, j: _scene(p, k % 2, k // 2, 100 * k + j))
    chexpert(root / "chexpert", n=8 * 12 * per_group, image=lambda p, i: _scene(p, i % 3 == 0, i % 2, i))
    return root


# the figure stem every notebook of run_all.sh writes (<stem>_<dataset>_<model>.png)
FIGURE_STEMS = (
    "quickstart",
    "spurious_correlation",
    "last_layer_retraining",
    "main_results",
    "ablations",
    "feature_geometry",
    "calibration_set",
    "cfr_dynamics",
)


def synthetic_prompt_bank():
    """A prompt bank for 3-d synthetic features (axis 0: class, axis 1: spurious attribute), every section filled:
    class k at ``(2k-1, (2k-1)/2, 0)``, attribute a at ``(0, 2a-1, 0.1)``, a candidate at their sum."""
    import numpy as np

    from calib.clip.prompts import PromptBank

    vec = {}
    for k in (0, 1):
        vec[f"class {k}"] = np.array([2 * k - 1, (2 * k - 1) / 2, 0.0])
        vec[f"spur {k}"] = np.array([0.0, 2 * k - 1, 0.1])
    for k in (0, 1):
        for a in (0, 1):
            vec[f"c{k} s{a}"] = vec[f"class {k}"] + vec[f"spur {a}"]
    spec = {
        "dataset": "synthetic",
        "class_names": ["c0", "c1"],
        "attr_names": ["a0", "a1"],
        "orth_cali": {
            "source": "test",
            "class_prompts": ["class 0", "class 1"],
            "spurious_prompts": ["spur 0", "spur 1"],
            "candidate_prompts": ["c0 s0", "c0 s1", "c1 s0", "c1 s1"],
            "candidate_pairs": [[0, 1], [2, 3]],
        },
        "roboshot": {
            "source": "test",
            "class_prompts": ["class 0", "class 1"],
            "reject": [["spur 1", "spur 0"]],
            "accept": [["class 1", "class 0"]],
        },
        "tie": {
            "source": "test",
            "class_prompts": ["class 0", "class 1"],
            "spurious_prompts": [["spur 0"], ["spur 1"]],
        },
        "fairerclip": {
            "source": "test",
            "class_prompts": ["class 0", "class 1"],
            "spurious_prompts": [["spur 0"], ["spur 1"]],
        },
    }
    texts = sorted(vec)
    return PromptBank(spec, texts, np.stack([vec[t] for t in texts]).astype(np.float32))
