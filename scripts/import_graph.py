"""The package's import graph by pipeline stage, and the imports that climb from a lower stage to a higher one.

    python scripts/import_graph.py            # the folder-level graph as a Mermaid diagram, then any violation
    python scripts/import_graph.py --check    # exit 1 if any import climbs (tests/test_layout.py runs the same)

Every ``import``/``from ... import`` of a calib module counts, including those inside functions (lazy imports
still make a stage depend on a higher one).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "calib"

# stage of each top-level entry of calib/: a module may import from its own stage or a lower one
STAGES = {
    "core": 0,
    "data": 1,
    "clip": 2,
    "methods": 3,
    "evaluation": 4,
    "studies": 5,
    "experiments": 6,
    "__main__": 7,
}


def stage_of(module: str) -> str:
    """``calib.clip.features`` -> ``clip``; ``calib`` itself -> ``calib``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "calib"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """``(imported calib module, line)`` for every import of calib in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "calib"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "calib":
            if node.module == "calib":  # from calib import paths -> calib.paths
                out += [(f"calib.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((node.module, node.lineno))
    return out


def edges() -> list[tuple[str, str, str, int]]:
    """``(importing module, imported module, file, line)`` over every module of the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        out += [(src, dst, str(path.relative_to(PACKAGE.parent)), line) for dst, line in imports(path)]
    return out


def violations() -> list[str]:
    """Each import from a lower stage to a higher one (or from an unknown top-level entry), as one line."""
    bad = []
    for src, dst, file, line in edges():
        a, b = stage_of(src), stage_of(dst)
        if a == "calib" and b != "calib":
            bad.append(f"{file}:{line}: the package root imports {dst}")
        elif a in STAGES and b in STAGES and STAGES[b] > STAGES[a]:
            bad.append(f"{file}:{line}: {src} (stage {STAGES[a]} {a}) imports {dst} (stage {STAGES[b]} {b})")
        elif a not in STAGES or b not in STAGES | {"calib": -1}:
            bad.append(f"{file}:{line}: {src} -> {dst}: a top-level entry without a stage in STAGES")
    return bad


def mermaid() -> str:
    """The folder-level graph: one arrow per pair of stages, labelled with the number of import statements."""
    counts = Counter(
        (stage_of(s), stage_of(d)) for s, d, _, _ in edges() if stage_of(s) != stage_of(d) and stage_of(d) != "calib"
    )
    lines = ["graph BT"]
    for (a, b), n in sorted(counts.items(), key=lambda kv: (STAGES.get(kv[0][0], 9), STAGES.get(kv[0][1], 9))):
        lines.append(f"  {a}[{a} {STAGES.get(a, '')}] -->|{n}| {b}[{b} {STAGES.get(b, '')}]")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 on an import that climbs")
    args = parser.parse_args()
    bad = violations()
    if not args.check:
        print(mermaid())
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
