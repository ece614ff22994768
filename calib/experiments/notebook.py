"""What every notebook's first calib cell calls: parameters, logging, figure style, device report."""

from __future__ import annotations

import ast
import json
import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

from calib.core.logs import setup_logging, use_plain_progress
from calib.core.runtime import default_device

log = logging.getLogger(__name__)


class ParameterError(ValueError):
    """A notebook parameter that cannot be used: names the parameter, its value and what was expected."""


def in_colab() -> bool:
    """True inside a Google Colab kernel."""
    return "google.colab" in sys.modules


DRIVE_ROOT = "/content/drive"
DRIVE_HOME = "/content/drive/MyDrive/calib"  # data, caches, results and figures when colab_drive is on

_CHECKED = ("list", "int", "float", "bool")  # the annotations parse_parameters understands; others pass untouched
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _type_name(annotation: Any) -> str:
    """``list``, ``list[int]``, ``"list"`` (under ``from __future__ import annotations``) -> ``"list"``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    if not isinstance(annotation, str) and getattr(annotation, "__origin__", None) is not None:
        text = getattr(annotation.__origin__, "__name__", text)  # list[int] -> list
    return text.split("[", 1)[0].strip()


def _bad(name: str, value: Any, expected: str) -> ParameterError:
    return ParameterError(f"notebook parameter {name} = {value!r}: expected {expected}")


def _parse_list(name: str, value: Any, allow_empty: bool) -> list:
    given = value  # messages quote what the user passed, not what it parsed to
    if isinstance(value, str):
        # papermill's -p and -r hand over text; -y and the Python API hand over real lists
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise _bad(
                    name,
                    value,
                    f'a list written as JSON or Python, e.g. -p {name} "[0, 1]" or -p {name} \'["a", "b"]\' '
                    f"(quote every string), or -y '{name}: [a, b]'",
                ) from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise _bad(name, given, f'a list, e.g. -p {name} "[{value!r}]" for one item')
    if not value and not allow_empty:
        # only where the notebook gives [] a meaning (setup's allow_empty) may it be empty
        raise _bad(name, given, f"a non-empty list: this notebook gives [] no meaning for {name}")
    return value


def _parse_scalar(name: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, bool):
            return value
        raise _bad(name, value, "True or False")
    if isinstance(value, bool):  # bool is an int subclass, but True epochs is a mistake
        raise _bad(name, value, f"a number ({kind})")
    if isinstance(value, str):
        try:
            value = int(value) if kind == "int" else float(value)
        except ValueError:
            raise _bad(name, value, f"a number ({kind})") from None
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind == "float" and isinstance(value, int):
        value = float(value)  # papermill's -p turns "1" into the int 1
    if not isinstance(value, int if kind == "int" else float):
        raise _bad(name, value, f"a number ({kind})")
    return value


def parse_parameters(namespace: MutableMapping[str, Any], allow_empty: Iterable[str] = ()) -> dict[str, Any]:
    """Check and convert a notebook's parameters in place; return those whose value changed.

    The parameters cell types every parameter (``seeds: list = [0, 1, 2]``), so its annotations are in the
    namespace's ``__annotations__``; papermill's injected cell assigns plain values after it. Each parameter
    annotated ``list``, ``int``, ``float`` or ``bool`` is checked: text (``-p seeds "[0, 1]"``, ``-r epochs 5``) is
    parsed (JSON, then a Python literal) and written back; a value of the wrong type raises :class:`ParameterError`.
    An empty list raises too, unless the parameter is named in ``allow_empty`` (where the notebook gives ``[]`` a
    meaning, e.g. ``ablations: list = []  # [] runs all``).
    """
    allow = set(allow_empty)
    kinds = {name: _type_name(a) for name, a in dict(namespace.get("__annotations__", {})).items()}
    lists = {name for name, kind in kinds.items() if kind == "list"}
    if allow - lists:
        # a typo in a notebook's setup line would silently make its empty default an error or hide one
        raise ValueError(f"allow_empty names {sorted(allow - lists)}, which are not list parameters: {sorted(lists)}")
    changed = {}
    for name, kind in kinds.items():
        if kind not in _CHECKED or name not in namespace:
            continue
        value = namespace[name]
        if kind == "list":
            new = _parse_list(name, value, name in allow)
        else:
            new = _parse_scalar(name, kind, value)
        if new is not value:
            namespace[name] = new
            changed[name] = new
    return changed


def setup(
    colab_drive: bool = False,
    namespace: MutableMapping[str, Any] | None = None,
    *,
    allow_empty: Iterable[str] = (),
    level: int = logging.INFO,
) -> str:
    """Check the notebook's parameters; configure logging (plain stdout lines), text progress bars, calib's figure
    style; return the device.

    Notebooks call ``setup(colab_drive, globals())``: every parameter annotated ``list`` (or ``int``, ``float``,
    ``bool``) in the parameters cell that arrives as text, as papermill's ``-p seeds "[0, 1]"`` passes it, is
    parsed and written back into ``namespace`` (see :func:`parse_parameters`). Rule for empty lists: an empty list
    is an error (:class:`ParameterError`, naming the parameter, its value and what is expected) unless the
    notebook names the parameter in ``allow_empty`` because ``[]`` means something there ("run all", "none of
    these"). Without ``namespace`` nothing is checked.

    In Colab: with ``colab_drive`` mount Google Drive and keep data, caches, results and figures in
    ``MyDrive/calib`` (they survive the runtime); without a GPU, warn that real backbones will be slow.
    """
    import os

    from calib.evaluation.plots import use_style

    # parameters first: a bad one stops the notebook before Drive is mounted or anything is loaded
    parsed = parse_parameters(namespace, allow_empty) if namespace is not None else {}
    if "colab_drive" in parsed:  # the argument was read before parsing: "False" as text would count as on
        colab_drive = parsed["colab_drive"]
    setup_logging(level, notebook=True)
    use_plain_progress()
    use_style()
    for name, value in parsed.items():
        log.info("parameter %s = %r", name, value)
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
