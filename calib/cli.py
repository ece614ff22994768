"""Command line: ``python -m calib <command>`` (also installed as ``calib``).

    python -m calib data make-toy --root DIR [--scale 1.0] [--seed 0] [--overwrite]
    python -m calib data check --dataset waterbirds --root DIR [--json]
    python -m calib list methods [--json]
    python -m calib toy-clip [--preset toy|toy-quick]
    python -m calib extract --dataset NAME [--root DIR] --model M --pretrained P [--split S]
    python -m calib report readme [--experiment spurious_correlation] [--dataset toy]

Exit status: 0 on success, 2 on bad input (wrong layout, unknown name), with one clear message.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from calib.utils import setup_logging

log = logging.getLogger("calib.cli")


def _cmd_make_toy(args: argparse.Namespace) -> int:
    from calib.data import ToyConfig, make_toy_waterbirds

    root = make_toy_waterbirds(Path(args.root), ToyConfig(seed=args.seed, scale=args.scale), overwrite=args.overwrite)
    print(f"toy benchmark ready at {root}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from calib.data import LOADERS, load_dataset

    if args.dataset not in LOADERS:
        raise ValueError(f"unknown dataset {args.dataset!r}; known: {sorted(LOADERS)}")
    ds = load_dataset(args.dataset, Path(args.root), check_files=True)
    counts = ds.group_counts()
    if args.json:
        print(json.dumps({"dataset": ds.name, "root": str(ds.root), "version": ds.version, "ok": True,
                          "splits": {s: {"n": int(sum(c)), "groups": dict(zip(ds.group_names, c))} for s, c in counts.items()}},
                         indent=2))
        return 0
    width = max(len(g) for g in ds.group_names)
    print(f"{ds.name} at {ds.root} (metadata version {ds.version}): layout OK")
    print(f"{'group':<{width}}  " + "  ".join(f"{s:>7}" for s in counts))
    for gi, gname in enumerate(ds.group_names):
        print(f"{gname:<{width}}  " + "  ".join(f"{counts[s][gi]:>7}" for s in counts))
    print(f"{'total':<{width}}  " + "  ".join(f"{sum(counts[s]):>7}" for s in counts))
    return 0


def _cmd_list_methods(args: argparse.Namespace) -> int:
    from calib.methods import LABEL_MARKS, describe_methods

    methods = describe_methods()
    if args.json:
        print(json.dumps(methods, indent=2, default=str))
        return 0
    for m in methods:
        print(f"{m['name']}{LABEL_MARKS[m['label_needs']]}  [group labels: {m['label_needs']}; uses: {', '.join(m['uses'])}]")
        print(f"    {m['summary']}")
        for k, v in m["options"].items():
            print(f"    --{k} (default {v!r})")
    return 0


def _cmd_toy_clip(args: argparse.Namespace) -> int:
    from calib.toyclip import TOY_PRESETS, ensure_toy_clip

    print(f"toy CLIP checkpoint: {ensure_toy_clip(TOY_PRESETS[args.preset])}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from calib.experiment import prepare_dataset
    from calib.features import get_split_features, get_text_prototypes
    from calib.models import load_clip

    ds = prepare_dataset(args.dataset, args.root)
    loaded = load_clip(args.model, args.pretrained, device=args.device)
    for split in args.split or list(ds.splits):
        if split not in ds.splits:
            raise ValueError(f"unknown split {split!r}; {ds.name} has {sorted(ds.splits)}")
        feats = get_split_features(loaded, ds, split, batch_size=args.batch_size, num_workers=args.num_workers)
        print(f"{ds.name}/{split}: h {tuple(feats.h.shape)}, z {tuple(feats.z.shape)}")
    get_text_prototypes(loaded, ds.class_names)
    return 0


def _cmd_report_readme(args: argparse.Namespace) -> int:
    from calib.report import update_readme

    path = update_readme(args.experiment, args.dataset, Path(args.readme) if args.readme else None)
    print(f"updated {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calib", description="calib: CLIP group robustness, reproducibly")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    mk = data.add_parser("make-toy", help="write the built-in toy benchmark (Waterbirds layout)")
    mk.add_argument("--root", required=True, help="folder to create")
    mk.add_argument("--scale", type=float, default=1.0, help="multiplies Waterbirds' group sizes (default 1.0)")
    mk.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    mk.add_argument("--overwrite", action="store_true", help="replace an existing toy benchmark")
    mk.set_defaults(func=_cmd_make_toy)
    ck = data.add_parser("check", help="validate a dataset's on-disk layout and print group counts")
    ck.add_argument("--dataset", required=True, help="dataset name, e.g. waterbirds")
    ck.add_argument("--root", required=True, help="dataset folder")
    ck.add_argument("--json", action="store_true", help="machine-readable output")
    ck.set_defaults(func=_cmd_check)

    ls = sub.add_parser("list", help="list registered things").add_subparsers(dest="list_command", required=True)
    lm = ls.add_parser("methods", help="methods, the group labels they need, their options")
    lm.add_argument("--json", action="store_true")
    lm.set_defaults(func=_cmd_list_methods)

    tc = sub.add_parser("toy-clip", help="train (or find) the toy CLIP checkpoint")
    tc.add_argument("--preset", default="toy", choices=["toy", "toy-quick"])
    tc.set_defaults(func=_cmd_toy_clip)

    ex = sub.add_parser("extract", help="extract and cache features of a dataset's splits")
    ex.add_argument("--dataset", required=True, help="toy, toy-quick, or a dataset name (waterbirds, ...)")
    ex.add_argument("--root", default=None, help="dataset folder (default <CALIB_DATA_DIR>/<dataset>)")
    ex.add_argument("--model", required=True, help="open_clip model name, e.g. RN50, ViT-L-14, calib-toy-vit")
    ex.add_argument("--pretrained", required=True, help="open_clip tag, checkpoint file, local-dir:<folder>, toy")
    ex.add_argument("--split", action="append", help="split(s) to extract (default: all)")
    ex.add_argument("--batch-size", type=int, default=256)
    ex.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: cores - 1)")
    ex.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    ex.set_defaults(func=_cmd_extract)

    rep = sub.add_parser("report", help="render results").add_subparsers(dest="report_command", required=True)
    rr = rep.add_parser("readme", help="write the toy results table into README.md")
    rr.add_argument("--experiment", default="spurious_correlation")
    rr.add_argument("--dataset", default="toy")
    rr.add_argument("--readme", default=None, help="README path (default: the checkout's README.md)")
    rr.set_defaults(func=_cmd_report_readme)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    from calib.data import DatasetLayoutError
    from calib.models import WeightsUnavailableError

    try:
        return args.func(args)
    except (DatasetLayoutError, WeightsUnavailableError, ValueError, FileNotFoundError) as err:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": str(err)}))
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
