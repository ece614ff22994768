"""The toy generator and the Waterbirds reader, against the exact on-disk format."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from calib.data import DatasetLayoutError, ToyConfig, load_waterbirds, make_toy_waterbirds
from calib.data import toy as toy_mod
from calib.data.toy import WATERBIRDS_GROUP_SIZES, render_scene
from tests.fixtures import HEADER, ROWS, write_waterbirds_fixture


def test_waterbirds_reader_on_fixture(tmp_path):
    ds = load_waterbirds(write_waterbirds_fixture(tmp_path / "wb", ROWS))
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [2, 1, 2]
    tr = ds.splits["train"]
    assert tr.g.tolist() == [3, 2]  # g = 2*y + place
    assert tr.ids.tolist() == [1, 2]
    assert ds.splits["test"].g.tolist() == [1, 0]
    assert tr.paths[0].is_file()
    assert ds.class_names == ["landbird", "waterbird"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda root: (root / "metadata.csv").unlink(), "metadata.csv is missing"),
        (lambda root: (root / "metadata.csv").write_text("img_id,img_filename,y,split\n1,a.jpg,0,0\n"), "lacks column"),
        (
            lambda root: (root / "metadata.csv").write_text(
                (root / "metadata.csv").read_text().replace(",1,0,1,", ",1,0,7,", 1)
            ),
            "'place' has value",
        ),
        (
            lambda root: (root / "metadata.csv").write_text(
                (root / "metadata.csv").read_text().replace(",0,2,0,", ",0,3,0,", 1)
            ),
            "'split' has value",
        ),
        (lambda root: next(root.glob("011.*/*.jpg")).unlink(), "absent"),
    ],
)
def test_waterbirds_bad_layouts(tmp_path, mutate, message):
    root = write_waterbirds_fixture(tmp_path / "wb", ROWS)
    mutate(root)
    with pytest.raises(DatasetLayoutError, match=message) as err:
        load_waterbirds(root)
    assert "metadata.csv with columns" in str(err.value)  # names the expected layout
    assert "waterbird_complete95_forest2water2" in str(err.value)  # and where the data comes from


def test_missing_root(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_waterbirds(tmp_path / "nowhere")


def test_render_is_deterministic_and_varied():
    a, sa = render_scene(np.random.default_rng([0, 5]), 1, 1)
    b, sb = render_scene(np.random.default_rng([0, 5]), 1, 1)
    c, _ = render_scene(np.random.default_rng([0, 6]), 1, 1)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)


def test_foreground_mask_is_the_painted_bird(toy_quick):
    """The mask re-rendered from (seed, img_id) marks exactly the pixels the glyph changed, and the image
    rendered with it is the image on disk (up to JPEG)."""
    from PIL import Image

    from calib.data.toy import _background, foreground_masks, render_scene_with_mask

    img, style, mask = render_scene_with_mask(np.random.default_rng([0, 5]), 1, 1)
    plain, _ = render_scene(np.random.default_rng([0, 5]), 1, 1)
    assert np.array_equal(img, plain) and mask.dtype == bool and mask.shape == (64, 64)
    background, _ = _background(np.random.default_rng([0, 5]), 1, 64)
    rng = np.random.default_rng([0, 5])
    _background(rng, 1, 64)
    painted = background.copy()
    from calib.data.toy import _draw_bird

    drawn = _draw_bird(rng, painted, 1)
    changed = np.any(painted != background, axis=-1)
    assert np.array_equal(drawn, mask) and changed[~mask].sum() == 0
    assert 0.01 < mask.mean() < 0.15  # a few percent of the image, as the module says

    test = toy_quick.splits["test"]
    masks = foreground_masks(toy_quick.root, test.ids[:4])
    assert masks.shape == (4, 64, 64) and masks.any(axis=(1, 2)).all()
    for k in range(4):
        on_disk = np.asarray(Image.open(test.paths[k]).convert("RGB"), dtype=np.float32)
        rng = np.random.default_rng([0, int(test.ids[k])])
        rendered, _, m = render_scene_with_mask(rng, int(test.y[k]), int(test.a[k]), 64)
        other, _, _ = render_scene_with_mask(np.random.default_rng([0, int(test.ids[k]) + 1]), 0, 0, 64)
        # JPEG (quality 95) smooths the sensor noise (sd 8): about 6.5 grey levels; another scene: tens
        assert np.abs(on_disk - rendered).mean() < 8 < 2 * 8 < np.abs(on_disk - other).mean()
        assert np.array_equal(m, masks[k])
    with pytest.raises(KeyError, match="not in"):
        foreground_masks(toy_quick.root, [10**7])


def test_backgrounds_differ_in_colour():
    """Water scenes are bluer than land scenes on average: the spurious feature is visible."""
    blue = {
        p: np.mean(
            [
                render_scene(np.random.default_rng([1, i]), 0, p)[0][..., 2].mean()
                - render_scene(np.random.default_rng([1, i]), 0, p)[0][..., 1].mean()
                for i in range(20)
            ]
        )
        for p in (0, 1)
    }
    assert blue[1] > blue[0] + 20


def test_toy_written_in_waterbirds_layout(toy_quick):
    root = toy_quick.root
    df = pd.read_csv(root / "metadata.csv")
    assert list(df.columns) == HEADER.split(",")
    sizes = ToyConfig(scale=0.04).group_sizes()
    assert toy_quick.group_counts() == sizes
    tr = toy_quick.splits["train"]
    corr = np.mean(tr.y == tr.a)
    full = WATERBIRDS_GROUP_SIZES["train"]
    assert corr == pytest.approx((full[0] + full[3]) / sum(full), abs=0.02)  # 95% correlated
    # val/test background-balanced within each class
    for s in ("val", "test"):
        c = toy_quick.group_counts()[s]
        assert abs(c[0] - c[1]) <= 1 and abs(c[2] - c[3]) <= 1
    first = root / df["img_filename"].iloc[0]
    with Image.open(first) as im:
        assert im.format == "JPEG" and im.size == (64, 64)


def test_toy_reuse_and_mismatch(tmp_path):
    cfg = ToyConfig(scale=0.002)
    root = make_toy_waterbirds(tmp_path / "toy", cfg)
    stamp = (root / "metadata.csv").stat().st_mtime_ns
    make_toy_waterbirds(root, cfg)  # reused, not rewritten
    assert (root / "metadata.csv").stat().st_mtime_ns == stamp
    with pytest.raises(DatasetLayoutError, match="made with"):
        make_toy_waterbirds(root, ToyConfig(scale=0.002, seed=1))
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match="not a toy benchmark"):
        make_toy_waterbirds(other, cfg)


def test_toy_same_seed_same_bytes(tmp_path):
    cfg = ToyConfig(scale=0.002)
    a = make_toy_waterbirds(tmp_path / "a", cfg)
    b = make_toy_waterbirds(tmp_path / "b", cfg)
    assert (a / "metadata.csv").read_bytes() == (b / "metadata.csv").read_bytes()
    f = pd.read_csv(a / "metadata.csv")["img_filename"].iloc[3]
    assert (a / f).read_bytes() == (b / f).read_bytes()


def test_interrupted_toy_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = toy_mod.render_scene

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(toy_mod, "render_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_toy_waterbirds(tmp_path / "toy", ToyConfig(scale=0.002))
    assert not (tmp_path / "toy").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "calib", *args], capture_output=True, text=True, timeout=300)


def test_cli_make_toy_and_check(tmp_path):
    root = tmp_path / "toy"
    r = _cli("data", "make-toy", "--root", str(root), "--scale", "0.002")
    assert r.returncode == 0, r.stderr
    r = _cli("data", "check", "--dataset", "waterbirds", "--root", str(root), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = ToyConfig(scale=0.002).group_sizes()
    assert {s: list(v["groups"].values()) for s, v in out["splits"].items()} == expected
    r = _cli("data", "check", "--dataset", "waterbirds", "--root", str(root))
    assert r.returncode == 0 and "waterbird/land" in r.stdout and "layout OK" in r.stdout


def test_cli_check_reports_bad_layout(tmp_path):
    root = write_waterbirds_fixture(tmp_path / "wb", ROWS)
    next(root.glob("002.*/*.jpg")).unlink()
    r = _cli("data", "check", "--dataset", "waterbirds", "--root", str(root))
    assert r.returncode == 2
    assert "absent" in r.stderr and "Laysan_Albatross_0002_1027.jpg" in r.stderr
    r = _cli("data", "check", "--dataset", "imagenet", "--root", str(root))
    assert r.returncode == 2 and "unknown dataset" in r.stderr
