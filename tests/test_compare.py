"""analysis/compare.py: the table from run folders and from the W&B API, the statistics across seeds
checked by hand, the figures (PNG, PDF, SVG), the CSV and the HTML report (opened in headless Chromium).
The runs' records are made by towers.measure.measure on constructed kernels, as the callback makes them."""

import csv
import functools
import html
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from analysis import compare, compare_figures, compare_read, compare_stats
from tests.fixtures.kernels import colour, gabor, noisy
from towers import records, sweep_report
from towers.verdict import Verdict

N = 16  # kernels per tower: small, and enough for the verdict to tell a planted split


# ----------------------------------------------------------------------------- fixtures in the runs' formats


def kernels(towers: int, seed: int, swap: int) -> torch.Tensor:
    """(towers, N, 3, 11, 11): tower 1 grey but for ``swap`` colour kernels, the others colour but for
    ``swap`` grey ones (swap N/2: no split); one tower: 2N kernels, N grey and N colour in random order."""
    grey, coloured = noisy(gabor(N * max(towers, 2), seed)), noisy(colour(N * max(towers, 2), seed + 1))
    if towers == 1:
        order = torch.randperm(2 * N, generator=torch.Generator().manual_seed(seed))
        return torch.cat([grey[:N], coloured[:N]])[order][None]
    blocks = [torch.cat([grey[: N - swap], coloured[:swap]])]
    blocks += [torch.cat([coloured[i * N : i * N + N - swap], grey[i * N : i * N + swap]]) for i in range(1, towers)]
    return torch.stack(blocks)


@functools.lru_cache(maxsize=None)
def _measured(towers: int, seed: int, swap: int | None) -> str:
    from towers.measure import measure

    shape = (1, 2 * N) if towers == 1 else (towers, N)
    k = (
        torch.randn(*shape, 3, 11, 11, generator=torch.Generator().manual_seed(seed))
        if swap is None
        else kernels(towers, seed, swap)
    )
    return json.dumps(measure(k, permutations=999, bootstrap=200, seed=seed))


def _record(stage, step, epoch, towers, seed, swap, error=None):
    """One record as KernelBisectionCallback writes it: towers.measure.measure + step/stage.
    ``swap`` None: random kernels (initialisation)."""
    record = json.loads(_measured(towers, seed, swap))
    if error:
        k = torch.full((towers, N if towers > 1 else 2 * N, 3, 11, 11), float("nan"))
        from towers.measure import measure

        record = measure(k, permutations=999, bootstrap=200)
    return {
        "stage": stage,
        "step": step,
        "epoch": epoch,
        "time": "2026-11-28T09:00:00+00:00",
        "axis_name": "luminance",
        **record,
    }


def write_run(
    folder: Path,
    towers: int,
    swap: int,
    seed: int,
    status="finished",
    diverged=False,
    layout="wandb",
    config=None,
    acc=0.75,
    precision="32-true",
):
    """A run's own folder as the callbacks leave it, plus its logger's files."""
    folder.mkdir(parents=True, exist_ok=True)
    init = _record("init", 0, 0, towers, seed, None)
    history = [
        init,
        _record("interval", 10, 1, towers, seed, max(swap, N // 2 - 2)),
        _record("interval", 15, 1, towers, seed, swap),
    ]
    last = (
        _record("end", 15, 1, towers, seed, swap, error=True) if diverged else _record("end", 20, 2, towers, seed, swap)
    )
    history.append(last)
    (folder / "bisection.json").write_text(
        json.dumps(
            {
                "format": "towers.bisection",
                "version": records.VERSION,
                "init": dict(init, kernels_file="kernels_init.npy"),
                "last": dict(last, kernels_file="kernels.npy"),
                "history": "bisection_history.jsonl",
                "measurement_seconds": 0.1,
            }
        )
    )
    (folder / "bisection_history.jsonl").write_text("".join(records.history_line(r) for r in history))
    from towers.figures import kernel_grid, write_png

    k = kernels(towers, seed, swap)
    np.save(folder / "kernels.npy", k.numpy())
    write_png(folder / "kernels.png", kernel_grid(k))
    summary = {"val/acc": acc, "test/acc": acc - 0.05, "train/loss": 0.4}
    (folder / "status.json").write_text(
        json.dumps(
            {
                "status": "diverged" if diverged else status,
                "step": last["step"],
                "epoch": last["epoch"],
                "message": "loss NaN" if diverged else "",
                "history": [dict(epoch=0, step=10, **summary)],
                "summary": summary,
            }
        )
    )
    config = config or {
        "seed_everything": seed,
        "model": {"num_towers": towers, "lr": 0.01, "width_policy": "split"},
        "data": {
            "class_path": "towers.data.CatsDogsDataModule",
            "init_args": {"batch_size": 32, "source": "demo", "root": "data/demo"},
        },
        "trainer": {"max_epochs": 2, "precision": precision},
    }
    if layout == "wandb":  # W&B's own files/ layout: config.yaml as {key: {value: ...}}, wandb-summary.json
        wb = {k: {"value": v} for k, v in config.items()}
        wb["_wandb"] = {"value": {"cli_version": "0.31.0"}}
        (folder / "config.yaml").write_text(yaml.safe_dump(wb))
        (folder / "wandb-summary.json").write_text(
            json.dumps({**summary, "bisection/kernels": {"_type": "images/separated"}})
        )
    elif layout == "csv":  # Lightning CSVLogger version dir: hparams.yaml + metrics.csv, no config.yaml
        (folder / "hparams.yaml").write_text(
            yaml.safe_dump({"num_towers": towers, "lr": 0.02, "width_policy": "per_tower"})
        )
        (folder / "metrics.csv").write_text("epoch,step,test/acc,val/acc\n0,9,,0.6\n1,19,,0.7\n1,19,0.66,\n")
        (folder / "status.json").unlink()
    return folder


# towers, seed, swap; the last diverges
GRID = [(1, 0, 0), (1, 1, 0), (1, 2, 0), (2, 0, 0), (2, 1, 2), (2, 2, 3), (2, 3, 0)]


def make_sweep(root: Path) -> Path:
    """A towers.sweep output folder: 3 one-tower controls, 3 two-tower seeds, one diverged, one failed early."""
    sweep = root / "demo"
    runs = []
    for i, (towers, seed, swap) in enumerate(GRID):
        name = f"run-{i:03d}"
        diverged = i == len(GRID) - 1
        write_run(
            sweep / "runs" / name / "wandb" / f"offline-run-20261128_0900{i:02d}-id{i}" / "files",
            towers,
            swap,
            seed,
            diverged=diverged,
        )
        runs.append(
            {
                "name": name,
                "params": {"model.num_towers": towers, "seed_everything": seed},
                "status": "diverged" if diverged else "finished",
                "message": "",
                "attempts": [],
            }
        )
    runs.append(
        {
            "name": "run-007",
            "params": {"model.num_towers": 2, "seed_everything": 4},
            "status": "failed",
            "message": "exit status 1; see the log",
            "attempts": [],
        }
    )
    (sweep / "runs" / "run-007").mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "demo", "sweep": {}, "runs": runs}))
    return sweep


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sweep = make_sweep(root)
    logs = root / "lightning_logs" / "version_0"
    write_run(logs, 2, 8, seed=7, layout="csv")  # half and half in both towers: not specialised
    return sweep, root / "lightning_logs"


