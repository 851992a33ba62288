"""What a new user meets first: one device and the device's precision by default, a clear message for
a misplaced --config, warnings for a fit that measures nothing, one folder per run, the summary block at
the end of a fit, and tower counts at a fixed total width (width_policy split, 3 towers)."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train import tiny_demo_args

import train
from towers.callbacks import KernelBisectionCallback
from towers.measure import summary_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    import wandb

    wandb.finish()


def tiny_demo(demo_root, out, *extra):
    """configs/demo.yaml as `make demo` runs it (its W&B logger, checkpoints and kernel callback), made tiny
    (:func:`test_train.tiny_demo_args`), one epoch."""
    return ["fit", *tiny_demo_args(demo_root, out), "--trainer.max_epochs=1", *extra]


@pytest.fixture
def lightning_log(caplog):
    """Lightning's rank-zero info lines (its logger does not propagate to the root logger)."""
    logger = logging.getLogger("lightning.pytorch")
    caplog.set_level(logging.INFO, logger="lightning.pytorch")  # whatever level an earlier test left it at
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_the_paper_config_uses_one_device_and_leaves_precision_to_the_device(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["fit", "--config", str(ROOT / "configs/paper.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["devices"] == 1 and trainer["precision"] is None
    assert train.default_precision("cpu") == "32-true"
    if not torch.cuda.is_available():
        assert train.default_precision("auto") == train.default_precision("gpu") == "32-true"


def test_a_config_before_the_subcommand_gets_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", str(ROOT / "configs/demo.yaml"), "fit", "--print_config"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--config must come after the subcommand" in err


def test_two_demo_runs_each_keep_everything_in_one_folder_and_end_with_the_summary(
    demo_root, tmp_path, capsys, lightning_log
):
    import wandb

    import analysis.kernels

    out = tmp_path / "runs"
    clis = []
    for towers in (2, 3):  # the second is split's 3 towers: 96/3 per tower, 256 -> 255, 4096 -> 4095 in all
        clis.append(train.main(tiny_demo(demo_root, out, f"--model.num_towers={towers}")))
        wandb.finish()
    printed = capsys.readouterr().out

    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    for cli, folder in zip(clis, sorted(folders, key=lambda f: (f / "files" / "status.json").stat().st_mtime)):
        files = folder / "files"
        for name in (
            "config.yaml",
            "status.json",
            "bisection.json",
            "kernels.npy",
            "kernels_init.npy",
            "kernels.png",
            "scores.png",
            "kernels/step_0000000.npy",
            "kernels/step_0000003.npy",
            "kernels/step_0000003.png",
        ):
            assert (files / name).is_file(), (folder.name, name)
        assert (folder / "checkpoints" / "last.ckpt").exists()
        assert len(list((folder / "checkpoints").glob("best-*.ckpt"))) == 1
        status = json.loads((files / "status.json").read_text())
        assert status["status"] == "finished" and status["precision"] == "32-true" and status["world_size"] == 1
        assert "test/acc" in status["summary"]
        # the summary block: test accuracy, the verdict line of the last measurement, the run folder in full
        callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, KernelBisectionCallback))
        (block,) = [b for b in printed.split("towers: end of fit")[1:] if f"run folder:    {folder.resolve()}\n" in b]
        assert f"test accuracy: {status['summary']['test/acc']:.4f}" in block
        assert f"verdict:       {summary_line(callback.last_record)} (step 3)" in block
    # every checkpoint is inside a run's folder, none in the uploaded files/
    assert {p.parent.parent for p in out.rglob("*.ckpt")} == set(folders)
    assert not list(out.rglob("files/**/*.ckpt"))

    # the tour's command on the printed folder, and on W&B's latest-run link (the second run)
    report = analysis.kernels.main([str(folders[0] / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "a")])
    assert report["num_towers"] == 2 and report["verdict"] is not None
    latest = np.load(out / "wandb" / "latest-run" / "files" / "kernels.npy")
    assert latest.shape[:2] == (3, 4)  # 12 conv1 kernels in 3 towers of 4: split's 3 towers trained

    # the 3-tower model reported its widths and parameter count once, at the start
    records = {id(r): r for r in lightning_log.records}  # one record reaches caplog's handler twice if Lightning's
    lines = [r.getMessage() for r in records.values() if r.getMessage().startswith("Model: 3 towers")]  # propagates
    params = sum(p.numel() for p in clis[1].model.parameters())
    assert lines == [
        (
            f"Model: 3 towers, width_policy split, per tower 4/11/16/16/11/171/171 (conv1-conv5, fc6, fc7; "
            f"totals 12/33/48/48/33/513/513), {params:,} parameters; precision 32-true"
        )
    ]


def test_fit_without_a_config_or_without_the_kernel_callback_warns(demo_root, tmp_path, capsys):
    tiny = [
        f"--data.root={demo_root}",
        "--data.source=demo",
        "--data.test_size=4",
        "--data.val_size=4",
        "--data.train_size=rest",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--data.resize_size=76",
        "--data.image_size=67",
        "--model.width_multiplier=0.0625",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--test_after_fit=false",
    ]
    no_config = r"without --config: .*paper's full-size network\) for 1 steps with no kernel measurement"
    with pytest.warns(UserWarning, match=no_config):
        train.main(["fit", *tiny, f"--trainer.default_root_dir={tmp_path / 'a'}"])
    config = tmp_path / "no_callback.yaml"
    config.write_text("trainer:\n  max_epochs: 1\n")
    with pytest.warns(UserWarning, match="no towers.KernelBisectionCallback"):
        train.main(["fit", "--config", str(config), *tiny, f"--trainer.default_root_dir={tmp_path / 'b'}"])
    printed = capsys.readouterr().out
    assert printed.count("test accuracy: not tested") == 2
    assert "verdict:       not measured (the config has no KernelBisectionCallback)" in printed
