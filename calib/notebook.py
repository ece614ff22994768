"""What every notebook's first calib cell calls: logging, figure style, device report."""
from __future__ import annotations

import logging
import sys

from calib.utils import default_device, setup_logging

log = logging.getLogger(__name__)

GITHUB_REPO = "calib-org/calib"  # <owner>/<repo> used by the Colab badges and the bootstrap cell


def in_colab() -> bool:
    """True inside a Google Colab kernel."""
    return "google.colab" in sys.modules


def setup(level: int = logging.INFO) -> str:
    """Configure logging and calib's figure style; return the device ("cuda" or "cpu").

    In Colab without a GPU it warns that feature extraction for real backbones will be slow.
    """
    from calib.plots import use_style

    setup_logging(level)
    use_style()
    device = default_device()
    if device == "cpu" and in_colab():
        log.warning("No GPU attached: Runtime > Change runtime type > GPU. The toy benchmark runs on CPU; "
                    "real CLIP backbones will be slow.")
    log.info("calib on %s", device)
    return device
