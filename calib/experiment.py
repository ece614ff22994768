"""The end-to-end pipeline the notebooks drive: dataset -> model -> cached features -> methods -> rows.

Dataset names: ``"toy"`` (the built-in toy benchmark, made on first use), ``"toy-quick"`` (a 4%
miniature for tests and smoke runs), or any name in :data:`calib.data.LOADERS` (real data,
read from ``root`` or ``<CALIB_DATA_DIR>/<name>``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from calib import paths
from calib.data import GroupDataset, ToyConfig, load_dataset, load_waterbirds, make_toy_waterbirds
from calib.features import FeatureSet, build_feature_set
from calib.methods import make_options, run_method
from calib.models import load_clip
from calib.results import append_rows, flatten_row, make_row, read_rows, results_path
from calib.utils import code_hash, seed_everything, stable_hash

log = logging.getLogger(__name__)

TOY_DATASETS: dict[str, ToyConfig] = {"toy": ToyConfig(), "toy-quick": ToyConfig(scale=0.04)}


def default_root(dataset: str) -> Path:
    """Where a dataset lives by default: ``<CALIB_DATA_DIR>/<folder>``."""
    folder = {"toy": "toy_waterbirds", "toy-quick": "toy_waterbirds_quick"}.get(dataset, dataset)
    return paths.data_dir() / folder


def prepare_dataset(dataset: str, root: str | Path | None = None) -> GroupDataset:
    """Load ``dataset`` (making the toy benchmark first if needed)."""
    root = Path(root) if root else default_root(dataset)
    if dataset in TOY_DATASETS:
        make_toy_waterbirds(root, TOY_DATASETS[dataset])
        return load_waterbirds(root, name=dataset)
    return load_dataset(dataset, root)


def prepare_features(
    dataset: str,
    model: str,
    pretrained: str | None,
    root: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 256,
    num_workers: int | None = None,
) -> FeatureSet:
    """Features of every split of ``dataset`` under ``(model, pretrained)``, from the cache when possible."""
    ds = prepare_dataset(dataset, root)
    loaded = load_clip(model, pretrained, device=device)
    return build_feature_set(loaded, ds, batch_size=batch_size, num_workers=num_workers)


@dataclass
class RunSpec:
    """What :func:`run_experiment` runs: methods x seeds, each method with option overrides."""

    experiment: str
    methods: list[str]
    seeds: list[int]
    options: dict[str, dict[str, Any]] | None = None


def _reuse_key(method: str, seed: int, options: dict, features: FeatureSet) -> tuple:
    m = features.meta
    return (method, int(seed), stable_hash(options, 10), m.get("weights"), m.get("dataset_version"), code_hash())


def run_experiment(spec: RunSpec, features: FeatureSet, write: bool = True, reuse: bool = True,
                   results_dir: Path | None = None) -> pd.DataFrame:
    """Run every (method, seed), append one result row each, and return the rows as a DataFrame.

    With ``reuse`` (default) a (method, seed, options) whose row already exists for the same
    features (weights fingerprint, dataset version) and the same calib source code is not run again:
    the stored row is returned.  Pass ``reuse=False`` to force a re-run.
    """
    path = results_path(spec.experiment, results_dir)
    stored = {}
    if reuse and write and path.is_file():
        for row in read_rows(path):
            key = (row["method"], row["seed"], row["options_hash"], row.get("weights"), row.get("dataset_version"),
                   row.get("code"))
            stored[key] = row
    rows, new_rows = [], []
    for method in spec.methods:
        for seed in spec.seeds:
            options = dataclasses.asdict(make_options(method, (spec.options or {}).get(method)))
            key = _reuse_key(method, seed, options, features)
            if key in stored:
                log.info("%s seed %d: reusing the stored result row (same features, options and code)", method, seed)
                rows.append(stored[key])
                continue
            seed_everything(seed)
            run = run_method(method, features, seed, (spec.options or {}).get(method))
            selected = next((r["epoch"] for r in run.history if r.get("selected")), None)
            rows.append(make_row(
                experiment=spec.experiment, method=method, dataset=features.meta.get("dataset", "?"),
                model=features.meta.get("model", "?"), pretrained=features.meta.get("pretrained", "?"),
                seed=seed, options=run.options, metrics=run.metrics, device=features.meta.get("device", "cpu"),
                extra={"label_needs": run.label_needs, "seconds": run.seconds,
                       "epochs_run": len(run.history), "selected_epoch": selected,
                       "group_names": features.group_names, "weights": features.meta.get("weights"),
                       "dataset_version": features.meta.get("dataset_version"), "code": code_hash()},
            ))
            new_rows.append(rows[-1])
    if write and new_rows:
        append_rows(new_rows, path)
        log.info("appended %d rows to %s", len(new_rows), path)
    return pd.DataFrame.from_records([flatten_row(r) for r in rows])
