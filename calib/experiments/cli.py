"""Command line: ``python -m calib <command>`` (also installed as ``calib``).

    python -m calib data make-toy --root DIR [--scale 1.0] [--seed 0] [--overwrite]
    python -m calib data check --dataset waterbirds --root DIR [--decode] [--json]
    python -m calib data download --dataset waterbirds --root DIR [--source URL|FILE] [--sha256 HEX]
    python -m calib list methods [--json]
    python -m calib toy-clip [--preset toy|toy-quick]
    python -m calib extract --dataset NAME [--root DIR] --model M --pretrained P [--split S]
    python -m calib evaluate --embeddings FILE.npz --method NAME [--seed N] [--option K=V] [--json]
    python -m calib export --dataset NAME --model M --pretrained P --out FILE.npz
    python -m calib bench methods [--dataset synthetic|toy] [--method NAME] [--seeds 0 1] [--epochs N] [--no-lanes]
    python -m calib bench throughput --model RN50 [--pretrained random] [--device cuda] [--batch-size 64]
    python -m calib plan --profile paper --data-dir DIR [--backbones M:P,...] [--seeds N] [--full-size] [--json]
    python -m calib report readme [--dataset toy] [--check]   # the generated blocks of README.md and docs/*.md
    python -m calib report notebooks [--repository OWNER/NAME]
    python -m calib realism --dataset toy --model calib-toy-vit --pretrained toy [--json]

Exit status: 0 on success, 2 on bad input (wrong layout, unknown name, an argument out of its range), with one
clear message; 130 on Ctrl-C, with one line.  Start-up imports neither torch nor scikit-learn: each command imports
what it uses, so ``--help``, ``list methods`` and ``data check`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from calib.core.logs import setup_logging

log = logging.getLogger("calib.experiments.cli")


# -- arguments checked at parsing, each message naming its argument ------------------------------------------------

Check = Callable[[Any], "str | None"]  # value -> what is wrong with it (None: fine)


class _Checked(argparse.Action):
    """Store an argument's value(s) after ``check``: a bad value stops at parsing with one line naming the argument
    (``--batch-size must be >= 1, got 0``), not deep inside a command (``range() arg 3 must not be zero``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, check: Check, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.check = check

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        for value in values if isinstance(values, list) else [values]:
            problem = self.check(value)
            if problem:
                parser.error(f"{option_string or self.dest} {problem}")
        setattr(namespace, self.dest, values)


def _at_least(low: int) -> Check:
    """An integer count or index: ``>= low`` (seeds: ``low=0``, where numpy's own message names no argument)."""
    what = "a non-negative integer" if low == 0 else f">= {low}"
    return lambda v: None if v >= low else f"must be {what}, got {v}"


def _positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else f"must be a finite number > 0, got {v}"


def _toy_scale(v: float) -> str | None:
    # the toy's group sizes are Waterbirds' times scale: 0 or less used to give the 2-per-group floor silently
    return None if 0 < v <= 1 else f"must be in (0, 1] (a fraction of Waterbirds' group sizes), got {v}"


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else f"must be in (0, 1] (a share of every split's size), got {v}"


def _folder(v: str) -> str | None:
    path = Path(v).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"lies inside {existing}, which is a file"
        return f"{v} {where}; it must be a folder"
    return None


def _device(v: str) -> str | None:
    """A device torch knows and this machine has: ``--device cuda`` without a GPU used to fail while loading the
    weights, and the message blamed the weights file."""
    import torch  # only when --device is given; every command that takes it imports torch anyway

    try:
        device = torch.device(v)
    except (RuntimeError, ValueError):
        return f"{v!r} is not a device torch knows; use cpu, cuda or cuda:N"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{v}: no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return (
                f"{v}: only {count} CUDA GPU(s) visible (cuda:0 to cuda:{count - 1}); use one of them or --device cpu"
            )
    return None


def _check_dataset(name: str, extra: tuple[str, ...] = ()) -> None:
    """An unknown ``--dataset`` before any work, listing every name the command accepts (the toys included)."""
    from calib.data import known_datasets

    known = [*extra, *known_datasets()]
    if name not in known:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known)}")


