"""Training through train.py on the CPU: a short fit, reproducibility, and kill-and-resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from towers.runs import newest_last_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny_demo_args(demo_root, out):
    """configs/demo.yaml made tiny: 24 training images in batches of 8 (3 steps an epoch), a narrow
    network on 67-pixel crops, run folders under `out`."""
    return [
        "--config",
        str(ROOT / "configs/demo.yaml"),
        f"--data.root={demo_root}",
        "--data.test_size=4",
        "--data.val_size=4",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--data.resize_size=76",
        "--data.image_size=67",
        "--model.width_multiplier=0.125",
        f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def tiny(demo_root, out, *extra):
    """:func:`tiny_demo_args` with a CSV logger in `out` instead of the config's W&B logger."""
    return [
        *tiny_demo_args(demo_root, out),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={out}",
        *extra,
    ]


def run_train(args, **kwargs):
    # the repository first; an outer PYTHONPATH kept after it (.ci/run puts the oldest Lightning there)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def last_checkpoint(out: Path) -> Path:
    found = newest_last_checkpoint(out)
    assert found is not None, f"no last.ckpt under {out}"
    return found


def weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_one_batch_fit_through_train_py(demo_root, tmp_path):
    result = run_train(["fit", *tiny(demo_root, tmp_path, "--trainer.max_steps=1", "--trainer.limit_val_batches=1")])
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(last_checkpoint(tmp_path), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 1
    assert checkpoint["hyper_parameters"]["image_size"] == 67  # linked from data.image_size
    run_folder = tmp_path / "lightning_logs" / "version_0"
    assert (run_folder / "bisection.json").exists()
    status = json.loads((run_folder / "status.json").read_text())
    assert status["status"] == "finished"
    assert 0 <= status["summary"]["test/acc"] <= 1  # test_after_fit: the final weights on held-out images


def fit_in_process(args) -> torch.Tensor:
    cli = train.main(["fit", *args])
    return cli.model.conv1_kernels().detach().clone()


def test_same_seed_same_kernels_bit_for_bit(demo_root, tmp_path):
    steps = ["--trainer.max_steps=4", "--trainer.limit_val_batches=1"]
    first = fit_in_process(tiny(demo_root, tmp_path / "a", *steps))
    again = fit_in_process(tiny(demo_root, tmp_path / "b", *steps))
    other = fit_in_process(tiny(demo_root, tmp_path / "c", *steps, "--seed_everything=1"))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_channels_last_on_the_cpu_changes_the_speed_not_the_training(demo_root, tmp_path):
    """The default (channels_last=None) trains NHWC on the CPU; the weights it learns are those of the
    standard format up to float rounding (summation order inside oneDNN's kernels)."""
    auto = train.main(
        [
            "fit",
            *tiny(
                demo_root,
                tmp_path / "auto",
                "--trainer.max_steps=3",
                "--seed_everything=3",
                "--trainer.limit_val_batches=1",
                "--test_after_fit=false",
            ),
        ]
    )
    standard = train.main(
        [
            "fit",
            *tiny(
                demo_root,
                tmp_path / "nchw",
                "--trainer.max_steps=3",
                "--seed_everything=3",
                "--trainer.limit_val_batches=1",
                "--test_after_fit=false",
                "--model.channels_last=false",
            ),
        ]
    )
    assert auto.model.model.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert standard.model.model.features.conv1.weight.is_contiguous()
    assert not standard.model.model.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for (name, a), (_, b) in zip(auto.model.state_dict().items(), standard.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(demo_root, tmp_path):
    epochs = ["--trainer.max_epochs=2"]
    whole = run_train(["fit", *tiny(demo_root, tmp_path / "whole", *epochs)])
    assert whole.returncode == 0, whole.stderr[-3000:]

    # Killed with SIGKILL at step 4, in the second epoch: only the end-of-epoch-1 checkpoint survives.
    broken = tmp_path / "broken"
    killed = run_train(
        [
            "fit",
            *tiny(
                demo_root,
                broken,
                *epochs,
                "--trainer.callbacks+=tests.fixtures.kill_switch.KillAtStep",
                "--trainer.callbacks.init_args.step=4",
            ),
        ]
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert torch.load(last_checkpoint(broken), map_location="cpu", weights_only=True)["global_step"] == 3

    resumed = run_train(["fit", *tiny(demo_root, broken, *epochs, "--ckpt_path=last")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr

    expected, got = weights(last_checkpoint(tmp_path / "whole")), weights(last_checkpoint(broken))
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"resumed run differs in {different}"
    assert torch.load(last_checkpoint(broken), map_location="cpu", weights_only=True)["global_step"] == 6


@pytest.mark.parametrize("strategy", ["ddp", "tower_parallel"])
def test_two_cpu_devices_through_train_py(demo_root, tmp_path, strategy):
    """The README's multi-device commands, on two CPU processes (gloo) or two CPU 'devices'."""
    result = run_train(
        [
            "fit",
            *tiny(
                demo_root,
                tmp_path,
                "--trainer.max_steps=2",
                "--trainer.limit_val_batches=1",
                f"--trainer.strategy={strategy}",
                "--trainer.accelerator=cpu",
                "--trainer.devices=2",
            ),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.rglob("bisection.json"))) == 1  # the kernel callback ran on rank 0 only
    # DDP doubles the global batch: said once, by rank zero, with the learning rate; tower-parallel is one process
    said = (result.stdout + result.stderr).count(
        "Global batch: 2 processes x data.batch_size 8 = 16 images per step, not the config's 8; learning rate 0.01"
    )
    assert said == (1 if strategy == "ddp" else 0)
    checkpoint = last_checkpoint(tmp_path)
    single = train.TowerClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    assert single.conv1_kernels().shape == (2, 6, 3, 11, 11)
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == 2


def test_without_a_wandb_key_a_shipped_config_trains_offline(demo_root, tmp_path):
    """The usual first run: no W&B account, WANDB_MODE unset. The run must log offline, not ask for a key."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(HOME=str(tmp_path / "home"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), PYTHONPATH=str(ROOT))
    args = tiny(
        demo_root, tmp_path / "run", "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--test_after_fit=false"
    )
    at = args.index("--trainer.logger=lightning.pytorch.loggers.CSVLogger")
    del args[at : at + 2]  # keep configs/demo.yaml's WandbLogger
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert (run / "files" / "bisection.json").exists()


def test_sgd_is_torchs_fused_one_and_steps_as_the_loop_implementation_does():
    from lightning.pytorch import Trainer

    from towers.module import TowerClassifier

    torch.manual_seed(0)
    module = TowerClassifier(width_multiplier=0.125, image_size=67, lr_schedule="constant")
    fused = module.configure_optimizers()
    assert fused.defaults["fused"] and [g["weight_decay"] for g in fused.param_groups] == [5e-4, 0.0]
    # the same updates as the one-tensor-at-a-time loop (decay, momentum, step), to float rounding: the
    # fused kernel's scalar tail rounds a multiply-add once, so a few elements differ in the last bits
    loop = torch.optim.SGD(
        [
            {"params": [p.detach().clone().requires_grad_() for p in g["params"]], "weight_decay": g["weight_decay"]}
            for g in fused.param_groups
        ],
        lr=0.01,
        momentum=0.9,
        foreach=False,
    )
    fused_params, loop_params = ([p for g in opt.param_groups for p in g["params"]] for opt in (fused, loop))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(fused_params, loop_params):
            p.grad = q.grad = torch.randn(p.shape, generator=generator)
        fused.step()
        loop.step()
    for p, q in zip(fused_params, loop_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)  # a few float32 ulps
    # Lightning cannot clip a fused optimizer's gradients under mixed precision: then the loop one
    module.trainer = Trainer(gradient_clip_val=1.0, logger=False, enable_checkpointing=False)
    assert not module.configure_optimizers().defaults["fused"]


def test_train_py_keeps_freed_memory_on_the_cpu_unless_told_not_to(demo_root, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(1))
    steps = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--test_after_fit=false"]
    train.main(["fit", *tiny(demo_root, tmp_path / "a", *steps)])
    assert calls == [1]
    train.main(["fit", *tiny(demo_root, tmp_path / "b", *steps, "--keep_freed_memory=false")])
    assert calls == [1]
