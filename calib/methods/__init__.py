"""Stage 3, methods: every method behind one interface (:class:`~calib.methods.base.Method`) and one registry,
trained on cached features (stages 0-2), seeds and settings as lanes of one pass.

Importing this package registers every method.  ``python -m calib list methods`` prints them.
"""

from __future__ import annotations

from calib.methods import (  # noqa: F401  (registration)
    adapters,
    cfr,
    dfr,
    fairerclip,
    heads,
    ppa,
    projection,
    prompted,
    reweighting,
    tpt,
)
from calib.methods.base import (
    LABEL_LEGEND,
    LABEL_MARKS,
    REGISTRY,
    SPURIOUS_MARK,
    Method,
    MethodRun,
    create,
    describe_methods,
    get_method_class,
    make_options,
    method_mark,
    register,
    run_method,
    run_methods,
)

__all__ = [
    "LABEL_LEGEND",
    "LABEL_MARKS",
    "REGISTRY",
    "SPURIOUS_MARK",
    "Method",
    "MethodRun",
    "create",
    "describe_methods",
    "get_method_class",
    "make_options",
    "method_mark",
    "register",
    "run_method",
    "run_methods",
]