def _cmd_realism(args: argparse.Namespace) -> int:
    from calib.clip.features import prepare_features
    from calib.studies.realism import realism_report, realism_table
    from calib.studies.testbed import make_testbed

    _check_dataset(args.dataset, extra=("testbed",))
    if args.dataset == "testbed":
        features = make_testbed()
    else:
        features = prepare_features(args.dataset, args.model, args.pretrained, root=args.root, device=args.device)
    report = realism_report(features, seed=args.seed)
    print(json.dumps(report, indent=2) if args.json else realism_table(report))
    return 0


def _cmd_make_toy(args: argparse.Namespace) -> int:
    from calib.data import ToyConfig, make_toy_waterbirds

    root = make_toy_waterbirds(Path(args.root), ToyConfig(seed=args.seed, scale=args.scale), overwrite=args.overwrite)
    print(f"toy benchmark ready at {root}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from calib.data.download import download

    root = download(args.dataset, Path(args.root), source=args.source, sha256=args.sha256)
    print(f"{args.dataset} ready at {root}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from calib.data import DatasetLayoutError, load_dataset

    ds = load_dataset(args.dataset, Path(args.root), check_files=True)
    try:  # the layout is fine, but every method would stop on these labels: say so, and why
        ds.check()
        label_problem = ""
    except ValueError as err:
        label_problem = str(err)
        print(f"warning: {label_problem}; methods stop on these features unless allow_partial", file=sys.stderr)
    if args.decode:
        bad = ds.undecodable(progress=not args.json)
        if bad:
            shown = "\n".join(f"  {p}: {why}" for p, why in bad[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DatasetLayoutError(
                f"{len(bad)} of {sum(len(t) for t in ds.splits.values())} images cannot be decoded "
                f"(corrupted or truncated); replace them:\n{shown}{more}"
            )
    counts = ds.group_counts()
    if args.json:
        print(
            json.dumps(
                {
                    "dataset": ds.name,
                    "root": str(ds.root),
                    "version": ds.version,
                    "layout": ds.extra.get("layout"),
                    "decoded": bool(args.decode),
                    "ok": True,
                    "labels_ok": not label_problem,
                    **({"label_problem": label_problem} if label_problem else {}),
                    "splits": {
                        s: {"n": int(sum(c)), "groups": dict(zip(ds.group_names, c))} for s, c in counts.items()
                    },
                },
                indent=2,
            )
        )
        return 0
    width = max(len(g) for g in ds.group_names)
    print(
        f"{ds.name} at {ds.root} (metadata version {ds.version}): layout OK"
        + (", every image decodes" if args.decode else " (images not decoded; --decode checks them)")
    )
    if ds.extra.get("layout"):
        print(f"layout: {ds.extra['layout']}")
    print(f"{'group':<{width}}  " + "  ".join(f"{s:>7}" for s in counts))
    for gi, gname in enumerate(ds.group_names):
        print(f"{gname:<{width}}  " + "  ".join(f"{counts[s][gi]:>7}" for s in counts))
    print(f"{'total':<{width}}  " + "  ".join(f"{sum(counts[s]):>7}" for s in counts))
    return 0


def method_registry() -> dict[str, Any]:
    """:func:`calib.methods.describe_methods` (as JSON: tuples become lists) with the label marks and their legend,
    read from a cache keyed by :func:`calib.core.hashing.code_hash`.

    Importing the methods imports torch and scikit-learn (seconds); their description only changes with calib's
    code, so it is cached per code hash: any edit of the package gives a new key, and the first ``list methods``
    after it describes the methods afresh by importing them.
    """
    from calib.core import paths
    from calib.core.hashing import code_hash

    path = paths.cache_dir() / "methods" / f"registry-{code_hash()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass  # not described yet by this code (or unreadable): import the methods
    from calib.methods import LABEL_LEGEND, LABEL_MARKS, describe_methods

    registry = json.loads(
        json.dumps({"methods": describe_methods(), "marks": LABEL_MARKS, "legend": LABEL_LEGEND}, default=str)
    )
    try:
        from calib.core.files import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(registry, indent=1).encode())
    except OSError as err:  # a read-only cache costs start-up time only
        log.debug("method registry not cached at %s: %s", path, err)
    return registry


def option_value(value: Any) -> str:
    """An option's value as ``--option KEY=VALUE`` takes it (what :func:`calib.methods.base.coerce_option` parses
    back to the same value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(option_value(v) for v in value) if value else "[]"
    return str(value)


def _cmd_list_methods(args: argparse.Namespace) -> int:
    registry = method_registry()
    if args.json:
        print(json.dumps(registry["methods"], indent=2))
        return 0
    print("Each method's options at their defaults, as `calib evaluate` takes them (--option KEY=VALUE, repeatable).")
    for m in registry["methods"]:
        print(
            f"{m['name']}{m['mark']}  "
            f"[group labels: {m['label_needs']}; uses: {', '.join(m['uses'])}"
            + ("; § names the spurious attribute in words" if m.get("names_spurious") else "")
            + "]"
        )
        print(f"    {m['summary']}")
        for k, spec in m["option_specs"].items():
            each = "each " if spec["type"].startswith(("tuple", "list")) else ""
            kind = spec["type"] + (f", {each}{spec['range']}" if spec["range"] else "")
            pair = shlex.quote(f"{k}={option_value(spec['default'])}")
            print(f"    --option {pair}  ({kind})")
    print(registry["legend"])
    return 0


def _cmd_toy_clip(args: argparse.Namespace) -> int:
    from calib.clip.toyclip import TOY_PRESETS, ensure_toy_clip

    print(f"toy CLIP checkpoint: {ensure_toy_clip(TOY_PRESETS[args.preset])}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from calib.clip.distributed import distributed_context
    from calib.clip.features import get_split_features, get_text_prototypes
    from calib.clip.models import load_clip
    from calib.data import prepare_dataset

    with distributed_context(args.device) as (rank, world, device):
        ds = prepare_dataset(args.dataset, args.root) if rank == 0 else None
        if world > 1:  # rank 0 may have to write the toy benchmark first
            import torch.distributed as dist

            dist.barrier()
            ds = ds or prepare_dataset(args.dataset, args.root)
        loaded = load_clip(args.model, args.pretrained, device=device)
        for split in args.split or list(ds.splits):
            if split not in ds.splits:
                raise ValueError(f"unknown split {split!r}; {ds.name} has {sorted(ds.splits)}")
            feats = get_split_features(loaded, ds, split, batch_size=args.batch_size, num_workers=args.num_workers)
            if rank == 0:
                print(
                    f"{ds.name}/{split}: h {tuple(feats.h.shape)}, z {tuple(feats.z.shape)} "
                    f"({world} process{'es' if world > 1 else ''})"
                )
        if rank == 0:
            get_text_prototypes(loaded, ds.class_names)
    return 0


def _parse_options(pairs: list[str] | None) -> dict:
    """``["epochs=3", "scaler=val"]`` -> ``{"epochs": "3", "scaler": "val"}``: values stay strings;
    :func:`calib.methods.make_options` parses each to its option's declared type."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = value
    return out


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from calib.clip.npz import load_npz
    from calib.methods import run_method

    feats = load_npz(Path(args.embeddings), allow_partial=args.allow_partial)
    run = run_method(
        args.method, feats, seed=args.seed, options=_parse_options(args.option), allow_partial=args.allow_partial
    )
    if run.partial:
        log.warning("partial evaluation (asked for): missing per split %s", run.partial)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "method": args.method,
                    "seed": args.seed,
                    "label_needs": run.label_needs,
                    "options": run.options,
                    "seconds": run.seconds,
                    "metrics": run.metrics,
                    **({"partial_evaluation": run.partial} if run.partial else {}),
                },
                indent=2,
                default=str,
            )
        )
        return 0
    print(f"{args.method} (seed {args.seed}; group labels read: {run.label_needs}; {run.seconds:.1f} s)")
    for split, m in run.metrics.items():
        groups = " ".join(f"{a * 100:.1f}" for a in m["group_acc"])
        print(
            f"  {split:5s} WGA {m['wga'] * 100:5.1f}  avg {m['avg_acc'] * 100:5.1f}  "
            f"avg(train-weighted) {m['avg_acc_trainw'] * 100:5.1f}  per group [{groups}]"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from calib.clip.features import prepare_features
    from calib.clip.npz import export_npz

    feats = prepare_features(args.dataset, args.model, args.pretrained, root=args.root, device=args.device)
    print(f"wrote {export_npz(feats, Path(args.out))}")
    return 0


def _cmd_bench_methods(args: argparse.Namespace) -> int:
    import torch

    from calib.experiments.bench import synthetic_features, time_methods

    _check_dataset(args.dataset, extra=("synthetic",))
    if args.dataset == "synthetic":
        feats = synthetic_features(args.d_h, args.d)
    else:
        from calib.clip.features import prepare_features

        feats = prepare_features(args.dataset, args.model, args.pretrained)
    from calib.experiments.runner import epoch_options

    options = epoch_options(args.epochs) if args.epochs else None
    df = time_methods(feats, args.method, tuple(args.seeds), options, lanes=not args.no_lanes, flops=not args.no_flops)
    sizes = {s: len(f) for s, f in feats.splits.items()}
    print(
        f"{feats.meta['dataset']} {sizes}, h dim {feats.splits['train'].h.shape[1]}, "
        f"torch threads {torch.get_num_threads()}"
        + ("" if args.no_flops else f", GEMM peak measured now: {df['peak_gflops'].iloc[0]:.1f} GFLOP/s")
    )
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.json:
        Path(args.json).write_text(df.to_json(orient="records", indent=2))
    return 0


def _cmd_bench_tpt(args: argparse.Namespace) -> int:
    from calib.experiments.bench import time_tpt

    _check_dataset(args.dataset)
    r = time_tpt(args.model, args.pretrained, args.dataset, args.images, args.views, args.device)
    print(
        f"TPT on {r['device']} ({r['threads']} threads), {r['model']} ({r['pretrained']}), {r['views']} views: "
        f"{r['seconds_per_image']:.3f} s per image (mean of {r['images']})"
    )
    return 0


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    import torch

    from calib.clip.models import load_clip
    from calib.clip.throughput import as_dict, measure

    torch.manual_seed(0)
    loaded = load_clip(args.model, args.pretrained, device=args.device)
    t = measure(
        loaded,
        batch_size=args.batch_size,
        n_files=args.files,
        num_workers=args.num_workers,
        amp=None if args.amp == "auto" else args.amp == "on",
        seconds=args.seconds,
    )
    if args.json:
        print(json.dumps(as_dict(t), indent=2))
        return 0
    peak = (
        f"{100 * t.fraction_of_peak:.1f}% of the {t.peak_bf16_tflops:.0f} TFLOP/s bf16 peak"
        if t.fraction_of_peak is not None
        else "peak unknown for this device"
    )
    print(
        f"{t.model} on {t.device} ({t.device_name}), batch {t.batch_size}, {t.image_size} px, "
        f"{'bf16 autocast' if t.amp else 'fp32'}:\n"
        f"  model-bound    {t.model_bound_img_s:9.1f} img/s  (in-memory tensors)\n"
        f"  pipeline-bound {t.pipeline_bound_img_s:9.1f} img/s  (500x375 JPEG files through the DataLoader)\n"
        f"  {t.gflop_per_image:.2f} GFLOP/img -> {t.achieved_tflops:.3f} TFLOP/s model-bound; {peak}"
    )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from calib.experiments.plan import PAPER_BACKBONES, full_size_plan, latest_speeds, paper_plan, parse_backbones

    backbones = parse_backbones(args.backbones) if args.backbones else PAPER_BACKBONES
    speeds = None if args.assumed else latest_speeds()
    plan = (
        full_size_plan(backbones, seeds=args.seeds, speeds=speeds)
        if args.full_size
        else paper_plan(Path(args.data_dir), backbones, seeds=args.seeds, speeds=speeds)
    )
    if args.json:
        print(
            json.dumps(
                {
                    "rows": [asdict(r) for r in plan.rows],
                    "skipped": plan.skipped,
                    "gpu_hours": plan.gpu_hours,
                    "speeds": str(speeds.path) if speeds else None,
                },
                indent=2,
            )
        )
    else:
        print(plan.render())
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from calib.experiments.plan import PAPER_BACKBONES, parse_backbones
    from calib.experiments.profile import CELL_NOTEBOOKS, Settings, plan_cells, run_profile

    backbones = parse_backbones(args.backbones) if args.backbones else PAPER_BACKBONES
    missing = _unavailable_weights(backbones)
    if missing:  # before any cell starts: nothing half-done, every missing backbone named at once
        print("\n\n".join(missing), file=sys.stderr)
        return 1
    cells = plan_cells(Path(args.data_dir), backbones)
    if not cells:
        print(f"no paper dataset found under {args.data_dir}", file=sys.stderr)
        return 1
    notebooks = tuple(n.strip() for n in args.notebooks.split(",")) if args.notebooks else CELL_NOTEBOOKS
    unknown = [n for n in notebooks if not n.startswith(CELL_NOTEBOOKS)]
    if unknown:
        print(f"--notebooks: {unknown} are not per-cell notebooks ({', '.join(CELL_NOTEBOOKS)})", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    settings = Settings(args.quick, args.tpt_images, notebooks, not args.no_tables, methods)
    report = run_profile(cells, settings, Path(args.data_dir))
    for st in report.stages:
        print(f"  {st.name:60} {st.seconds:8.0f}")
    return 0


def _unavailable_weights(backbones: tuple) -> list[str]:
    """The error of every ``(model, pretrained)`` whose weights cannot be loaded here."""
    from calib.clip.models import WeightsUnavailableError, check_weights

    out = []
    for model, pretrained in backbones:
        try:
            check_weights(model, pretrained)
        except (WeightsUnavailableError, ValueError) as err:
            out.append(f"error: {err}")
    return out


def _cmd_rehearse(args: argparse.Namespace) -> int:
    from calib.experiments.rehearse import rehearse, render_report

    device = args.device or ("cuda" if _cuda_available() else "cpu")
    report = rehearse(
        [d.strip() for d in args.datasets.split(",") if d.strip()],
        [b.strip() for b in args.backbones.split(",") if b.strip()],
        args.fraction,
        list(args.seeds),
        args.epochs,
        device,
        images=args.images,
        out=Path(args.out) if args.out else None,
        layout_images=args.layout_images,
        per_image=args.per_image,
        cfr_schedule=_cfr_schedule(args, device),
    )
    print(render_report(report))
    if args.out:
        print(f"report: {args.out}")
    return 0


def _cfr_schedule(args: argparse.Namespace, device: str) -> tuple[str, str, float] | None:
    """``--cfr-schedule DATASET:BACKBONE`` at ``--cfr-fraction`` (default: the full size on a GPU, the rehearsal's
    ``--fraction`` elsewhere); None for ``--cfr-schedule none``."""
    if args.cfr_schedule == "none":
        return None
    dataset, _, backbone = args.cfr_schedule.partition(":")
    fraction = args.cfr_fraction or (1.0 if device.startswith("cuda") else args.fraction)
    return dataset, backbone, fraction


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cmd_report_readme(args: argparse.Namespace) -> int:
    from calib.experiments.readme import stale_blocks, update_readme

    root = Path(args.root) if args.root else None
    if args.check:
        stale = stale_blocks(root, dataset=args.dataset)
        for line in stale:
            print(line)
        print(f"{len(stale)} stale generated block(s)" if stale else "every generated block is current")
        return 1 if stale else 0
    changed = update_readme(args.dataset, root)
    print("updated " + ", ".join(str(p) for p in changed) if changed else "every generated block was already current")
    return 0


def _cmd_report_notebooks(args: argparse.Namespace) -> int:
    from calib.experiments.colab import repository, sync_notebooks

    repo = args.repository or repository()
    changed = sync_notebooks(repo)
    print(f"Colab badges and bootstrap cells point at github.com/{repo}; {len(changed)} file(s) rewritten")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calib", description="calib: CLIP group robustness, reproducibly")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    mk = data.add_parser("make-toy", help="write the built-in toy benchmark (Waterbirds layout)")
    mk.add_argument("--root", required=True, action=_Checked, check=_folder, help="folder to create")
    mk.add_argument(
        "--scale",
        type=float,
        default=1.0,
        action=_Checked,
        check=_toy_scale,
        help="multiplies Waterbirds' group sizes, in (0, 1] (default 1.0)",
    )
    mk.add_argument(
        "--seed", type=int, default=0, action=_Checked, check=_at_least(0), help="generator seed (default 0)"
    )
    mk.add_argument("--overwrite", action="store_true", help="replace an existing toy benchmark")
    mk.set_defaults(func=_cmd_make_toy)
    ck = data.add_parser("check", help="validate a dataset's on-disk layout and print group counts")
    ck.add_argument("--dataset", required=True, help="dataset name, e.g. waterbirds")
    ck.add_argument("--root", required=True, action=_Checked, check=_folder, help="dataset folder")
    ck.add_argument("--json", action="store_true", help="machine-readable output")
    ck.add_argument("--decode", action="store_true", help="also decode every image (slow; finds corrupted files)")
    ck.set_defaults(func=_cmd_check)

    dl = data.add_parser("download", help="download and extract a dataset with a public source (waterbirds)")
    dl.add_argument("--dataset", required=True)
    dl.add_argument("--root", required=True, action=_Checked, check=_folder, help="folder to create")
    dl.add_argument("--source", default=None, help="URL or local file instead of the official source (mirrors)")
    dl.add_argument("--sha256", default=None, help="expected sha256 of the archive")
    dl.set_defaults(func=_cmd_download)

    ls = sub.add_parser("list", help="list registered things").add_subparsers(dest="list_command", required=True)
    lm = ls.add_parser("methods", help="methods, the group labels they need, their options")
    lm.add_argument("--json", action="store_true")
    lm.set_defaults(func=_cmd_list_methods)

    tc = sub.add_parser("toy-clip", help="train (or find) the toy CLIP checkpoint")
    tc.add_argument("--preset", default="toy", choices=["toy", "toy-quick"])
    tc.set_defaults(func=_cmd_toy_clip)

    ex = sub.add_parser("extract", help="extract and cache features of a dataset's splits")
    ex.add_argument("--dataset", required=True, help="toy, toy-quick, or a dataset name (waterbirds, ...)")
    ex.add_argument(
        "--root",
        default=None,
        action=_Checked,
        check=_folder,
        help="dataset folder (default <CALIB_DATA_DIR>/<dataset>)",
    )
    ex.add_argument("--model", required=True, help="open_clip model name, e.g. RN50, ViT-L-14, calib-toy-vit")
    ex.add_argument("--pretrained", required=True, help="open_clip tag, checkpoint file, local-dir:<folder>, toy")
    ex.add_argument("--split", action="append", help="split(s) to extract (default: all)")
    ex.add_argument("--batch-size", type=int, default=256, action=_Checked, check=_at_least(1))
    ex.add_argument(
        "--num-workers",
        type=int,
        default=None,
        action=_Checked,
        check=_at_least(0),
        help="DataLoader workers (default: cores - 1)",
    )
    ex.add_argument(
        "--device", default=None, action=_Checked, check=_device, help="cuda / cpu (default: cuda when present)"
    )
    ex.set_defaults(func=_cmd_extract)

    ev = sub.add_parser("evaluate", help="run a method on your own embeddings (DFR npz layout) and print metrics")
    ev.add_argument("--embeddings", required=True, help="npz with embeddings_/y_/g_ + train (optional), val, test")
    ev.add_argument("--method", required=True, help="a method from `python -m calib list methods`")
    ev.add_argument("--seed", type=int, default=0, action=_Checked, check=_at_least(0))
    ev.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option override (repeatable)")
    ev.add_argument(
        "--allow-partial",
        action="store_true",
        help="let a split lack a class or group of the training split (worst group over those present; reported)",
    )
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)

    xp = sub.add_parser("export", help="write cached features as an embeddings npz (DFR layout)")
    xp.add_argument("--dataset", required=True)
    xp.add_argument("--root", default=None, action=_Checked, check=_folder)
    xp.add_argument("--model", required=True)
    xp.add_argument("--pretrained", required=True)
    xp.add_argument("--device", default=None, action=_Checked, check=_device)
    xp.add_argument("--out", required=True, help="output .npz path")
    xp.set_defaults(func=_cmd_export)

    bn = sub.add_parser("bench", help="timings").add_subparsers(dest="bench_command", required=True)
    bm = bn.add_parser("methods", help="seconds per method per seed")
    bm.add_argument("--dataset", default="synthetic", help="'synthetic' (Waterbirds-sized) or a dataset name")
    bm.add_argument("--model", default="calib-toy-vit")
    bm.add_argument("--pretrained", default="toy")
    bm.add_argument(
        "--d-h", type=int, default=1024, action=_Checked, check=_at_least(1), help="synthetic pre-projection dims"
    )
    bm.add_argument("--d", type=int, default=768, action=_Checked, check=_at_least(1), help="synthetic embedding dims")
    bm.add_argument("--method", action="append", help="method(s) to time (default: all)")
    bm.add_argument("--seeds", type=int, nargs="+", default=[0], action=_Checked, check=_at_least(0))
    bm.add_argument(
        "--epochs",
        type=int,
        default=None,
        action=_Checked,
        check=_at_least(1),
        help="epochs of every projection-trained method (default: its own)",
    )
    bm.add_argument("--no-lanes", action="store_true", help="run the seeds one after another, not as lanes of one pass")
    bm.add_argument("--no-flops", action="store_true", help="skip the FLOP count and the GEMM-peak measurement")
    bm.add_argument("--json", default=None, help="also write the timings to this JSON file")
    bm.set_defaults(func=_cmd_bench_methods)
    bp = bn.add_parser("tpt", help="TPT's seconds per test image (per-image work: views, one AdamW step)")
    bp.add_argument("--model", default="calib-toy-vit")
    bp.add_argument("--pretrained", default="toy", help="e.g. toy, random:0 (random weights), a tag or a file")
    bp.add_argument("--dataset", default="toy")
    bp.add_argument("--images", type=int, default=4, action=_Checked, check=_at_least(1))
    bp.add_argument("--views", type=int, default=64, action=_Checked, check=_at_least(1))
    bp.add_argument("--device", default=None, action=_Checked, check=_device)
    bp.set_defaults(func=_cmd_bench_tpt)

    bt = bn.add_parser("throughput", help="feature-extraction images/s, model- and pipeline-bound")
    bt.add_argument("--model", default="RN50")
    bt.add_argument("--pretrained", default="random", help="weights do not change throughput; random is fine")
    bt.add_argument("--device", default=None, action=_Checked, check=_device)
    bt.add_argument("--batch-size", type=int, default=64, action=_Checked, check=_at_least(1))
    bt.add_argument(
        "--files",
        type=int,
        default=512,
        action=_Checked,
        check=_at_least(1),
        help="JPEG files for the pipeline-bound run",
    )
    bt.add_argument("--num-workers", type=int, default=None, action=_Checked, check=_at_least(0))
    bt.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on for CUDA)")
    bt.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        action=_Checked,
        check=_positive,
        help="duration of the model-bound timing",
    )
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=_cmd_bench_throughput)

    pl = sub.add_parser("plan", help="what the paper profile would run, and its estimated GPU hours")
    pl.add_argument("--profile", choices=["paper"], default="paper")
    pl.add_argument(
        "--data-dir",
        default=".",
        action=_Checked,
        check=_folder,
        help="folder holding waterbirds/, celeba/, metashift/, chexpert/",
    )
    pl.add_argument("--full-size", action="store_true", help="estimate as if every dataset were present")
    pl.add_argument(
        "--backbones",
        default=None,
        help="comma-separated MODEL:PRETRAINED pairs (default: RN50-quickgelu:openai,ViT-L-14-336-quickgelu:openai)",
    )
    pl.add_argument(
        "--seeds", type=int, default=5, action=_Checked, check=_at_least(1), help="seeds per method (the paper: 5)"
    )
    pl.add_argument(
        "--assumed", action="store_true", help="cost with the assumed constants, not this device's rehearsal report"
    )
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_cmd_plan)

    pp = sub.add_parser(
        "profile",
        help="the paper profile: every (dataset, backbone) cell's notebooks, then the tables (under torchrun: "
        "the cells spread over the ranks, rank 0 writes the tables)",
    )
    pp.add_argument(
        "--data-dir",
        required=True,
        action=_Checked,
        check=_folder,
        help="folder holding waterbirds/, celeba/, metashift/, chexpert/",
    )
    pp.add_argument("--backbones", default=None, help="comma-separated MODEL:PRETRAINED pairs (default: the paper's)")
    pp.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, one ablation: a smoke run")
    pp.add_argument(
        "--tpt-images", type=int, default=500, action=_Checked, check=_at_least(0), help="TPT's test subsample"
    )
    pp.add_argument("--notebooks", default=None, help="comma-separated per-cell notebook prefixes (default: all)")
    pp.add_argument("--methods", default=None, help="comma-separated methods of notebook 03 (default: its own)")
    pp.add_argument("--no-tables", action="store_true", help="run the cells only, not notebooks 08 and 03")
    pp.set_defaults(func=_cmd_profile)

    rh = sub.add_parser(
        "rehearse", help="the paper profile's real workload on synthetic inputs with the real shapes: a JSON report"
    )
    rh.add_argument("--datasets", default="waterbirds,celeba,metashift,chexpert", help="comma-separated paper datasets")
    rh.add_argument(
        "--backbones", default="RN50-quickgelu,ViT-L-14-336-quickgelu", help="comma-separated paper backbones"
    )
    rh.add_argument(
        "--fraction", type=float, default=1.0, action=_Checked, check=_fraction, help="share of every split's size"
    )
    rh.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], action=_Checked, check=_at_least(0))
    rh.add_argument("--epochs", type=int, default=100, action=_Checked, check=_at_least(1), help="projection epochs")
    rh.add_argument("--images", type=int, default=256, action=_Checked, check=_at_least(0), help="JPEGs per backbone")
    rh.add_argument(
        "--layout-images",
        type=int,
        default=4096,
        action=_Checked,
        check=_at_least(0),
        help="most synthetic JPEGs written per dataset in its release layout (0: no dataset image stage)",
    )
    rh.add_argument(
        "--cfr-schedule",
        default="celeba:ViT-L-14-336-quickgelu",
        help="DATASET:BACKBONE whose CFR is timed at the released schedule, seeds as lanes ('none': not timed)",
    )
    rh.add_argument(
        "--cfr-fraction",
        type=float,
        default=None,
        action=_Checked,
        check=_fraction,
        help="size of that CFR timing (default: 1, the full dataset, on a GPU; --fraction elsewhere)",
    )
    rh.add_argument(
        "--per-image",
        type=int,
        default=4,
        action=_Checked,
        check=_at_least(1),
        help="test images TPT and the attribution maps are timed on",
    )
    rh.add_argument("--device", default=None, action=_Checked, check=_device, help="default: cuda when present")
    rh.add_argument("--out", default=None, help="write the JSON report here")
    rh.set_defaults(func=_cmd_rehearse)

    rl = sub.add_parser("realism", help="how CLIP-like features are: the measures of docs/toy_realism.md")
    rl.add_argument("--dataset", required=True, help="toy, a dataset name, or 'testbed'")
    rl.add_argument("--root", default=None, action=_Checked, check=_folder)
    rl.add_argument("--model", default="calib-toy-vit")
    rl.add_argument("--pretrained", default="toy")
    rl.add_argument("--device", default=None, action=_Checked, check=_device)
    rl.add_argument("--seed", type=int, default=0, action=_Checked, check=_at_least(0))
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(func=_cmd_realism)

    rep = sub.add_parser("report", help="render results").add_subparsers(dest="report_command", required=True)
    rr = rep.add_parser("readme", help="refresh the generated tables of README.md and docs/*.md")
    rr.add_argument("--dataset", default="toy")
    rr.add_argument(
        "--root",
        default=None,
        action=_Checked,
        check=_folder,
        help="checkout whose README.md and docs/*.md to refresh (default: this)",
    )
    rr.add_argument(
        "--check", action="store_true", help="refresh nothing; exit 1 if a block differs from its notebook's table"
    )
    rr.set_defaults(func=_cmd_report_readme)
    rn = rep.add_parser("notebooks", help="point the Colab badges and bootstrap cells at [project.urls] Repository")
    rn.add_argument("--repository", default=None, help="owner/name instead of pyproject's (for a one-off check)")
    rn.set_defaults(func=_cmd_report_notebooks)
    return p


