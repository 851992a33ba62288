"""The sweep files (W&B schema, the command wandb agent renders, what train.py parses from it, the
W&B project) and the offline agent (towers/sweep.py) driving a stand-in training program: GPUs,
shards, two agents at once, kill and resume, failure, divergence, the disk estimate, the table."""

import collections
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
from towers.verdict import format_p

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
    assert bisection["parameters"]["model.width_policy"] == {"value": "split"}  # a fixed total width
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
    agent._command_run(
        {"run_id": "r1", "program": config["program"], "args": {k: {"value": v} for k, v in params.items()}}
    )
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
    cli = ParseOnly(train.TowerClassifier, train.ImageDataModule, args=argv, save_config_callback=train.SaveRunConfig)
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
        assert command[-len(params) :] == [f"--{k}={v}" for k, v in params.items()]  # after the config
        parsed = parse_train_args(command[3:])
        # a dict value (sweeps/demo.yaml's `model` conditions) is a partial config: each of its keys must arrive
        flat = {
            f"{key}.{k}" if isinstance(value, dict) else key: v if isinstance(value, dict) else value
            for key, value in params.items()
            for k, v in (value.items() if isinstance(value, dict) else [(key, value)])
        }
        for key, value in flat.items():
            assert parsed[key] == value and type(parsed[key]) is type(value), (key, parsed[key], value)
        # the combination builds (tiny widths: the check is that e.g. 3 towers are accepted)
        model_args = {k: v for k, v in vars(parsed["model"]).items() if not k.startswith("_")}
        TowerClassifier(**{**model_args, "width_multiplier": 1 / 16, "image_size": 67})


def wandb_sweep_project(path, monkeypatch):
    """The project `wandb sweep FILE` creates the sweep in, decided by wandb's own CLI. No server: the
    call that would create the sweep is intercepted, and no settings file or login gives a default."""
    import wandb
    import wandb.apis.public.sweeps as public_sweeps
    from click.testing import CliRunner
    from wandb.cli import cli

    created = {}

    class NoServer:
        def __init__(self):
            self.settings = collections.defaultdict(lambda: None)

    def upsert(api, config, project=None, entity=None, **kwargs):
        created["project"] = project
        raise RuntimeError("no W&B server in the tests")

    monkeypatch.setattr(wandb, "Api", lambda *args, **kwargs: NoServer())
    monkeypatch.setattr(public_sweeps, "_upsert_sweep", upsert)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    CliRunner().invoke(cli.sweep, [str(path)])
    return created["project"]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_the_sweep_and_its_runs_log_to_one_wandb_project(path, tmp_path, monkeypatch):
    # Without `project:` wandb sweep names the project after the clone's folder, while the runs'
    # logger names its own; under `wandb agent ENTITY/PROJECT/ID` the runs go to the sweep's.
    config = yaml.safe_load(path.read_text())
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["train.py"])
    project = wandb_sweep_project(path, monkeypatch)
    assert project == config["project"]
    params = sample_params(config, 1)[0]
    logger = parse_train_args(agent_mod.render_command(config, params)[3:])["trainer"]["logger"]
    assert logger.class_path.endswith("WandbLogger") and logger.init_args.project == project
    agent = agent_mod.Agent(agent_mod.Sweep(path, tmp_path / "out"), count=1)
    assert agent.run_env({"name": "run-000", "params": params}, None)["WANDB_PROJECT"] == project


