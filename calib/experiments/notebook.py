"""What every notebook's first calib cell calls: logging, figure style, device report."""

from __future__ import annotations

import logging
import sys

from calib.core.logs import setup_logging, use_plain_progress
from calib.core.runtime import default_device

log = logging.getLogger(__name__)


def in_colab() -> bool:
    """True inside a Google Colab kernel."""
    return "google.colab" in sys.modules


DRIVE_ROOT = "/content/drive"
DRIVE_HOME = "/content/drive/MyDrive/calib"  # data, caches, results and figures when colab_drive is on


def setup(colab_drive: bool = False, level: int = logging.INFO) -> str:
    """Configure logging (plain stdout lines), text progress bars, calib's figure style; return the device.

    In Colab: with ``colab_drive`` mount Google Drive and keep data, caches, results and figures in
    ``MyDrive/calib`` (they survive the runtime); without a GPU, warn that real backbones will be slow.
    """
    import os

    from calib.evaluation.plots import use_style

    setup_logging(level, notebook=True)
    use_plain_progress()
    use_style()
    if colab_drive and in_colab():
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount(DRIVE_ROOT)
        os.environ.setdefault("CALIB_HOME", DRIVE_HOME)
        log.info("data, caches and results under %s", os.environ["CALIB_HOME"])
    elif colab_drive:
        log.warning("colab_drive=True outside Colab: ignored")
    device = default_device()
    if device == "cpu" and in_colab():
        log.warning(
            "No GPU attached: Runtime > Change runtime type > GPU. The toy benchmark runs on CPU; "
            "real CLIP backbones will be slow."
        )
    log.info("calib on %s", device)
    return device
