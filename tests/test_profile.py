"""The paper profile's plan and --dry-run; the throughput benchmark's accounting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calib.clip.throughput import measure, peak_bf16
from calib.experiments.plan import PAPER_BACKBONES, full_size_plan, paper_plan, parse_backbones
from tests.fixtures import FIGURE_STEMS, ROWS, write_waterbirds_fixture

REPO = Path(__file__).resolve().parents[1]


def test_plan_lists_present_datasets_and_skips_the_rest(tmp_path):
    write_waterbirds_fixture(tmp_path / "waterbirds", ROWS)
    (tmp_path / "celeba").mkdir()  # present but empty: skipped with the reason
    plan = paper_plan(tmp_path)
    assert [(r.dataset, r.model) for r in plan.rows] == [("waterbirds", m) for m, _ in PAPER_BACKBONES]
    assert plan.rows[0].images == 5 and plan.rows[0].train == 2
    assert any(s.startswith("celeba: CelebA layout problem") for s in plan.skipped)
    assert any(s.startswith("metashift: not found") for s in plan.skipped)
    assert plan.gpu_hours > 0


def test_parse_backbones_and_custom_plan(tmp_path):
    assert parse_backbones("RN50-quickgelu:openai, ViT-B-32:local-dir:/w/vit") == (
        ("RN50-quickgelu", "openai"),
        ("ViT-B-32", "local-dir:/w/vit"),
    )  # split at the first colon only
    for bad in ("RN50", ":openai", "RN50:", ""):
        with pytest.raises(ValueError, match="MODEL:PRETRAINED"):
            parse_backbones(bad)
    five = full_size_plan((("RN50-quickgelu", "openai"),))
    one = full_size_plan((("RN50-quickgelu", "openai"),), seeds=1)
    # per-seed work scales with the seeds; notebook 07's maps run once (seed 0), TPT once per seed
    from calib.experiments.plan import ASSUMED_MAPS_S_PER_IMG, ASSUMED_TPT_S_PER_IMG, N_GROUPS, method_seconds

    for r1, r5 in zip(one.rows, five.rows):
        maps_s = ASSUMED_MAPS_S_PER_IMG * 50 * N_GROUPS[r1.dataset] * 2
        assert r1.methods_h * 3600 == pytest.approx(method_seconds(r1.train, 1) + ASSUMED_TPT_S_PER_IMG * 500 + maps_s)
        assert (r5.methods_h * 3600 - maps_s) == pytest.approx(5 * (r1.methods_h * 3600 - maps_s))
    custom = full_size_plan((("ViT-B-32", "random"),), seeds=1)
    assert "no assumed speed for ViT-B-32" in custom.render() and "(1 seeds)" in custom.render()


def test_full_size_estimate_is_positive_and_ordered():
    plan = full_size_plan()
    by = {(r.dataset, r.model): r for r in plan.rows}
    vit = "ViT-L-14-336-quickgelu"  # the release's ViT (ViT-L/14@336px) is a default backbone
    assert by[("celeba", vit)].extraction_h > by[("waterbirds", vit)].extraction_h
    assert by[("waterbirds", vit)].extraction_h > by[("waterbirds", "RN50-quickgelu")].extraction_h
    assert 1 < plan.gpu_hours < 1000


def test_run_all_paper_dry_run(tmp_path):
    write_waterbirds_fixture(tmp_path / "data" / "waterbirds", ROWS)
    env = {**os.environ, "CALIB_USE_CURRENT_ENV": "1", "PYTHON": sys.executable, "CALIB_HOME": str(tmp_path / "home")}
    r = subprocess.run(
        ["bash", str(REPO / "run_all.sh"), "--profile", "paper", "--data-dir", str(tmp_path / "data"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "skip celeba: not found" in r.stdout and "skip chexpert: not found" in r.stdout
    assert "waterbirds" in r.stdout and "ViT-L-14-336-quickgelu/openai" in r.stdout and "GPU hours" in r.stdout
    assert not (tmp_path / "home" / "results").exists()  # a dry run runs nothing
    for args, message in (
        (["--profile", "paper"], "--data-dir"),
        (["--dry-run"], "applies to --profile paper"),
        (["--backbones", "RN50:openai"], "applies to --profile paper"),
        (["--profile", "nope"], "unknown profile"),
        (["--nproc", "2"], "--nproc applies to --profile paper"),
        (["--profile", "paper", "--data-dir", str(tmp_path), "--nproc", "0"], "--nproc takes a positive integer"),
    ):
        r = subprocess.run(
            ["bash", str(REPO / "run_all.sh"), *args], capture_output=True, text=True, env=env, timeout=300
        )
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_plan_command_json(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "calib", "plan", "--full-size", "--json"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["rows"]) == 8 and out["gpu_hours"] > 0


def test_throughput_accounting(monkeypatch):
    import calib.clip.throughput as tp
    from calib.clip.models import load_clip

    grad_modes = []
    real_encode = tp.encode_pre_projection

    def spy(model, x):
        grad_modes.append(torch.is_grad_enabled())
        return real_encode(model, x)

    monkeypatch.setattr(tp, "encode_pre_projection", spy)

    torch.manual_seed(0)
    loaded = load_clip("calib-toy-vit", "random", device="cpu")
    t = measure(loaded, batch_size=8, n_files=16, num_workers=0, seconds=0.2)
    assert t.model_bound_img_s > 0 and t.pipeline_bound_img_s > 0
    assert t.image_size == 64 and t.amp is False
    assert t.achieved_tflops == pytest.approx(t.model_bound_img_s * t.gflop_per_image / 1e3)
    assert t.fraction_of_peak is None  # no known peak for a CPU
    assert grad_modes and not any(grad_modes)  # both timings run without autograd, as extraction does
    assert peak_bf16("NVIDIA H200") == 989.0 and peak_bf16("NVIDIA A100-SXM4-80GB") == 312.0


def test_bf16_features_match_fp32_on_cpu():
    """Mixed precision (bf16 autocast, as used on GPUs) changes features only within a stated tolerance."""
    from calib.clip.models import encode_pre_projection, load_clip

    torch.manual_seed(0)
    loaded = load_clip("ViT-B-32", "random", device="cpu")
    x = torch.randn(4, 3, 224, 224)
    h32, z32 = encode_pre_projection(loaded.model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16, z16 = encode_pre_projection(loaded.model, x)
    cos = torch.nn.functional.cosine_similarity(z16.float(), z32, dim=1)
    assert (cos > 0.999).all(), cos  # stated tolerance: cosine similarity above 0.999 per image
    rel = (h16.float() - h32).norm(dim=1) / h32.norm(dim=1)
    assert (rel < 0.05).all(), rel


def test_paper_profile_without_weights_stops_at_once_with_instructions(tmp_path):
    write_waterbirds_fixture(tmp_path / "data" / "waterbirds", ROWS)
    env = {
        **os.environ,
        "CALIB_USE_CURRENT_ENV": "1",
        "PYTHON": sys.executable,
        "CALIB_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
    }
    r = subprocess.run(
        ["bash", str(REPO / "run_all.sh"), "--profile", "paper", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode != 0
    assert "not on this machine" in r.stderr and "timm/resnet50_clip.openai" in r.stderr
    assert not (tmp_path / "home" / ".cache" / "features").exists()  # nothing half-written


def test_paper_profile_end_to_end_on_fixtures(paper_profile_run):
    """The paper profile's real code path (extraction, notebooks 00-07 per dataset, 08 per dataset, the joint main
    table with TPT) on MetaShift and CheXpert fixtures in their release layouts, with a real open_clip architecture
    at random weights (``--backbones calib-toy-vit:random``) and ``--quick`` settings (the run: ``conftest.py``'s
    ``paper_profile_run``)."""
    import nbformat

    from calib.evaluation.results import load_results

    returncode, stdout, stderr = paper_profile_run.wait()
    home = paper_profile_run.home
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "skip waterbirds: not found" in stdout and "skip celeba: not found" in stdout
    assert "Passed unknown parameter" not in stderr  # each notebook got only the parameters it declares
    figures = {p.name for p in (home / "figures").glob("*.png")}
    for ds in ("metashift", "chexpert"):
        for stem in FIGURE_STEMS:
            assert f"{stem}_{ds}_calib-toy-vit.png" in figures, (stem, ds)
    table = (home / "figures" / "main_results_metashift_chexpert.md").read_text()
    for ds in ("metashift", "chexpert"):
        for method in (
            "zeroshot",
            "dfr†",
            "afr",
            "groupdro‡",
            "cfr",
            "tpt (20 test images)",
            "orth_cali§",
            "orth_cali (projection only)§",
            "roboshot§",
            "tie_star§",
            "fairerclip§",
            "ppa (from the paper)",
        ):
            assert f"| {ds} | calib-toy-vit | {method} |" in table
    rows = load_results("main_results", home / "results")
    assert set(rows.dataset) == {"metashift", "chexpert"} and set(rows.pretrained) == {"random"}
    executed = sorted((home / "notebooks" / "executed").glob("*.ipynb"))
    assert len(executed) == 2 * 7 + 2 + 1  # 00-07 but 03 per dataset, 08 per dataset, the joint 03
    ranks = [json.loads((home / "notebooks" / "executed" / f"profile_rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(c for rep in ranks for c in rep["cells"]) == [  # one cell each, by estimated cost
        "chexpert__calib-toy-vit__random",
        "metashift__calib-toy-vit__random",
    ]
    assert [len(rep["cells"]) for rep in ranks] == [1, 1]
    assert not [st for st in ranks[1]["stages"] if "03_main_results (paper)" in st["name"]]  # rank 0 writes tables
    assert [st["name"] for st in ranks[0]["stages"]][-1] == "notebook 03_main_results (paper)"
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"], path