# -- the offline agent ------------------------------------------------------------------------------
def write_sweep(tmp_path, parameters, method="grid", **extra):
    config = {
        "program": str(FIXTURES / "standin_train.py"),
        "method": method,
        "project": "towers-test",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": parameters,
        "command": [
            "${env}",
            "${interpreter}",
            "${program}",
            "fit",
            "--config",
            str(FIXTURES / "standin.yaml"),
            "${args}",
        ],
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def state(out):
    return json.loads((out / "sweep.json").read_text())


def epochs_run(out, name):
    log = out / "runs" / name / "epochs.log"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def standin_starts(out, name):
    """What each stand-in process of a run saw: its environment, start and end time (env.json)."""
    return [json.loads(p.read_text()) for p in sorted((out / "runs" / name).glob("standin-*/env.json"))]


def agent_process(path, out, log, *args):
    """An agent in a process of its own (so it can be killed), its output in the file log."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "towers.sweep", str(path), "--out", str(out), *args],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=f,
            stderr=f,
        )


def wait_until(condition, agent, what, log):
    deadline = time.time() + 150
    while not condition():
        assert agent.poll() is None, f"the agent ended before {what}:\n{log.read_text()}"
        assert time.time() < deadline, f"no {what}"
        time.sleep(0.05)


def wait_dead(pid):
    for _ in range(100):  # a run process dies with its agent (PR_SET_PDEATHSIG)
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            return
        time.sleep(0.1)
    pytest.fail(f"run process {pid} outlived its agent")


def test_the_agent_needs_no_lightning(tmp_path):
    # the agent resumes a run from its newest last*.ckpt (towers.records, which train.py uses too)
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    for name in ("a/checkpoints/last.ckpt", "a/checkpoints/epoch=1.ckpt", "last-v1.ckpt"):
        (tmp_path / name).write_text(name)
        time.sleep(0.01)
    assert agent_mod.newest_last_checkpoint(tmp_path) == tmp_path / "last-v1.ckpt"
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, towers.sweep; print('lightning' in sys.modules)"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert loaded.stdout.strip() == "False", loaded.stderr


def test_failed_and_diverged_runs_are_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    path = write_sweep(
        tmp_path,
        {
            "model.lr": {"values": [0.01, 5.0]},
            "standin.fail_at_epoch": {"values": [99, 1]},
            "standin.diverge_above_lr": {"value": 1.0},
        },
    )
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
    assert "Disk: no estimate until a run of" in printed  # the stand-in is not train.py: nothing to measure yet
    table = printed[printed.index("run ") :]
    assert "diverged" in table and "failed" in table and failed["log"] in table
    row = next(line for line in table.splitlines() if line.startswith(runs[0.01, 99]["name"]))
    assert "0.8333" in row and "0.2" in row and "0.002" in row  # val/acc, eta2, p_value of bisection.json
    # a second start has nothing left to do: no run is repeated; its estimate is the runs' own checkpoints
    assert agent_mod.main([str(path), "--out", str(out)]) == 0
    assert len(state(out)["runs"]) == 4
    assert all(len(r["attempts"]) == 1 for r in state(out)["runs"])
    largest = max(
        (out / "runs" / r["name"] / "checkpoints" / "last.ckpt").stat().st_size
        for r in state(out)["runs"]
        if (out / "runs" / r["name"] / "checkpoints").exists()
    )
    assert f"Disk: about {agent_mod._size(4 * largest)} of checkpoints for 4 runs" in capsys.readouterr().out


def test_gpus_give_each_run_its_own_gpu_and_never_one_gpu_two_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(agent_mod, "visible_gpu_count", lambda: 8)  # a machine with GPUs 0..7
    path = write_sweep(
        tmp_path,
        {
            "model.num_towers": {"values": [1, 2, 3]},
            "seed_everything": {"values": [0, 1]},
            "standin.sleep": {"value": 0.15},
        },
    )
    out = tmp_path / "out"
    assert agent_mod.main([str(path), "--out", str(out), "--gpus", "3,7"]) == 0
    runs = state(out)["runs"]
    assert [r["status"] for r in runs] == ["finished"] * 6
    spans = {"3": [], "7": []}
    for run in runs:
        (attempt,) = run["attempts"]
        (seen,) = standin_starts(out, run["name"])
        assert seen["env"]["CUDA_VISIBLE_DEVICES"] == attempt["gpu"]
        spans[attempt["gpu"]].append((seen["start"], seen["end"]))
        # W&B: the sweep file's project, the sweep as group, the condition (no seed) as job type
        assert seen["env"]["WANDB_PROJECT"] == "towers-test" and seen["env"]["WANDB_RUN_GROUP"] == "out"
        assert seen["env"]["WANDB_JOB_TYPE"] == f"towers: {run['params']['model.num_towers']}"
    assert spans["3"] and spans["7"]
    for gpu, starts in spans.items():  # one GPU's runs one after the other
        starts.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(starts)), (gpu, starts)


def test_gpu_ids_count_within_the_agents_own_visible_devices_and_bad_options_get_one_line(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")  # e.g. the GPUs SLURM gave the job
    monkeypatch.setattr(agent_mod, "visible_gpu_count", lambda: 2)  # which CUDA then numbers 0 and 1
    path = write_sweep(tmp_path, {"model.lr": {"values": [0.01]}})
    out = tmp_path / "out"
    assert agent_mod.main([str(path), "--out", str(out), "--gpus", "1", "--shard", "0/2"]) == 0
    (seen,) = standin_starts(out, "run-000")
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "6"
    capsys.readouterr()
    for bad in (
        ["--gpus", "2"],
        ["--gpus", "0,0"],
        ["--gpus", "a"],
        ["--count", "-3"],
        ["--count", "0"],
        ["--jobs", "0"],
        ["--jobs", "two"],
        ["--jobs", "3", "--gpus", "0,1"],
        ["--shard", "2/2"],
        ["--shard", "1"],
        ["--shard", "0/3"],
    ):  # the last: this sweep was split into 2
        with pytest.raises(SystemExit) as stopped:
            agent_mod.main([str(path), "--out", str(out), *bad])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # argparse's usage, then one line naming the option
        assert stopped.value.code == 2 and "error:" in last and bad[0] in last and "Traceback" not in err, err


def test_three_shards_split_a_grid_and_a_killed_shard_resumes_its_own_runs(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "model.num_towers": {"values": [1, 2, 3]},
            "seed_everything": {"values": [0, 1]},
            "standin.sleep": {"value": 0.5},
        },
    )
    out = tmp_path / "out"
    logs = [tmp_path / f"agent{i}.log" for i in range(3)]
    agents = [agent_process(path, out, logs[i], "--shard", f"{i}/3") for i in range(3)]
    try:
        # shard 1 owns run-001 and run-004: kill its agent while run-001 is in flight, one epoch saved
        wait_until(lambda: epochs_run(out, "run-001"), agents[1], "run-001's first epoch", logs[1])
        agents[1].send_signal(signal.SIGKILL)
        agents[1].wait()
        killed = state(out)["runs"][1]  # readable after the kill
        assert killed["status"] == "running" and killed["owner"]["pid"] == agents[1].pid
        wait_dead(killed["attempts"][0]["pid"])
        assert 1 <= len(epochs_run(out, "run-001")) < 3
        assert agent_mod.main([str(path), "--out", str(out), "--shard", "1/3"]) == 0  # the same arguments again
        for agent, log in zip(agents, logs):
            assert agent.wait(timeout=150) in (0, -signal.SIGKILL), log.read_text()
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    runs = state(out)["runs"]
    assert [r["name"] for r in runs] == [f"run-{k:03d}" for k in range(6)]
    assert {(r["params"]["model.num_towers"], r["params"]["seed_everything"]) for r in runs} == set(
        itertools.product([1, 2, 3], [0, 1])
    )
    shard_of = {agents[0].pid: 0, agents[1].pid: 1, agents[2].pid: 2, os.getpid(): 1}
    for k, run in enumerate(runs):  # each run by its own shard, every epoch exactly once
        assert run["status"] == "finished" and run["owner"] is None
        assert {shard_of[a["agent"]] for a in run["attempts"]} == {k % 3}
        assert len(run["attempts"]) == (2 if k == 1 else 1)
        assert epochs_run(out, run["name"]) == [0, 1, 2]
        assert [h["epoch"] for h in run["history"]] == [0, 1, 2]
    resumed = runs[1]["attempts"][1]
    assert resumed["resumed_from"].endswith("last.ckpt")
    assert resumed["command"][-1] == f"--ckpt_path={resumed['resumed_from']}"
    # one W&B run per grid point: both attempts of the resumed run got its id, every run its own
    ids = {r["name"]: {s["env"]["WANDB_RUN_ID"] for s in standin_starts(out, r["name"])} for r in runs}
    assert all(ids[r["name"]] == {r["wandb_id"]} for r in runs) and len({r["wandb_id"] for r in runs}) == 6
    assert {s["env"]["WANDB_RESUME"] for s in standin_starts(out, "run-001")} == {"allow"}
    assert sum(len(standin_starts(out, r["name"])) for r in runs) == 7  # 6 runs, one resumed once


def test_a_run_is_held_while_its_owner_lives_here_or_beats_elsewhere(tmp_path):
    from towers import sweep_state

    path = write_sweep(tmp_path, {"model.lr": {"values": [0.01]}})
    agent = agent_mod.Agent(agent_mod.Sweep(path, tmp_path / "out"), count=None)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        now = time.time()
        here = {
            "host": sweep_state.HOST,
            "pid": sleeper.pid,
            "start": sweep_state.process_start(sleeper.pid),
            "heartbeat": now - 3600,
        }  # on this host the pid decides, not the heartbeat
        elsewhere = {"host": "other-node", "pid": 1, "start": 0, "heartbeat": now - 10}
        assert sweep_state.owner_alive(here, now) and sweep_state.owner_alive(elsewhere, now)
        assert not sweep_state.owner_alive(dict(here, start=here["start"] + 1), now)  # the pid reused
        assert not sweep_state.owner_alive(dict(elsewhere, heartbeat=now - sweep_state.STALE_SECONDS - 1), now)
        for owner in (here, elsewhere):
            with agent.sweep.locked():
                agent.sweep.runs[0].update(status="running", owner=owner)
            assert agent.claim() is None  # a live agent's run is never taken
            with agent.sweep.locked():
                assert [r["name"] for r in agent.held_by_others(time.time())] == ["run-000"]
    finally:
        sleeper.kill()
        sleeper.wait()
    with agent.sweep.locked():
        agent.sweep.runs[0]["owner"] = here
    assert agent.claim() == ("run-000", None)  # its owner is gone: taken, and held by this agent now
    assert agent.is_me(state(tmp_path / "out")["runs"][0]["owner"])


def test_two_agents_started_at_once_on_one_state_run_each_run_once(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "model.num_towers": {"values": [1, 2]},
            "seed_everything": {"values": [0, 1]},
            "standin.sleep": {"value": 0.2},
        },
    )
    out = tmp_path / "out"
    logs = [tmp_path / f"agent{i}.log" for i in range(2)]
    agents = [agent_process(path, out, log) for log in logs]
    for agent, log in zip(agents, logs):
        assert agent.wait(timeout=150) == 0, log.read_text()
    runs = state(out)["runs"]
    assert [r["name"] for r in runs] == [f"run-{k:03d}" for k in range(4)]
    for run in runs:
        assert run["status"] == "finished" and len(run["attempts"]) == 1
        assert len(standin_starts(out, run["name"])) == 1 and epochs_run(out, run["name"]) == [0, 1, 2]
    assert {a["agent"] for r in runs for a in r["attempts"]} <= {a.pid for a in agents}


def test_a_run_that_ended_while_its_agent_was_killed_is_recorded_from_its_files(tmp_path, capsys):
    # the stand-in writes its last checkpoint, status.json and bisection.json, then SIGKILLs the agent
    marker = tmp_path / "agent-killed"
    path = write_sweep(
        tmp_path, {"model.num_towers": {"values": [2]}, "standin.kill_agent_at_end": {"value": str(marker)}}
    )
    out = tmp_path / "out"
    agent = agent_process(path, out, tmp_path / "agent.log")
    assert agent.wait(timeout=150) == -signal.SIGKILL, (tmp_path / "agent.log").read_text()
    (before,) = state(out)["runs"]
    assert before["status"] == "running" and before["summary"] == {}  # killed before it recorded the end
    assert agent_mod.main([str(path), "--out", str(out)]) == 0
    (run,) = state(out)["runs"]
    assert run["status"] == "finished" and len(run["attempts"]) == 1  # recorded, not run again
    assert "recorded from" in run["attempts"][0]["note"] and run["owner"] is None
    assert epochs_run(out, run["name"]) == [0, 1, 2]
    assert run["summary"]["val/acc"] == pytest.approx(1 - 0.5 / 3)
    assert run["bisection"]["eta2"] == pytest.approx(0.2) and run["bisection"]["p_eta2"] == pytest.approx(0.002)
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith(run["name"] + " "))
    assert "finished" in row and "0.8333" in row and "0.2" in row and "0.002" in row


def test_hyperband_stops_runs_that_fall_behind(tmp_path):
    # The stand-in's val/acc at every epoch is lower the further lr is from 0.01. Hyperband with
    # eta 2 keeps a running run while its best value is in the better half of the values the runs
    # had at the same epoch: the 0.02 run passes (second of two), the 0.3 and 0.5 runs fall behind.
    path = write_sweep(
        tmp_path,
        {
            "model.lr": {"values": [0.01, 0.02, 0.3, 0.5]},
            "standin.sleep": {"value": 0.4},
            "trainer.max_epochs": {"value": 5},
        },
        early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2},
    )
    out = tmp_path / "out"
    assert agent_mod.main([str(path), "--out", str(out)]) == 0
    runs = state(out)["runs"]
    assert [r["status"] for r in runs] == ["finished", "finished", "stopped", "stopped"]
    assert [len(r["history"]) for r in runs[:2]] == [5, 5]
    assert all(1 <= len(r["history"]) < 5 for r in runs[2:])
    assert all(r["message"] == "stopped early by hyperband" for r in runs[2:])


def test_an_output_folder_of_another_sweep_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    path = write_sweep(tmp_path, {"model.lr": {"values": [0.01]}})
    assert agent_mod.main([str(path), "--out", str(out)]) == 0
    path = write_sweep(tmp_path, {"model.lr": {"values": [0.02]}})
    capsys.readouterr()
    assert agent_mod.main([str(path), "--out", str(out)]) == 2
    assert "belongs to a different sweep config" in one_error_line(capsys)


def test_a_random_sweep_needs_a_count(tmp_path, capsys):
    path = write_sweep(tmp_path, {"model.lr": {"min": 0.001, "max": 0.1}}, method="random")
    with pytest.raises(SystemExit) as stopped:
        agent_mod.main([str(path), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2 and "sweep has no end: give --count N" in capsys.readouterr().err
    assert agent_mod.main([str(path), "--out", str(tmp_path / "out"), "--count", "2", "--jobs", "2"]) == 0
    assert [r["status"] for r in state(tmp_path / "out")["runs"]] == ["finished", "finished"]


def test_demo_sweep_end_to_end_through_train_py(tmp_path, capsys):
    """The real chain: towers.sweep -> the command of sweeps/demo.yaml -> train.py -> offline W&B runs.

    Needs the data module and configs/demo.yaml (the data branch); a second config after demo.yaml
    makes the data and the network tiny and keeps the generated images in tmp_path. The disk estimate
    printed before the run is compared with the checkpoints the run wrote.
    """
    from tests.test_logging import wandb_records, wandb_run_contents

    config = yaml.safe_load((ROOT / "sweeps/demo.yaml").read_text())
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        yaml.safe_dump(
            {
                "model": {"width_multiplier": 0.125},
                "data": {"root": str(tmp_path / "demo-data"), "demo_images_per_class": 16, "batch_size": 8},
                "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False},
            }
        )
    )
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
        assert 0 <= run["bisection"]["eta2"] <= 1 and 0 < run["bisection"]["p_eta2"] <= 1
        assert (folder / "files" / "kernels.png").exists(), "kernel images belong in the W&B run folder"
        (record,) = [r.run for r in wandb_records(next(folder.glob("*.wandb"))) if r.WhichOneof("record_type") == "run"]
        assert (record.project, record.run_group) == (config["project"], "out")
        assert record.job_type.startswith(f"towers: {towers}")  # the run's condition (towers.conditions)
        # the grid point's W&B id, which every attempt of it gets: train.py's WandbLogger takes it
        assert record.run_id == run["wandb_id"] and folder.name.endswith(f"-{run['wandb_id']}")
    # the estimate: 2 checkpoint files (the latest epoch, last.ckpt links to it; the best) of weights and momentum
    printed = capsys.readouterr().out
    # the end table: the run's verdict, delta f and eta2 with their p, as its bisection.json says
    result = runs[0]["bisection"]
    # (a few steps leave every kernel unstructured: then no side, no delta f, and its cells are empty)
    assert result["verdict"] in ("specialised", "not specialised")
    assert result["delta_f"] is None or -1 <= result["delta_f"] <= 1
    row = next(line for line in printed.splitlines() if line.startswith(runs[0]["name"] + " "))
    p_delta_f = format_p(result["p_delta_f"], result["permutations"], bare=True)
    delta_f = "" if result["delta_f"] is None else f"{result['delta_f']:.4g}"
    assert f" {result['verdict']} " in row and f" {delta_f} " in row and f" {p_delta_f} " in row
    assert (
        f" {result['eta2']:.4g} " in row
        and f" {format_p(result['p_eta2'], result['permutations']).removeprefix('= ')} " in row
    )
    first, low, high = result["towers"][0], result["colour_fraction_low"][0], result["colour_fraction_high"][0]
    fraction = result["colour_fraction"][0]
    assert (
        f"{first}: n/a" if fraction is None else f"{first}: {100 * fraction:.0f}% [{100 * low:.0f}-{100 * high:.0f}]"
    ) in row
    estimate, files, parameters, per_parameter = agent_mod.train_checkpoint_bytes(config, runs[0]["params"])
    assert (files, per_parameter) == (2, 8)
    assert (
        f"Disk: about {agent_mod._size(estimate)} of checkpoints for 1 runs (per run 2 checkpoint files x "
        f"{parameters / 1e6:.1f}M parameters x 8 bytes" in printed
    )
    written = [p for p in (out / "runs" / runs[0]["name"]).rglob("*.ckpt") if not p.is_symlink()]
    assert len(written) == 2
    assert 0.9 < sum(p.stat().st_size for p in written) / estimate < 1.1


# -- what the agent refuses, and what it does with damaged state (issue 24) -------------------------
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_jobs_2_without_gpus_runs_two_runs_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = write_sweep(tmp_path, {"seed_everything": {"values": [0, 1, 2]}, "standin.sleep": {"value": 0.2}})
    out = tmp_path / "out"
    assert agent_mod.main([str(path), "--out", str(out), "--jobs", "2"]) == 0
    spans = sorted((s["start"], s["end"]) for r in state(out)["runs"] for s in standin_starts(out, r["name"]))
    assert len(spans) == 3
    # the first two ran at once: each started before the other ended; and never more than two at once
    (a0, a1), (b0, b1) = spans[:2]
    assert a0 < b1 and b0 < a1, spans
    assert max(sum(s0 <= t < s1 for s0, s1 in spans) for t, _ in spans) == 2, spans
    assert all(a["gpu"] is None for r in state(out)["runs"] for a in r["attempts"])  # the devices they find


def test_gpus_the_agent_cannot_see_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path, {"model.lr": {"values": [0.01]}})
    out = tmp_path / "out"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for count, ids, said in ((2, "0,7", "sees 2 GPUs, numbered 0..1; 7 is not"), (0, "0", "sees no GPU; 0 is not")):
        monkeypatch.setattr(agent_mod, "visible_gpu_count", lambda count=count: count)
        with pytest.raises(SystemExit) as stopped:
            agent_mod.main([str(path), "--out", str(out), "--gpus", ids])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and said in err.strip().splitlines()[-1], err
    assert not out.exists()
    # and the count is the real one: this process's CUDA devices as PyTorch counts them
    import torch

    monkeypatch.undo()
    assert agent_mod.visible_gpu_count() == torch.cuda.device_count()


def test_a_sweep_parameter_train_py_does_not_know_stops_the_agent_before_any_launch(tmp_path, monkeypatch, capsys):
    config = yaml.safe_load((ROOT / "sweeps/demo.yaml").read_text())
    monkeypatch.chdir(ROOT)  # the sweep's paths (train.py, configs/demo.yaml) are relative to the repository
    monkeypatch.setattr(sys, "argv", ["train.py"])
    out = tmp_path / "out"
    for parameters, said in (
        ({"model.num_towerz": {"values": [2]}}, "unrecognized arguments: --model.num_towerz=2"),
        ({"model.num_towers": {"values": [2, "two"]}}, 'model.num_towers="two"'),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(dict(config, parameters={**parameters, "seed_everything": {"values": [0]}})))
        assert agent_mod.main([str(path), "--out", str(out)]) == 2
        err = one_error_line(capsys)
        assert said in err and "nothing was launched" in err, err
        assert not out.exists()  # nothing launched, nothing written


def test_a_sweep_file_or_output_folder_that_cannot_be_used_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    cases = {"missing.yaml": None, "notyaml.yaml": "parameters: [a\n", "empty.yaml": "", "list.yaml": "- 1\n"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        assert agent_mod.main([str(tmp_path / name), "--out", str(out)]) == 2, name
        assert name in one_error_line(capsys)
    # valid for W&B's schema, but not for its engine: a continuous parameter in a grid
    path = write_sweep(tmp_path, {"model.lr": {"min": 0.001, "max": 0.1}})
    assert agent_mod.main([str(path), "--out", str(out)]) == 2
    assert "is a disallowed type with grid search" in one_error_line(capsys)
    path = write_sweep(tmp_path, {"model.lr": {"values": [0.01]}})
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(dict(config, program=str(tmp_path / "nowhere.py"))))
    assert agent_mod.main([str(path), "--out", str(out)]) == 2
    assert "nowhere.py is not a file" in one_error_line(capsys)
    path = write_sweep(tmp_path, {"model.lr": {"values": [0.01]}})
    (tmp_path / "a-file").write_text("")
    assert agent_mod.main([str(path), "--out", str(tmp_path / "a-file")]) == 2  # --out names a file
    assert "a-file (give --out a folder" in one_error_line(capsys)


def finished_sweep(tmp_path):
    """A grid of two runs, both finished: the sweep file, OUT, and what each run's stand-in saw."""
    path = write_sweep(tmp_path, {"seed_everything": {"values": [0, 1]}})
    out = tmp_path / "out"
    assert agent_mod.main([str(path), "--out", str(out)]) == 0
    assert [r["status"] for r in state(out)["runs"]] == ["finished", "finished"]
    return path, out


@pytest.mark.parametrize(
    "damage, said",
    [
        ("cut", "is not JSON"),
        ("[]", "is not a sweep's state ([] is not of type 'object')"),
        ("wrong shape", "is not a sweep's state (state.runs[1]: 'params' is a required property)"),
        ("0 bytes", "is empty (0 bytes) while"),
        ("missing", "is missing while"),
    ],
)
def test_a_damaged_sweep_json_stops_the_agent_naming_its_backup_and_repeats_nothing(tmp_path, capsys, damage, said):
    path, out = finished_sweep(tmp_path)
    good = (out / "sweep.json").read_text()
    assert (out / "sweep.json.bak").read_text() == good  # the copy kept at every save
    damaged = {
        "cut": good[: len(good) // 2],
        "[]": "[]",
        "wrong shape": json.dumps({**json.loads(good), "runs": [json.loads(good)["runs"][0], {"name": "run-001"}]}),
        "0 bytes": "",
    }
    if damage == "missing":
        (out / "sweep.json").unlink()
    else:
        (out / "sweep.json").write_text(damaged[damage])
    capsys.readouterr()
    assert agent_mod.main([str(path), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert said in err and "sweep.json.bak, holds 2 runs (2 finished)" in err, err
    assert f"`cp {out}/sweep.json.bak {out}/sweep.json`" in err
    # nothing ran again, and the damaged file was left as it was for the user to see
    assert all(len(standin_starts(out, f"run-00{k}")) == 1 for k in range(2))
    assert (
        not (out / "sweep.json").exists()
        if damage == "missing"
        else (out / "sweep.json").read_text() == damaged[damage]
    )
    # what the line says to do works: the sweep is whole again, and done
    (out / "sweep.json").write_text((out / "sweep.json.bak").read_text())
    assert agent_mod.main([str(path), "--out", str(out)]) == 0
    assert all(len(standin_starts(out, f"run-00{k}")) == 1 for k in range(2))
    assert json.loads((out / "sweep.json").read_text())["runs"] == json.loads(good)["runs"]


def test_a_damaged_sweep_json_without_a_good_backup_says_so_and_an_empty_one_without_runs_is_a_new_sweep(
    tmp_path, capsys
):
    path, out = finished_sweep(tmp_path)
    (out / "sweep.json").write_text("[]")
    (out / "sweep.json.bak").write_text('{"runs": ')
    capsys.readouterr()
    assert agent_mod.main([str(path), "--out", str(out)]) == 2
    assert "sweep.json.bak is not JSON" in one_error_line(capsys)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "sweep.json").write_text("")  # e.g. `touch`: no run folders, so a new sweep
    assert agent_mod.main([str(path), "--out", str(fresh)]) == 0
    assert [r["status"] for r in state(fresh)["runs"]] == ["finished", "finished"]


def test_two_processes_generating_the_demo_data_at_once_both_get_it(tmp_path):
    # as two sharded agents' first runs on a data folder that does not exist yet: both generate it
    # (each into a folder of its own); the second rename finds the first's complete folder and uses it
    root = tmp_path / "demo-data"
    code = "import sys; from towers.data.demo import make_demo_dataset; make_demo_dataset(sys.argv[1], 6, 0)"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(root)],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(
        f"{c}.{i}.jpg" for c in ("cat", "dog") for i in range(6)
    )
    assert [p.name for p in tmp_path.iterdir()] == ["demo-data"]  # no temporary folder left


def test_the_sync_command_uploads_every_attempt_of_a_run_into_its_one_wandb_run(tmp_path):
    from towers.sweep_report import sync_command

    path = write_sweep(tmp_path, {"seed_everything": {"values": [0, 1]}})
    sweep = agent_mod.Sweep(path, tmp_path / "out")
    with sweep.locked():
        one, old = sweep.new_run({"seed_everything": 0}), sweep.new_run({"seed_everything": 1})
        folders = [f"w/offline-run-2026120{k}_000000-{one['wandb_id']}" for k in (1, 2)]
        one["attempts"] = [{"wandb_dir": f} for f in folders]  # killed once, resumed: one id
        one["wandb_dir"] = folders[-1]
        old.pop("wandb_id")  # a state from before the runs had one id: their attempts had two
        old["attempts"] = [{"wandb_dir": "w/offline-run-1-aaaa"}, {"wandb_dir": "w/offline-run-2-bbbb"}]
        old["wandb_dir"] = "w/offline-run-2-bbbb"
    assert sync_command(sweep).splitlines()[-1].split()[2:] == [*folders, "w/offline-run-2-bbbb"]


# -- the end table beside the paper's Figure 3, and each tower's kernels by spatial frequency (issues 22, 23)
def test_the_end_table_gives_every_towers_frequencies_and_sets_each_condition_beside_figure_3():
    from types import SimpleNamespace

    import torch

    from tests.fixtures.kernels import colour, gabor, noisy
    from towers import reference, sweep_report
    from towers.measure import measure
    from towers.records import VERSION, Record

    def summary(record: dict) -> dict:  # what read_bisection keeps in the sweep's state (bisection.json's version)
        return Record.from_dict(record, VERSION).summary()

    paper = reference.paper_record()
    grey, coloured = noisy(gabor(32, 3)), noisy(colour(32, 4))
    planted = measure(torch.stack([grey[:16], coloured[:16]]), permutations=999, bootstrap=200)  # delta f 1
    mixed = measure(  # half grey, half colour in both towers: no side largely grey, none largely colour
        torch.stack([torch.cat([grey[16:24], coloured[16:24]]), torch.cat([grey[24:], coloured[24:]])]),
        permutations=999,
        bootstrap=200,
    )
    assert mixed["delta_f"] is None and planted["delta_f"] == 1.0  # what the counts below rest on
    results = [("finished", paper), ("finished", planted), ("finished", mixed), ("failed", planted)]
    sweep = SimpleNamespace(
        config={"metric": {"name": "val/acc"}, "parameters": {"seed_everything": {"values": [0, 1, 2, 3]}}},
        runs=[
            {
                "name": f"run-{i}",
                "params": {"seed_everything": i},
                "status": status,
                "summary": {"val/acc": 0.5},
                "bisection": summary(record),
                "exit_code": 0 if status == "finished" else 1,
                "message": "",
                "log": "log.txt",
            }
            for i, (status, record) in enumerate(results)
        ],
    )
    printed = sweep_report.table(sweep)
    lines = printed.splitlines()
    assert lines[0].split()[-2:] == ["frequency", "exit"]
    # per tower its grey and colour kernels by band, as the record counts them (and every counted kernel once)
    for (_status, record), line in zip(results, lines[1:5]):
        for t, g, c, n_grey, n_colour in zip(
            record["towers"],
            record["frequency_grey"],
            record["frequency_colour"],
            record["grey_count"],
            record["colour_count"],
        ):
            assert (sum(g), sum(c)) == (n_grey, n_colour)
            assert f"{t}: g {'/'.join(map(str, g))} c {'/'.join(map(str, c))}" in line
    assert "low/mid/high = period over 8 px / 4-8 px / under 4 px" in printed
    # the one condition ("all": only the seed is swept), its 3 finished seeds beside Figure 3: the paper's
    # own record is as split as itself, the planted split more, the mixed run has no split (counted 0)
    (line,) = [x for x in lines if x.startswith("  all: ")]
    d = paper["delta_f"]
    agnostic = [1 - r["grey_fraction_agnostic"] for r in (paper, planted)]
    specific = [r["colour_fraction_specific"] for r in (paper, planted)]
    assert f"3 seeds: median Δf {d:.2f} (Figure 3: {d:.2f}; a seed without a split counted 0)" in line
    assert (
        f"{100 * sum(agnostic) / 2:.0f}% | {100 * sum(specific) / 2:.0f}% (Figure 3: {100 * agnostic[0]:.0f}% | "
        f"{100 * specific[0]:.0f}%; median over the 2 seeds with a split)"
    ) in line
    assert f"2 of 3 at least as split as Figure 3 (a split with Δf ≥ {d:.2f})" in line
    assert f"its frequency {sweep_report.frequency_text(paper)}" in printed
