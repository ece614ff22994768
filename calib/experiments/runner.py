"""Experiments: methods x variants x seeds on one feature set, written as result rows, resumable.

The notebooks drive the pipeline through it: :func:`calib.clip.features.prepare_features` gives the features
of a dataset under a CLIP model; :func:`run_experiment` runs a :class:`RunSpec` on them and appends one row per
(variant, seed) to ``results/<experiment>.jsonl``; :func:`run_grid` does so over datasets and backbones.
Dataset names: ``"toy"``, ``"toy-quick"`` or any name in :data:`calib.data.LOADERS`
(:func:`calib.data.prepare_dataset`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calib.clip.features import FeatureSet, prepare_features
from calib.clip.models import load_clip
from calib.core.hashing import code_hash, stable_hash
from calib.data import prepare_dataset
from calib.evaluation.results import append_rows, flatten_row, make_row, read_rows, results_path
from calib.methods import MethodRun, make_options, run_methods
from calib.methods.base import SUBSAMPLE_SEED, RunContext, evaluate_instance
from calib.methods.precision import compute_record

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """What :func:`run_experiment` runs: (methods + variants) x seeds.

    ``options`` maps a method to its option overrides; ``variants`` maps a label to
    ``(method, overrides)`` for extra configurations of a method (ablations, protocols).
    Every row records its ``variant`` label (the method name for plain methods); with ``history``
    it also keeps the run's per-epoch history (notebook 06 draws it).
    """

    experiment: str
    methods: list[str]
    seeds: list[int]
    options: dict[str, dict[str, Any]] | None = None
    variants: dict[str, tuple[str, dict[str, Any]]] | None = None
    history: bool = False

    def runs(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``(variant label, method, overrides)`` for every configuration."""
        out = [(m, m, dict((self.options or {}).get(m) or {})) for m in self.methods]
        return out + [(label, m, dict(o)) for label, (m, o) in (self.variants or {}).items()]


def protocol_variants(methods: list[str], options: dict[str, dict] | None = None) -> dict[str, tuple[str, dict]]:
    """Both model-selection protocols for every method that selects an epoch:
    ``<m>`` (``val_wga``, the paper's protocol) and ``<m> [no group labels]`` (``val_worst_class``);
    every setting in a method's ``table_variants`` (UMFC: train-fit and transductive) unless ``options``
    fixes one."""
    from calib.methods import get_method_class, make_options

    out = {}
    for m in methods:
        base = dict((options or {}).get(m) or {})
        if hasattr(make_options(m), "selection"):
            out[m] = (m, {**base, "selection": "val_wga"})
            out[f"{m} [no group labels]"] = (m, {**base, "selection": "val_worst_class"})
        elif get_method_class(m).table_variants and not base:  # e.g. UMFC's train-fit and transductive rows
            out.update({label: (m, dict(o)) for label, o in get_method_class(m).table_variants.items()})
        else:
            out[m] = (m, base)
    return out


def _reuse_key(method: str, seed: int, options: dict, features: FeatureSet) -> tuple:
    m = features.meta
    return (method, int(seed), stable_hash(options, 10), m.get("weights"), m.get("dataset_version"), code_hash())


