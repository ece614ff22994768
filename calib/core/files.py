"""Writing files safely: atomic files and folders, advisory locks, one clear error for a read-only or full disk.

Temporary files and folders are siblings of their target named ``.<name>.tmp-<pid>-<random>``; each is held under
an exclusive ``flock`` by the process writing it, from creation until it is renamed into place.  Whenever calib
makes one it first removes the stale ones in that folder (see :func:`remove_stale_temps` for the rule), so a
killed run leaves nothing behind for long.  What calib writes gets the permissions a plain ``open()`` would give
under the current umask (``mkstemp`` / ``mkdtemp`` alone would leave it private).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# ``.<name>.tmp-<pid>-<8 characters of tempfile's alphabet>``: made by this module, flock-ed while in use
TEMP_PATTERN = re.compile(r"^\..+\.tmp-\d+-[a-z0-9_]{8}$")
# ``.<name>.tmp-<8 characters>``: made by calib before temporaries were locked; such a writer may still be running
LEGACY_TEMP_PATTERN = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}$")
LEGACY_TEMP_AGE_S = 3600.0  # far longer than any build calib makes under one temporary name (minutes at most)
try:
    import fcntl
except ImportError:  # Windows: no flock, so no way to tell a live temporary from a stale one
    fcntl = None  # type: ignore[assignment]
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


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
def locked(path: Path, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<path>.lock`` (POSIX ``flock``; elsewhere no lock, with a debug note).

    ``remove``: delete the ``.lock`` file when done, so building something leaves nothing beside it.  That is safe
    because every taker checks, once it holds the lock, that ``<path>.lock`` is still the file it locked (a holder
    that removes it does so before releasing it); a process that finds it removed locks the new file instead.  Only
    for locks that no calib older than this check takes: the result files' locks (kept) are also taken by those.
    """
    if fcntl is None:
        log.debug("no fcntl: %s written without a lock", path)
        yield
        return
    lock = Path(str(path) + ".lock")
    with writing_to(lock):
        lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with writing_to(lock):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(lock, fd):
            break
        os.close(fd)  # its holder removed it while this process waited: lock the file there now
    try:
        yield
    finally:
        if remove:
            lock.unlink(missing_ok=True)  # before releasing: a waiter on this file sees it gone and retries
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` alone must set it to read it,
    and another thread creating a file in that instant would get the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask (0644 with umask 022)."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder under the current umask (0755 with umask 022)."""
    return 0o777 & ~current_umask()


def _try_flock(fd: int, blocking: bool) -> bool | None:
    """Exclusive ``flock`` on ``fd``: True if held, False if another process holds it, None if the file system
    cannot lock it (some NFS set-ups) or there is no ``fcntl``."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        log.debug("cannot flock a temporary (%s)", err)
        return None


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file or folder open as ``fd`` (not removed or renamed meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` that no live process is writing; return what was removed.

    The rule: a temporary named by this module (``.<name>.tmp-<pid>-<random>``) is locked by its writer from the
    moment it is made until it is renamed into place, and the lock dies with the writer. So one whose lock can be
    taken has no writer: it is left from a killed or crashed run and is removed. One whose lock is held is live and
    kept; so is one whose file system cannot lock it (then there is no way to tell). A temporary of the older
    unlocked naming (``.<name>.tmp-<random>``) may belong to a run of an older calib that is still writing it, so
    it is removed only when it has not changed for :data:`LEGACY_TEMP_AGE_S`. Anything else is never touched.
    """
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if TEMP_PATTERN.match(entry.name):
            is_dir = entry.is_dir(follow_symlinks=False)
            try:
                fd = os.open(path, (os.O_RDONLY | _O_DIRECTORY) if is_dir else os.O_RDWR)
            except OSError:
                continue  # gone (renamed into place meanwhile) or not ours to open
            try:
                # after taking the lock, check the name still points at what was locked: its writer may have
                # renamed it into place between the listing and the lock
                if _try_flock(fd, blocking=False) is not True or not _same_file(path, fd):
                    continue
                _remove(path, is_dir)
                removed.append(path)
            finally:
                os.close(fd)
        elif LEGACY_TEMP_PATTERN.match(entry.name):
            try:
                age = time.time() - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            if age > LEGACY_TEMP_AGE_S:
                _remove(path, entry.is_dir(follow_symlinks=False))
                removed.append(path)
    for path in removed:
        log.info("removed %s, a temporary left by an interrupted run", path)
    return removed


def _remove(path: Path, is_dir: bool) -> None:
    if is_dir:
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _locked_temp(final: Path, is_dir: bool) -> tuple[Path, int | None]:
    """A new temporary sibling of ``final`` (folder or file) and an fd holding its lock, made readable as a plain
    ``mkdir`` / ``open`` would make it (``mkdtemp`` / ``mkstemp`` make it private).

    Between ``mkdtemp`` / ``mkstemp`` and the lock another process's :func:`remove_stale_temps` may take it for
    stale and remove it; the name is checked again once locked, and on such a (rare) loss another is made.
    """
    prefix = f".{final.name}.tmp-{os.getpid()}-"
    while True:
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
            if fcntl is None:  # nothing removes temporaries there (and a folder cannot be opened)
                os.chmod(tmp, default_dir_mode())
                return tmp, None
            try:
                fd = os.open(tmp, os.O_RDONLY | _O_DIRECTORY)
            except FileNotFoundError:
                continue
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
            tmp = Path(name)
        _try_flock(fd, blocking=True)
        if _same_file(tmp, fd):
            os.chmod(tmp, default_dir_mode() if is_dir else default_file_mode())
            return tmp, fd
        os.close(fd)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` only if the block succeeds.

    An interrupted or failed build never leaves a folder at ``final`` that looks complete; stale temporaries of
    earlier runs in the same folder are removed first.  Two processes building the same ``final`` at once should
    hold :func:`locked` around this (the second one then finds the first's result).
    """
    final = Path(final)
    with writing_to(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final.parent)
        tmp, fd = _locked_temp(final, is_dir=True)
    try:
        with writing_to(final):
            yield tmp
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)  # releases the temporary's lock, only once it is renamed or removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename (removing stale temporaries of
    earlier runs in the same folder first)."""
    path = Path(path)
    with writing_to(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        tmp, fd = _locked_temp(path, is_dir=False)
    assert fd is not None  # a file always has its descriptor
    try:
        with writing_to(path):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # the lock is held until the file has its final name
