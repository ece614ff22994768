"""One small interface and one registry for every method.

A method is a class with

- ``name``: its registry key;
- ``Options``: a dataclass of typed, documented options whose defaults are the paper's settings;
- ``label_needs``: which group labels it reads: ``"none"``, ``"val_groups"`` (validation group
  labels, e.g. for model selection or DFR) or ``"train_groups"`` (an oracle);
- ``uses``: what it needs (``"z"`` final embeddings, ``"h"`` pre-projection features,
  ``"text"`` the zero-shot head's class prototypes, ``"prompts"`` the text embeddings of the dataset's prompt
  file (:class:`calib.clip.prompts.PromptBank`), ``"train"`` the training split);
- ``names_spurious``: whether its prompts name the spurious attribute (marked ``§`` in tables);
- ``fit(data, seed)`` and ``logits(split) -> [n, C]``.

:func:`run_method` fits a registered method and evaluates it on every split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
import os
import time
import types
import typing
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from calib.clip.features import FeatureSet, SplitFeatures
from calib.core.checks import check_labels, check_norms
from calib.core.metrics import evaluate
from calib.core.runtime import seed_everything

log = logging.getLogger(__name__)

LABEL_NEEDS = ("none", "val_groups", "train_groups")
LABEL_MARKS = {"none": "", "val_groups": "†", "train_groups": "‡"}
# a method told the spurious attribute in words (its prompts name it) reads something no label-free method reads
SPURIOUS_MARK = "§"
LABEL_LEGEND = (
    "† uses validation group labels; ‡ uses training group labels (oracle); unmarked: no group labels; "
    "§ names the spurious attribute in words (prompts)."
)

REGISTRY: dict[str, type[Method]] = {}


@dataclass
class NoOptions:
    """This method has no options."""


SUBSAMPLE_SEED = 0  # the test subsample of a per-image method (max_images) is the same for every run seed


@dataclass
class RunContext:
    """What a method that works on images (``uses`` "images" / "clip", e.g. TPT) gets beside the features:
    the dataset (its image files) and the loaded CLIP model."""

    dataset: Any  # calib.data.GroupDataset
    clip: Any  # calib.clip.models.LoadedClip

    def paths_of(self, ids: np.ndarray) -> list:
        """The image files of the samples with these ids (the test split's table first)."""
        tables = sorted(self.dataset.splits.items(), key=lambda kv: kv[0] != "test")
        for _, table in tables:
            lookup = dict(zip(table.ids.tolist(), table.paths))
            if all(int(i) in lookup for i in ids):
                return [lookup[int(i)] for i in ids]
        raise ValueError(f"{self.dataset.name}: no split holds all of these {len(ids)} image ids")


class Method:
    """Base class: subclasses set ``name``, ``Options``, ``label_needs``, ``uses`` and implement fit/logits."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    label_needs: ClassVar[str] = "none"
    uses: ClassVar[tuple[str, ...]] = ("z",)
    summary: ClassVar[str] = ""
    # told the spurious attribute in words (e.g. "a water background"): marked SPURIOUS_MARK in every table
    names_spurious: ClassVar[bool] = False
    # settings shown as separate table rows (label -> option overrides), e.g. UMFC's two modes
    table_variants: ClassVar[dict[str, dict[str, Any]]] = {}
    # splits evaluated by default (None: all); per-image methods (TPT) evaluate the test split only
    eval_splits: ClassVar[tuple[str, ...] | None] = None
    context: RunContext | None = None  # set by run_method for methods that use "images" / "clip"

    @classmethod
    def needs_images(cls) -> bool:
        """Whether it works on the images with the CLIP model (TPT) rather than on cached features alone."""
        return bool({"images", "clip"} & set(cls.uses))

    @classmethod
    def row_label(cls, options: dict[str, Any]) -> str:
        """The method's name in tables for a row with these ``options`` (its setting, where it has several)."""
        return cls.name

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        self.history: list[dict] = []  # per-epoch diagnostics for trainable methods

    def required_labels(self) -> str:
        """Group labels this configured instance reads (may depend on options, e.g. selection)."""
        return self.label_needs

    @classmethod
    def lane_key(cls, options: Any) -> Hashable | None:
        """Runs whose options give the same key can be fitted together by :meth:`fit_lanes` (one pass,
        several seeds or settings); ``None``: this method fits one run at a time."""
        return None

    @classmethod
    def lane_memory(cls, data: FeatureSet, options: Any) -> tuple[str, int, int] | None:
        """``(device, bytes shared by a pass, bytes per lane)``: an upper-bound estimate of the memory a pass of
        lanes holds on its device (:func:`split_passes` splits a pass that would not fit); ``None``: not estimated,
        never split."""
        return None

    @classmethod
    def fit_lanes(cls, methods: list[Method], data: FeatureSet, seeds: list[int]) -> None:
        """Fit configured instances ``methods[i]`` with ``seeds[i]``; each ends exactly as its own ``fit``
        would leave it.  The default fits them one after another."""
        for method, seed in zip(methods, seeds):
            method.fit(data, seed)

    def fit(self, data: FeatureSet, seed: int) -> None:
        raise NotImplementedError

    def logits(self, split: SplitFeatures) -> np.ndarray:
        """Class scores ``[n, C]`` for a split's samples."""
        raise NotImplementedError


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to :data:`REGISTRY` under ``cls.name``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    if cls.label_needs not in LABEL_NEEDS:
        raise ValueError(f"{cls.name}: label_needs must be one of {LABEL_NEEDS}")
    REGISTRY[cls.name] = cls
    return cls


def method_mark(name: str, label_needs: str) -> str:
    """The marks a table puts after method ``name`` whose run read ``label_needs``: ``†``/``‡`` for group labels
    (:data:`LABEL_MARKS`), then ``§`` when the method names the spurious attribute in words."""
    cls = REGISTRY.get(name)
    return LABEL_MARKS.get(label_needs, "") + (SPURIOUS_MARK if cls is not None and cls.names_spurious else "")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_NUMBERS = {int: (int, np.integer), float: (int, float, np.integer, np.floating)}  # declared -> accepted


def coerce_option(hint: Any, value: Any) -> Any:
    """``value`` as the declared type ``hint`` (int, float, bool, str, ``X | None``, ``tuple[X, ...]``).

    Strings (from ``--option KEY=VALUE``) are parsed; other values must already fit.  Raises ``TypeError``.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce_option(arg, value)
            except TypeError:
                pass
        raise TypeError(value)
    if hint in (tuple, list) or origin in (tuple, list):
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip().startswith("[") else value.split(",")
            except json.JSONDecodeError as err:
                raise TypeError(value) from err
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        item = args[0] if args else Any
        return tuple(coerce_option(item, v) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise TypeError(value)
    if hint in _NUMBERS:  # int or float: a string is parsed, a number must be of an accepted kind (never bool)
        if isinstance(value, str):
            try:
                return hint(value)
            except ValueError as err:
                raise TypeError(value) from err
        if isinstance(value, bool) or not isinstance(value, _NUMBERS[hint]):
            raise TypeError(value)
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value


def option(
    default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> Any:
    """A field of an ``Options`` dataclass with ``default`` and the range its values must lie in (a tuple option:
    each item).  ``ge``/``gt``: lower bound (inclusive / exclusive); ``le``/``lt``: upper bound.  The range lives in
    the field's metadata, so it changes neither the options' values nor their hash (``dataclasses.asdict``)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if ("ge" in bounds and "gt" in bounds) or ("le" in bounds and "lt" in bounds):
        raise ValueError(f"give one lower and one upper bound at most, got {bounds}")
    if isinstance(default, (list, dict, set)):
        raise TypeError("a mutable default needs default_factory; use a tuple")
    return dataclasses.field(default=default, metadata={"range": bounds} if bounds else {})


def describe_range(bounds: dict[str, float]) -> str:
    """``{"ge": 0, "lt": 1}`` -> ``"in [0, 1)"``; ``{"ge": 1}`` -> ``">= 1"``; ``{}`` -> ``""``."""
    low = next(((k, v) for k, v in bounds.items() if k in ("ge", "gt")), None)
    high = next(((k, v) for k, v in bounds.items() if k in ("le", "lt")), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == 'le' else ')'}"
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{symbols[pair[0]]} {pair[1]:g}" for pair in (low, high) if pair)


_COMPARE = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def in_range(value: Any, bounds: dict[str, float]) -> bool:
    """Whether ``value`` (a number, ``None`` or a tuple of numbers) lies in ``bounds``; ``None`` always does
    (it means "not set"), NaN never does (every comparison with it is false)."""
    if value is None:
        return True
    if isinstance(value, (tuple, list)):
        return all(in_range(v, bounds) for v in value)
    return all(_COMPARE[k](value, b) for k, b in bounds.items())


def option_ranges(options_cls: type) -> dict[str, dict[str, float]]:
    """``{option: bounds}`` of the options of ``options_cls`` that declare a range (see :func:`option`)."""
    return {f.name: dict(f.metadata["range"]) for f in fields(options_cls) if f.metadata.get("range")}


def check_option_ranges(name: str, options: Any) -> None:
    """Raise ``ValueError`` naming the option, its range and the value when an option of method ``name`` lies
    outside its declared range: caught here, before any fitting, instead of deep inside a method."""
    for key, bounds in option_ranges(type(options)).items():
        value = getattr(options, key)
        if not in_range(value, bounds):
            each = " (each item)" if isinstance(value, (tuple, list)) else ""
            raise ValueError(f"option {key!r} of method {name!r} must be {describe_range(bounds)}{each}, got {value!r}")


def make_options(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The ``Options`` of method ``name`` with ``overrides`` applied.

    Unknown keys are an error; each value is converted to the option's declared type (strings such as
    ``"3"`` or ``"true"`` from the command line are parsed), and a value that does not fit names the option
    and the type it expects; a value outside the option's declared range (:func:`option`) names the range.
    """
    cls = get_method_class(name)
    overrides = dict(overrides or {})
    known = {f.name for f in fields(cls.Options)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options: {sorted(known)}")
    hints = typing.get_type_hints(cls.Options)
    for key, value in overrides.items():
        try:
            overrides[key] = coerce_option(hints.get(key, Any), value)
        except TypeError:
            raise ValueError(
                f"option {key!r} of method {name!r} expects {_type_name(hints[key])}, got {value!r}"
            ) from None
    options = cls.Options(**overrides)
    check_option_ranges(name, options)
    return options


def get_method_class(name: str) -> type[Method]:
    """The registered class for ``name``; the error lists every known method."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(REGISTRY)}")
    return REGISTRY[name]


