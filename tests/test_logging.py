"""Logging through train.py's CLI: W&B offline runs (name, full config, summary, per-run folder),
two runs in one folder, CSV and disabled W&B, the offline fallback line, and the divergence stop."""

import importlib.util
import json
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import train
from towers.runs import EXIT_DIVERGED, run_dir

# Once the data module is merged, train.py takes the crop size once, as data.image_size (linked to the model's).
HAS_DATA = importlib.util.find_spec("towers.data") is not None
TINY = [
    "--model.width_multiplier=0.0625",
    f"--{'data' if HAS_DATA else 'model'}.image_size=67",
    "--trainer.max_epochs=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--run_status.check_every_n_steps=2",
]
WANDB = [
    "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
    "--trainer.logger.init_args.project=towers",
    "--trainer.logger.init_args.log_model=false",
]


def loaders(n=16):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 67, 67, generator=g), torch.randint(0, 2, (n,), generator=g))
    return DataLoader(data, batch_size=4), DataLoader(data, batch_size=8)


def fit(args):
    """train.py's CLI without a data module (not merged yet): the parsed trainer and model, fitted on random data."""
    cli = train.main(args, run=False)
    cli.trainer.fit(cli.model, *loaders())
    return cli


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    import wandb

    wandb.finish()


def wandb_records(path: Path):
    """The records of an offline run's .wandb file (W&B's LevelDB-style log of protobuf records).

    wandb 0.31 reads these files only in its Go core, so the tests unpack them here: a 7-byte header
    (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks (crc32, length, type, data);
    types 1 full, 2 first, 3 middle, 4 last.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run_contents(run_folder: Path):
    """(config, summary, run name) stored in an offline W&B run."""
    (log,) = run_folder.glob("*.wandb")
    for _ in range(600):  # wandb.finish() can return before W&B's core has written the last records (60 s under load)
        records = wandb_records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    config, summary, name = {}, {}, None

    def items(updates):
        return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}

    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
            config.update(items(record.run.config.update))
        elif kind == "config":
            config.update(items(record.config.update))
        elif kind == "summary":  # the run's summary: the last value of each logged metric
            summary.update(items(record.summary.update))
    return config, summary, name


def test_two_wandb_runs_in_one_folder_each_keep_their_config_and_metrics(tmp_path):
    import wandb

    folders = []
    for seed in (0, 1):
        cli = fit(TINY + WANDB + [f"--seed_everything={seed}", f"--trainer.default_root_dir={tmp_path}"])
        folders.append(run_dir(cli.trainer))
        wandb.finish()
    assert folders[0] != folders[1]
    for seed, files in enumerate(folders):
        run_folder = files.parent
        assert run_folder.parent == tmp_path / "wandb" and run_folder.name.startswith("offline-run-")
        # the resolved config, in the run's own folder and in the W&B run
        assert f"seed_everything: {seed}" in (files / "config.yaml").read_text()
        config, summary, name = wandb_run_contents(run_folder)
        assert name == f"t2-s{seed}-lr0.01" + ("-b128" if HAS_DATA else "")  # the data module's default batch
        assert config["seed_everything"] == seed
        assert config["model"]["num_towers"] == 2 and config["model"]["width_multiplier"] == 0.0625
        assert config["trainer"]["max_epochs"] == 2
        # summary metrics, in the W&B log and in status.json (which `wandb sync` uploads with files/)
        # 2 epochs of 4 batches; Lightning logs the last step as global_step - 1
        assert 0 <= summary["val/acc"] <= 1 and summary["trainer/global_step"] == 7
        status = json.loads((files / "status.json").read_text())
        assert status["status"] == "finished" and status["step"] == 8
        assert [h["epoch"] for h in status["history"]] == [0, 1]
        assert status["summary"]["val/acc"] == pytest.approx(summary["val/acc"])
        # checkpoints stay local, in the run's own folder beside files/ (which W&B uploads), not in it
        assert len(list((run_folder / "checkpoints").glob("*.ckpt"))) == 1
        assert status["precision"] == "32-true"  # the CPU's default, recorded with every run
    assert len(list(tmp_path.rglob("*.ckpt"))) == 2 and not list(tmp_path.rglob("files/**/*.ckpt"))


def test_a_diverging_run_stops_and_is_recorded_as_diverged(tmp_path):
    healthy = fit(TINY + [f"--trainer.default_root_dir={tmp_path / 'healthy'}", "--trainer.logger=false"])
    assert json.loads((tmp_path / "healthy" / "status.json").read_text())["status"] == "finished"
    assert train.exit_status(healthy) == 0
    cli = fit(
        TINY
        + [
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--model.lr=1e8",
            "--trainer.max_epochs=5",
        ]
    )
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "diverged" and "NaN or infinite" in status["message"]
    assert cli.trainer.global_step < 20  # stopped, not run on for 5 epochs of NaN weights
    assert train.exit_status(cli) == EXIT_DIVERGED == 3


def test_a_resumed_run_reports_the_history_of_all_its_epochs(tmp_path):
    fit(TINY + [f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.max_epochs=1"])
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    cli = train.main(TINY + [f"--trainer.default_root_dir={tmp_path / 'resumed'}", "--trainer.logger=false"], run=False)
    cli.trainer.fit(cli.model, *loaders(), ckpt_path=ckpt)
    status = json.loads((tmp_path / "resumed" / "status.json").read_text())
    assert status["status"] == "finished" and [h["epoch"] for h in status["history"]] == [0, 1]


def test_csv_logger_and_disabled_wandb_work(tmp_path, monkeypatch):
    cli = fit(
        TINY
        + [
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    folder = run_dir(cli.trainer)
    assert (folder / "config.yaml").exists() and (folder / "metrics.csv").exists()
    assert json.loads((folder / "status.json").read_text())["status"] == "finished"
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    wandb.teardown()  # wandb reads WANDB_MODE once per process, at its first run
    cli = fit(TINY + WANDB + [f"--trainer.default_root_dir={tmp_path / 'disabled'}"])
    assert json.loads((run_dir(cli.trainer) / "status.json").read_text())["status"] == "finished"
    assert not list((tmp_path / "disabled").rglob("*.wandb"))  # no W&B run written
    # the run's files and its checkpoint stay under default_root_dir, not in W&B's scratch folder
    assert run_dir(cli.trainer).is_relative_to(tmp_path / "disabled")
    assert len(list((run_dir(cli.trainer) / "checkpoints").glob("*.ckpt"))) == 1


def test_without_api_key_the_run_goes_offline_with_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    # the messages train.py emits, collected directly: log capture depends on what earlier tests did
    # to Lightning's loggers
    said = []
    monkeypatch.setattr(train, "rank_zero_info", said.append)
    train.main(TINY + WANDB + [f"--trainer.default_root_dir={tmp_path}"], run=False)
    lines = [line for line in said if "offline" in line]
    assert len(lines) == 1 and "wandb sync" in lines[0]
    import os

    assert os.environ["WANDB_MODE"] == "offline"


def test_under_ddp_one_wandb_run_and_every_rank_gets_the_values(tmp_path):
    import os
    import subprocess

    args = (
        TINY
        + WANDB
        + [
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.lr=0.0123",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
        ]
    )
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "fixtures" / "ddp_fit.py"), *args],
        env=dict(
            os.environ,
            WANDB_MODE="offline",
            PYTHONPATH=os.pathsep.join(  # for `import train`
                filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
            ),
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the swept value reached both ranks (each parsed the same command line) ...
    assert "rank 0 lr 0.0123 done" in done.stderr and "rank 1 lr 0.0123 done" in done.stderr
    # ... and only rank 0 made a W&B run, with its own status.json and config.yaml
    (run_folder,) = (tmp_path / "wandb").glob("offline-run-*")
    assert json.loads((run_folder / "files" / "status.json").read_text())["status"] == "finished"
    assert (run_folder / "files" / "config.yaml").exists()
    assert len(list(tmp_path.rglob("status.json"))) == 1


def test_run_name_from_the_config():
    from jsonargparse import Namespace

    config = Namespace(model=Namespace(num_towers=3, lr=0.001), seed_everything=4, data=Namespace(batch_size=500))
    assert train.run_name(config) == "t3-s4-lr0.001-b500"
    config.data = None  # no data module in the config
    assert train.run_name(config) == "t3-s4-lr0.001"
