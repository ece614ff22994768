"""The generated blocks of the README and the docs pages: each ``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``
block is rendered from result rows by :func:`update_readme` (``python -m calib report readme``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from calib.core import paths
from calib.core.hashing import code_hash
from calib.evaluation.results import load_results, read_rows, results_path
from calib.evaluation.tables import main_table, render_main_table, render_table, results_table
from calib.studies.dynamics import render_dynamics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """A generated block: the result rows it is rendered from and how."""

    experiment: str  # rows from results/<experiment>.jsonl, those of the dataset asked for
    render: Callable[[pd.DataFrame], str]
    testbeds: bool = False  # the known-answer testbed's rows sit beside the dataset's (seed and options as run)
    figure: str | None = None  # the figures/<figure>.md a notebook writes with the same table from the same rows


BLOCKS: dict[str, Block] = {  # marker name -> block
    "results": Block(
        "spurious_correlation",
        lambda df: render_table(results_table(df), "markdown"),
        figure="spurious_correlation_{dataset}_{model}",
    ),
    "main-table": Block(
        "main_results", lambda df: render_main_table(main_table(df), "markdown"), figure="main_results_{dataset}"
    ),
    "cfr-dynamics": Block("cfr_dynamics", render_dynamics, testbeds=True, figure="cfr_dynamics_{dataset}"),
    "attribution": Block("attribution", lambda df: _attribution_block(df), figure="attribution_mass_{dataset}_{model}"),
    "pretraining": Block(
        "pretraining_sources", lambda df: _pretraining_block(df), figure="pretraining_sources_{dataset}"
    ),
}
VERSIONS = "versions"  # the block listing the package versions behind every generated table
MARKER = re.compile(r"<!-- ([\w-]+):start -->")


def _attribution_block(df: pd.DataFrame) -> str:
    from calib.studies.attribution import mass_markdown, mass_table_from_rows

    return mass_markdown(mass_table_from_rows(df))


def _pretraining_block(df: pd.DataFrame) -> str:
    from calib.studies.pretraining import robustness_table, table_markdown

    return table_markdown(robustness_table(df))


def generated_pages(root: Path | None = None) -> dict[Path, list[str]]:
    """Every page of the checkout holding generated blocks (``README.md``, ``docs/*.md``) -> its block names.

    A marker without its end, or a name that is no block, raises one ``ValueError`` naming the page."""
    root = Path(root or paths.repo_root() or Path.cwd())
    out = {}
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if not page.is_file():
            continue
        text = page.read_text()
        names = MARKER.findall(text)
        for name in names:
            if name not in BLOCKS and name != VERSIONS:
                raise ValueError(f"{page}: unknown generated block {name!r}; known: {sorted(BLOCKS)} and {VERSIONS!r}")
            if f"<!-- {name}:end -->" not in text:
                raise ValueError(f"{page}: <!-- {name}:start --> has no <!-- {name}:end -->")
        if names:
            out[page] = names
    return out


def block_text(text: str, name: str) -> str:
    """What lies between a block's markers in ``text``."""
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    return text.split(start, 1)[1].split(end, 1)[0]


def render_versions(rows: list[dict]) -> str:
    """One line per distinct set of package versions (and git revision) among raw result rows."""
    seen: dict[str, set[str]] = {}
    for row in rows:
        prov = row.get("provenance", {})
        versions = ", ".join(f"{k} {v}" for k, v in sorted(prov.get("versions", {}).items()))
        seen.setdefault(versions, set()).add(str(prov.get("git_rev", "?"))[:12])
    lines = [f"- {v} (code at {', '.join(sorted(revs))})" for v, revs in seen.items()]
    head = (
        "The generated tables on this page and in `docs/` were produced with (exact environment: "
        "`requirements.lock`):\n\n"
    )
    return head + "\n".join(lines) + "\n"


def update_readme(dataset: str = "toy", root: Path | None = None) -> list[Path]:
    """Refresh every generated block of the README and the docs pages whose rows exist; return the pages changed.

    A block whose experiment has no rows for ``dataset`` yet is left as it is, with one warning."""
    pages = generated_pages(root)
    rendered: dict[str, str] = {}
    for name in dict.fromkeys(n for names in pages.values() for n in names if n != VERSIONS):
        block = BLOCKS[name]
        try:
            df = load_results(block.experiment)
        except FileNotFoundError:
            log.warning("no %s rows yet; generated block %r left as it is", block.experiment, name)
            continue
        keep = df["dataset"] == dataset
        if block.testbeds:
            keep |= df["dataset"].str.startswith("testbed")
        if keep.any():
            rendered[name] = block.render(df[keep])
    raw = []  # which package versions produced the tables: rows of this code only
    for block in BLOCKS.values():
        path = results_path(block.experiment)
        if path.is_file():
            raw += [r for r in read_rows(path) if r.get("dataset") == dataset and r.get("code") == code_hash()]
    if raw:
        rendered[VERSIONS] = render_versions(raw)
    changed = []
    for page, names in pages.items():
        text = old = page.read_text()
        for name in names:
            if name in rendered:
                text = _replace_block(text, name, rendered[name])
        if text != old:
            page.write_text(text)
            changed.append(page)
    return changed


def stale_blocks(root: Path | None = None, figures_dir: Path | None = None, dataset: str = "toy") -> list[str]:
    """Generated blocks that differ from the table their notebook wrote from the same rows
    (``<figures_dir>/<figure>.md``), one line each; ``[]`` when every block is current."""
    from calib.clip.toyclip import TOY_MODEL_NAME

    figures_dir = Path(figures_dir or paths.figures_dir())
    out = []
    for page, names in generated_pages(root).items():
        text = page.read_text()
        for name in names:
            block = BLOCKS.get(name)
            if block is None or block.figure is None:
                continue
            figure = figures_dir / (block.figure.format(dataset=dataset, model=TOY_MODEL_NAME) + ".md")
            if not figure.is_file():
                out.append(f"{page.name}: block {name!r} has no {figure} to compare with")
            elif block_text(text, name) != figure.read_text():
                out.append(f"{page.name}: block {name!r} differs from {figure.name} (run ./run_all.sh)")
    return out


def _replace_block(text: str, name: str, block: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    new = f"{start}\n{block}{end}"
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, new=new: new, text, flags=re.S)
