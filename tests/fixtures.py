"""Tiny datasets in the exact on-disk layouts of the real releases, shared by the tests.

Each writer produces what the real download or release holds (file names, CSV quirks, folder nesting), so
the loaders are tested against the format, not against calib's own idea of it.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from calib.data.layouts import (
    CELEBA_ATTRS,
    WATERBIRDS_HEADER,
    celeba_attr_values,
    grey_image,
    write_celeba,
    write_chexpert,
    write_metashift,
    write_waterbirds,
)

HEADER = WATERBIRDS_HEADER


def write_waterbirds_fixture(root, rows, make_images=True):
    """A tiny Waterbirds release: metadata.csv exactly as the group-DRO tarball writes it, plus images."""

    def flat(path, img_id):
        Image.fromarray(np.full((8, 8, 3), 40 * img_id % 255, np.uint8)).save(path)

    return write_waterbirds(root, rows, flat if make_images else None)


ROWS = [
    (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, 0, 1),
    (2, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 1, 0, 0),
    (3, "010.Red_winged_Blackbird/Red_Winged_Blackbird_0017_583.jpg", 0, 1, 0),
    (4, "010.Red_winged_Blackbird/Red_Winged_Blackbird_0040_5.jpg", 0, 2, 1),
    (5, "011.Rusty_Blackbird/Rusty_Blackbird_0015_6885.jpg", 0, 2, 0),
]

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
    grey_image(path, value)


def celeba_original(root, rows=CELEBA_ROWS, image=None):
    """The official release (:func:`calib.data.layouts.write_celeba`)."""
    return write_celeba(root, rows, image)


def celeba_kaggle(root):
    """The Kaggle mirror: CSV attribute and partition files, images in a doubled folder."""
    root.mkdir(parents=True)
    lines = ["image_id," + ",".join(CELEBA_ATTRS)]
    for f, b, m, _ in CELEBA_ROWS:
        lines.append(f + "," + ",".join(str(v) for v in celeba_attr_values(b, m)))
        _img(root / "img_align_celeba" / "img_align_celeba" / f)  # Kaggle's doubled folder
    (root / "list_attr_celeba.csv").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.csv").write_text(
        "image_id,partition\n" + "".join(f"{f},{p}\n" for f, _, _, p in CELEBA_ROWS)
    )
    return root


def metashift(root, n=10, image=None):
    """The CFR release's MetaShift-Cat-Dog-indoor-outdoor folders (:func:`calib.data.layouts.write_metashift`)."""
    return write_metashift(root, n, image)


def chexpert(root, n=48, image=None):
    """CheXpert-v1.0-small plus ``CHEXPERT DEMO.csv`` (:func:`calib.data.layouts.write_chexpert`)."""
    return write_chexpert(root, n, image)


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
