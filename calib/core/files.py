"""Writing files safely: atomic files and folders, advisory locks, one clear error for a read-only or full disk."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


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