def create(name: str, **overrides: Any) -> Method:
    """An instance of method ``name`` with option ``overrides``."""
    return get_method_class(name)(make_options(name, overrides))


def describe_methods() -> list[dict[str, Any]]:
    """Name, label needs (with default options), used arrays, summary and options of every method.

    ``options``: ``{option: default}``; ``option_specs``: ``{option: {"default", "type", "range"}}`` with the
    declared type (``"int"``, ``"tuple[float, ...]"``) and range (``">= 1"``, ``"in [0, 1)"``, ``""``: any).
    """
    out = []
    for name, cls in sorted(REGISTRY.items()):
        hints = typing.get_type_hints(cls.Options)
        ranges = option_ranges(cls.Options)
        opts = {f.name: f.default if f.default is not dataclasses.MISSING else None for f in fields(cls.Options)}
        specs = {
            k: {"default": v, "type": _type_name(hints.get(k, Any)), "range": describe_range(ranges.get(k, {}))}
            for k, v in opts.items()
        }
        needs = cls(cls.Options()).required_labels()
        out.append(
            {
                "name": name,
                "label_needs": needs,
                "mark": method_mark(name, needs),
                "names_spurious": cls.names_spurious,
                "uses": list(cls.uses),
                "summary": cls.summary,
                "options": opts,
                "option_specs": specs,
            }
        )
    return out


