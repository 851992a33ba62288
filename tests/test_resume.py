"""A run is the run that was asked for (issue 24): `--ckpt_path last` under a root that several runs share
resumes this run's own checkpoint; a checkpoint with other settings is refused, naming them; SIGTERM and
SIGUSR1 save a checkpoint and exit 128 + the signal; a SLURM requeue resumes the newest of this run's
hpc_ckpt and last; a fresh fit never continues another run; a run resumed at its end has its verdict and
continues the same W&B run. In-process fits of the tiny demo (3 steps an epoch, 2 epochs)."""

import json
import os
import signal
import stat
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from test_train import tiny, tiny_demo_args

import train
from towers.resume import CHECKPOINT_KEY, wandb_run_id

SHORT = ["--trainer.max_epochs=2", "--trainer.limit_val_batches=1", "--test_after_fit=false"]


def signal_at(step: int, *names: str) -> list[str]:
    return [
        "--trainer.callbacks+=tests.fixtures.kill_switch.SignalAtStep",
        f"--trainer.callbacks.init_args.step={step}",
        f"--trainer.callbacks.init_args.signals=[{','.join(names)}]",
    ]


def fit(demo_root, root, *extra) -> int:
    return train.command_line(["fit", *tiny(demo_root, root, *SHORT, *extra)])


