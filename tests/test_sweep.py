"""The sweep files (W&B schema, the command wandb agent renders, what train.py parses from it) and
the offline agent (towers/sweep.py) driving a stand-in training program: kill and resume, failure,
divergence, the table."""

import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from towers import sweep as agent_mod

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))


# -- the sweep files --------------------------------------------------------------------------------
def test_the_three_sweep_files_exist():
    assert {p.name for p in SWEEP_FILES} >= {"bisection.yaml", "lr_batch.yaml", "demo.yaml"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_file_is_a_valid_wandb_sweep(path):
    config = yaml.safe_load(path.read_text())
    assert agent_mod.sweeps.schema_violations_from_proposed_config(config) == []
    agent_mod.sweeps.SweepConfig(config)  # raises on a schema violation
    assert config["program"] == "train.py"
    command = config["command"]
    assert command[:4] == ["${env}", "${interpreter}", "${program}", "fit"]
    # the config file before the swept values, or the file silently wins
    assert command.index("--config") < command.index("${args}") == len(command) - 1
    for name, spec in config["parameters"].items():
        assert "parameters" not in spec, f"{name}: nested parameters render as a Python dict"


def test_bisection_grid_and_lr_batch_search_are_what_the_study_needs():
    bisection = yaml.safe_load((ROOT / "sweeps/bisection.yaml").read_text())
    assert bisection["method"] == "grid"
    assert set(bisection["parameters"]["model.num_towers"]["values"]) >= {1, 2, 3, 4}
    assert len(bisection["parameters"]["seed_everything"]["values"]) >= 5
    assert bisection["parameters"]["model.width_policy"] == {"value": "per_tower"}
    assert bisection["metric"]["name"] == "val/acc"
    lr_batch = yaml.safe_load((ROOT / "sweeps/lr_batch.yaml").read_text())
    assert lr_batch["method"] in ("random", "bayes")
    assert lr_batch["parameters"]["model.lr"]["distribution"] == "log_uniform_values"
    assert "data.batch_size" in lr_batch["parameters"]
    assert lr_batch["early_terminate"]["type"] == "hyperband"
    assert agent_mod.grid_size(yaml.safe_load((ROOT / "sweeps/demo.yaml").read_text())) <= 8


# -- what wandb agent runs, and what train.py makes of it -------------------------------------------
def wandb_agent_command(config, params, tmp_path, monkeypatch):
    """The command list wandb's own Agent builds for one run (its process start is intercepted)."""
    from wandb import wandb_agent

    captured = {}

    class Capture:
        def __init__(self, command=None, env=None, **kwargs):
            captured["command"] = command

    monkeypatch.setattr(wandb_agent, "AgentProcess", Capture)
    monkeypatch.setattr(os, "environ", dict(os.environ, WANDB_DIR=str(tmp_path)))  # the agent writes env
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="test")
    agent._sweep_command = copy.deepcopy(config["command"])  # as the agent receives it from the server
    agent._command_run({"run_id": "r1", "program": config["program"],
                        "args": {k: {"value": v} for k, v in params.items()}})
    return captured["command"]


def sample_params(config, n=3):
    """Grid: points covering every value of every parameter; random/bayes: n draws of the engine."""
    if config["method"] != "grid":
        return [agent_mod.next_params(config, []) for _ in range(n)]
    points, runs = [], []
    while (run := agent_mod.sweeps.next_run(config, runs)) is not None:
        runs.append(run)
        points.append({k: v["value"] for k, v in run.config.items()})
    # every value of each swept parameter at least once
    seen, keep = set(), []
    for p in points:
        new = {(k, json.dumps(v)) for k, v in p.items()} - seen
        if new:
            keep.append(p)
            seen |= new
    return keep


def parse_train_args(argv):
    """Parse a train.py command line with train.py's CLI, without building the model or the trainer."""
    import train

    class ParseOnly(train.TowersCLI):
        def instantiate_classes(self):
            pass

        def _run_subcommand(self, subcommand):
            pass

    assert argv[0] == "fit"
    cli = ParseOnly(train.TowerClassifier, train.CatsDogsDataModule, args=argv, save_config_callback=train.SaveRunConfig)
    return cli.config["fit"]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_rendered_command_parses_to_the_swept_values(path, tmp_path, monkeypatch):
    config = yaml.safe_load(path.read_text())
    config_file = config["command"][config["command"].index("--config") + 1]
    assert (ROOT / config_file).exists(), config_file
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["train.py"])
    from towers.module import TowerClassifier

    for params in sample_params(config):
        command = wandb_agent_command(config, params, tmp_path, monkeypatch)
        assert command == agent_mod.render_command(config, params)  # the offline agent renders the same
        assert command[:3] == ["/usr/bin/env", "python", "train.py"]
        assert command[-len(params):] == [f"--{k}={v}" for k, v in params.items()]  # after the config
        parsed = parse_train_args(command[3:])
        # a dict value (sweeps/demo.yaml's `model` conditions) is a partial config: each of its keys must arrive
        flat = {f"{key}.{k}" if isinstance(value, dict) else key: v if isinstance(value, dict) else value
                for key, value in params.items() for k, v in (value.items() if isinstance(value, dict) else [(key, value)])}
        for key, value in flat.items():
            assert parsed[key] == value and type(parsed[key]) is type(value), (key, parsed[key], value)
        # the combination builds (tiny widths: the check is that e.g. 3 towers are accepted)
        model_args = {k: v for k, v in vars(parsed["model"]).items() if not k.startswith("_")}
        TowerClassifier(**{**model_args, "width_multiplier": 1 / 16, "image_size": 67})