def run_experiment(
    spec: RunSpec,
    features: FeatureSet,
    write: bool = True,
    reuse: bool = True,
    results_dir: Path | None = None,
    context: RunContext | None = None,
    allow_partial: bool = False,
) -> pd.DataFrame:
    """Run every (method, seed), append one result row each, and return the rows as a DataFrame.

    ``context`` (the dataset and the loaded CLIP) is what methods working on images need (TPT).  Each row is
    appended when its pass ends; after an interruption (Ctrl-C, kill -9) a rerun computes only the missing rows.
    ``allow_partial`` lets a validation or test split lack a class or group of the training split (each row then
    records what was missing in ``partial_evaluation``); without it such features stop with one error.

    With ``reuse`` (default) a (method, seed, options) whose row already exists for the same
    features (weights fingerprint, dataset version) and the same calib source code is not run again:
    the stored row is returned.  Pass ``reuse=False`` to force a re-run.
    """
    path = results_path(spec.experiment, results_dir)
    stored = {}
    if reuse and write and path.is_file():
        for row in read_rows(path):
            key = (
                row["method"],
                row["seed"],
                row["options_hash"],
                row.get("weights"),
                row.get("dataset_version"),
                row.get("code"),
            )
            stored[key] = row
    tasks = []  # (variant, method, overrides, seed, options) in the order rows are returned
    for variant, method, overrides in spec.runs():
        for seed in spec.seeds:
            tasks.append((variant, method, overrides, seed, dataclasses.asdict(make_options(method, overrides))))

    # runs to fit: one per training trajectory (runs differing only in `selection` share one)
    def trajectory(method: str, seed: int, options: dict) -> tuple:
        return method, seed, stable_hash({k: v for k, v in options.items() if k != "selection"})

    pending: dict[tuple, tuple[str, int, dict]] = {}
    for _, method, overrides, seed, options in tasks:
        if _reuse_key(method, seed, options, features) not in stored:
            pending.setdefault(trajectory(method, seed, options), (method, seed, overrides))
    trained: dict[tuple, MethodRun] = {}
    reused = {i for i, t in enumerate(tasks) if _reuse_key(t[1], t[3], t[4], features) in stored}
    rows: dict[int, dict] = {}  # task index -> its row, made as soon as its run is stored or trained
    saved = 0

    def row_for(i: int) -> dict:
        variant, method, _, seed, options = tasks[i]
        if i in reused:
            log.info("%s seed %d: reusing the stored result row (same features, options and code)", variant, seed)
            return {**stored[_reuse_key(method, seed, options, features)], "variant": variant}
        traj = trajectory(method, seed, options)
        run = trained[traj]
        wanted = options.get("selection")
        if getattr(run.instance.options, "selection", wanted) != wanted:  # the same training, another epoch
            run.instance.reselect(wanted)
            lanes, run = run.lanes, evaluate_instance(run.instance, features, seed, run.seconds)
            run.lanes = trained[traj].lanes = lanes
            trained[traj] = run
            log.info("%s seed %d: selection %s from the same training run", variant, seed, wanted)
        return _make_row(spec, variant, method, seed, run, features, task=i)

    def save_ready() -> None:
        """Make (and append) the row of every task whose run is now stored or trained: a row is saved the moment
        its pass ends, so an interruption loses at most the pass in progress."""
        nonlocal saved
        for i, (_, method, _, seed, options) in enumerate(tasks):
            if i in rows or (i not in reused and trajectory(method, seed, options) not in trained):
                continue
            rows[i] = row_for(i)
            if write and i not in reused:  # dedupe: another process may have just written this run
                saved += append_rows([rows[i]], path, dedupe=reuse)

    by_method: dict[str, list[tuple]] = {}
    for traj, (method, _, _) in pending.items():
        by_method.setdefault(method, []).append(traj)
    try:
        save_ready()
        for method, trajs in by_method.items():  # seeds and settings that can share a pass train as its lanes
            seeds, overrides = [pending[t][1] for t in trajs], [pending[t][2] for t in trajs]

            def finished(done: dict[int, MethodRun], trajs: list[tuple] = trajs) -> None:
                trained.update({trajs[i]: run for i, run in done.items()})
                save_ready()

            run_methods(
                method, features, seeds, overrides, context=context, on_pass=finished, allow_partial=allow_partial
            )
    except KeyboardInterrupt:
        log.warning(
            "%s interrupted: %d of %d row(s) are saved in %s (%d stored before, %d written now); "
            "a rerun computes only the rest",
            spec.experiment,
            len(reused) + saved,
            len(tasks),
            path if write else "(nothing: write=False)",
            len(reused),
            saved,
        )
        raise
    return pd.DataFrame.from_records([flatten_row(rows[i]) for i in range(len(tasks))])


