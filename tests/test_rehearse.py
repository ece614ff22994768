"""The paper profile's rehearsal (issue 20): synthetic inputs with each dataset's split and group sizes and each
backbone's dimensions, every notebook's method runs grouped as the notebooks group them, one JSON report."""

import json

import numpy as np
import pytest

from calib.experiments.cli import main
from calib.experiments.rehearse import (
    BACKBONE_DIMS,
    DATASET_GROUPS,
    notebook_specs,
    rehearsal_features,
    rehearse,
    render_report,
)


def test_rehearsal_features_have_the_real_shapes():
    feats = rehearsal_features("celeba", "RN50-quickgelu", fraction=0.01)
    assert feats.splits["train"].h.shape[1] == 2048 and feats.W0.shape == (2048, 1024)
    counts = np.bincount(feats.splits["train"].g, minlength=4).tolist()
    assert counts == [max(2, round(n * 0.01)) for n in DATASET_GROUPS["celeba"]["train"]]
    assert sum(DATASET_GROUPS["celeba"]["train"]) == 162770 and sum(DATASET_GROUPS["waterbirds"]["test"]) == 5794
    assert feats.n_groups == 4 and rehearsal_features("chexpert", "ViT-L-14-336-quickgelu", 0.001).n_groups == 12
    assert feats.prompts.vectors.shape[1] == 1024  # the prompt methods read vectors of the embedding width
    assert BACKBONE_DIMS["ViT-L-14-336-quickgelu"] == (1024, 768)


def test_notebook_specs_follow_the_notebooks():
    specs = notebook_specs([0, 1], epochs=3)
    assert list(specs) == [f"0{i}_{n}" for i, n in enumerate(
        ["quickstart", "spurious_correlation", "last_layer_retraining", "main_results", "ablations",
         "feature_geometry", "cfr_dynamics"])]  # fmt: skip
    main_runs = {label: method for label, method, _ in specs["03_main_results"].runs()}
    assert "tpt" not in main_runs.values()  # per-image work: timed in the image stage
    assert {"fairerclip", "orth_cali", "afr", "cfr"} <= set(main_runs.values())
    assert main_runs["cfr [no group labels]"] == "cfr"  # both protocols, as run_grid makes them
    assert specs["05_feature_geometry"].seeds == [0]


def test_rehearse_writes_one_report(tmp_path):
    out = tmp_path / "report.json"
    report = rehearse(
        ["waterbirds"], ["RN50-quickgelu"], 0.002, [0], 1, "cpu", images=2, image_seconds=0.2, out=out, per_image=1
    )
    saved = json.loads(out.read_text())
    assert saved["stamp"]["device"] == "cpu" and saved["gemm_peak_gflops"] > 0 and saved["fraction"] == 0.002
    stages = [(r["stage"], r.get("notebook")) for r in saved["records"]]
    assert stages[:2] == [("images", None), ("dataset_images", None)] and len(stages) == 2 + 7
    images = saved["records"][0]
    assert images["model_bound_img_s"] > 0 and images["pipeline_bound_img_s"] > 0 and images["gflop_per_image"] > 1
    layout = saved["records"][1]  # JPEGs in the Waterbirds release layout, read by the real loader
    written = sum(max(2, round(n * 0.002)) for sizes in DATASET_GROUPS["waterbirds"].values() for n in sizes)
    assert layout["images_written"] == written == 35 and layout["image_size"] == [500, 375]
    assert layout["extracted"] == sum(max(2, round(n * 0.002)) for n in DATASET_GROUPS["waterbirds"]["train"])
    assert layout["pipeline_img_s"] > 0 and layout["tpt_s_per_img"] > 0
    assert set(layout["attribution_s_per_img"]) == {"m2ib", "gradcam"}  # a ResNet tower: no attention maps
    assert "TPT" in render_report(report)
    for r in saved["records"][2:]:
        assert r["seconds"] > 0 and r["peak_rss_gib"] > 0.1 and r["runs"] >= 1 and r["peak_gpu_gib"] is None
    assert "03_main_results" in render_report(report)


def test_layout_sizes_scale_and_cap():
    from calib.experiments.rehearse import layout_sizes

    full = layout_sizes("celeba", 1.0, 10**9)
    assert full == DATASET_GROUPS["celeba"]
    capped = layout_sizes("celeba", 1.0, 2035)  # 2035 / 202,599 ~ 1 %: every group ~1 % of its size, at least 2
    assert capped["train"] == (719, 672, 230, 14) and capped["val"][3] == 2
    assert sum(sum(v) for v in capped.values()) <= 2035 + 12


