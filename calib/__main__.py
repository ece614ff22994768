"""``python -m calib``: see :mod:`calib.cli`."""

import sys

from calib.cli import main

sys.exit(main())