def write_reference(path: Path, wrapped: bool) -> Path:
    """A published figure's record as analysis/kernels.py --json writes it (or wrapped like bisection.json)."""
    record = json.loads(_measured(2, 11, 1))
    path.write_text(json.dumps({"last": record} if wrapped else record))
    return path


@pytest.fixture(scope="module")
def report(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    runs = compare.collect_local(list(folders))
    ref = compare.read_reference(write_reference(out.parent / "figure3.json", wrapped=False))
    return runs, compare.write_report(runs, out, source="fixtures", references=[ref])


# ----------------------------------------------------------------------------- the table


def test_table_from_sweep_and_lightning_folders(folders):
    runs = compare.collect_local(list(folders))
    rows = {r.name: r.row for r in runs}
    assert list(rows) == [f"run-{i:03d}" for i in range(8)] + ["version_0"]
    r = rows["run-004"]
    assert (r["sweep"], r["seed"], r["num_towers"], r["width_policy"], r["batch_size"], r["lr"], r["max_epochs"]) == (
        "demo",
        1,
        2,
        "split",
        32,
        0.01,
        2,
    )
    assert (r["precision"], r["data"], r["data_root"]) == ("32-true", "demo", "data/demo")
    assert (r["epochs"], r["step"], r["status"]) == (2, 20, "finished")
    assert r["test_acc"] == pytest.approx(0.70) and r["val_acc"] == pytest.approx(0.75)
    bis = json.loads(next((folders[0] / "runs" / "run-004").rglob("bisection.json")).read_text())
    last, init = bis["last"], bis["init"]
    for key in (
        "verdict",
        "delta_f",
        "p_delta_f",
        "auc",
        "agnostic_tower",
        "specific_tower",
    ):
        assert r[key] == last[key], key
    assert r["verdict"] == "specialised" and (r["agnostic_tower"], r["specific_tower"]) == (1, 2)
    rec, rec_init = records.Record.from_dict(last, records.VERSION), records.Record.from_dict(init, records.VERSION)
    assert (r["eta2"], r["p_eta2"], r["omega2"]) == (rec.value("eta2"), rec.value("p_eta2"), rec.value("omega2"))
    assert r["eta2"] is not None and r["eta2_init"] == rec_init.value("eta2") and r["verdict_init"] == init["verdict"]
    assert [r["tower1_colour_fraction"], r["tower2_colour_fraction"]] == last["colour_fraction"]
    assert [r["tower1_colour_fraction_low"], r["tower2_colour_fraction_high"]] == [
        last["colour_fraction_low"][0],
        last["colour_fraction_high"][1],
    ]
    assert r["tower1_colour_fraction"] == 2 / N and r["tower2_colour_fraction"] == 1 - 2 / N  # two kernels swapped
    assert r["onset_step"] == 15  # specialised at steps 15 and 20, not at 10 (near half and half)
    assert "color_tower" not in r and "color_tower" not in compare_read.FIXED_COLUMNS
    assert "delta_f_low" not in compare_read.FIXED_COLUMNS  # no per-run interval of a data-chosen delta f
    control = rows["run-000"]
    assert control["num_towers"] == 1 and control["verdict"] == "not specialised"
    assert control["agnostic_tower"] is None and control["specific_tower"] is None  # no tower named unless specialised
    assert rows["run-006"]["status"] == "diverged" and rows["run-006"]["delta_f"] is None
    failed = rows["run-007"]
    assert (failed["status"], failed["seed"], failed["num_towers"], failed["verdict"]) == ("failed", 4, 2, None)
    assert "exit status 1" in failed["message"]
    v = rows["version_0"]  # Lightning CSV log dir: hparams.yaml and metrics.csv
    assert (v["num_towers"], v["lr"], v["width_policy"], v["test_acc"], v["val_acc"]) == (
        2,
        0.02,
        "per_tower",
        0.66,
        0.7,
    )
    assert v["status"] is None and v["verdict"] == "not specialised" and v["agnostic_tower"] is None
    judged = [r.name for r in runs if r.judged]
    assert judged == ["run-000", "run-001", "run-002", "run-003", "run-004", "run-005", "version_0"]


def test_an_unreadable_file_is_reported_and_the_run_kept(tmp_path):
    sweep = make_sweep(tmp_path)
    bisection = next((sweep / "runs" / "run-004").rglob("bisection.json"))
    bisection.write_text('{"format": "towers.bisection", "init": ')  # cut short
    with pytest.warns(UserWarning, match="cannot read .*bisection.json"):
        rows = {r.name: r.row for r in compare.collect_local([sweep])}
    r = rows["run-004"]
    assert r["delta_f"] is None and r["status"] == "finished" and r["num_towers"] == 2 and r["val_acc"] == 0.75
    assert r["message"].startswith("unreadable bisection.json")
    assert rows["run-005"]["verdict"] == "specialised"  # the other runs are untouched


def test_the_sweep_agents_verdict_wins_over_a_stale_status_json(tmp_path):
    sweep = make_sweep(tmp_path)
    status = next((sweep / "runs" / "run-003").rglob("status.json"))
    status.write_text(json.dumps(dict(json.loads(status.read_text()), status="running")))  # killed mid-run
    state = json.loads((sweep / "sweep.json").read_text())
    state["runs"][3].update(status="failed", message="exit status -9; see the log")
    (sweep / "sweep.json").write_text(json.dumps(state))
    r = {r.name: r.row for r in compare.collect_local([sweep])}["run-003"]
    assert (r["status"], r["message"]) == ("failed", "exit status -9; see the log")


def test_no_runs_found_says_what_it_looked_for(tmp_path):
    with pytest.raises(SystemExit, match=r"no runs found under .*sweep\.json.*bisection\.json or status\.json"):
        compare.collect_local([tmp_path])
    with pytest.raises(SystemExit, match="no such folder"):
        compare.collect_local([tmp_path / "missing"])
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path / "o")])  # neither folders nor --wandb


def _resolved(*files) -> dict:
    """The config train.py resolves from the given files, with every default (what SaveRunConfig writes)."""
    import contextlib

    import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        train.main(args=["fit", *(a for f in files for a in ("--config", f)), "--print_config"])
    return yaml.safe_load(out.getvalue())


def test_paper_and_code2012_runs_are_different_conditions(tmp_path):
    """Same towers, learning rate, batch and epochs, but the 2012 code's LR schedule, LRN placement and
    initial stds: two conditions, never pooled, named by what differs."""
    paper, code = _resolved("configs/paper.yaml"), _resolved("configs/paper.yaml", "configs/code2012.yaml")
    for name, config in (("paper", paper), ("code2012", code)):
        for seed in range(2):
            write_run(tmp_path / name / f"s{seed}", 2, 0, seed, config=dict(config, seed_everything=seed))
    runs = compare.collect_local([tmp_path])
    summary = compare_stats.summarize(runs)
    assert len(summary) == 2 and [s["seeds"] for s in summary] == [2, 2]
    assert len({r.row["condition"] for r in runs}) == 2
    by_id = {s["id"]: s for s in summary}
    for run in runs:
        assert run.name in by_id[run.row["condition"]]["runs"]
        assert run.name.startswith("code2012") == (run.condition["model.lr_schedule"] == "step")
    code_label = next(s["label"] for s in summary if s["condition"]["model.lr_schedule"] == "step")
    paper_label = next(s["label"] for s in summary if s["condition"]["model.lr_schedule"] == "plateau")
    assert code_label == (
        "towers: 2; conv1 LRN before ReLU (2012 code): yes; initial std overrides: conv3 0.03, conv4 0.03, "
        "conv5 0.03; LR schedule: step"
    )
    assert paper_label == (
        "towers: 2; conv1 LRN before ReLU (2012 code): no; initial std overrides: none; LR schedule: plateau"
    )
    # the one condition is also the sweep's W&B job type (the swept settings of it) and the logged id
    from towers.conditions import condition, condition_id
    from towers.sweep_state import condition as job_type

    sweep = {
        "parameters": {"model.lr_schedule": {"values": ["plateau", "step"]}, "seed_everything": {"values": [0, 1]}}
    }
    assert job_type(sweep, {"model.lr_schedule": "step", "seed_everything": 1}) == "LR schedule: step"
    assert condition_id(condition(dict(code, seed_everything=5))) == condition_id(condition(code))
    assert condition_id(condition(code)) != condition_id(condition(paper))