def test_rehearse_rejects_unknown_names(capsys):
    with pytest.raises(ValueError, match="unknown paper dataset"):
        rehearse(["imagenet"], ["RN50-quickgelu"], 0.01, [0], 1, "cpu")
    with pytest.raises(ValueError, match="unknown paper backbone"):
        rehearse(["waterbirds"], ["ViT-B-32"], 0.01, [0], 1, "cpu")
    with pytest.raises(SystemExit):
        main(["rehearse", "--fraction", "0"])
    assert "must be in (0, 1]" in capsys.readouterr().err


def _report(path, device_name, time, methods_seconds=(3.0, 7.0)):
    records = [{"stage": "images", "backbone": "RN50-quickgelu", "pipeline_bound_img_s": 1000.0}]
    records += [
        {"stage": "methods", "dataset": "waterbirds", "backbone": "RN50-quickgelu", "notebook": f"0{i}", "train": 48,
         "seconds": s}
        for i, s in enumerate(methods_seconds)
    ]  # fmt: skip
    records.append({"stage": "dataset_images", "dataset": "waterbirds", "backbone": "RN50-quickgelu",
                    "tpt_s_per_img": 0.2, "attribution_s_per_img": {"m2ib": 0.5, "gradcam": 0.1}})  # fmt: skip
    stamp = {"device_name": device_name, "time": time, "commit": "abc", "device": "cuda"}
    path.write_text(json.dumps({"stamp": stamp, "fraction": 0.01, "seeds": [0], "epochs": 10, "records": records}))


def test_plan_reads_the_newest_report_of_its_device(tmp_path):
    from calib.experiments.plan import full_size_plan, latest_speeds

    _report(tmp_path / "old.json", "H200", "2026-01-01T00:00:00Z", (100.0, 100.0))
    _report(tmp_path / "new.json", "H200", "2026-02-01T00:00:00Z")
    _report(tmp_path / "other.json", "A100", "2026-03-01T00:00:00Z")
    (tmp_path / "broken.json").write_text("{")
    speeds = latest_speeds("H200", tmp_path)
    assert speeds.path.name == "new.json" and latest_speeds("V100", tmp_path) is None
    plan = full_size_plan((("RN50-quickgelu", "openai"), ("ViT-L-14-336-quickgelu", "openai")), 5, speeds)
    row = next(r for r in plan.rows if (r.dataset, r.model) == ("waterbirds", "RN50-quickgelu"))
    assert row.source == "measured"
    assert row.extraction_h == pytest.approx(11788 / 1000 / 3600)
    # 10 s measured at 48 training images, 1 seed, 10 epochs -> 4795 images, 5 seeds, 100 epochs; TPT 0.2 s/img on
    # 500 test images per seed; the maps 0.6 s/img on 50 images a group (4 groups) under 2 towers
    assert row.methods_h == pytest.approx((10 * 4795 / 48 * 5 * 10 + 0.2 * 500 * 5 + 0.6 * 50 * 4 * 2) / 3600)
    assert {r.source for r in plan.rows if r != row} == {"assumed"}  # nothing measured for them
    text = plan.render()
    assert "measured on H200 by new.json" in text and "7 row(s) costed at assumed" in text


def test_cfr_schedule_timing_adds_up():
    from calib.experiments.rehearse import rehearse_cfr

    one = rehearse_cfr("waterbirds", "RN50-quickgelu", 0.004, [0], "cpu", peak_gflops=100.0)
    two = rehearse_cfr("waterbirds", "RN50-quickgelu", 0.004, [0, 1], "cpu", peak_gflops=100.0)
    assert one["stage"] == "cfr_schedule" and (one["lanes"], two["lanes"]) == (1, 2)
    # every matrix product of an epoch is per lane: two lanes, exactly twice the work
    assert two["cfr_epoch_gflop"] == pytest.approx(2 * one["cfr_epoch_gflop"], rel=1e-9)
    assert one["cfr_epoch_gflop"] > 0 and one["cfr_gflops"] == pytest.approx(
        one["cfr_epoch_gflop"] / one["cfr_epoch_seconds"]
    )
    assert one["cfr_fraction_of_gemm_peak"] == pytest.approx(one["cfr_gflops"] / 100.0)
    full = (one["base_seconds"] + 99 * (one["cfr_epoch_seconds"] + one["reference_epoch_seconds"])) / 0.004 / 60
    assert one["full_size_100_epochs_minutes"] == pytest.approx(full)
    with pytest.raises(ValueError, match="cfr_schedule"):
        rehearse(["waterbirds"], ["RN50-quickgelu"], 0.01, [0], 1, "cpu", cfr_schedule=("imagenet", "RN50", 1.0))
