"""Cost of the colour-bisection measurement, and its share of the paper run's training time.

Three figures, on the CPU:

    permutation test   towers.verdict.verdict (the one engine: verdict, eta2, sensitivity cuts, margin)
                       on the 96 conv1 kernels of a fresh full-width TowerAlexNet with 1 (the halves
                       control), 2 and 4 towers: 9,999 permutations plus the 2,000-resample bootstrap of
                       the medians (the call the callback makes)
    callback           one full KernelBisectionCallback measurement inside a real (tiny) Lightning fit
                       that measures after every step: the host copy of conv1, the scores, the test, the
                       kernel grid and the score plot, the PNG / .npy / JSON writes, and the logging
                       (W&B offline by default, as configs/paper.yaml logs); the first one (at
                       initialisation) pays one-off imports and is reported apart
    share of training  the measurements of one paper run (configs/paper.yaml: at initialisation and every
                       ``every_n_epochs`` epochs of ``max_epochs``, on ``train_size - val_size`` training
                       images per epoch) against the run's training time at the step rate: the 2-tower
                       paper model's training step (bench_step's, batch 32, CPU fp32) measured in the same
                       run, or the rates given with --images-per-s (e.g. a GPU's from bench_step), or
                       the step row of a bench_data JSON (--data-json)

    python benchmarks/bench_bisection.py
    python benchmarks/bench_bisection.py --images-per-s 5000   # also: a GPU that trains at 5,000 images/s
    python benchmarks/bench_bisection.py --quick               # few repeats, no W&B: checks that it runs
"""

import argparse
import datetime
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from benchmarks.bench_step import Runner, add_malloc_argument, machine, malloc_as_train_py, save_results
from towers.callbacks import KernelBisectionCallback
from towers.model import TowerAlexNet
from towers.verdict import verdict

PAPER_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "paper.yaml"


def paper_schedule(path: Path = PAPER_CONFIG) -> dict:
    """Epochs, training images per epoch and the callback's interval, as configs/paper.yaml sets them."""
    config = yaml.safe_load(path.read_text())
    every = [
        c.get("init_args", {}).get("every_n_epochs", 5)
        for c in config["trainer"]["callbacks"]
        if c["class_path"].endswith("KernelBisectionCallback")
    ]
    if not every:
        raise ValueError(f"{path} has no KernelBisectionCallback")
    max_epochs, every = config["trainer"]["max_epochs"], every[0]
    # at initialisation, every `every` epochs, and at the end unless that was an interval measurement
    measurements = 1 + max_epochs // every + (max_epochs % every != 0)
    return dict(
        config=str(path.name),
        max_epochs=max_epochs,
        every_n_epochs=every,
        measurements=measurements,
        images_per_epoch=config["data"]["train_size"] - config["data"]["val_size"],
    )


def time_bisection(num_towers: int, permutations: int, repeats: int) -> dict:
    torch.manual_seed(0)
    kernels = TowerAlexNet(num_towers, num_classes=2).conv1_kernels().detach()  # (T, 96 / T, 3, 11, 11)
    verdict(kernels, permutations=permutations)  # warm-up: first-call allocations, the noise quantile
    times = []
    for seed in range(1, repeats + 1):  # not the warm-up's seed: its permutations are kept (a cache hit)
        start = time.perf_counter()
        verdict(kernels, permutations=permutations, seed=seed)
        times.append(time.perf_counter() - start)
    return dict(
        towers=num_towers,
        kernels=int(kernels.shape[0] * kernels.shape[1]),
        permutations=permutations,
        repeats=repeats,
        ms=1000 * statistics.median(times),
        ms_min=1000 * min(times),
        ms_max=1000 * max(times),
    )


class TimedKernelBisectionCallback(KernelBisectionCallback):
    """The callback, with the wall time of every measurement (everything ``_measure`` does) kept."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds: list[float] = []

    def _measure(self, trainer, pl_module, stage):
        start = time.perf_counter()
        super()._measure(trainer, pl_module, stage)
        self.seconds.append(time.perf_counter() - start)


def time_callback(num_towers: int, measurements: int, logger: str, permutations: int, folder: Path) -> dict:
    """A fit of ``measurements - 1`` steps of the full-width model on tiny random images (67 px: only conv1's
    96 kernels matter here), measuring at initialisation and after every step."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from towers.module import TowerClassifier

    x = torch.randn(2 * measurements, 3, 67, 67, generator=torch.Generator().manual_seed(0)) * 50
    y = torch.arange(2 * measurements) % 2
    callback = TimedKernelBisectionCallback(every_n_epochs=None, every_n_steps=1, permutations=permutations)
    if logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ["WANDB_MODE"] = "offline"  # a benchmark uploads nothing
        os.environ.setdefault("WANDB_SILENT", "true")
        run_logger = WandbLogger(project="towers-bench", save_dir=str(folder), offline=True)
    elif logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        run_logger = TensorBoardLogger(str(folder))
    else:
        run_logger = False
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=measurements - 1,
        logger=run_logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(folder),
        num_sanity_val_steps=0,
    )
    model = TowerClassifier(num_towers=num_towers, num_classes=2, image_size=67, lr_schedule="constant")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no validation loop, few workers: Lightning's advice, not our concern
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=2))
    if run_logger and logger == "wandb":
        import wandb

        wandb.finish()
    first, rest = callback.seconds[0], callback.seconds[1:]
    return dict(
        towers=num_towers,
        logger=logger,
        measurements=len(callback.seconds),
        first_ms=1000 * first,
        ms=1000 * statistics.median(rest),
        ms_min=1000 * min(rest),
        ms_max=1000 * max(rest),
    )


