"""calib: reproducible CLIP group-robustness experiments (CFR, CVPR 2024) on cached features.

The package holds all logic; notebooks are thin drivers.  Its folders follow the pipeline, each stage importing
only from the stages before it (``tests/test_layout.py`` checks it):

- :mod:`calib.core`         0  paths, hashing, atomic files, logging, seeds, the metrics
- :mod:`calib.data`         1  dataset readers (Waterbirds, CelebA, MetaShift, CheXpert), the toy benchmark, downloads
- :mod:`calib.clip`         2  open_clip loading, the toy CLIP, prompts, feature extraction and its cache
- :mod:`calib.methods`      3  one interface and one registry of methods
- :mod:`calib.evaluation`   4  result rows, bootstrap statistics, tables, plots
- :mod:`calib.studies`      5  ablations, dynamics, testbed, realism, geometry, attribution, pretraining sources
- :mod:`calib.experiments`  6  the experiment runner, the CLI, the plan, benchmarks, README blocks, notebook support
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
