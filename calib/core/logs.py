"""Logging set-up for the CLI and notebooks, progress bars, and silencing expected library warnings."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _ShortFormatter(logging.Formatter):
    """Notebook lines: the message alone at INFO, ``WARNING: message`` above it."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno <= logging.INFO else f"{record.levelname}: {msg}"


_PLAIN_PROGRESS = False  # set by calib.experiments.notebook.setup(): text progress bars on stdout


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