@dataclass
class MethodRun:
    """What :func:`run_method` returns: metrics per split, predictions, options, timing."""

    method: str
    seed: int
    options: dict[str, Any]
    label_needs: str
    metrics: dict[str, dict]  # split -> Evaluation.as_dict()
    predictions: dict[str, np.ndarray]  # split -> [n] predicted class
    seconds: float
    history: list[dict]
    instance: Method
    lanes: int = 1  # runs fitted together in its pass (seconds is the pass's time / lanes)
    partial: dict | None = None  # split -> classes / groups it lacks, when a partial evaluation was allowed


def check_feature_set(data: FeatureSet, allow_partial: bool = False) -> dict[str, dict[str, list[int]]]:
    """Check a feature set where it enters a method: no empty split, every class and group of the training
    split in the others (unless ``allow_partial``: then returned per split), labels within the training split's,
    no feature row 1000x its split's median norm (:mod:`calib.core.checks`)."""
    source = data.meta.get("source") or f"features of {data.meta.get('dataset', '?')} / {data.meta.get('model', '?')}"
    partial = check_labels(
        {s: (f.y, f.g) for s, f in data.splits.items()},
        source,
        data.class_names,
        data.group_names,
        allow_partial=allow_partial,
    )
    check_norms({f"{s} {k}": getattr(f, k) for s, f in data.splits.items() for k in ("z", "h")}, source)
    return partial


