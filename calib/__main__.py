"""``python -m calib``: see :mod:`calib.experiments.cli`."""

import sys

from calib.experiments.cli import main

sys.exit(main())