def _make_row(
    spec: RunSpec, variant: str, method: str, seed: int, run: MethodRun, features: FeatureSet, task: int
) -> dict:
    """The result row of one (variant, seed) run on ``features``; ``task`` is its position in ``spec`` (rows are
    written as their passes end, so tables order them by it: :func:`calib.evaluation.results.load_results`)."""
    selected = next((r["epoch"] for r in run.history if r.get("selected")), None)
    return make_row(
        experiment=spec.experiment,
        method=method,
        dataset=features.meta.get("dataset", "?"),
        model=features.meta.get("model", "?"),
        pretrained=features.meta.get("pretrained", "?"),
        seed=seed,
        options=run.options,
        metrics=run.metrics,
        device=features.meta.get("device", "cpu"),
        extra={
            "variant": variant,
            "task": task,
            "label_needs": run.label_needs,
            "seconds": run.seconds,
            "lanes": run.lanes,
            "compute": compute_record(run.options, features.meta.get("precision")),
            "epochs_run": len(run.history),
            "selected_epoch": selected,
            "group_names": features.group_names,
            "weights": features.meta.get("weights"),
            "dataset_version": features.meta.get("dataset_version"),
            "code": code_hash(),
            "calibration_groups": getattr(run.instance, "calibration_groups", None),
            "correct": _correct_bits(run, features),
            **({"partial_evaluation": run.partial} if run.partial else {}),
            **({"history": [dict(r) for r in run.history]} if spec.history else {}),
        },
    )


def _correct_bits(run, features: FeatureSet) -> dict[str, str]:
    """Which test samples the run got right, packed (:func:`calib.evaluation.stats.pack_correct`; bootstrap intervals).
    A run on a seeded test subsample (``max_images``, e.g. TPT) is scored on that subsample."""
    from calib.clip.features import subsample
    from calib.evaluation.stats import pack_correct

    out = {}
    n_sub = run.options.get("max_images", 0) if isinstance(run.options, dict) else 0
    if n_sub and n_sub < len(features.splits["test"]):
        features = subsample(features, "test", n_sub, SUBSAMPLE_SEED)
    for split in ("test",):
        if split in run.predictions and split in features.splits:
            s = features.splits[split]
            out[split] = pack_correct(np.asarray(run.predictions[split]) == s.y, s.g)
    return out


def epoch_options(epochs: int) -> dict[str, dict[str, Any]]:
    """Option overrides giving every projection-training method (and CFR's reference) ``epochs`` epochs."""
    return {"clip_erm": {"epochs": epochs}, "cfr": {"epochs": epochs, "reference_epochs": epochs}}


def run_grid(
    experiment: str,
    datasets: list[str],
    backbones: list[list[str]],
    methods: list[str],
    seeds: list[int],
    options: dict[str, dict] | None = None,
    protocols: bool = True,
) -> pd.DataFrame:
    """Every method x dataset x backbone x seed (and, with ``protocols``, both selection protocols).

    ``backbones`` holds ``[model, pretrained]`` pairs.  Methods that work on images (TPT) get the dataset and
    the model.  Returns the rows of this grid.
    """
    from calib.methods import REGISTRY

    frames = []
    for dataset in datasets:
        for model, pretrained in backbones:
            features = prepare_features(dataset, model, pretrained)
            context = None
            if any(REGISTRY[m].needs_images() for m in methods if m in REGISTRY):
                context = RunContext(prepare_dataset(dataset), load_clip(model, pretrained))
            variants = (
                protocol_variants(methods, options)
                if protocols
                else {m: (m, (options or {}).get(m, {})) for m in methods}
            )
            spec = RunSpec(experiment, [], list(seeds), variants=variants)
            frames.append(run_experiment(spec, features, context=context))
    return pd.concat(frames, ignore_index=True)