def step_rate(batch_size: int, steps: int) -> float:
    """images/s of bench_step's training step for the 2-tower paper model (227 px, full width), in
    channels_last, as TowerClassifier trains on the CPU."""
    runner = Runner(
        TowerAlexNet(2, num_classes=2),
        227,
        batch_size,
        torch.device("cpu"),
        bf16=False,
        compile_=False,
        channels_last=True,
    )
    runner.y = runner.y % 2
    runner.timed(1)  # warm-up
    times = [runner.timed(1) for _ in tqdm(range(steps), desc="training step", leave=False)]
    return batch_size / statistics.median(times)


def table(rows: list[dict], kind: str) -> str:
    if kind == "bisection":
        lines = ["| towers | kernels | permutations | ms (min–max) |", "|---|---|---|---|"]
        lines += [
            f"| {r['towers']} | {r['kernels']} | {r['permutations']} | {r['ms']:.0f} ({r['ms_min']:.0f}–{r['ms_max']:.0f}) |"
            for r in rows
        ]
    elif kind == "callback":
        lines = [
            "| towers | logger | measurements | first ms | ms per measurement after it (min–max) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['towers']} | {r['logger']} | {r['measurements']} | {r['first_ms']:.0f} | "
            f"{r['ms']:.0f} ({r['ms_min']:.0f}–{r['ms_max']:.0f}) |"
            for r in rows
        ]
    else:
        lines = [
            "| towers | step rate from | images/s | epoch s | measurements s per run | training s per run | share | images/s at which the share is 1% |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['towers']} | {r['rate_from']} | {r['images_per_s']:.1f} | {r['epoch_s']:.0f} | "
            f"{r['measurement_s_per_run']:.1f} | {r['training_s_per_run']:.0f} | {r['share']:.4%} | "
            f"{r['images_per_s_at_1_percent']:.0f} |"
            for r in rows
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--towers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--permutations", type=int, default=9999)
    parser.add_argument("--repeats", type=int, help="timed calls of bisection (default 7; --quick 2)")
    parser.add_argument("--measurements", type=int, help="callback measurements per fit (default 8; --quick 3)")
    parser.add_argument(
        "--logger",
        choices=["wandb", "tensorboard", "none"],
        help="the fit's logger (default wandb offline, as configs/paper.yaml; --quick none)",
    )
    parser.add_argument("--images-per-s", type=float, nargs="+", default=[], help="training rates to relate to")
    parser.add_argument("--data-json", type=Path, help="take the training step's rate from this bench_data JSON")
    parser.add_argument("--steps", type=int, help="timed training steps when measuring the rate (default 3)")
    parser.add_argument("--no-step", action="store_true", help="do not measure the training step here")
    parser.add_argument("--quick", action="store_true", help="few repeats, no W&B, no step: checks that it runs")
    add_malloc_argument(parser)
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_bisection-<time>.json)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    measurements = args.measurements or (3 if args.quick else 8)
    logger = args.logger or ("none" if args.quick else "wandb")
    if measurements < 2:
        parser.error("--measurements must be at least 2 (the first one is reported apart)")

    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: False", tips: not the figures
        logging.getLogger(name).setLevel(logging.WARNING)
    started, info = datetime.datetime.now(datetime.timezone.utc), machine()
    info["keep_freed_memory"] = malloc_as_train_py(args, torch.device("cpu"))
    schedule = paper_schedule()
    bisection_rows = [time_bisection(t, args.permutations, repeats) for t in tqdm(args.towers, desc="permutation test")]
    print(table(bisection_rows, "bisection"), flush=True)

    callback_rows = []
    with tempfile.TemporaryDirectory(prefix="bench_bisection-") as tmp:
        for t in tqdm(args.towers, desc="callback"):
            callback_rows.append(time_callback(t, measurements, logger, args.permutations, Path(tmp) / f"t{t}"))
    print(table(callback_rows, "callback"), flush=True)

    rates = [("--images-per-s", r) for r in args.images_per_s]
    if args.data_json:
        data = json.loads(args.data_json.read_text())
        step = next(r for r in data["results"] if r["pipeline"] == "training step")
        rates.append((f"{args.data_json.name} (batch {data['batch_size']})", step["images_per_s"]))
    if not (args.quick or args.no_step):
        rates.append(("measured here (batch 32)", step_rate(32, args.steps or 3)))
    share_rows = []
    for rate_from, rate in rates:
        for r in callback_rows:
            epoch_s = schedule["images_per_epoch"] / rate
            cost = (r["first_ms"] + (schedule["measurements"] - 1) * r["ms"]) / 1000
            training = schedule["max_epochs"] * epoch_s
            share_rows.append(
                dict(
                    towers=r["towers"],
                    rate_from=rate_from,
                    images_per_s=rate,
                    epoch_s=epoch_s,
                    measurement_s_per_run=cost,
                    training_s_per_run=training,
                    share=cost / training,
                    # the training rate at which the measurements would cost 1% of the run
                    images_per_s_at_1_percent=0.01 * schedule["max_epochs"] * schedule["images_per_epoch"] / cost,
                )
            )
    if share_rows:
        print(table(share_rows, "share"), flush=True)

    info["loadavg_at_end"] = os.getloadavg()
    return save_results(
        "bench_bisection",
        args.out,
        argv,
        started,
        info,
        paper_schedule=schedule,
        bisection=bisection_rows,
        callback=callback_rows,
        share=share_rows,
    )


if __name__ == "__main__":
    main()