# ----------------------------------------------------------------------------- statistics by hand


def test_every_run_bound_is_the_one_sided_clopper_pearson_bound():
    # n of n: the bound solves p^n = 0.05
    for n, bound in ((5, 0.549), (10, 0.741), (29, 0.902)):
        assert compare_stats.every_run_bound(n, n) == pytest.approx(0.05 ** (1 / n)) == pytest.approx(bound, abs=5e-4)
    # k < n: the exact one-sided bound, P(X >= k | n, p) = 0.05 (3 of 5 -> 0.189)
    from scipy import stats

    lb = compare_stats.every_run_bound(3, 5)
    assert lb == pytest.approx(0.1893, abs=5e-4) and stats.binom.sf(2, 5, lb) == pytest.approx(0.05)
    assert compare_stats.every_run_bound(0, 5) == 0.0
    assert compare_stats.clopper_pearson(5, 5)[0] == pytest.approx(0.478, abs=5e-4)  # two-sided: 0.025 ** (1/5)


def test_towers_against_the_one_tower_control_at_the_seed_level():
    # every trained Delta f above every control's: the exact one-sided p is 1 / C(6, 3) = 0.05
    assert compare_stats.versus_control([0.5, 0.6, 0.7], [0.0, 0.05, 0.1]) == pytest.approx(0.05)
    assert compare_stats.versus_control([0.5, 0.6], [0.0, 0.1]) == pytest.approx(1 / 6)  # two seeds each: p >= 1/6
    assert compare_stats.versus_control([0.0, 0.05, 0.1], [0.5, 0.6, 0.7]) == pytest.approx(1.0)
    assert np.isnan(compare_stats.versus_control([0.5], []))


def test_median_interval_is_the_exact_order_statistic_interval():
    # 5 seeds: [min, max] covers the median with probability 1 - 2 / 2^5 = 93.75%, the most 5 seeds give
    med, lo, hi, level = compare_stats.median_interval([0.9, 0.1, 0.5, 0.3, 0.7])
    assert (med, lo, hi, level) == (0.5, 0.1, 0.9, 0.9375)
    # 10 seeds: the 2nd and 9th values, 1 - 2 P(Bin(10, 1/2) <= 1) = 1 - 22 / 1024
    values = [0.05 * i for i in range(10)]
    med, lo, hi, level = compare_stats.median_interval(values[::-1])
    assert (lo, hi) == (values[1], values[8]) and level == pytest.approx(1 - 22 / 1024)
    # fewer than 5 seeds: no interval (4 seeds reach only 87.5%)
    med, lo, hi, level = compare_stats.median_interval([0.3, 0.4, 0.5, 0.6])
    assert med == pytest.approx(0.45) and np.isnan(lo) and np.isnan(hi) and level == 0.875
    assert compare_stats.median_interval_ranks(17, 0.95)[:2] == (5, 13)  # 95.1%; (6, 12) would be 85.7%


