"""analysis/compare.py: the table from run folders and from the W&B API, the statistics checked by
hand, the figures, the CSV and the HTML report (opened in headless Chromium)."""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
import compare  # noqa: E402


# ----------------------------------------------------------------------------- fixtures in the runs' formats

def _record(stage, step, epoch, towers, scores, eta2, p_value, error=None):
    """One record as KernelBisectionCallback writes it (towers.callbacks.measure + step/stage)."""
    n = len(scores) // towers
    tower = np.repeat(np.arange(1, towers + 1), n).tolist()
    medians = [float(np.median(scores[i * n:(i + 1) * n])) for i in range(towers)]
    k = len(scores)
    stats = None if error else {
        "groups": list(range(1, towers + 1)) if towers > 1 else ["first half", "second half"],
        "eta2": eta2, "eta2_null": (max(towers, 2) - 1) / (k - 1), "p_value": p_value,
        "eta2_split": eta2, "p_value_split": p_value, "color_group": int(np.argmax(medians)) + 1,
        "control": towers == 1, "permutations": 999, "bootstrap": 200, "ci_level": 0.95, "seed": 0}
    return {"stage": stage, "step": step, "epoch": epoch, "time": "2026-11-28T09:00:00+00:00",
            "axis_name": "luminance", "num_towers": towers, "kernels_per_tower": n, "kernel_size": [11, 11],
            "channel_std": None, "axis": [0.577, 0.577, 0.577], "tower": tower, "error": error,
            "score": None if error else [float(s) for s in scores],
            "tower_median": None if error else medians, "statistics": stats}