# -- the offline agent ------------------------------------------------------------------------------
def write_sweep(tmp_path, parameters, method="grid", **extra):
    config = {"program": str(FIXTURES / "standin_train.py"), "method": method,
              "metric": {"name": "val/acc", "goal": "maximize"}, "parameters": parameters,
              "command": ["${env}", "${interpreter}", "${program}", "fit", "--config",
                          str(FIXTURES / "standin.yaml"), "${args}"], **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def state(out):
    return json.loads((out / "sweep.json").read_text())


def epochs_run(out, name):
    log = out / "runs" / name / "epochs.log"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_failed_and_diverged_runs_are_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    path = write_sweep(tmp_path, {"model.lr": {"values": [0.01, 5.0]},
                                  "standin.fail_at_epoch": {"values": [99, 1]},
                                  "standin.diverge_above_lr": {"value": 1.0}})
    out = tmp_path / "out"
    assert agent_mod.main([str(path), "--out", str(out), "--jobs", "2"]) == 0
    runs = {(r["params"]["model.lr"], r["params"]["standin.fail_at_epoch"]): r for r in state(out)["runs"]}
    assert len(runs) == 4
    assert runs[0.01, 99]["status"] == "finished" and runs[0.01, 99]["exit_code"] == 0
    failed = runs[0.01, 1]
    assert failed["status"] == "failed" and failed["exit_code"] == 1
    assert "stand-in failure at epoch 1" in Path(failed["log"]).read_text()
    for key in [(5.0, 99), (5.0, 1)]:
        assert runs[key]["status"] == "diverged" and runs[key]["exit_code"] == 3
        assert "NaN or infinite" in runs[key]["message"]
    printed = capsys.readouterr().out
    table = printed[printed.index("run "):]
    assert "diverged" in table and "failed" in table and failed["log"] in table
    row = next(line for line in table.splitlines() if line.startswith(runs[0.01, 99]["name"]))
    assert "0.8333" in row and "0.2" in row and "0.002" in row  # val/acc, eta2, p_value of bisection.json
    # a second start has nothing left to do: no run is repeated
    assert agent_mod.main([str(path), "--out", str(out)]) == 0
    assert len(state(out)["runs"]) == 4
    assert all(len(r["attempts"]) == 1 for r in state(out)["runs"])


def test_killed_agent_resumes_without_repeating_or_losing_a_run(tmp_path):
    path = write_sweep(tmp_path, {"model.num_towers": {"values": [1, 2]}, "seed_everything": {"values": [0, 1]},
                                  "standin.sleep": {"value": 0.6}})
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    agent = subprocess.Popen([sys.executable, "-m", "towers.sweep", str(path), "--out", str(out)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # kill it while run-001 is in flight with at least one epoch checkpointed
        deadline = time.time() + 150
        while time.time() < deadline:
            if epochs_run(out, "run-001"):
                break
            assert agent.poll() is None, "the agent ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("run-001 never started")
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    finally:
        if agent.poll() is None:
            agent.kill()
    killed = state(out)
    assert [r["status"] for r in killed["runs"]] == ["finished", "running"]
    child = killed["runs"][1]["attempts"][0]["pid"]
    for _ in range(100):  # the run process dies with its agent (PR_SET_PDEATHSIG)
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    epochs_before = epochs_run(out, "run-001")
    assert 1 <= len(epochs_before) < 3

    assert agent_mod.main([str(path), "--out", str(out)]) == 0  # the same arguments again
    runs = state(out)["runs"]
    assert [r["name"] for r in runs] == ["run-000", "run-001", "run-002", "run-003"]
    assert {(r["params"]["model.num_towers"], r["params"]["seed_everything"]) for r in runs} == \
        set(itertools.product([1, 2], [0, 1]))
    assert all(r["status"] == "finished" for r in runs)
    assert len(runs[0]["attempts"]) == 1  # finished before the kill: not repeated
    resumed = runs[1]["attempts"]
    assert len(resumed) == 2 and resumed[1]["resumed_from"].endswith("last.ckpt")
    assert resumed[1]["command"][-1] == f"--ckpt_path={resumed[1]['resumed_from']}"
    for run in runs:  # every epoch run exactly once, and the history has each once
        assert epochs_run(out, run["name"]) == [0, 1, 2]
        assert [h["epoch"] for h in run["history"]] == [0, 1, 2]


def test_hyperband_stops_runs_that_fall_behind(tmp_path):
    # The stand-in's val/acc at every epoch is lower the further lr is from 0.01. Hyperband with
    # eta 2 keeps a running run while its best value is in the better half of the values the runs
    # had at the same epoch: the 0.02 run passes (second of two), the 0.3 and 0.5 runs fall behind.
    path = write_sweep(tmp_path, {"model.lr": {"values": [0.01, 0.02, 0.3, 0.5]},
                                  "standin.sleep": {"value": 0.4}, "trainer.max_epochs": {"value": 5}},
                       early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2})
    out = tmp_path / "out"
    assert agent_mod.main([str(path), "--out", str(out)]) == 0
    runs = state(out)["runs"]
    assert [r["status"] for r in runs] == ["finished", "finished", "stopped", "stopped"]
    assert [len(r["history"]) for r in runs[:2]] == [5, 5]
    assert all(1 <= len(r["history"]) < 5 for r in runs[2:])
    assert all(r["message"] == "stopped early by hyperband" for r in runs[2:])


def test_an_output_folder_of_another_sweep_is_refused(tmp_path):
    out = tmp_path / "out"
    path = write_sweep(tmp_path, {"model.lr": {"values": [0.01]}})
    assert agent_mod.main([str(path), "--out", str(out)]) == 0
    path = write_sweep(tmp_path, {"model.lr": {"values": [0.02]}})
    with pytest.raises(SystemExit, match="different sweep"):
        agent_mod.main([str(path), "--out", str(out)])


def test_a_random_sweep_needs_a_count(tmp_path):
    path = write_sweep(tmp_path, {"model.lr": {"min": 0.001, "max": 0.1}}, method="random")
    with pytest.raises(SystemExit, match="--count"):
        agent_mod.main([str(path), "--out", str(tmp_path / "out")])
    assert agent_mod.main([str(path), "--out", str(tmp_path / "out"), "--count", "2", "--jobs", "2"]) == 0
    assert [r["status"] for r in state(tmp_path / "out")["runs"]] == ["finished", "finished"]


def test_demo_sweep_end_to_end_through_train_py(tmp_path):
    """The real chain: towers.sweep -> the command of sweeps/demo.yaml -> train.py -> offline W&B runs.

    Needs the data module and configs/demo.yaml (the data branch); a second config after demo.yaml
    makes the data and the network tiny and keeps the generated images in tmp_path.
    """
    from tests.test_logging import wandb_run_contents

    config = yaml.safe_load((ROOT / "sweeps/demo.yaml").read_text())
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({
        "model": {"width_multiplier": 0.125},
        "data": {"root": str(tmp_path / "demo-data"), "demo_images_per_class": 16, "batch_size": 8},
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False}}))
    at = config["command"].index("${args}")
    config["command"][at:at] = ["--config", str(tiny)]
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the sweep's command names train.py and configs/demo.yaml relative to the repository
    try:
        assert agent_mod.main([str(path), "--out", str(out), "--count", "1"]) == 0  # one run: ~20 s of imports
    finally:
        os.chdir(cwd)
    runs = state(out)["runs"]
    assert [r["status"] for r in runs] == ["finished"], [r["message"] for r in runs]
    for run in runs:
        assert run["wandb_dir"], "no W&B run: configs/demo.yaml needs the WandbLogger (see README)"
        folder = Path(run["wandb_dir"])
        assert folder.name.startswith("offline-run-")
        _, summary, name = wandb_run_contents(folder)
        towers = run["params"]["model"]["num_towers"]  # sweeps/demo.yaml: one `model` value per condition
        assert name.startswith(f"t{towers}-s{run['params']['seed_everything']}-")
        assert 0 <= summary["val/acc"] <= 1
        assert (folder / "files" / "config.yaml").exists()
        assert (folder / "files" / "bisection.json").exists()
        assert 0 <= run["bisection"]["eta2"] <= 1 and 0 < run["bisection"]["p_value"] <= 1
        assert (folder / "files" / "kernels.png").exists(), "kernel images belong in the W&B run folder"
