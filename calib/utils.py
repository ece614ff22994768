"""Small shared helpers: seeding, device choice, hashing, atomic writes, logging set-up."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy's legacy global state and torch; return a fresh ``default_rng(seed)``.

    Code in calib draws from the returned generator (or one derived from it), never from numpy's
    global state; the global seeding only tames third-party code.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    import torch

    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def torch_generator(seed: int, device: str | None = None):
    """A ``torch.Generator`` seeded with ``seed`` (on ``device``, default CPU)."""
    import torch

    gen = torch.Generator(device=device or "cpu")
    gen.manual_seed(seed)
    return gen


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, otherwise ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON of ``obj`` (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_hash(path: Path, length: int = 16) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


class OutputNotWritableError(OSError):
    """An output folder is read-only or its disk is full; the message says which and what to set."""


_WRITE_ERRNOS = {
    errno.EACCES: "is not writable (permission denied)",
    errno.EPERM: "is not writable (operation not permitted)",
    errno.EROFS: "is on a read-only file system",
    errno.ENOSPC: "is on a full disk (no space left)",
    errno.EDQUOT: "is over its disk quota",
}


@contextmanager
def writing_to(path: Path) -> Iterator[None]:
    """Turn a read-only / full-disk ``OSError`` while writing ``path`` into one :class:`OutputNotWritableError`."""
    try:
        yield
    except OutputNotWritableError:
        raise
    except OSError as err:
        why = _WRITE_ERRNOS.get(err.errno)
        if why is None:
            raise
        raise OutputNotWritableError(
            err.errno,
            f"cannot write {path}: its folder {why}. Free space, or point calib elsewhere with CALIB_HOME "
            "(or CALIB_RESULTS_DIR, CALIB_CACHE_DIR, CALIB_FIGURES_DIR, CALIB_DATA_DIR) set to a writable folder",
        ) from None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<path>.lock`` (POSIX ``flock``; elsewhere no lock, with a debug note)."""
    try:
        import fcntl
    except ImportError:  # Windows
        log.debug("no fcntl: %s written without a lock", path)
        yield
        return
    lock = Path(str(path) + ".lock")
    with writing_to(lock):
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` only if the block succeeds.

    An interrupted or failed build never leaves a folder at ``final`` that looks complete.
    """
    final = Path(final)
    with writing_to(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with writing_to(final):
            yield tmp
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    with writing_to(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with writing_to(path), os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_CODE_HASH: str | None = None


def code_hash(length: int = 12) -> str:
    """Hash of calib's own source (every .py, .json, .mplstyle file in the package).

    Stored with every result row: a row is reused only by the code that produced it.
    """
    global _CODE_HASH
    if _CODE_HASH is None:
        from calib.paths import PACKAGE_DIR

        h = hashlib.sha256()
        for f in sorted(PACKAGE_DIR.rglob("*")):
            if f.suffix in (".py", ".json", ".mplstyle") and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(PACKAGE_DIR)).encode())
                h.update(f.read_bytes())
        _CODE_HASH = h.hexdigest()
    return _CODE_HASH[:length]


class _ShortFormatter(logging.Formatter):
    """Notebook lines: the message alone at INFO, ``WARNING: message`` above it."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno <= logging.INFO else f"{record.levelname}: {msg}"


_PLAIN_PROGRESS = False  # set by calib.notebook.setup(): text progress bars on stdout


def setup_logging(level: int = logging.INFO, notebook: bool = False) -> None:
    """Route calib's log records to one handler (the CLI and notebooks call this; calling again replaces it).

    Command line: stderr with time, logger and level.  ``notebook``: a plain stdout stream with the short
    format of :class:`_ShortFormatter` (stderr would show every INFO line as a red box in JupyterLab).
    """
    import sys

    logger = logging.getLogger("calib")
    for h in [h for h in logger.handlers if getattr(h, "_calib", False)]:
        logger.removeHandler(h)
    if notebook:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_ShortFormatter())
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    handler._calib = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False  # libraries call logging.basicConfig; avoid printing every line twice
    logger.setLevel(level)


def use_plain_progress(on: bool = True) -> None:
    """Text progress bars on stdout (notebooks: a saved notebook then shows each bar's final state, where a
    widget bar would be saved at "0%")."""
    global _PLAIN_PROGRESS
    _PLAIN_PROGRESS = on


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm progress bar: the widget or terminal bar, or with :func:`use_plain_progress` a text bar on stdout."""
    import sys

    if _PLAIN_PROGRESS:
        from tqdm.std import tqdm

        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("ascii", True)
        return tqdm(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


@contextmanager
def expected_random_init() -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" where random weights are
    what was asked for (the toy CLIP before training, ``random:N``)."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "initialized randomly" not in record.getMessage()

    root, drop = logging.getLogger(), _Drop()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
