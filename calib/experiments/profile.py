"""The paper profile's driver: every (dataset, backbone) cell, on one process or spread over a node's GPUs.

``./run_all.sh --profile paper`` calls ``python -m calib profile``; with ``--nproc N`` it launches it under
``torchrun --nproc_per_node N``.  Each cell (one dataset under one backbone) is independent: its features are
extracted and notebooks 00-02 and 04-07 run on it.  Under torchrun the cells are shared out by their estimated cost
(longest first, each to the least-loaded rank, :func:`assign_cells`), each rank's children see only its own GPU
(``CUDA_VISIBLE_DEVICES``), the ranks meet at a barrier (gloo: it needs no GPU), and rank 0 alone runs the
tables: notebook 08 per dataset and notebook 03 over every cell.  Result rows from several ranks go to the same
JSONL files under a lock (:func:`calib.evaluation.results.append_rows`).

Each rank writes ``profile_rank<r>.json`` (its cells and every stage's seconds) beside the executed notebooks.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from calib.core import paths

log = logging.getLogger(__name__)

CELL_NOTEBOOKS = ("00", "01", "02", "04", "05", "06", "07")  # per (dataset, backbone); 08 and 03 are the tables
BARRIER_TIMEOUT = datetime.timedelta(days=7)  # a rank may wait for the others' cells for as long as they take


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    pretrained: str
    hours: float = 0.0  # estimated (calib.experiments.plan): what the ranks are balanced by

    @property
    def tag(self) -> str:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.pretrained)
        return f"{self.dataset}__{self.model}__{safe}"


@dataclass
class Settings:
    """What every notebook of the profile is given (``run_all.sh --profile paper`` options)."""

    quick: bool = False  # 1 seed, 3 epochs, one ablation and one dynamics variant, 2 images a group for M2IB
    tpt_images: int = 500  # TPT's seeded test subsample per dataset and backbone (0: all)
    notebooks: tuple[str, ...] = CELL_NOTEBOOKS  # which per-cell notebooks run (prefixes)
    tables: bool = True  # rank 0 runs notebooks 08 and 03 after every cell
    methods: list[str] | None = None  # notebook 03's methods (None: its default, the main table)

    @property
    def seeds(self) -> list[int]:
        from calib.experiments.plan import PAPER_SEEDS

        return [0] if self.quick else list(PAPER_SEEDS)


def notebook_parameters(name: str, cell: Cell, s: Settings) -> dict:
    """The papermill parameters of per-cell notebook ``name`` (each gets only those it declares)."""
    params: dict = {"dataset": cell.dataset, "model": cell.model, "pretrained": cell.pretrained}
    epochs = {"epochs": 3} if s.quick else {}
    if name.startswith("05"):
        return {**params, "seed": 0, **epochs}
    if name.startswith("07"):  # M2IB: seconds per image on a CPU
        return {**params, "seed": 0, **epochs, "per_group": 2 if s.quick else 50}
    params.update(seeds=s.seeds, **epochs)
    if name.startswith("04") and s.quick:
        params["ablations"] = ["CFR (default)"]
    if name.startswith("06"):
        params["testbed_core"] = []  # the testbed is a toy-profile study
        if s.quick:
            params["variants"] = ["CFR (default)"]
    return params


def assign_cells(cells: list[Cell], world: int) -> list[list[Cell]]:
    """Cells per rank: longest estimated first, each to the rank with the least estimated work so far (ties: the
    lower rank), so one rank is not left with CelebA and CheXpert while another has Waterbirds."""
    shares: list[list[Cell]] = [[] for _ in range(world)]
    load = [0.0] * world
    for cell in sorted(cells, key=lambda c: -c.hours):
        r = min(range(world), key=lambda i: (load[i], i))
        shares[r].append(cell)
        load[r] += cell.hours
    return shares


def plan_cells(data_dir: Path, backbones: tuple) -> list[Cell]:
    """The profile's cells under ``data_dir`` (datasets present) with their estimated hours."""
    from calib.experiments.plan import current_device_name, latest_speeds, paper_plan

    plan = paper_plan(Path(data_dir), backbones, speeds=latest_speeds(current_device_name()))
    for line in plan.skipped:
        log.info("skipped %s", line)
    return [Cell(r.dataset, r.model, r.pretrained, r.extraction_h + r.methods_h) for r in plan.rows]


@dataclass
class Stage:
    name: str
    seconds: float


@dataclass
class RankReport:
    rank: int
    world: int
    cells: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)


def _child_env(data_dir: Path, local_rank: int, world: int) -> dict[str, str]:
    """The environment of a rank's children: the data folder; its own GPU only, when the node has GPUs and several
    ranks share it."""
    env = {**os.environ, "CALIB_DATA_DIR": str(Path(data_dir).resolve())}
    if world > 1:
        import torch

        if torch.cuda.is_available():
            visible = env.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            env["CUDA_VISIBLE_DEVICES"] = ids[local_rank % len(ids)]
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)  # children are single processes, not members of the group
    return env


