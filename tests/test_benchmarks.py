import json
import platform

import torch

from benchmarks.bench_step import (
    BASELINE,
    CHANNELS_LAST,
    MODEL_NAMES,
    NaiveTowerAlexNet,
    TowerwiseTorchLRN,
    main,
    median_ci95,
)
from towers.lrn import local_response_norm
from towers.model import TowerAlexNet


def test_naive_reference_is_the_same_network_as_tower_alexnet():
    torch.manual_seed(0)
    model = TowerAlexNet(num_towers=2, num_classes=10, width_multiplier=0.25, image_size=67).eval()
    naive = NaiveTowerAlexNet(2, 10, width_multiplier=0.25, image_size=67).load_from(model).eval()
    assert sum(p.numel() for p in naive.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.rand(3, 3, 67, 67) * 255
    torch.testing.assert_close(naive(x), model(x), rtol=1e-4, atol=1e-5)


def test_towerwise_torch_lrn_is_towers_lrn():
    x = torch.randn(2, 24, 5, 5, dtype=torch.float64) * 40
    for groups in (1, 2, 4):
        torch.testing.assert_close(TowerwiseTorchLRN(groups)(x), local_response_norm(x, groups))


def test_quick_benchmark_writes_a_row_per_model(tmp_path):
    out = tmp_path / "step.json"
    cl = "towers-2" + CHANNELS_LAST
    payload = main(
        [
            "--quick",
            "--batch-sizes",
            "2",
            "--warmup",
            "0",
            "--rounds",
            "5",
            "--device",
            "cpu",
            "--models",
            "towers-2",
            "towers-2 no LRN",
            cl,
            "towers-2 no LRN" + CHANNELS_LAST,
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(payload["results"]))
    rows = {r["model"]: r for r in saved["results"]}
    assert set(rows) == {BASELINE, "towers-2", "towers-2 no LRN", cl, "towers-2 no LRN" + CHANNELS_LAST}
    assert set(rows) <= set(MODEL_NAMES)
    assert rows[BASELINE]["ratio_to_alexnet"] == 1.0 and rows[BASELINE]["ratio_ci95"] is None
    assert all(r["images_per_s"] > 0 and r["batch_size"] == 2 for r in rows.values())
    for name in ("towers-2", cl):
        assert rows[name]["lrn_share_removed"] is not None and rows[name]["lrn_share_removed"] < 1
        low, high = rows[name]["ratio_ci95"]
        assert low <= rows[name]["ratio_to_alexnet"] <= high
        low, high = rows[name]["lrn_share_removed_ci95"]
        assert low <= rows[name]["lrn_share_removed"] <= high
        # the LRN layers' own time: part of the step, and what the share says
        assert 0 < rows[name]["lrn_ms"] < rows[name]["step_ms_max"]
        assert 0 < rows[name]["lrn_share_timed"] < 1
    assert rows[BASELINE]["lrn_ms"] is rows["towers-2 no LRN"]["lrn_ms"] is None  # no LRN layers to time
    assert "allocator_env" in saved["machine"]
    # the CPU step runs with freed memory kept, as train.py trains (where the C library is glibc)
    assert saved["machine"]["keep_freed_memory"] is (platform.libc_ver()[0] == "glibc")
    assert not list(tmp_path.glob("*.tmp"))


def test_channels_last_rows_run_in_that_format():
    from benchmarks.bench_step import Runner, build_models

    model, side = build_models(quick=True)["towers-2" + CHANNELS_LAST]
    runner = Runner(model, side, 2, torch.device("cpu"), bf16=False, compile_=False, channels_last=True)
    assert runner.x.is_contiguous(memory_format=torch.channels_last)
    assert runner.model.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert runner.model.features(runner.x).is_contiguous(memory_format=torch.channels_last)


def test_median_ci95_brackets_the_median():
    values = [0.8, 0.9, 1.0, 1.1, 1.2, 0.95, 1.05]
    low, high = median_ci95(values)
    assert low <= 1.0 <= high and low >= 0.8 and high <= 1.2
    assert median_ci95(values[:4]) is None  # too few rounds to say


def test_quick_data_benchmark_writes_every_pipeline(tmp_path):
    from benchmarks.bench_data import STEP
    from benchmarks.bench_data import main as bench_data

    out = tmp_path / "data.json"
    payload = bench_data(["--quick", "--workers", "0", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(payload["results"]))
    rows = {(r["pipeline"], r["workers"]): r for r in saved["results"]}
    assert set(rows) == {(STEP, None), ("jpeg", 0), ("jpeg", 1), ("store", 0), ("store", 1)}
    assert rows[(STEP, None)]["ratio_to_step"] == 1.0
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["ratio_to_step"] > 0
        assert 0 < r["ms_per_batch_min"] <= r["ms_per_batch"] <= r["ms_per_batch_max"]
        if r["pipeline"] != STEP:  # the augmentation ran inside every timed epoch, and took part of it
            assert 0 < r["augment_ms_per_batch"] <= r["ms_per_batch_max"]
    build = saved["store_build"]
    assert build["images"] == saved["dataset"]["images"] == 16 and build["seconds"] > 0 and build["store_mb"] > 0
    assert saved["dataset"]["mean_kb"] > 0
    assert not list(tmp_path.glob("*.tmp"))


def test_quick_bisection_benchmark_relates_the_cost_to_the_paper_run(tmp_path):
    from benchmarks.bench_bisection import main as bench_bisection
    from benchmarks.bench_bisection import paper_schedule

    out = tmp_path / "bisection.json"
    payload = bench_bisection(
        ["--quick", "--towers", "2", "4", "--permutations", "999", "--images-per-s", "10", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(payload))
    schedule = saved["paper_schedule"]
    assert schedule == paper_schedule()
    # configs/paper.yaml: 90 epochs, every 5 -> at initialisation + 18 times; 24,000 - 1,000 images
    assert (
        schedule["max_epochs"],
        schedule["every_n_epochs"],
        schedule["measurements"],
        schedule["images_per_epoch"],
    ) == (90, 5, 19, 23000)
    assert [(r["towers"], r["kernels"], r["permutations"]) for r in saved["bisection"]] == [(2, 96, 999), (4, 96, 999)]
    assert all(0 < r["ms_min"] <= r["ms"] <= r["ms_max"] for r in saved["bisection"])
    assert [(r["towers"], r["measurements"]) for r in saved["callback"]] == [(2, 3), (4, 3)]
    assert all(r["first_ms"] > 0 and 0 < r["ms_min"] <= r["ms"] for r in saved["callback"])
    assert [(r["towers"], r["images_per_s"]) for r in saved["share"]] == [(2, 10.0), (4, 10.0)]
    for share, callback in zip(saved["share"], saved["callback"]):
        assert share["epoch_s"] == 2300.0 and share["training_s_per_run"] == 90 * 2300.0
        cost = (callback["first_ms"] + 18 * callback["ms"]) / 1000
        assert abs(share["share"] - cost / (90 * 2300.0)) < 1e-12 and 0 < share["share"] < 1
    assert not list(tmp_path.glob("*.tmp"))


def test_quick_calibration_writes_its_tables(tmp_path):
    from benchmarks.calibration import INIT_ROWS
    from benchmarks.calibration import main as calibration

    out = tmp_path / "calibration.json"
    payload = calibration(["--draws", "3", "--tables", "initialisation", "power", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["draws"] == 3 and len(saved["initialisation"]) == len(INIT_ROWS)
    # at initialisation nearly every kernel is unstructured: no run of any tower count may be called specialised
    assert all(row["specialised"]["k"] == 0 for row in payload["initialisation"])
    assert all(row["unstructured"]["fraction"] > 0.9 for row in payload["initialisation"])
    assert [row["kernels"] for row in payload["initialisation"]] == [96, 96, 144, 96]
    # a nearly clean planted split is found every time, with a margin of many kernels
    assert payload["power"][0]["specialised"]["k"] == 3 and payload["power"][0]["margin_when_specialised"][0] > 5
