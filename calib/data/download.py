"""Downloading datasets that have a public, registration-free source (Waterbirds).

``python -m calib data download --dataset waterbirds --root DIR [--source URL|FILE] [--sha256 HEX]``

- resumable: bytes go to ``<DIR>.part`` and an interrupted transfer continues from its length
  (HTTP ``Range``; local files by offset);
- checksum-verified: against ``--sha256`` (or the source's known checksum); the sha256 seen is
  printed and recorded in ``<DIR>/.calib_download.json`` so later copies can be checked against it;
- extracted atomically: into a temporary sibling folder, validated with the dataset's own loader
  (and, for the official source, Waterbirds' exact group sizes), then renamed to ``DIR``.

Datasets that need registration or a build step (CelebA, CheXpert, MetaShift) are not downloaded:
the error says what to get and where to put it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from calib.data import LOADERS, DatasetLayoutError
from calib.data.toy import WATERBIRDS_GROUP_SIZES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    url: str
    sha256: str | None  # None: no published checksum known to calib; pass --sha256 to verify
    group_sizes: dict | None = None  # exact per-split group sizes of the official release


SOURCES = {
    "waterbirds": Source(
        url="https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz",
        sha256=None,
        group_sizes={s: list(v) for s, v in WATERBIRDS_GROUP_SIZES.items()},
    ),
}
MANUAL = {
    "celeba": "CelebA needs a manual download (Google Drive or Kaggle, with their terms): see "
    "`python -m calib data check --dataset celeba` for the layout.",
    "chexpert": "CheXpert requires registration at https://stanfordaimi.azurewebsites.net/ (CheXpert-v1.0-small and "
    "the CHEXPERT DEMO table); put them in one folder and pass it as --root.",
    "chexpert-sex": "CheXpert requires registration at https://stanfordaimi.azurewebsites.net/.",
    "metashift": "MetaShift-Cat-Dog-indoor-outdoor is built with the MetaShift repository's dataset_generation "
    "script (or taken from SubpopBench's data); put its train/ and test/ folders under --root.",
}


class DownloadError(RuntimeError):
    """The transfer, the checksum or the extracted content failed; nothing was left at the target."""


def _fetch(source: str, part: Path, chunk: int = 1 << 20) -> None:
    """Append the bytes of ``source`` not yet in ``part`` (resume by offset)."""
    have = part.stat().st_size if part.exists() else 0
    local = Path(source[7:] if source.startswith("file://") else source)
    if local.is_file():
        total = local.stat().st_size
        if have > total:
            part.unlink()
            have = 0
        with open(local, "rb") as src, open(part, "ab") as dst:
            src.seek(have)
            shutil.copyfileobj(src, dst, chunk)
        return
    if "://" not in source:
        raise DownloadError(f"source {source} is neither a file nor a URL")
    req = urllib.request.Request(source, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp, open(part, "ab" if resp.status == 206 else "wb") as dst:
            shutil.copyfileobj(resp, dst, chunk)
    except OSError as err:
        raise DownloadError(
            f"download of {source} failed ({err}); run the command again to resume "
            f"from {part.stat().st_size if part.exists() else 0} bytes"
        ) from err


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(name: str, root: Path, source: str | None = None, sha256: str | None = None) -> Path:
    """Download and extract dataset ``name`` into ``root`` (see the module docstring)."""
    root = Path(root).resolve()
    if name in MANUAL:
        raise DatasetLayoutError(MANUAL[name])
    if name not in SOURCES:
        raise ValueError(f"no download for dataset {name!r}; downloadable: {sorted(SOURCES)}")
    if root.exists() and any(root.iterdir()):
        raise DownloadError(f"{root} exists and is not empty; remove it or choose another --root")
    spec = SOURCES[name]
    official = source is None
    want = (sha256 or spec.sha256 or "").lower() or None
    part = root.with_name(root.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    _fetch(source or spec.url, part)
    seen = sha256_of(part)
    if want and seen != want:
        part.unlink()
        raise DownloadError(f"sha256 mismatch for {name}: expected {want}, got {seen}; the partial file was removed")
    if not want:
        log.warning("no published checksum for %s: sha256 of the downloaded archive is %s", name, seen)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.extract-", dir=root.parent))
    try:
        try:
            with tarfile.open(part) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DownloadError(f"{part} is not a complete archive ({err}); delete it and download again") from err
        tops = [p for p in tmp.iterdir() if p.is_dir()]
        content = tops[0] if len(tops) == 1 and not (tmp / "metadata.csv").exists() else tmp
        ds = LOADERS[name](content, check_files=True)  # the real loader validates the layout
        if official and spec.group_sizes and ds.group_counts() != spec.group_sizes:
            raise DownloadError(f"the archive's group sizes {ds.group_counts()} differ from the official release")
        (content / ".calib_download.json").write_text(json.dumps({"source": source or spec.url, "sha256": seen}))
        if root.exists():
            root.rmdir()
        content.replace(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    part.unlink()
    log.info("%s ready at %s (sha256 %s)", name, root, seen)
    return root