def run_folders(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def identity(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {"step": checkpoint["global_step"], **checkpoint[CHECKPOINT_KEY]}


def status(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text())


def resumed_from(folder: Path):
    return yaml.safe_load((folder / "config.yaml").read_text())["ckpt_path"]


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_sigterm_then_last_resumes_this_runs_checkpoint_in_a_shared_root(demo_root, tmp_path, capsys):
    root = tmp_path / "runs"
    # seed 0, stopped by SIGTERM in its second epoch: a checkpoint to resume from, status, exit 128 + 15
    assert fit(demo_root, root, "--seed_everything=0", *signal_at(4, "SIGTERM")) == 143
    (seed0,) = run_folders(root)
    interrupted = seed0 / "checkpoints" / "last-interrupted.ckpt"
    assert last_error(capsys) == (
        f"train.py: interrupted: stopped by SIGTERM at step 4; resume with --ckpt_path last (it continues {interrupted})"
    )
    assert status(seed0)["status"] == "interrupted" and status(seed0)["step"] == 4
    assert identity(interrupted) == {"step": 4, "seed": 0, "wandb_id": None, "slurm_job": None}

    # seed 1 in the same root: its last.ckpt is now the newest file there
    assert fit(demo_root, root, "--seed_everything=1") == 0
    seed1 = run_folders(root)[1]
    assert identity(seed1 / "checkpoints" / "last.ckpt")["seed"] == 1

    # seed 0 again with --ckpt_path last: its own checkpoint, not seed 1's newer one
    assert fit(demo_root, root, "--seed_everything=0", "--ckpt_path=last") == 0
    resumed = run_folders(root)[2]
    assert resumed_from(resumed) == str(interrupted)
    assert identity(resumed / "checkpoints" / "last.ckpt") == {
        "step": 6,
        "seed": 0,
        "wandb_id": None,
        "slurm_job": None,
    }
    assert status(resumed)["status"] == "finished"

    # a checkpoint whose settings differ from the command line's is refused, naming every difference
    capsys.readouterr()
    mine = seed1 / "checkpoints" / "last.ckpt"
    assert fit(demo_root, root, "--seed_everything=0", "--model.num_towers=1", f"--ckpt_path={mine}") == 2
    assert last_error(capsys) == (
        f"train.py: error: --ckpt_path {mine} is a checkpoint of another run: seed_everything: 1 in the "
        f"checkpoint, 0 asked; model.num_towers: 2 in the checkpoint, 1 asked; give the checkpoint's settings "
        f"on the command line, or --resume_settings checkpoint to continue it with its own"
    )
    assert len(run_folders(root)) == 3  # nothing started
    # ... unless the command line defers to it: the checkpoint's seed and towers (it is at its end: no steps)
    args = ["--seed_everything=0", "--model.num_towers=1", "--resume_settings=checkpoint", f"--ckpt_path={mine}"]
    assert fit(demo_root, root, *args) == 0
    deferred = yaml.safe_load((run_folders(root)[3] / "config.yaml").read_text())
    assert deferred["seed_everything"] == 1 and deferred["model"]["num_towers"] == 2


def fake_slurm(monkeypatch, tmp_path) -> Path:
    """SLURM's environment for one task of job 4242, and an `scontrol` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in dict(
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="train",
        SLURM_NODELIST="localhost",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
    ).items():
        monkeypatch.setenv(key, value)
    return calls


def test_slurm_preemption_requeue_resumes_the_newest_of_this_run_and_a_fresh_fit_starts_afresh(
    demo_root, tmp_path, monkeypatch, capsys
):
    calls = fake_slurm(monkeypatch, tmp_path)
    root = tmp_path / "runs"
    # SIGUSR1 (Lightning saves hpc_ckpt_1.ckpt and requeues), then SIGTERM, at step 4 of 6
    assert fit(demo_root, root, "--seed_everything=0", *signal_at(4, "SIGUSR1", "SIGTERM")) == 143
    (seed0,) = run_folders(root)
    hpc = seed0 / "checkpoints" / "hpc_ckpt_1.ckpt"
    assert calls.read_text().split() == ["requeue", "4242"]
    assert not list(root.glob("hpc_ckpt_*")), "Lightning's SLURM checkpoint is moved out of the shared root"
    assert identity(hpc) == {"step": 4, "seed": 0, "wandb_id": None, "slurm_job": "4242"}
    assert identity(seed0 / "checkpoints" / "last.ckpt")["step"] == 3  # the end of epoch 0: older
    assert not (seed0 / "checkpoints" / "last-interrupted.ckpt").exists()  # nothing new since the hpc save
    assert status(seed0)["status"] == "requeued"
    assert last_error(capsys).startswith("train.py: interrupted: stopped by SIGTERM at step 4; resume with")

    # the requeued job: --ckpt_path last resumes the newest of this run's hpc_ckpt and last.ckpt
    assert fit(demo_root, root, "--seed_everything=0", "--ckpt_path=last") == 0
    requeued = run_folders(root)[1]
    assert resumed_from(requeued) == str(hpc)
    assert identity(requeued / "checkpoints" / "last.ckpt")["step"] == 6

    # a fresh fit with another seed in the same root, under SLURM: from the start, not from seed 0's files
    assert fit(demo_root, root, "--seed_everything=1") == 0
    fresh = run_folders(root)[2]
    assert resumed_from(fresh) is None and status(fresh)["status"] == "finished"
    first = json.loads((fresh / "bisection_history.jsonl").read_text().splitlines()[0])
    assert first["stage"] == "init" and first["step"] == 0  # measured its own initial kernels

    # an hpc_ckpt of another run left in the root, which Lightning would resume: refused in one line
    capsys.readouterr()
    (root / "hpc_ckpt_1.ckpt").write_bytes(hpc.read_bytes())
    assert fit(demo_root, root, "--seed_everything=2") == 2
    assert "under SLURM Lightning resumes it when no --ckpt_path is given, but it is not this run's" in last_error(
        capsys
    )


def test_sigusr1_outside_slurm_saves_stops_and_says_so(demo_root, tmp_path, capsys):
    root = tmp_path / "runs"
    assert fit(demo_root, root, *signal_at(2, "SIGUSR1")) == 128 + signal.SIGUSR1
    (folder,) = run_folders(root)
    assert status(folder)["status"] == "interrupted" and status(folder)["step"] == 2
    assert identity(folder / "checkpoints" / "last-interrupted.ckpt")["step"] == 2
    assert last_error(capsys).startswith("train.py: interrupted: stopped by SIGUSR1 at step 2; resume with")


class StopBeforeTheEnd(Callback):
    """Fails the fit after its last checkpoint, before the end-of-training measurement: a run killed there."""

    def on_train_end(self, trainer, pl_module):
        raise RuntimeError("killed after the final checkpoint")


def test_a_run_resumed_at_its_end_is_measured_and_continues_its_wandb_run(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    root = tmp_path / "runs"
    args = [*tiny_demo_args(demo_root, root), *SHORT]
    cli = train.main(args, run=False)
    cli.trainer.callbacks.insert(0, StopBeforeTheEnd())
    with pytest.raises(RuntimeError, match="killed after the final checkpoint"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    import wandb

    wandb.finish()
    (first,) = (root / "wandb").glob("offline-run-*")
    run_id = first.name.rsplit("-", 1)[1]
    assert json.loads((first / "files" / "bisection.json").read_text())["last"]["stage"] != "end"
    last = first / "checkpoints" / "last.ckpt"
    assert wandb_run_id(last) == run_id and identity(last)["step"] == 6

    assert train.command_line(["fit", *args, "--ckpt_path=last"]) == 0
    (second,) = set((root / "wandb").glob("offline-run-*")) - {first}
    assert second.name.rsplit("-", 1)[1] == run_id  # the same W&B run, continued
    record = json.loads((second / "files" / "bisection.json").read_text())["last"]
    assert record["stage"] == "end" and record["step"] == 6 and record["verdict"] is not None
    assert status(second / "files")["status"] == "finished"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--ckpt_path={missing}"], "--ckpt_path {missing}: no such checkpoint file"),
        (["--ckpt_path={folder}"], "--ckpt_path {folder}: a folder, not a checkpoint file"),
        (
            ["--ckpt_path=last", "--seed_everything=true"],
            "seed_everything is true (a random seed), so give the run's seed",
        ),
        (["--seed_everything=-1"], "seed_everything=-1 is out of range; a seed is an integer from 0 to 4294967295"),
    ],
)
def test_checkpoint_and_seed_mistakes_are_one_line_exit_2(demo_root, tmp_path, capsys, options, message):
    paths = {"missing": tmp_path / "nowhere.ckpt", "folder": tmp_path}
    options = [o.format(**paths) for o in options]
    assert fit(demo_root, tmp_path / "runs", *options) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message.format(**paths) in err.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()  # refused before anything was written
