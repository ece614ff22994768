"""calib: reproducible CLIP group-robustness experiments (CFR, CVPR 2024) on cached features.

The package holds all logic; notebooks are thin drivers.  Main entry points:

- :mod:`calib.data`      datasets (Waterbirds layout, the built-in toy benchmark)
- :mod:`calib.models`    loading open_clip models (pretrained tags, files, ``local-dir:``, toy CLIP)
- :mod:`calib.features`  pre-projection feature extraction and the feature cache
- :mod:`calib.methods`   one interface and one registry of methods
- :mod:`calib.metrics`   worst-group accuracy and friends
- :mod:`calib.results`   append-only JSONL result rows and tables
- :mod:`calib.experiment` the end-to-end pipeline the notebooks call
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