def _run(cmd: list[str], env: dict[str, str], what: str, report: RankReport) -> None:
    t0 = time.perf_counter()
    log.info("[rank %d] %s", report.rank, what)
    r = subprocess.run(cmd, env=env, cwd=paths.repo_root() or None)
    seconds = time.perf_counter() - t0
    report.stages.append(Stage(what, round(seconds, 1)))
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}")
    log.info("[rank %d] %s: %.0f s", report.rank, what, seconds)


def _papermill(notebook: Path, out: Path, params: dict) -> list[str]:
    return [
        sys.executable,
        "-m",
        "papermill",
        "--log-level",
        "WARNING",
        "-k",
        "python3",
        str(notebook),
        str(out),
        "-y",
        json.dumps(params),
    ]


def notebooks_dir() -> Path:
    root = paths.repo_root()
    if root is None:
        raise RuntimeError("the paper profile runs the notebooks of a calib checkout; none found beside the package")
    return root / "notebooks"


def run_cell(cell: Cell, s: Settings, executed: Path, env: dict[str, str], report: RankReport) -> None:
    """Extract ``cell``'s features and run its notebooks."""
    _run(
        [sys.executable, "-m", "calib", "extract", "--dataset", cell.dataset, "--model", cell.model]
        + ["--pretrained", cell.pretrained],
        env,
        f"extract {cell.dataset} / {cell.model} / {cell.pretrained}",
        report,
    )
    for nb in sorted(notebooks_dir().glob("0*.ipynb")):
        if not nb.name.startswith(tuple(s.notebooks)) or not nb.name.startswith(CELL_NOTEBOOKS):
            continue
        out = executed / f"{nb.stem}__{cell.tag}.ipynb"
        params = notebook_parameters(nb.name, cell, s)
        _run(_papermill(nb, out, params), env, f"notebook {nb.stem} ({cell.dataset} / {cell.model})", report)
    report.cells.append(cell.tag)


def run_tables(cells: list[Cell], s: Settings, executed: Path, env: dict[str, str], report: RankReport) -> None:
    """Notebook 08 per dataset (the given backbones as sources) and notebook 03 over every cell."""
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    backbones = [list(b) for b in dict.fromkeys((c.model, c.pretrained) for c in cells)]
    nbs = notebooks_dir()
    for ds in datasets:
        params = {"dataset": ds, "sources": [], "clip_backbones": backbones}
        _run(
            _papermill(nbs / "08_pretraining_sources.ipynb", executed / f"08_pretraining_sources__{ds}.ipynb", params),
            env,
            f"notebook 08_pretraining_sources ({ds})",
            report,
        )
    params = {"datasets": datasets, "backbones": backbones, "seeds": s.seeds, "tpt_images": s.tpt_images}
    if s.quick:
        params["epochs"] = 3
    if s.methods is not None:
        params["methods"] = s.methods
    _run(
        _papermill(nbs / "03_main_results.ipynb", executed / "03_main_results__paper.ipynb", params),
        env,
        "notebook 03_main_results (paper)",
        report,
    )


def run_profile(cells: list[Cell], s: Settings, data_dir: Path, executed: Path | None = None) -> RankReport:
    """This process's share of ``cells`` (datasets under ``data_dir``; all of them outside torchrun), then, on rank 0
    after every rank's cells, the tables.  Returns (and writes, as ``profile_rank<r>.json``) what this rank ran and
    how long it took."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    executed = executed or paths.home() / "notebooks" / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    report = RankReport(rank, world)
    env = _child_env(data_dir, local, world)
    failed: BaseException | None = None
    try:
        mine = assign_cells(cells, world)[rank]
        log.info("[rank %d of %d] cells: %s", rank, world, ", ".join(c.tag for c in mine) or "none")
        for cell in mine:
            run_cell(cell, s, executed, env, report)
    except BaseException as err:  # meet the others at the barrier before failing, so no rank waits forever
        failed = err
    if world > 1:
        ok = _all_ranks_ok(failed is None)
        if failed is None and not ok:
            failed = RuntimeError("another rank failed: see its log; no tables were written")
    if failed is None and rank == 0 and s.tables:
        run_tables(cells, s, executed, env, report)
    if world > 1:
        dist.destroy_process_group()
    (executed / f"profile_rank{rank}.json").write_text(json.dumps(asdict(report), indent=1))
    if failed is not None:
        raise failed
    return report


def _all_ranks_ok(ok: bool) -> bool:
    """Barrier that also tells every rank whether all ranks succeeded."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag) == 0
