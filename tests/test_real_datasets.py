"""CelebA (both layouts), MetaShift and CheXpert readers on tiny fixtures in the exact on-disk formats."""

import json
import subprocess
import sys

import numpy as np
import pytest

from calib.data import DatasetLayoutError, load_dataset
from tests.fixtures import celeba_kaggle, celeba_original, chexpert, metashift


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


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: (r / "list_eval_partition.txt").unlink(), "neither the original"),
        (
            lambda r: (r / "list_attr_celeba.txt").write_text(
                (r / "list_attr_celeba.txt").read_text().replace("7\n", "9\n", 1)
            ),
            "announces 9 images",
        ),
        (
            lambda r: (r / "list_eval_partition.txt").write_text(
                (r / "list_eval_partition.txt").read_text().replace("000006.jpg 2", "000006.jpg 5")
            ),
            "partition values",
        ),
        (lambda r: (r / "img_align_celeba" / "000004.jpg").unlink(), "absent"),
    ],
)
def test_celeba_bad_layouts(tmp_path, mutate, message):
    root = celeba_original(tmp_path / "celeba")
    mutate(root)
    with pytest.raises(DatasetLayoutError, match=message) as err:
        load_dataset("celeba", root)
    assert "list_attr_celeba" in str(err.value) and "Kaggle" in str(err.value)


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


def test_chexpert_too_small_to_stratify_still_splits(tmp_path):
    """Every group has at least two images, but the validation split (10 images) is smaller than the 12 groups:
    that split falls back to a plain seeded random split instead of failing inside sklearn."""
    ds = load_dataset("chexpert", chexpert(tmp_path / "small", n=96))
    assert {s: len(t) for s, t in ds.splits.items()} == {"train": 71, "val": 10, "test": 15}
    again = load_dataset("chexpert", tmp_path / "small")
    assert again.splits["test"].ids.tolist() == ds.splits["test"].ids.tolist()


def test_chexpert_needs_the_demographics(tmp_path):
    root = chexpert(tmp_path / "CheXpert-v1.0-small", n=8)
    (root / "CHEXPERT DEMO.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="registration"):
        load_dataset("chexpert", root)
    with pytest.raises(DatasetLayoutError, match="valid.csv is missing"):
        (root / "valid.csv").unlink()
        load_dataset("chexpert", root)


def test_data_check_every_dataset(tmp_path):
    roots = {
        "celeba": celeba_kaggle(tmp_path / "c"),
        "metashift": metashift(tmp_path / "m"),
        "chexpert": chexpert(tmp_path / "x"),
    }
    for name, root in roots.items():
        r = subprocess.run(
            [sys.executable, "-m", "calib", "data", "check", "--dataset", name, "--root", str(root), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["ok"]


@pytest.mark.parametrize(
    "dataset, inner, make",
    [
        ("metashift", "MetaShift-Cat-Dog-indoor-outdoor", metashift),
        ("chexpert", "CheXpert-v1.0-small", chexpert),
        ("celeba", "celeba", celeba_kaggle),
        ("waterbirds", "waterbird_complete95_forest2water2", None),
        ("waterbirds", "waterbirds_v1.0", None),
    ],
)
def test_parent_of_the_released_folder_is_accepted(tmp_path, dataset, inner, make):
    """Users point --root at the folder they extracted the archive in (SubpopBench's data folder)."""
    from tests.fixtures import ROWS, write_waterbirds_fixture

    if make is None:
        write_waterbirds_fixture(tmp_path / "data" / inner, ROWS)
    else:
        make(tmp_path / "data" / inner)
    direct = load_dataset(dataset, tmp_path / "data" / inner)
    parent = load_dataset(dataset, tmp_path / "data")
    assert parent.root == direct.root == (tmp_path / "data" / inner).resolve()
    assert parent.version == direct.version and parent.group_counts() == direct.group_counts()
    assert f"parent folder given: using {inner}/" in parent.extra["layout"]
    assert "given directly" in direct.extra["layout"]
    out = subprocess.run(
        [sys.executable, "-m", "calib", "data", "check", "--dataset", dataset, "--root", str(tmp_path / "data")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and f"parent folder given: using {inner}/" in out.stdout, out.stderr


def test_metashift_wrong_parent_names_both_layouts(tmp_path):
    (tmp_path / "data" / "something-else").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="or its parent holding MetaShift-Cat-Dog-indoor-outdoor"):
        load_dataset("metashift", tmp_path / "data")