def test_seed_simulation_runs_and_keeps_its_size(tmp_path):
    """benchmarks/seed_simulation.py, few draws: every row, the null's size near 5% at most, Figure 3's power,
    every printed interval at its level (the full run's table is in BENCHMARKS.md)."""
    from benchmarks import seed_simulation

    out = tmp_path / "sim.json"
    assert seed_simulation.main(["--draws", "150", "--truth-runs", "20000", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 18 and {(r["num_towers"], r["seeds"]) for r in rows} == {
        (t, n) for t in (2, 3, 4) for n in (5, 10)
    }
    null = [r for r in rows if r["effect"] == "none"]
    assert max(r["rejects"] for r in null) <= 0.05 + 3 * (0.05 * 0.95 / 150) ** 0.5  # 5% within Monte-Carlo error
    fig3 = next(r for r in rows if r["effect"] == "Figure 3" and (r["num_towers"], r["seeds"]) == (2, 10))
    assert fig3["rejects"] >= 0.9
    for r in rows:
        for side in ("towers", "control"):
            c = r[side]
            assert c["median_interval"] >= c["median_interval_level"] - 0.06 and c["one_sided_bound"] >= 0.89


def _row(towers, seed, delta, specialised, precision="32-true", lr=0.01):
    row = {c: None for c in compare_read.FIXED_COLUMNS}
    row.update(
        run=f"t{towers}s{seed}{precision}lr{lr}",
        seed=seed,
        num_towers=towers,
        lr=lr,
        precision=precision,
        delta_f=delta,
        omega2=delta / 2,
        verdict="specialised" if specialised else "not specialised",
        status="finished",
    )
    last = records.Record.from_dict(
        {
            "stage": "end",
            "verdict": row["verdict"],
            "delta_f": delta,
            "towers": ["half A", "half B"] if towers == 1 else [1, 2],
        },
        records.VERSION,
    )
    config = {"model": {"num_towers": towers, "lr": lr}, "trainer": {"precision": precision}}
    row["condition"] = compare_read.conditions.condition_id(compare_read.conditions.condition(config))
    return compare.Run(row=row, last=last, condition=compare_read.conditions.condition(config))


def test_summary_by_condition_never_pools_precisions():
    runs = [_row(2, s, d, True) for s, d in enumerate([0.5, 0.6, 0.7, 0.4, 0.1])]
    runs[-1].row["verdict"] = "not specialised"
    runs += [_row(1, s, d, False) for s, d in enumerate([0.0, 0.05, 0.1])]
    runs += [_row(2, s, 0.05, False, precision="bf16-mixed") for s in range(3)]  # same settings, other precision
    runs += [_row(1, s, 0.3, False, precision="bf16-mixed") for s in range(2)]
    runs.append(compare.Run(row=dict(runs[0].row, run="diverged", status="diverged"), last=runs[0].last))
    summary = {s["label"]: s for s in compare_stats.summarize(runs)}
    assert set(summary) == {
        "towers: 1; precision: 32-true",
        "towers: 2; precision: 32-true",
        "towers: 1; precision: bf16-mixed",
        "towers: 2; precision: bf16-mixed",
    }
    fp32 = summary["towers: 2; precision: 32-true"]
    assert (fp32["seeds"], fp32["specialised"]) == (5, 4)  # the diverged run is no seed; bf16 runs not pooled
    assert fp32["bound"] == pytest.approx(compare_stats.every_run_bound(4, 5))
    assert fp32["delta_f_median"] == pytest.approx(0.5)
    assert fp32["control_seeds"] == 3  # its control: T=1 at the same precision, not the bf16 one
    assert fp32["control_p"] == pytest.approx(compare_stats.versus_control([0.5, 0.6, 0.7, 0.4, 0.1], [0.0, 0.05, 0.1]))
    assert (fp32["delta_f_low"], fp32["delta_f_high"], fp32["median_level"]) == (0.1, 0.7, 0.9375)  # 5 seeds: min, max
    assert "re" not in fp32  # no random-effects estimate: it does not cover (benchmarks/seed_simulation.py)
    bf16 = summary["towers: 2; precision: bf16-mixed"]
    assert bf16["control_seeds"] == 2 and bf16["control_p"] == pytest.approx(
        compare_stats.versus_control([0.05] * 3, [0.3, 0.3])
    )
    line = compare_stats.condition_line(fp32)
    assert line.startswith(
        f"towers: 2; precision: 32-true [{fp32['id']}]: 4 of 5 seeds specialised (one-sided 95% lower bound 0.34); "
        "median Δf 0.50 [0.10, 0.70] (93.8% order-statistic interval)"
    )
    assert (
        f"one-tower control as 2 random groups (3 seeds): median Δf 0.05; towers vs control p = {fp32['control_p']:.2g}"
        in line
    )
    assert "(one-tower control)" in compare_stats.condition_line(summary["towers: 1; precision: 32-true"])


# ----------------------------------------------------------------------------- figures, CSV, HTML

FIGURES = (
    "delta_f_by_towers",
    "specialised",
    "omega2_by_towers",
    "tower_fractions",
    "kernels_montage",
    "delta_f_over_steps",
)


def test_figures_csv_and_html_are_written(report):
    runs, paths = report
    for name in FIGURES:
        data = paths[f"{name}.png"].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    with open(paths["table.csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [r.name for r in runs]
    assert rows[4]["verdict"] == "specialised" and rows[4]["precision"] == "32-true" and rows[7]["status"] == "failed"
    assert rows[4]["p_delta_f"] == "0.001"  # the number in the CSV; the HTML prints the floor as a bound
    assert {"tower1_colour_fraction", "tower2_colour_fraction_low", "tower1_score", "condition"} <= set(rows[0])
    page = paths["report.html"].read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from outside the file
    assert page.count("<tr class=") == len(runs)
    settings = "batch: 32; data module: towers.data.CatsDogsDataModule; data folder: data/demo; data: demo; "
    settings += "learning rate: 0.01; width policy: split; epochs: 2; precision: 32-true"
    ids = {
        t: next(r.row["condition"] for r in runs if r.row["num_towers"] == t and r.row["lr"] == 0.01) for t in (1, 2)
    }
    assert f"<li>towers: 2; {settings} [{ids[2]}]: 3 of 3 seeds specialised (one-sided 95% lower bound 0.37)" in page
    delta = {  # a run without both sides counts 0
        t: [
            compare_stats.seed_value(r.row["delta_f"])
            for r in runs
            if r.judged and r.row["num_towers"] == t and r.row["lr"] == 0.01
        ]
        for t in (1, 2)
    }
    p = compare_stats.versus_control(delta[2], delta[1])
    assert (
        f"one-tower control as 2 random groups (3 seeds): median Δf {np.median(delta[1]):.2f}; towers vs control p = {p:.2g}"
        in page
    )
    assert f"<li>towers: 1; {settings} [{ids[1]}] (one-tower control): 0 of 3 seeds specialised" in page
    assert "run-006 (diverged)" in page and "run-007 (failed)" in page
    assert '<td data-v="0.001">≤ 1e-3</td>' in page  # p_delta_f at the floor of 999 permutations
    # the sensitivity table: every cut of the records, the rule's 1/3 among them, the T=2 seeds at each
    section = page[page.index("<h2>Sensitivity to the colour cut</h2>") :]
    assert all(f"<th>cut {c:g}</th>" in section for c in (0.1, 0.2, 0.3, 0.3333, 0.4, 0.5))
    row = next(r for r in section.split("<tr>") if r.startswith(f"<td>towers: 2; {settings}</td>"))
    assert (
        row.count("<td>3 of 3 (") + row.count("<td>2 of 3 (") + row.count("<td>1 of 3 (") + row.count("<td>0 of 3 (")
        == 6
        and "<td>3 of 3 (" in row
    )
    assert not list(paths["report.html"].parent.glob(".*.tmp"))


def test_report_records_the_commit_and_the_configs(report):
    _, paths = report
    page = paths["report.html"].read_text()
    head = subprocess.run(
        ["git", "-C", str(Path(compare.__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    commit = re.search(r"<code id=commit>(.*?)</code>", page).group(1)
    assert commit.split()[0] == (head or "unknown")
    configs = page[page.index("<h2>Configs of the runs</h2>") :]
    assert configs.count("<details><summary>") == 9  # every run's config, the failed one's too
    conditions = page[page.index("<h2>Conditions</h2>") : page.index("<h2>Sensitivity")]
    assert conditions.count("<details><summary>") == 3  # each condition's settings in full, under its id
    assert "LR schedule: not recorded" not in conditions and "learning rate: 0.01   (model.lr)" in conditions
    assert "trainer.precision: 32-true" in page and "data.root: data/demo" in page


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    from analysis import compare_html

    assert compare_html.git_commit(tmp_path) == "unknown"


def test_reference_is_shown_beside_the_runs(report, tmp_path):
    runs, paths = report
    plain = compare.read_reference(write_reference(tmp_path / "plain.json", wrapped=False))
    wrapped = compare.read_reference(write_reference(tmp_path / "wrapped.json", wrapped=True))
    record = json.loads(_measured(2, 11, 1))
    assert {k: v for k, v in plain.items() if k not in ("name", "source")} == {
        k: v for k, v in wrapped.items() if k not in ("name", "source")
    }
    assert (plain["delta_f"], plain["verdict"], plain["num_towers"]) == (record["delta_f"], record["verdict"], 2)
    page = paths["report.html"].read_text()
    assert f"published figure figure3: {record['verdict']}, Δf {record['delta_f']:.4g}, p " in page
    assert "published: figure3 (T=2)" in page  # its row in the conditions' table
    fig = compare_figures.fig_delta_f(runs, compare_stats.summarize(runs), [plain])
    (legend,) = [a.get_legend() for a in fig.axes if a.get_legend()]
    assert f"plain: Δf {record['delta_f']:.2f}, {record['verdict']}" in [t.get_text() for t in legend.get_texts()]
    (tmp_path / "bad.json").write_text(json.dumps({"statistics": {}}))
    with pytest.raises(SystemExit, match="no verdict in it"):
        compare.read_reference(tmp_path / "bad.json")


def test_figures_are_fit_for_a_paper(report):
    """Every text at least 8 pt, every legend outside its axes, intervals drawn."""
    from matplotlib.text import Text

    runs, _ = report
    summary = compare_stats.summarize(runs)
    chosen = compare_figures.choose_montage(runs, None)
    figures = {
        "delta_f": compare_figures.fig_delta_f(runs, summary, []),
        "specialised": compare_figures.fig_specialised(summary),
        "omega2": compare_figures.fig_omega2(runs, summary),
        "fractions": compare_figures.fig_tower_fractions(runs),
        "montage": compare_figures.fig_montage(chosen),
        "steps": compare_figures.fig_over_steps(runs),
    }
    for name, fig in figures.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        small = [
            (t.get_text(), t.get_fontsize())
            for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < compare_figures.MIN_FONT
        ]
        assert not small, (name, small)
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:
                assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)), name
    # the one-tower montage is split where the control splits, the towers labelled
    labels = [t.get_text() for t in figures["montage"].findobj(Text)]
    assert "half A" in labels and "half B" in labels and "tower 1\nagnostic" in labels and "tower 2\nspecific" in labels
    control = next(r for r in runs if r.name == "run-000")
    image, blocks = compare_figures.montage_grid(control)
    assert [b[0] for b in blocks] == ["half A", "half B"]
    assert image.shape[0] == blocks[1][2]  # the last block ends the grid


@pytest.mark.parametrize("fmt, magic", [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_format_pdf_and_svg(report, tmp_path, fmt, magic):
    compare.write_report(report[0], tmp_path, fmt=fmt)
    for name in FIGURES:
        assert (tmp_path / f"{name}.{fmt}").read_bytes().startswith(magic), name
        assert not (tmp_path / f"{name}.png").exists()
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == len(FIGURES)


def test_cli_on_folders(folders, tmp_path, capsys):
    ref = write_reference(tmp_path / "fig3.json", wrapped=True)
    assert (
        compare.main(
            [str(f) for f in folders]
            + ["--out", str(tmp_path), "--montage", "run-004", "run-000", "--reference", str(ref)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "9 runs (7 finished, 1 diverged, 1 failed)" not in out  # version_0 has no status.json
    assert "9 runs (6 finished, 1 diverged, 1 failed, 1 unknown)" in out and "report:" in out
    assert "published fig3: specialised" in out
    lines = [line.strip() for line in out.splitlines()]
    settings = "batch: 32; data module: towers.data.CatsDogsDataModule; data folder: data/demo; data: demo; "
    settings += "learning rate: 0.01; width policy: split; epochs: 2; precision: 32-true"
    assert any(re.match(rf"towers: 2; {settings} \[T2-[0-9a-f]{{8}}\]: 3 of 3 seeds specialised", x) for x in lines), (
        out
    )
    csv_run = r"towers: 2; learning rate: 0.02; width policy: per_tower; 6 settings not recorded \[T2-[0-9a-f]{8}\]: "
    assert any(re.match(csv_run + "0 of 1 seeds specialised", x) for x in lines), out
    assert (tmp_path / "report.html").stat().st_size > 10000
    with pytest.raises(SystemExit, match="no run named nope"):
        compare.main([str(folders[0]), "--out", str(tmp_path), "--montage", "nope"])
    with pytest.raises(SystemExit) as exit_:  # argparse: one line, status 2
        compare.main([str(folders[0]), "--out", str(tmp_path), "--format", "jpg"])
    assert exit_.value.code == 2


# ----------------------------------------------------------------------------- the W&B public API path


class FakeFile:
    """wandb.apis.public.File: .name, .download(root, replace)."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.name

    def download(self, root=".", replace=False, exist_ok=False, api=None):
        target = Path(root) / self.name
        shutil.copy(self.path, target)
        return open(target)


class FakeRun:
    """wandb.apis.public.Run as compare.py uses it: id, name, state, config (plain values, nested
    as logged), summary (.items()), sweep (None for runs the offline agent synced), group, files()."""

    def __init__(self, folder: Path, name: str, sweep_group: str):
        self.folder, self.name, self.id = folder, name, folder.parent.name.split("-")[-1]
        wandb_config = yaml.safe_load((folder / "config.yaml").read_text())
        self.config = {k: v["value"] for k, v in wandb_config.items()}
        self.summary = json.loads((folder / "wandb-summary.json").read_text())
        self.state = (
            "finished" if json.loads((folder / "status.json").read_text())["status"] == "finished" else "failed"
        )
        self.sweep, self.group = None, sweep_group

    def files(self, names=None, pattern=None, per_page=50):
        return [FakeFile(p) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def scan_history(self, keys=None, page_size=1000, min_step=0, max_step=None, use_cache=True):
        raise AssertionError("bisection_history.jsonl was uploaded: the history comes from it")


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.paths = []

    def runs(self, path, filters=None, order="+created_at", per_page=50, include_sweeps=False, lazy=True):
        self.paths.append(path)
        return list(self._runs)

    def sweep(self, path):
        """wandb.apis.public.Sweep: its .runs."""
        self.paths.append(path)
        return type("Sweep", (), {"id": path.split("/")[-1], "runs": list(self._runs)})()


def test_wandb_api_gives_the_same_table(folders, tmp_path):
    sweep = folders[0]
    local = [r for r in compare.collect_local([sweep]) if r.row["run"] != "run-007"]  # run-007 never synced
    fake = FakeApi(
        [FakeRun(next((sweep / "runs" / r.name).rglob("bisection.json")).parent, r.name, "demo") for r in local]
    )
    remote = compare.collect_wandb("me/towers", api=fake, cache=tmp_path)
    assert fake.paths == ["me/towers"]
    assert len(remote) == len(local)
    for a, b in zip(local, remote):
        assert {k: v for k, v in a.row.items() if k != "source"} == {k: v for k, v in b.row.items() if k != "source"}
        assert a.history == b.history and b.kernels_png.read_bytes() == a.kernels_png.read_bytes()
    assert remote[0].row["source"] == f"wandb:me/towers/{fake._runs[0].id}"
    assert compare.collect_wandb("me/towers", sweep="abc123", api=fake, cache=tmp_path / "s")[2].row == remote[2].row
    assert fake.paths[-1] == "me/towers/abc123"
    with pytest.raises(SystemExit, match="no runs found in W&B project me/empty"):
        compare.collect_wandb("me/empty", api=FakeApi([]), cache=tmp_path)


def test_wandb_history_from_the_logged_scalars_when_no_history_file(folders, tmp_path):
    class RunWithoutHistoryFile(FakeRun):
        def files(self, names=None, pattern=None, per_page=50):
            return [f for f in super().files() if f.name != "bisection_history.jsonl"]

        def scan_history(self, keys=None, page_size=1000, min_step=0, max_step=None, use_cache=True):
            assert keys == ["bisection/eta2", "bisection/p_value", "verdict/delta_f", "verdict/specialised"]
            return iter(
                [
                    {
                        "_step": 0,
                        "bisection/eta2": 0.05,
                        "bisection/p_value": 0.6,
                        "verdict/delta_f": 0.1,
                        "verdict/specialised": 0.0,
                    },
                    {
                        "_step": 10,
                        "bisection/eta2": 0.3,
                        "bisection/p_value": 0.01,
                        "verdict/delta_f": 0.8,
                        "verdict/specialised": 1.0,
                    },
                    {
                        "_step": 20,
                        "bisection/eta2": 0.4,
                        "bisection/p_value": 0.001,
                        "verdict/delta_f": 0.9,
                        "verdict/specialised": 1.0,
                    },
                ]
            )

    folder = next((folders[0] / "runs" / "run-004").rglob("bisection.json")).parent
    (run,) = compare.collect_wandb(
        "me/towers", api=FakeApi([RunWithoutHistoryFile(folder, "run-004", "demo")]), cache=tmp_path
    )
    assert [
        (h.step, h.value("eta2"), h.value("p_eta2"), h.value("delta_f"), h.value("verdict")) for h in run.history
    ] == [
        (0, 0.05, 0.6, 0.1, "not specialised"),
        (10, 0.3, 0.01, 0.8, "specialised"),
        (20, 0.4, 0.001, 0.9, "specialised"),
    ]
    assert run.row["onset_step"] == 10  # from the logged verdict/specialised
    assert run.row["delta_f"] == json.loads((folder / "bisection.json").read_text())["last"]["delta_f"]


def test_wandb_cli_writes_the_same_csv(folders, tmp_path, monkeypatch):
    import wandb

    sweep = folders[0]
    local = [r for r in compare.collect_local([sweep]) if r.row["run"] != "run-007"]
    fake = FakeApi(
        [FakeRun(next((sweep / "runs" / r.name).rglob("bisection.json")).parent, r.name, "demo") for r in local]
    )
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: fake)
    assert compare.main(["--wandb", "me/towers", "--out", str(tmp_path / "w")]) == 0
    with open(tmp_path / "w" / "table.csv", newline="") as f:
        remote = [{k: v for k, v in r.items() if k != "source"} for r in csv.DictReader(f)]
    local_csv = list(csv.DictReader(io.StringIO(compare.table_csv(local))))
    assert remote == [{k: v for k, v in r.items() if k != "source"} for r in local_csv]


# ----------------------------------------------------------------------------- the report in a browser

CHECK = """<pre id="check"></pre><script>
window.addEventListener("load", () => {
  const sizes = Array.from(document.images).map(i => i.complete + ":" + i.naturalWidth + "x" + i.naturalHeight);
  const th = Array.from(document.querySelectorAll("table.runs th")).find(h => h.textContent === "delta_f");
  th.click(); th.click();  // descending
  const first = document.querySelector("table.runs tbody tr").cells[0].textContent;
  const box = document.querySelector("table.runs").parentElement;
  document.getElementById("check").textContent = JSON.stringify({sizes, first,
    body: document.body.scrollWidth, page: document.documentElement.scrollWidth, window: window.innerWidth,
    box: box.clientWidth, table: box.scrollWidth, overflow: getComputedStyle(box).overflowX});
});
</script></body>"""


def test_report_opens_in_headless_chromium(report):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        if os.environ.get("CI"):  # .ci/run installs it: in CI its absence is a failure, not a skip
            pytest.fail("no chromium on PATH although .ci/run installs Debian's chromium")
        pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium)")
    _, paths = report
    page = paths["report.html"].read_text().replace("</body>", CHECK)
    with tempfile.TemporaryDirectory() as profile:
        probe = Path(profile) / "probe.html"
        probe.write_text(page)
        dom = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}/u",
                "--window-size=1400,900",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    found = re.search(r'<pre id="check">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(check["sizes"]) == len(FIGURES)
    for size in check["sizes"]:
        complete, dims = size.split(":")
        width, height = map(int, dims.split("x"))
        assert complete == "true" and width > 100 and height > 100, check
    assert check["first"] == "run-003"  # largest delta f (no kernel swapped) first after sorting descending
    # fits a 1400 px window: nothing wider than the page; the wide table scrolls inside its own box
    assert check["window"] == 1400, check
    assert check["body"] <= 1400 and check["page"] <= 1400, check
    assert check["overflow"] == "auto" and check["table"] > check["box"], check


# ----------------------------------------------------------------------------- runs made by the real callbacks


def _real_fit(root: Path, towers: int, seed: int, logger: str):
    """A few steps of a real TowerClassifier fit on random tensors with KernelBisectionCallback,
    RunStatus and train.py's SaveRunConfig (config.yaml in the run folder, nested config to the
    logger), logging to offline W&B or to CSV, then a test pass (test/acc)."""
    import lightning as L
    import torch
    from jsonargparse import ArgumentParser
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    from torch.utils.data import DataLoader, TensorDataset

    from towers.callbacks import KernelBisectionCallback
    from towers.module import TowerClassifier
    from towers.runs import RunStatus, SaveRunConfig

    parser = ArgumentParser()
    for key, kind in (
        ("seed_everything", int),
        ("model.num_towers", int),
        ("model.lr", float),
        ("model.width_policy", str),
        ("data.batch_size", int),
        ("trainer.max_epochs", int),
        ("trainer.precision", str),
    ):
        parser.add_argument(f"--{key}", type=kind)
    config = parser.parse_args(
        [
            f"--seed_everything={seed}",
            f"--model.num_towers={towers}",
            "--model.lr=0.01",
            "--model.width_policy=split",
            "--data.batch_size=8",
            "--trainer.max_epochs=2",
            "--trainer.precision=32-true",
        ]
    )
    L.seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(16, 3, 67, 67, generator=g), torch.randint(0, 2, (16,), generator=g))
    loader = DataLoader(data, batch_size=8)
    model = TowerClassifier(num_towers=towers, num_classes=2, lr=0.01, width_multiplier=0.125, image_size=67)
    log = WandbLogger(save_dir=str(root), offline=True, project="towers") if logger == "wandb" else CSVLogger(str(root))
    callbacks = [
        KernelBisectionCallback(every_n_steps=2, permutations=999, bootstrap=200),
        RunStatus(),
        SaveRunConfig(parser, config),
    ]
    trainer = L.Trainer(
        max_epochs=2,
        logger=log,
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        callbacks=callbacks,
    )
    trainer.fit(model, loader, loader)
    trainer.test(model, loader, verbose=False)
    if logger == "wandb":
        import wandb

        wandb.finish()


def test_table_from_runs_written_by_the_real_callbacks(tmp_path, monkeypatch):
    from towers.sweep import Sweep

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "program": "train.py",
                "method": "grid",
                "parameters": {"model.num_towers": {"values": [1, 2]}, "seed_everything": {"values": [0]}},
            }
        )
    )
    sweep = Sweep(sweep_file, tmp_path / "grid")  # the agent's own state file, written by its own class
    for towers in (1, 2):
        run = sweep.new_run({"model.num_towers": towers, "seed_everything": 0})
        _real_fit(tmp_path / "grid" / "runs" / run["name"], towers, 0, "wandb")
        run["status"] = "finished"
    sweep.save()
    _real_fit(tmp_path / "logs", 2, 1, "csv")

    runs = compare.collect_local([tmp_path / "grid", tmp_path / "logs"])
    rows = {r.name: r.row for r in runs}
    assert list(rows) == ["run-000", "run-001", "lightning_logs/version_0"]
    for name, towers, seed in (("run-000", 1, 0), ("run-001", 2, 0), ("lightning_logs/version_0", 2, 1)):
        r = rows[name]
        folder = next(Path(r["source"]).rglob("bisection.json")) if Path(r["source"]).is_dir() else None
        bis = json.loads(folder.read_text())
        assert (r["num_towers"], r["seed"], r["lr"], r["batch_size"], r["max_epochs"], r["width_policy"]) == (
            towers,
            seed,
            0.01,
            8,
            2,
            "split",
        ), r
        assert r["status"] == "finished" and r["epochs"] == 2 and r["step"] == 4
        last, init = (records.Record.from_dict(bis[k], bis["version"]) for k in ("last", "init"))
        assert (r["eta2"], r["p_eta2"], r["omega2"]) == (last.value("eta2"), last.value("p_eta2"), last.value("omega2"))
        assert r["eta2_null"] == pytest.approx(1 / 11)  # 12 conv1 kernels at width 0.125, two groups
        assert r["eta2_init"] == init.value("eta2") and r["eta2"] is not None
        assert r["precision"] == "32-true" and r["version"] == records.VERSION
        for key in (
            "verdict",
            "delta_f",
            "p_delta_f",
            "agnostic_tower",
            "specific_tower",
        ):
            assert r[key] == bis["last"][key], key
        assert [r["tower1_colour_fraction"], r["tower2_colour_fraction"]] == bis["last"]["colour_fraction"]
        assert [r[f"tower{k}_score"] for k in range(1, towers + 1)] == bis["last"]["tower_median"]
        assert 0 <= r["val_acc"] <= 1
    # test/acc logged after fit reaches metrics.csv; an offline W&B run keeps it only in its binary log
    # the test after fit reaches the table from status.json, for offline W&B runs as for CSV runs
    assert all(0 <= r["test_acc"] <= 1 for r in rows.values())
    assert rows["run-000"]["sweep"] == "grid" and rows["lightning_logs/version_0"]["sweep"] is None
    assert [h.step for h in runs[1].history] == [0, 2, 4]
    # one record type through every writer and reader: bisection.json and the history (the callback), the
    # W&B summary (the callback), the sweep's state (the agent), the table (compare), the dashboard's keys
    folder = next((tmp_path / "grid" / "runs" / "run-001").rglob("bisection.json")).parent
    last = records.read_bisection(folder / "bisection.json")["last"]
    history, broken = records.read_history(folder / "bisection_history.jsonl")
    assert broken == 0 and (history[-1].step, history[-1].verdict) == (last.step, last.verdict)
    assert isinstance(last.verdict, Verdict) and last.kernels_file == records.KERNELS_NPY
    assert records.Record.from_dict(json.loads(json.dumps(last.to_dict()))) == last  # to_dict <-> from_dict
    summary = last.summary()
    assert records.Record.from_dict(summary).summary() == summary and summary["version"] == records.VERSION
    wandb_summary = (
        json.loads((folder / "wandb-summary.json").read_text()) if (folder / "wandb-summary.json").exists() else None
    )
    if wandb_summary is not None:  # offline runs keep their summary in the binary log only
        assert {k: wandb_summary[k] for k in summary} == summary
    from towers.sweep_state import read_bisection

    assert read_bisection(folder, folder) == {**summary, "file": str(folder / "bisection.json")}
    row = rows["run-001"]
    assert all(row[k] == last.value(k) for k in ("verdict", "delta_f", "p_delta_f", "eta2", "p_eta2", "permutations"))
    assert all(r.kernels_png is not None for r in runs)
    paths = compare.write_report(runs, tmp_path / "report")
    assert paths["report.html"].stat().st_size > 50000

    # the keys the dashboard's panels read are the ones the real run logged
    from analysis import dashboard

    # (the same scalars go to every logger, so metrics.csv lists them; W&B keeps the images by key)
    with open(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv", newline="") as f:
        logged = set(next(csv.reader(f)))
    scalars = {
        dashboard.ETA2,
        dashboard.ETA2_NULL,
        dashboard.P_VALUE,
        dashboard.TEST_ACC,
        dashboard.VAL_ACC,
        dashboard.DELTA_F,
        dashboard.SPECIALISED,
        dashboard.P_DELTA_F,
        dashboard.colour_fraction(1),
        dashboard.colour_fraction(2),
        dashboard.tower_score(1),
        dashboard.tower_score(2),
        dashboard.tower_score(2, init=True),
    }
    # the verdict's scalars where the tiny run has them (a run without a split has no delta f; a tower of
    # unstructured kernels no colour fraction): exactly what its record's metrics give
    last = records.read_bisection(next((tmp_path / "logs").rglob("bisection.json")))["last"]
    scalars = {k for k in scalars if k in last.metrics() or not k.startswith(("verdict/", "tower_"))} | {
        k for k in last.metrics() if not k.endswith("kernel_change")
    }
    assert scalars <= logged, scalars - logged
    media = next((tmp_path / "grid" / "runs" / "run-001").rglob("media")) / "images"
    images = {f"{p.parent.relative_to(media).as_posix()}/{p.name.split('_')[0]}" for p in media.rglob("*.png")}
    assert {dashboard.KERNELS, dashboard.SCORES} <= images, images
    config = compare_read.read_config(next((tmp_path / "grid" / "runs" / "run-001").rglob("config.yaml")))
    assert {dashboard.NUM_TOWERS, dashboard.LR, dashboard.BATCH_SIZE, dashboard.SEED} <= set(config)


def test_a_broken_history_line_is_skipped_counted_and_reported(tmp_path):
    """A line cut short by a killed process (anywhere in the file, a resumed run appends after it) is
    skipped and counted; the other lines are kept and the run's row says so."""
    record = records.history_line({"step": 5, "stage": "interval", "statistics": {"eta2": 0.1}})
    path = tmp_path / "bisection_history.jsonl"
    path.write_text(record + record[:20] + "\n" + record.replace('"step": 5', '"step": 9') + "[1, 2]\n")
    found, broken = records.read_history(path)
    assert [r.step for r in found] == [5, 9] and broken == 2
    sweep = make_sweep(tmp_path / "sweep")
    history = next((sweep / "runs" / "run-004").rglob("bisection_history.jsonl"))
    history.write_text(history.read_text() + '{"step": 25, "sta')
    rows = {r.name: r for r in compare.collect_local([sweep])}
    run = rows["run-004"]
    assert "bisection_history.jsonl: 1 broken line skipped" in run.row["message"]
    assert len(run.history) == 4 and run.row["onset_step"] == 15 and run.judged


def test_a_status_json_of_the_wrong_shape_is_a_row_with_its_reason(tmp_path):
    sweep = make_sweep(tmp_path)
    for name, text in (("run-003", "[1, 2]"), ("run-004", '{"summary": [1]}'), ("run-005", '"finished"')):
        next((sweep / "runs" / name).rglob("status.json")).write_text(text)
    (sweep / "sweep2").mkdir()
    (sweep / "sweep2" / "sweep.json").write_text('{"runs": 3}')  # a sweep state of the wrong shape
    with pytest.warns(UserWarning):
        runs = compare.collect_local([sweep])
    rows = {r.name: r.row for r in runs}
    for name in ("run-003", "run-004", "run-005"):
        assert "unreadable status.json: not a status.json" in rows[name]["message"], name
        assert rows[name]["status"] == "finished"  # the sweep agent's word, the verdict kept
    assert rows["run-004"]["verdict"] == "specialised"
    assert (
        rows["sweep2/sweep.json"]["status"] == "unreadable"
        and "not a sweep's state" in rows["sweep2/sweep.json"]["message"]
    )
    paths = compare.write_report(runs, tmp_path / "out")  # the report is written with them
    assert "sweep2/sweep.json (unreadable)" in paths["report.html"].read_text()


def test_a_run_without_a_verdict_is_named_not_counted(tmp_path):
    """A bisection.json of format 1 (before the verdict) stays a row, named in the report, in no statistic;
    one judged by an earlier rule (version 2) too, with the reason."""
    folder = write_run(tmp_path / "runs" / "old", 2, 0, seed=0)
    data = json.loads((folder / "bisection.json").read_text())
    for key in ("init", "last"):
        data[key] = {k: v for k, v in data[key].items() if k not in records.VERDICT_FIELDS and k != "version"}
        data[key]["statistics"] = {"eta2": 0.3, "p_value": 0.01}
    (folder / "bisection.json").write_text(json.dumps(dict(data, version=1)))
    (run,) = compare.collect_local([tmp_path / "runs"])
    assert run.usable and not run.judged and run.row["verdict"] is None and run.row["eta2"] == 0.3
    assert compare_stats.summarize([run]) == []
    paths = compare.write_report([run], tmp_path / "out")
    assert "old (no verdict in its bisection.json)" in paths["report.html"].read_text()
    folder = write_run(tmp_path / "runs2" / "rule2", 2, 0, seed=0)
    data = json.loads((folder / "bisection.json").read_text())
    for key in ("init", "last"):
        data[key] = {k: v for k, v in data[key].items() if k != "version"}
    (folder / "bisection.json").write_text(json.dumps(dict(data, version=2)))
    (run,) = compare.collect_local([tmp_path / "runs2"])
    assert (
        run.row["verdict"] == "specialised"
        and not run.judged
        and "earlier rule (record version 2" in run.row["message"]
    )


def test_a_reference_without_a_verdict_is_one_line_with_status_2(folders, tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"score": [0.1]}))
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(folders[0]), "--out", str(tmp_path), "--reference", str(tmp_path / "bad.json")])
    assert exit_.value.code == 2 and "no verdict in it" in capsys.readouterr().err


def test_three_towers_count_by_the_best_bipartition(tmp_path):
    """A 3-tower run counts by the verdict on its best bipartition; the montage names both towers of the
    specific side."""
    folder = write_run(tmp_path / "runs" / "three", 3, 1, seed=0)
    (run,) = compare.collect_local([tmp_path / "runs"])
    last = json.loads((folder / "bisection.json").read_text())["last"]
    assert (last["agnostic_group"], last["specific_group"]) == ([1], [2, 3])
    (s,) = compare_stats.summarize([run])
    assert (s["label"], s["specialised"], s["seeds"]) == ("towers: 3", 1, 1) and run.row["verdict"] == "specialised"
    assert [run.row[f"tower{k}_colour_fraction"] for k in (1, 2, 3)] == last["colour_fraction"]
    _, labels = compare_figures.montage_grid(run)
    assert [label for label, _, _ in labels] == ["tower 1\nagnostic", "tower 2\nspecific", "tower 3\nspecific"]


def test_the_control_is_judged_with_as_many_groups_as_the_towers(tmp_path):
    """Towers against control at T = 3: the one-tower control's kernels split into 3 random groups and
    judged by the verdict's own rule, exactly as towers.verdict.verdict(control_groups=3) judges them."""
    from towers.verdict import verdict

    for seed in range(3):
        write_run(tmp_path / "runs" / f"three{seed}", 3, 1, seed=seed)
        write_run(tmp_path / "runs" / f"one{seed}", 1, 0, seed=seed)
    runs = compare.collect_local([tmp_path / "runs"])
    (three,) = [s for s in compare_stats.summarize(runs) if s["num_towers"] == 3]
    controls = [r for r in runs if r.row["num_towers"] == 1]
    expected = []
    for run in controls:
        seed = run.last.value("seed")
        direct = verdict(kernels(1, run.row["seed"], 0), permutations=999, seed=seed, control_groups=3).delta_f
        assert compare_stats.control_delta_f(run, 3) == pytest.approx(compare_stats.seed_value(direct))
        expected.append(compare_stats.seed_value(direct))
    assert three["control_seeds"] == 3 and three["num_towers"] == 3
    assert three["control_p"] == pytest.approx(
        compare_stats.versus_control(
            [compare_stats.seed_value(r.row["delta_f"]) for r in runs if r.row["num_towers"] == 3], expected
        )
    )
    assert "one-tower control as 3 random groups (3 seeds)" in compare_stats.condition_line(three)


# ----------------------------------------------------------------------------- beside the paper's Figure 3


def test_versus_paper_counts_seeds_at_least_as_split_as_figure_3():
    from towers import reference

    paper = {"delta_f": 0.55, "grey_fraction_agnostic": 0.9, "colour_fraction_specific": 0.6}
    seeds = [
        {"delta_f": 0.55, "grey_fraction_agnostic": 0.8, "colour_fraction_specific": 0.7},  # as split: counted
        {"delta_f": 0.549, "grey_fraction_agnostic": 1.0, "colour_fraction_specific": 0.5},  # less: not
        {"delta_f": None, "grey_fraction_agnostic": None, "colour_fraction_specific": 0.9},  # no split: Δf 0
        {"delta_f": 0.9, "grey_fraction_agnostic": 0.95, "colour_fraction_specific": 0.95},
    ]
    v = reference.versus_paper(seeds, paper)
    assert (v["seeds"], v["split"], v["as_split"]) == (4, 3, 2)
    assert v["delta_f_median"] == pytest.approx((0.549 + 0.55) / 2)  # of 0, 0.549, 0.55, 0.9
    assert v["agnostic_colour_median"] == pytest.approx(0.05) and v["specific_colour_median"] == pytest.approx(0.7)
    assert (v["paper_delta_f"], v["paper_agnostic_colour"], v["paper_specific_colour"]) == pytest.approx(
        (0.55, 0.1, 0.6)
    )
    assert "2 of 4 at least as split as Figure 3 (a split with Δf ≥ 0.55)" in reference.versus_paper_text(v)
    # by default Figure 3's own record (towers.reference) is the one owner of its numbers: as split as itself
    own = reference.paper_record()
    v = reference.versus_paper([own])
    assert (v["as_split"], v["paper_delta_f"]) == (1, own["delta_f"])
    assert v["paper_specific_colour"] == own["colour_fraction_specific"]


def test_the_report_gives_every_towers_frequencies_and_each_condition_beside_figure_3(folders, tmp_path, capsys):
    from towers import reference

    assert compare.main([str(f) for f in folders] + ["--out", str(tmp_path)]) == 0  # Figure 3 without being asked
    out = capsys.readouterr().out
    paper = reference.paper_record()
    runs = compare.collect_local(list(folders))
    two = [r for r in runs if r.judged and r.row["num_towers"] == 2 and r.row["lr"] == 0.01]
    # the planted splits (swap 0, 2, 3 of 16: Δf 1, 0.75, 0.625) are all at least as split as Figure 3 (0.55)
    assert sorted(r.row["delta_f"] for r in two) == pytest.approx([0.625, 0.75, 1.0])
    (line,) = [x for x in out.splitlines() if "learning rate: 0.01" in x and x.strip().startswith("towers: 2")]
    d = paper["delta_f"]
    assert f"beside the paper's Figure 3: 3 seeds: median Δf 0.75 (Figure 3: {d:.2f};" in line
    assert f"3 of 3 at least as split as Figure 3 (a split with Δf ≥ {d:.2f})" in line
    (half,) = [x for x in out.splitlines() if "learning rate: 0.02" in x]  # half grey, half colour: no split
    assert "1 seeds: median Δf 0.00" in half and "0 of 1 at least as split" in half
    page = (tmp_path / "report.html").read_text()
    assert "beside the paper&#x27;s Figure 3 (a description)" in page
    assert html.escape(f"3 of 3 at least as split as Figure 3 (a split with Δf ≥ {d:.2f})") in page
    assert html.escape(f"frequency {sweep_report.frequency_text(paper)}") in page  # the paper's row
    # table.csv: per tower its grey and colour kernels by band, every grey / colour kernel counted once
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text()))}
    for run in two:
        for k, (grey, colour_) in enumerate(zip(run.last.value("grey_count"), run.last.value("colour_count")), 1):
            bands_grey = [int(x) for x in rows[run.name][f"tower{k}_frequency_grey"].split("/")]
            bands_colour = [int(x) for x in rows[run.name][f"tower{k}_frequency_colour"].split("/")]
            assert (len(bands_grey), sum(bands_grey), sum(bands_colour)) == (3, grey, colour_)
            assert float(rows[run.name][f"tower{k}_frequency_median"]) == pytest.approx(
                run.last.value("frequency_median")[k - 1]
            )
