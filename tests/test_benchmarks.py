import json

import torch

from benchmarks.bench_step import BASELINE, MODEL_NAMES, NaiveTowerAlexNet, TowerwiseTorchLRN, main
from towers.model import TowerAlexNet, local_response_norm


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
    payload = main(["--quick", "--batch-sizes", "2", "--warmup", "0", "--rounds", "1", "--device", "cpu",
                    "--models", "towers-2", "towers-2 no LRN", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(payload["results"]))
    rows = {r["model"]: r for r in saved["results"]}
    assert set(rows) == {BASELINE, "towers-2", "towers-2 no LRN"} and set(rows) <= set(MODEL_NAMES)
    assert rows[BASELINE]["ratio_to_alexnet"] == 1.0
    assert all(r["images_per_s"] > 0 and r["batch_size"] == 2 for r in rows.values())
    assert rows["towers-2"]["lrn_share"] is not None and rows["towers-2"]["lrn_share"] < 1
    assert not list(tmp_path.glob("*.tmp"))
