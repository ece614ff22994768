"""CelebA (both layouts), MetaShift and CheXpert readers on tiny fixtures in the exact on-disk formats."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from calib.data import DatasetLayoutError, load_dataset

CELEBA_ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
                "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
                "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
                "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
                "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
# (file, Blond_Hair, Male, partition)
CELEBA_ROWS = [("000001.jpg", -1, -1, 0), ("000002.jpg", -1, 1, 0), ("000003.jpg", 1, -1, 0), ("000004.jpg", 1, 1, 0),
               ("000005.jpg", 1, -1, 1), ("000006.jpg", -1, 1, 2), ("000007.jpg", 1, 1, 2)]


def _img(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)


def _attr_values(blond, male):
    vals = [-1] * 40
    vals[CELEBA_ATTRS.index("Blond_Hair")], vals[CELEBA_ATTRS.index("Male")] = blond, male
    return vals


def celeba_original(root):
    root.mkdir(parents=True)
    lines = [str(len(CELEBA_ROWS)), " ".join(CELEBA_ATTRS) + " "]
    for f, b, m, _ in CELEBA_ROWS:  # the release right-aligns values: "-1" and " 1" -> runs of spaces
        lines.append(f + " " + " ".join(f"{v:2d}" for v in _attr_values(b, m)))
        _img(root / "img_align_celeba" / f)
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, _, _, p in CELEBA_ROWS))
    return root


def celeba_kaggle(root):
    root.mkdir(parents=True)
    lines = ["image_id," + ",".join(CELEBA_ATTRS)]
    for f, b, m, _ in CELEBA_ROWS:
        lines.append(f + "," + ",".join(str(v) for v in _attr_values(b, m)))
        _img(root / "img_align_celeba" / "img_align_celeba" / f)  # Kaggle's doubled folder
    (root / "list_attr_celeba.csv").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.csv").write_text("image_id,partition\n" + "".join(f"{f},{p}\n" for f, _, _, p in CELEBA_ROWS))
    return root


@pytest.mark.parametrize("make", [celeba_original, celeba_kaggle])
def test_celeba_both_layouts(tmp_path, make):
    ds = load_dataset("celeba", make(tmp_path / "celeba"))
    assert ds.group_counts() == {"train": [1, 1, 1, 1], "val": [0, 0, 1, 0], "test": [0, 1, 0, 1]}
    tr = ds.splits["train"]
    assert tr.y.tolist() == [0, 0, 1, 1] and tr.a.tolist() == [0, 1, 0, 1]
    assert all(p.is_file() for p in tr.paths)
    assert ds.group_names[3] == "blond/male"


def test_celeba_layouts_agree(tmp_path):
    a = load_dataset("celeba", celeba_original(tmp_path / "a"))
    b = load_dataset("celeba", celeba_kaggle(tmp_path / "b"))
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(a.splits[s].g, b.splits[s].g)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: (r / "list_eval_partition.txt").unlink(), "neither the original"),
    (lambda r: (r / "list_attr_celeba.txt").write_text((r / "list_attr_celeba.txt").read_text().replace("7\n", "9\n", 1)),
     "announces 9 images"),
    (lambda r: (r / "list_eval_partition.txt").write_text((r / "list_eval_partition.txt").read_text().replace("000006.jpg 2", "000006.jpg 5")),
     "partition values"),
    (lambda r: (r / "img_align_celeba" / "000004.jpg").unlink(), "absent"),
])
def test_celeba_bad_layouts(tmp_path, mutate, message):
    root = celeba_original(tmp_path / "celeba")
    mutate(root)
    with pytest.raises(DatasetLayoutError, match=message) as err:
        load_dataset("celeba", root)
    assert "list_attr_celeba" in str(err.value) and "Kaggle" in str(err.value)


def metashift(root, n=10):
    for k, folder in enumerate(["train/cat/cat(indoor)", "train/dog/dog(outdoor)", "test/cat/cat(outdoor)",
                                "test/dog/dog(indoor)"]):
        for i in range(n):
            _img(root / folder / f"{k}_{i:03d}.jpg", 10 * k + i)
    return root


def test_metashift_split_rule(tmp_path):
    ds = load_dataset("metashift", metashift(tmp_path / "MetaShift-Cat-Dog-indoor-outdoor"))
    sizes = {s: len(t) for s, t in ds.splits.items()}
    assert sizes == {"train": 26, "val": 4, "test": 10}  # 40 images: 25% test, 10% val
    all_g = np.concatenate([t.g for t in ds.splits.values()])
    assert np.bincount(all_g).tolist() == [10, 10, 10, 10]
    # a cat(indoor) image is y=1 (cat), a=1 (indoor), g=3
    for t in ds.splits.values():
        for p, g in zip(t.paths, t.g):
            assert g == {"cat(indoor)": 3, "dog(outdoor)": 0, "cat(outdoor)": 2, "dog(indoor)": 1}[p.parent.name]
    again = load_dataset("metashift", tmp_path / "MetaShift-Cat-Dog-indoor-outdoor")
    assert [p.name for p in again.splits["test"].paths] == [p.name for p in ds.splits["test"].paths]


def test_metashift_missing_folder(tmp_path):
    root = metashift(tmp_path / "ms")
    for f in (root / "test/dog/dog(indoor)").iterdir():
        f.unlink()
    (root / "test/dog/dog(indoor)").rmdir()
    with pytest.raises(DatasetLayoutError, match=r"dog\(indoor\).*missing"):
        load_dataset("metashift", root)


CHEX_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
               "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
               "Fracture,Support Devices")
RACES = ["White", "White, non-Hispanic", "Black or African American", "Asian", "Black, non-Hispanic", "Other"]


def chexpert(root, n=48):
    rng = np.random.default_rng(0)
    rows = {"train.csv": [], "valid.csv": []}
    demo = ["PATIENT,GENDER,AGE_AT_CXR,PRIMARY_RACE,ETHNICITY"]
    for i in range(n):
        patient = f"patient{i + 1:05d}"
        split = "valid" if i % 8 == 0 else "train"
        rel = f"{split}/{patient}/study1/view1_frontal.jpg"
        _img(root / rel, i)
        sex = "Male" if i % 2 else "Female"
        finding = "1.0" if i % 3 == 0 else ("" if i % 3 == 1 else "0.0")  # blank means 0
        rows[f"{split}.csv"].append(f"CheXpert-v1.0-small/{rel},{sex},{50 + i},Frontal,AP,{finding}" + ",0.0" * 13)
        race = RACES[rng.integers(len(RACES))] if i % 4 else RACES[i % 6]
        demo.append(f'{patient},{sex},{50 + i},"{race}",Unknown')  # quoted: races contain commas
    for fname, lines in rows.items():
        (root / fname).write_text("\n".join([CHEX_HEADER, *lines]) + "\n")
    (root / "CHEXPERT DEMO.csv").write_text("\n".join(demo) + "\n")
    return root


def test_chexpert_sex_race(tmp_path):
    root = chexpert(tmp_path / "CheXpert-v1.0-small")
    ds = load_dataset("chexpert", root)
    assert ds.n_groups == 12
    n = sum(len(t) for t in ds.splits.values())
    assert n == 48
    assert abs(len(ds.splits["test"]) - 0.15 * n) <= 1 and abs(len(ds.splits["val"]) - 0.10 * n) <= 1
    all_y = np.concatenate([t.y for t in ds.splits.values()])
    assert all_y.sum() == 16  # "1.0" every third row; blanks and 0.0 are 0
    sex = load_dataset("chexpert-sex", root)
    assert sex.n_groups == 4
    # patient00002 (i=1): Male; its race draw is deterministic: check the attribute coding against the table
    for t in ds.splits.values():
        for p, a in zip(t.paths, t.a):
            i = int(p.parts[-3][7:]) - 1
            assert (a // 3 == 1) == (i % 2 == 1)  # Male -> 3 * 1 + race


def test_chexpert_needs_the_demographics(tmp_path):
    root = chexpert(tmp_path / "CheXpert-v1.0-small", n=8)
    (root / "CHEXPERT DEMO.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="registration"):
        load_dataset("chexpert", root)
    with pytest.raises(DatasetLayoutError, match="valid.csv is missing"):
        (root / "valid.csv").unlink()
        load_dataset("chexpert", root)


def test_data_check_every_dataset(tmp_path):
    roots = {"celeba": celeba_kaggle(tmp_path / "c"), "metashift": metashift(tmp_path / "m"),
             "chexpert": chexpert(tmp_path / "x")}
    for name, root in roots.items():
        r = subprocess.run([sys.executable, "-m", "calib", "data", "check", "--dataset", name, "--root", str(root),
                            "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["ok"]