def write_run(folder: Path, towers: int, eta2: float, p_value: float, seed: int, status="finished",
              diverged=False, layout="wandb", config=None, acc=0.75):
    """A run's own folder as the callbacks leave it, plus its logger's files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 10 * towers)
    init_scores = rng.uniform(0.5, 0.8, 8 * towers)
    trained = np.concatenate([rng.uniform(0.1 + 0.5 * (i % 2), 0.4 + 0.5 * (i % 2), 8) for i in range(towers)])
    init = _record("init", 0, 0, towers, init_scores, 0.05, 0.6)
    history = [init, _record("interval", 10, 1, towers, trained, eta2 / 2, 0.2)]
    last = (_record("end", 15, 1, towers, trained, None, None, error="conv1 weights are not finite (NaN or inf): "
                    "training diverged?") if diverged else _record("end", 20, 2, towers, trained, eta2, p_value))
    history.append(last)
    (folder / "bisection.json").write_text(json.dumps({
        "format": "towers.bisection", "version": 1, "init": dict(init, kernels_file="kernels_init.npy"),
        "last": dict(last, kernels_file="kernels.npy"), "history": "bisection_history.jsonl",
        "measurement_seconds": 0.1}))
    (folder / "bisection_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (20 * towers, 40, 3), dtype=np.uint8)).save(folder / "kernels.png")
    summary = {"val/acc": acc, "test/acc": acc - 0.05, "train/loss": 0.4}
    (folder / "status.json").write_text(json.dumps({
        "status": "diverged" if diverged else status, "step": last["step"], "epoch": last["epoch"],
        "message": "loss NaN" if diverged else "", "history": [dict(epoch=0, step=10, **summary)],
        "summary": summary}))
    config = config or {"seed_everything": seed, "model": {"num_towers": towers, "lr": 0.01, "width_policy": "split"},
                        "data": {"class_path": "towers.data.CatsDogsDataModule", "init_args": {"batch_size": 32}},
                        "trainer": {"max_epochs": 2}}
    if layout == "wandb":  # W&B's own files/ layout: config.yaml as {key: {value: ...}}, wandb-summary.json
        wb = {k: {"value": v} for k, v in config.items()}
        wb["_wandb"] = {"value": {"cli_version": "0.31.0"}}
        (folder / "config.yaml").write_text(yaml.safe_dump(wb))
        (folder / "wandb-summary.json").write_text(json.dumps({**summary, "bisection/kernels": {"_type": "images/separated"}}))
    elif layout == "csv":  # Lightning CSVLogger version dir: hparams.yaml + metrics.csv, no config.yaml
        (folder / "hparams.yaml").write_text(yaml.safe_dump(
            {"num_towers": towers, "lr": 0.02, "width_policy": "per_tower"}))
        (folder / "metrics.csv").write_text("epoch,step,test/acc,val/acc\n0,9,,0.6\n1,19,,0.7\n1,19,0.66,\n")
        (folder / "status.json").unlink()
    return folder


def make_sweep(root: Path) -> Path:
    """A towers.sweep output folder: 2 tower counts x 2 seeds finished, one diverged, one failed early."""
    sweep = root / "demo"
    runs = []
    grid = [(1, 0, 0.01, 0.6), (1, 1, 0.02, 0.4), (2, 0, 0.40, 0.001), (2, 1, 0.30, 0.002), (2, 2, 0.5, 0.001)]
    for i, (towers, seed, eta2, p) in enumerate(grid):
        name = f"run-{i:03d}"
        write_run(sweep / "runs" / name / "wandb" / f"offline-run-20261128_0900{i:02d}-id{i}" / "files",
                  towers, eta2, p, seed, diverged=(i == 4))
        runs.append({"name": name, "params": {"model.num_towers": towers, "seed_everything": seed},
                     "status": "diverged" if i == 4 else "finished", "message": "", "attempts": []})
    runs.append({"name": "run-005", "params": {"model.num_towers": 2, "seed_everything": 3}, "status": "failed",
                 "message": "exit status 1; see the log", "attempts": []})
    (sweep / "runs" / "run-005").mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "demo", "sweep": {}, "runs": runs}))
    return sweep


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sweep = make_sweep(root)
    logs = root / "lightning_logs" / "version_0"
    write_run(logs, 2, 0.35, 0.003, seed=7, layout="csv")
    return sweep, root / "lightning_logs"


@pytest.fixture(scope="module")
def report(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    runs = compare.collect_local(list(folders))
    return runs, compare.write_report(runs, out, source="fixtures")


# ----------------------------------------------------------------------------- the table

def test_table_from_sweep_and_lightning_folders(folders):
    runs = compare.collect_local(list(folders))
    rows = {r.name: r.row for r in runs}
    assert list(rows) == [f"run-{i:03d}" for i in range(6)] + ["version_0"]
    r = rows["run-002"]
    assert (r["sweep"], r["seed"], r["num_towers"], r["width_policy"], r["batch_size"], r["lr"], r["max_epochs"]) \
        == ("demo", 0, 2, "split", 32, 0.01, 2)
    assert (r["epochs"], r["step"], r["status"]) == (2, 20, "finished")
    assert r["eta2"] == 0.40 and r["p_value"] == 0.001 and r["significant"] is True
    assert r["test_acc"] == pytest.approx(0.70) and r["val_acc"] == pytest.approx(0.75)
    assert r["eta2_init"] == 0.05 and r["p_value_init"] == 0.6
    assert r["eta2_null"] == pytest.approx(1 / 15)
    bis = json.loads(next((folders[0] / "runs" / "run-002").rglob("bisection.json")).read_text())
    assert [r["tower1_score"], r["tower2_score"]] == bis["last"]["tower_median"]
    assert [r["tower1_score_init"], r["tower2_score_init"]] == bis["init"]["tower_median"]
    assert r["tower1_score"] < 0.45 < r["tower2_score"]  # the fixture's grey and coloured towers
    assert rows["run-000"]["num_towers"] == 1 and rows["run-000"]["significant"] is False
    assert rows["run-004"]["status"] == "diverged" and rows["run-004"]["eta2"] is None
    failed = rows["run-005"]
    assert (failed["status"], failed["seed"], failed["num_towers"], failed["eta2"]) == ("failed", 3, 2, None)
    assert "exit status 1" in failed["message"]
    v = rows["version_0"]  # Lightning CSV log dir: hparams.yaml and metrics.csv
    assert (v["num_towers"], v["lr"], v["width_policy"], v["test_acc"], v["val_acc"]) == (2, 0.02, "per_tower", 0.66, 0.7)
    assert v["status"] is None and v["eta2"] == 0.35
    usable = [r.name for r in runs if r.usable]
    assert usable == ["run-000", "run-001", "run-002", "run-003", "version_0"]  # the last stage of version_0 is "end"


def test_an_unreadable_file_is_reported_and_the_run_kept(tmp_path):
    sweep = make_sweep(tmp_path)
    bisection = next((sweep / "runs" / "run-002").rglob("bisection.json"))
    bisection.write_text('{"format": "towers.bisection", "init": ')  # cut short
    with pytest.warns(UserWarning, match="cannot read .*bisection.json"):
        rows = {r.name: r.row for r in compare.collect_local([sweep])}
    r = rows["run-002"]
    assert r["eta2"] is None and r["status"] == "finished" and r["num_towers"] == 2 and r["val_acc"] == 0.75
    assert r["message"].startswith("unreadable bisection.json")
    assert rows["run-003"]["eta2"] == 0.30  # the other runs are untouched


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


# ----------------------------------------------------------------------------- statistics by hand

def test_clopper_pearson_every_run_bounds():
    assert compare.clopper_pearson(5, 5)[0] == pytest.approx(0.478, abs=5e-4)
    assert compare.clopper_pearson(10, 10)[0] == pytest.approx(0.692, abs=5e-4)
    assert compare.clopper_pearson(5, 5)[1] == 1.0
    lo, hi = compare.clopper_pearson(0, 5)  # upper bound 1 - 0.025 ** (1/5)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** 0.2)


def test_median_and_bootstrap_interval():
    med, lo, hi = compare.median_interval([0.9, 0.1, 0.5, 0.3, 0.7])
    assert med == 0.5 and 0.1 <= lo <= med <= hi <= 0.9 and lo < hi
    assert compare.median_interval([0.2, 0.4, 0.6, 0.8])[0] == pytest.approx(0.5)
    med, lo, hi = compare.median_interval([0.3])
    assert med == 0.3 and np.isnan(lo) and np.isnan(hi)


def test_summary_of_a_constructed_table():
    def run(towers, seed, eta2, p, lr=0.01):
        row = {c: None for c in compare.FIXED_COLUMNS}
        row.update(run=f"t{towers}s{seed}lr{lr}", seed=seed, num_towers=towers, lr=lr, eta2=eta2, p_value=p,
                   eta2_null=(towers - 1) / (48 * towers - 1), status="finished")
        return compare.Run(row=row, last={"stage": "end", "control": False})

    eta2 = [0.31, 0.12, 0.45, 0.28, 0.05]
    p = [0.001, 0.01, 0.0001, 0.02, 0.3]
    runs = [run(2, s, e, q) for s, (e, q) in enumerate(zip(eta2, p))]
    runs += [run(4, s, 0.2, 0.001) for s in range(10)]
    runs += [run(2, 0, 0.9, 0.001, lr=0.1)]
    runs.append(compare.Run(row=dict(runs[0].row, run="diverged", status="diverged"), last={"stage": "end"}))
    summary = {s["label"]: s for s in compare.summarize(runs, alpha=0.05)}
    assert set(summary) == {"T=2, lr=0.01", "T=2, lr=0.1", "T=4, lr=0.01"}
    two = summary["T=2, lr=0.01"]
    assert (two["seeds"], two["significant"]) == (5, 4)  # the diverged run is not a seed
    assert two["eta2_median"] == pytest.approx(0.28)  # sorted: .05 .12 .28 .31 .45
    assert two["eta2_low"] <= 0.28 <= two["eta2_high"]
    assert (two["cp_low"], two["cp_high"]) == pytest.approx((0.2836, 0.9949), abs=1e-4)
    assert two["eta2_null"] == pytest.approx(1 / 95)
    four = summary["T=4, lr=0.01"]
    assert (four["significant"], four["seeds"]) == (10, 10) and four["cp_low"] == pytest.approx(0.6915, abs=1e-4)
    assert four["eta2_median"] == four["eta2_low"] == four["eta2_high"] == 0.2


# ----------------------------------------------------------------------------- figures, CSV, HTML

def test_figures_csv_and_html_are_written(report):
    runs, paths = report
    for name in ("eta2_by_towers.png", "significant.png", "tower_scores.png", "kernels_montage.png",
                 "eta2_over_steps.png"):
        data = paths[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    with open(paths["table.csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [r.name for r in runs]
    assert rows[2]["eta2"] == "0.4" and rows[2]["status"] == "finished" and rows[5]["status"] == "failed"
    assert {"tower1_score", "tower2_score_init"} <= set(rows[0])
    page = paths["report.html"].read_text()
    assert page.count('src="data:image/png;base64,') == 5
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from outside the file
    assert page.count("<tr class=") == len(runs)
    assert "2 of 2 seeds" in page and "run-004 (diverged)" in page and "run-005 (failed)" in page
    assert not list(paths["report.html"].parent.glob(".*.tmp"))


def test_cli_on_folders(folders, tmp_path, capsys):
    assert compare.main([str(f) for f in folders] + ["--out", str(tmp_path), "--montage", "run-002", "run-000"]) == 0
    out = capsys.readouterr().out
    assert "7 runs (4 finished, 1 diverged, 1 failed, 1 unknown)" in out and "report:" in out
    assert "T=2, width=split, batch=32, lr=0.01, epochs=2: 2 of 2 seeds" in out
    assert "T=2, width=per_tower, batch=None, lr=0.02, epochs=None: 1 of 1 seeds" in out
    assert (tmp_path / "report.html").stat().st_size > 10000
    with pytest.raises(SystemExit, match="no run named nope"):
        compare.main([str(folders[0]), "--out", str(tmp_path), "--montage", "nope"])


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
        self.state = "finished" if json.loads((folder / "status.json").read_text())["status"] == "finished" else "failed"
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
    local = [r for r in compare.collect_local([sweep]) if r.row["run"] != "run-005"]  # run-005 never synced
    fake = FakeApi([FakeRun(next((sweep / "runs" / r.name).rglob("bisection.json")).parent, r.name, "demo")
                    for r in local])
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
            assert keys == ["bisection/eta2", "bisection/p_value"]
            return iter([{"_step": 0, "bisection/eta2": 0.05, "bisection/p_value": 0.6},
                         {"_step": 20, "bisection/eta2": 0.4, "bisection/p_value": 0.001}])

    folder = next((folders[0] / "runs" / "run-002").rglob("bisection.json")).parent
    (run,) = compare.collect_wandb("me/towers", api=FakeApi([RunWithoutHistoryFile(folder, "run-002", "demo")]),
                                   cache=tmp_path)
    assert [(h["step"], h["eta2"], h["p_value"]) for h in run.history] == [(0, 0.05, 0.6), (20, 0.4, 0.001)]
    assert run.row["eta2"] == 0.40


def test_wandb_cli_writes_the_same_csv(folders, tmp_path, monkeypatch):
    import wandb

    sweep = folders[0]
    local = [r for r in compare.collect_local([sweep]) if r.row["run"] != "run-005"]
    fake = FakeApi([FakeRun(next((sweep / "runs" / r.name).rglob("bisection.json")).parent, r.name, "demo")
                    for r in local])
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
  const th = Array.from(document.querySelectorAll("table.runs th")).find(h => h.textContent === "eta2");
  th.click(); th.click();  // descending
  const first = document.querySelector("table.runs tbody tr").cells[0].textContent;
  document.getElementById("check").textContent = JSON.stringify({sizes, first});
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
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}/u",
             "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r'<pre id="check">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(check["sizes"]) == 5
    for size in check["sizes"]:
        complete, dims = size.split(":")
        width, height = map(int, dims.split("x"))
        assert complete == "true" and width > 100 and height > 100, check
    assert check["first"] == "run-002"  # largest eta2 (0.40) first after sorting descending


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
    for key, kind in (("seed_everything", int), ("model.num_towers", int), ("model.lr", float),
                      ("model.width_policy", str), ("data.batch_size", int), ("trainer.max_epochs", int)):
        parser.add_argument(f"--{key}", type=kind)
    config = parser.parse_args([f"--seed_everything={seed}", f"--model.num_towers={towers}", "--model.lr=0.01",
                                "--model.width_policy=split", "--data.batch_size=8", "--trainer.max_epochs=2"])
    L.seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(16, 3, 67, 67, generator=g), torch.randint(0, 2, (16,), generator=g))
    loader = DataLoader(data, batch_size=8)
    model = TowerClassifier(num_towers=towers, num_classes=2, lr=0.01, width_multiplier=0.125, image_size=67)
    log = WandbLogger(save_dir=str(root), offline=True, project="towers") if logger == "wandb" else CSVLogger(str(root))
    callbacks = [KernelBisectionCallback(every_n_steps=2, permutations=999, bootstrap=200), RunStatus(),
                 SaveRunConfig(parser, config)]
    trainer = L.Trainer(max_epochs=2, logger=log, default_root_dir=str(root), accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        log_every_n_steps=1, callbacks=callbacks)
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
    sweep_file.write_text(yaml.safe_dump({"program": "train.py", "method": "grid", "parameters": {
        "model.num_towers": {"values": [1, 2]}, "seed_everything": {"values": [0]}}}))
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
        assert (r["num_towers"], r["seed"], r["lr"], r["batch_size"], r["max_epochs"], r["width_policy"]) == \
            (towers, seed, 0.01, 8, 2, "split"), r
        assert r["status"] == "finished" and r["epochs"] == 2 and r["step"] == 4
        assert r["eta2"] == bis["last"]["statistics"]["eta2"] and r["p_value"] == bis["last"]["statistics"]["p_value"]
        assert r["eta2_null"] == pytest.approx(1 / 11)  # 12 conv1 kernels at width 0.125, two groups
        assert r["eta2_init"] == bis["init"]["statistics"]["eta2"]
        assert [r[f"tower{k}_score"] for k in range(1, towers + 1)] == bis["last"]["tower_median"]
        assert [r[f"tower{k}_score_init"] for k in range(1, towers + 1)] == bis["init"]["tower_median"]
        assert 0 <= r["val_acc"] <= 1
    # test/acc logged after fit reaches metrics.csv; an offline W&B run keeps it only in its binary log
    # the test after fit reaches the table from status.json, for offline W&B runs as for CSV runs
    assert all(0 <= r["test_acc"] <= 1 for r in rows.values())
    assert rows["run-000"]["sweep"] == "grid" and rows["lightning_logs/version_0"]["sweep"] is None
    assert [h["step"] for h in runs[1].history] == [0, 2, 4]
    assert all(r.kernels_png is not None for r in runs)
    paths = compare.write_report(runs, tmp_path / "report")
    assert paths["report.html"].stat().st_size > 50000

    # the keys the dashboard's panels read are the ones the real run logged
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    import dashboard

    # (the same scalars go to every logger, so metrics.csv lists them; W&B keeps the images by key)
    with open(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv", newline="") as f:
        logged = set(next(csv.reader(f)))
    scalars = {dashboard.ETA2, dashboard.ETA2_NULL, dashboard.P_VALUE, dashboard.TEST_ACC, dashboard.VAL_ACC,
               dashboard.tower_score(1), dashboard.tower_score(2), dashboard.tower_score(2, init=True)}
    assert scalars <= logged, scalars - logged
    media = next((tmp_path / "grid" / "runs" / "run-001").rglob("media")) / "images"
    images = {f"{p.parent.relative_to(media).as_posix()}/{p.name.split('_')[0]}" for p in media.rglob("*.png")}
    assert {dashboard.KERNELS, dashboard.SCORES} <= images, images
    config = compare.read_config(next((tmp_path / "grid" / "runs" / "run-001").rglob("config.yaml")))
    assert {dashboard.NUM_TOWERS, dashboard.LR, dashboard.BATCH_SIZE, dashboard.SEED} <= set(config)


def test_history_drops_only_a_last_line_cut_short(tmp_path):
    path = tmp_path / "bisection_history.jsonl"
    record = json.dumps({"step": 5, "stage": "interval", "statistics": {"eta2": 0.1}})
    path.write_text(record + "\n" + record[:20])  # a process killed while appending
    with pytest.warns(UserWarning, match="cut short"):
        assert [r["step"] for r in compare.read_history(path)] == [5]
    path.write_text(record[:20] + "\n" + record + "\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        compare.read_history(path)