# errors that mean bad input (exit 2, one line), by module: looked up only in modules already imported, because an
# exception whose module was never imported cannot have been raised, and importing calib.clip.models imports torch
_INPUT_ERRORS = (
    ("calib.data.base", "DatasetLayoutError"),
    ("calib.clip.models", "WeightsUnavailableError"),
    ("calib.data.download", "DownloadError"),
    ("calib.core.files", "OutputNotWritableError"),
)


def _input_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[m], name, None) for m, name in _INPUT_ERRORS if m in sys.modules]
    return (ValueError, FileNotFoundError, *(c for c in loaded if isinstance(c, type)))  # incl. EmbeddingsFileError


def _command(args: argparse.Namespace | None) -> str:
    """``calib bench methods``: the command an interruption stopped."""
    words = [getattr(args, k, None) for k in ("command", "data_command", "list_command", "bench_command")]
    words.append(getattr(args, "report_command", None))
    return " ".join(["calib", *(w for w in words if w)])


def _interrupted(args: argparse.Namespace | None) -> int:
    """One line for Ctrl-C instead of a traceback of the library frames that happened to run."""
    tqdm = sys.modules.get("tqdm.std")
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
        sys.stderr.write("\n")  # an open progress bar holds the cursor at the end of its line
    print(
        f"interrupted: {_command(args)} stopped; work already finished is kept (feature caches and result rows "
        "are written atomically), so running it again resumes",
        file=sys.stderr,
    )
    return 130


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        setup_logging(logging.DEBUG if args.verbose else logging.INFO)
        try:
            return args.func(args)
        except Exception as err:
            if not isinstance(err, _input_errors()):
                raise
            if getattr(args, "json", False):
                print(json.dumps({"ok": False, "error": str(err)}))
            print(f"error: {err}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        return _interrupted(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