def check_inputs(name: str, uses: tuple[str, ...], data: FeatureSet) -> None:
    """Raise a clear error when ``data`` lacks something method ``name`` uses, or holds NaN / infinity."""
    from calib.clip.features import check_finite

    check_finite(
        data.splits,
        data.meta.get("source") or f"features of {data.meta.get('dataset', '?')} / {data.meta.get('model', '?')}",
        data.text,
    )
    if "h" in uses and any(s.h is None for s in data.splits.values()):
        raise ValueError(
            f"method {name!r} trains the image projection and needs pre-projection features (h); "
            "these features only hold final embeddings (e.g. an embeddings npz)"
        )
    if "text" in uses and data.text is None:
        raise ValueError(
            f"method {name!r} uses CLIP's zero-shot head (text prototypes), which these features "
            "do not have (e.g. an embeddings npz)"
        )
    if "prompts" in uses and data.prompts is None:
        raise ValueError(
            f"method {name!r} reads the text embeddings of the dataset's prompt file (calib/data/prompts/), which "
            "these features do not have (an embeddings npz, or a dataset without a prompt file)"
        )
    if "train" in uses and "train" not in data.splits:
        raise ValueError(f"method {name!r} needs a training split; the features have {sorted(data.splits)}")


def run_method(
    name: str,
    data: FeatureSet,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    splits: tuple[str, ...] | None = None,
    context: RunContext | None = None,
    allow_partial: bool = False,
) -> MethodRun:
    """Fit method ``name`` on ``data`` with ``seed`` and evaluate it on ``splits`` (default: the method's
    ``eval_splits``, else all present).  Methods that work on images need ``context`` (dataset and model); a
    positive ``max_images`` option evaluates a seeded subsample of that many test samples (:data:`SUBSAMPLE_SEED`:
    the same images for every run seed, so seeds differ only in the method's own randomness and compare on one
    sample).  ``allow_partial``: see :func:`run_methods`."""
    return run_methods(name, data, [seed], [options], splits, context, allow_partial=allow_partial)[0]


def run_methods(
    name: str,
    data: FeatureSet,
    seeds: list[int],
    options: list[dict[str, Any] | None] | None = None,
    splits: tuple[str, ...] | None = None,
    context: RunContext | None = None,
    on_pass: Callable[[dict[int, MethodRun]], None] | None = None,
    allow_partial: bool = False,
) -> list[MethodRun]:
    """:func:`run_method` for each ``(seeds[i], options[i])``; runs whose options share a
    :meth:`Method.lane_key` are fitted together in one pass (lanes), each with the numbers of its own run.
    A run's ``seconds`` is its pass's time divided by the pass's lanes.  A run fitted alone first seeds the
    global generators (Python, NumPy, torch) with its seed.  ``on_pass`` is called after each pass with
    ``{i: run}`` of the runs it finished (:func:`calib.experiments.runner.run_experiment` saves their rows there,
    so an interruption loses at most the pass in progress).  ``data`` is checked first
    (:func:`check_feature_set`); ``allow_partial`` lets a split lack a class or group, recorded in each run."""
    partial = check_feature_set(data, allow_partial)
    options = list(options) if options is not None else [None] * len(seeds)
    if len(options) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(options)} option sets")
    cls = get_method_class(name)
    methods = [cls(make_options(name, o)) for o in options]
    inputs = []
    for method in methods:
        run_data = data
        if method.needs_images():
            if context is None:
                raise ValueError(
                    f"method {name!r} works on the images with the CLIP model itself, not on cached features: "
                    "pass context=RunContext(dataset, loaded_clip) to run_method (or run_experiment)"
                )
            method.context = context
            if getattr(method.options, "max_images", 0):
                from calib.clip.features import subsample

                run_data = subsample(data, "test", method.options.max_images, SUBSAMPLE_SEED)
        check_inputs(name, method.uses, run_data)
        inputs.append(run_data)
    passes: dict[Any, list[int]] = {}
    for i, method in enumerate(methods):
        key = cls.lane_key(method.options)
        passes.setdefault(("alone", i) if key is None or inputs[i] is not data else key, []).append(i)
    out: list[MethodRun | None] = [None] * len(seeds)
    for members in (part for group in passes.values() for part in split_passes(cls, data, methods, group)):
        t0 = time.perf_counter()
        if len(members) == 1:  # alone: global generators seeded too, for methods that draw from them
            seed_everything(seeds[members[0]])
            methods[members[0]].fit(inputs[members[0]], seeds[members[0]])
        else:
            cls.fit_lanes([methods[i] for i in members], data, [seeds[i] for i in members])
        seconds = (time.perf_counter() - t0) / len(members)
        for i in members:
            out[i] = evaluate_instance(methods[i], inputs[i], seeds[i], seconds, splits or methods[i].eval_splits)
            out[i].lanes = len(members)
            out[i].partial = partial or None
        if on_pass is not None:
            on_pass({i: out[i] for i in members})
    return out


