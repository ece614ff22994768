"""data download: resumable, checksum-verified, atomic, tested against a local file source."""

import hashlib
import subprocess
import sys
import tarfile

import pytest

from calib.data import DatasetLayoutError, load_waterbirds
from calib.data.download import DownloadError, download
from tests.fixtures import ROWS, write_waterbirds_fixture


@pytest.fixture
def tarball(tmp_path):
    src = write_waterbirds_fixture(tmp_path / "src" / "waterbird_complete95_forest2water2", ROWS)
    path = tmp_path / "waterbirds.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return path


def test_download_extracts_and_verifies(tarball, tmp_path):
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    root = download("waterbirds", tmp_path / "data" / "waterbirds", source=str(tarball), sha256=sha)
    ds = load_waterbirds(root)
    assert sum(len(t) for t in ds.splits.values()) == 5
    assert (root / ".calib_download.json").is_file()
    assert not list((tmp_path / "data").glob("*.part")) and not list((tmp_path / "data").glob(".*extract*"))


def test_download_resumes_a_partial_file(tarball, tmp_path):
    target = tmp_path / "data" / "waterbirds"
    target.parent.mkdir()
    data = tarball.read_bytes()
    (target.parent / "waterbirds.part").write_bytes(data[: len(data) // 2])  # an interrupted transfer
    download("waterbirds", target, source=f"file://{tarball}", sha256=hashlib.sha256(data).hexdigest())
    assert (target / "metadata.csv").is_file()


def test_wrong_checksum_leaves_nothing(tarball, tmp_path):
    target = tmp_path / "data" / "waterbirds"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download("waterbirds", target, source=str(tarball), sha256="0" * 64)
    assert not target.exists() and not list(target.parent.iterdir())


def test_corrupt_archive_and_bad_layout_leave_nothing(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    target = tmp_path / "data" / "waterbirds"
    with pytest.raises(DownloadError, match="not a complete archive"):
        download("waterbirds", target, source=str(bad))
    assert not target.exists()
    empty = tmp_path / "empty.tar.gz"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "readme.txt").write_text("hi")
    with tarfile.open(empty, "w:gz") as tar:
        tar.add(tmp_path / "x", arcname="x")
    (target.parent / "waterbirds.part").unlink(missing_ok=True)
    with pytest.raises(DatasetLayoutError, match="metadata.csv is missing"):
        download("waterbirds", target, source=str(empty))
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.is_dir()]


def test_registration_datasets_say_what_to_do(tmp_path):
    with pytest.raises(DatasetLayoutError, match="registration"):
        download("chexpert", tmp_path / "c")
    r = subprocess.run(
        [sys.executable, "-m", "calib", "data", "download", "--dataset", "chexpert", "--root", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "stanfordaimi" in r.stderr
