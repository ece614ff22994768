"""The generated blocks of README.md and docs/*.md: refreshed wherever they live, and current (issue 19)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from calib.evaluation.tables import render_table, results_table, write_tables
from calib.experiments.readme import BLOCKS, VERSIONS, block_text, generated_pages, stale_blocks, update_readme

REPO = Path(__file__).resolve().parent.parent


def test_every_committed_block_is_current():
    """Each block equals the table its notebook wrote from the same rows (figures/*.md, committed beside it)."""
    pages = generated_pages(REPO)
    names = [n for ns in pages.values() for n in ns]
    assert sorted(names) == sorted([*BLOCKS, VERSIONS]), "each generated block lives on exactly one page"
    assert stale_blocks(REPO, REPO / "figures") == []


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "docs").mkdir(parents=True)
    shutil.copy(REPO / "README.md", root / "README.md")
    for page in (REPO / "docs").glob("*.md"):
        shutil.copy(page, root / "docs" / page.name)
    return root


@pytest.fixture(scope="module")
def bed_rows():
    """spurious_correlation rows of a small testbed (zero-shot, two seeds) in the session's results folder."""
    from calib.evaluation.results import load_results
    from calib.experiments.runner import RunSpec, run_experiment
    from calib.studies.testbed import TestbedConfig, make_testbed

    bed = make_testbed(TestbedConfig(scale=0.05))
    run_experiment(RunSpec("spurious_correlation", ["zeroshot"], seeds=[0, 1]), bed)
    rows = load_results("spurious_correlation")
    return rows[rows["dataset"] == bed.meta["dataset"]], bed.meta["dataset"]


def test_update_refreshes_blocks_on_every_page(tmp_path, bed_rows):
    rows, dataset = bed_rows
    root = _checkout(tmp_path)
    page = next(p for p, names in generated_pages(root).items() if "results" in names)
    before = page.read_text()
    changed = update_readme(dataset, root)
    assert page in changed
    after = page.read_text()
    assert block_text(after, "results") == render_table(results_table(rows), "markdown")
    assert "| testbed |" in block_text(after, "results") and "| toy |" not in block_text(after, "results")
    # the text around the block is untouched
    assert after.split("<!-- results:start -->")[0] == before.split("<!-- results:start -->")[0]
    assert after.split("<!-- results:end -->")[1] == before.split("<!-- results:end -->")[1]
    assert update_readme(dataset, root) == []  # nothing left to change


def test_stale_block_is_reported(tmp_path, bed_rows):
    rows, dataset = bed_rows
    root = _checkout(tmp_path)
    update_readme(dataset, root)
    figures = tmp_path / "figures"
    write_tables(results_table(rows), f"spurious_correlation_{dataset}_calib-toy-vit", figures_dir=figures)
    lines = stale_blocks(root, figures, dataset=dataset)
    assert not any("'results'" in line for line in lines), lines  # the notebook's table and the block agree
    md = figures / f"spurious_correlation_{dataset}_calib-toy-vit.md"
    md.write_text(md.read_text().replace("| zeroshot |", "| zeroshot (edited) |"))
    assert any("'results' differs" in line for line in stale_blocks(root, figures, dataset=dataset))


def test_unknown_or_unclosed_block_names_its_page(tmp_path):
    root = _checkout(tmp_path)
    (root / "docs" / "extra.md").write_text("<!-- typo-table:start -->\nx\n<!-- typo-table:end -->\n")
    with pytest.raises(ValueError, match=r"extra\.md: unknown generated block 'typo-table'"):
        generated_pages(root)
    (root / "docs" / "extra.md").write_text("<!-- results:start -->\nx\n")
    with pytest.raises(ValueError, match=r"extra\.md: <!-- results:start --> has no <!-- results:end -->"):
        generated_pages(root)