# headroom over the estimate (autograd's transient buffers, the allocator's fragmentation)
MEMORY_MARGIN = 1.5


def memory_budget(device: str) -> int | None:
    """Bytes a pass may hold on ``device``: ``CALIB_LANE_MEMORY_GIB`` when set, else 80 % of the GPU's free memory,
    or half of the host's available memory on a CPU; ``None`` when unknown."""
    env = os.environ.get("CALIB_LANE_MEMORY_GIB")
    if env:
        return int(float(env) * 2**30)
    if device.startswith("cuda"):
        import torch

        return int(0.8 * torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return None


def split_passes(cls: type[Method], data: FeatureSet, methods: list[Method], members: list[int]) -> list[list[int]]:
    """``members`` (indices into ``methods``, one pass of lanes) as consecutive passes that each fit the device's
    :func:`memory_budget` by :meth:`Method.lane_memory` (with :data:`MEMORY_MARGIN`); one pass when they all fit.
    Lanes are independent, so a split changes the time, not the numbers (``tests/test_lanes.py``)."""
    if len(members) < 2:
        return [members]
    estimate = cls.lane_memory(data, methods[members[0]].options)
    if estimate is None:
        return [members]
    device, shared, per_lane = estimate
    budget = memory_budget(device)
    need = MEMORY_MARGIN * (shared + per_lane * len(members))
    if budget is None or need <= budget:
        return [members]
    fit = max(1, int((budget / MEMORY_MARGIN - shared) // max(per_lane, 1)))
    parts = [members[i : i + fit] for i in range(0, len(members), fit)]
    log.warning(
        "%s: %d lanes need about %.1f GiB on %s, %.1f GiB available: split into %d passes of at most %d lanes",
        cls.name,
        len(members),
        need / 2**30,
        device,
        budget / 2**30,
        len(parts),
        fit,
    )
    return parts


def evaluate_instance(
    method: Method, data: FeatureSet, seed: int, seconds: float, splits: tuple[str, ...] | None = None
) -> MethodRun:
    """Metrics of a fitted method on ``splits`` (default: all present)."""
    name = method.name
    metrics, preds = {}, {}
    for split in splits or tuple(data.splits):
        feats = data.splits[split]
        pred = method.logits(feats).argmax(1)
        preds[split] = pred
        metrics[split] = evaluate(
            pred, feats.y, feats.g, data.n_groups, data.n_classes, data.train_group_counts
        ).as_dict()
    log.info(
        "%s seed %d: test WGA %.3f, avg %.3f (%.1f s)",
        name,
        seed,
        metrics.get("test", {}).get("wga", np.nan),
        metrics.get("test", {}).get("avg_acc", np.nan),
        seconds,
    )
    return MethodRun(
        method=name,
        seed=seed,
        options=dataclasses.asdict(method.options),
        label_needs=method.required_labels(),
        metrics=metrics,
        predictions=preds,
        seconds=seconds,
        history=method.history,
        instance=method,
    )
