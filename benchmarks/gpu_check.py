"""GPU check: tower-parallel equals the single-device model, and training throughput of each strategy.

    python benchmarks/gpu_check.py                 # paper-size net, batch 128; writes gpu_check.json
    python benchmarks/gpu_check.py --num-towers 4  # round-robin when towers > GPUs
    python benchmarks/gpu_check.py --cpu-dry-run   # the same machinery on the CPU, tiny net (no timings worth reading)

Without a GPU it prints "no GPU, skipped" and exits 0. Otherwise it

1. checks on up to two GPUs, in fp32 with TF32 off, that TowerParallelAlexNet gives the
   single-device TowerAlexNet's outputs and gradients (exit 1 if not), and puts each tower's
   layers on its GPU;
2. trains ``--steps`` timed steps (after ``--warmup``) through Lightning, one subprocess per run:
   single device in fp32 (32-true) and in train.py's default precision for the GPU
   (``train.default_precision``: bf16-mixed where the GPU has native bf16), NCHW and channels_last,
   eager and ``torch.compile``; DDP over all GPUs and tower-parallel on 2 GPUs (if there are two or
   more), tower-parallel on 1; and prints images/s, ms/step and peak memory per GPU;
3. writes everything (device, versions, the equivalence check, one entry per run, the wall time) as
   one JSON file, ``--out`` (default ``gpu_check.json``). Meant to take under 5 minutes (not yet
   timed on a GPU; ``--skip-compile`` saves the compile run's minute or so). ``--cpu-dry-run`` leaves
   the compile run out: on the CPU dynamo cannot trace the LRN's Numba loops.

Batches are made once on each process's GPU, so the numbers are the model's and the strategy's,
not the data loader's. The device is synchronised only at the two ends of the timed window.
Under DDP every process trains ``--batch-size`` images a step (global batch = batch size x GPUs);
tower-parallel trains ``--batch-size`` images a step in all.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-towers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128, help="per process (the paper: 128)")
    p.add_argument("--image-size", type=int, default=227)
    p.add_argument("--width-multiplier", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps (cudnn.benchmark tries algorithms here)")
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument("--cpu-dry-run", action="store_true", help="run every mode on the CPU with a tiny net")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON file with every result")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile run")
    p.add_argument("--data-only", action="store_true", help="only the input pipeline rows (section 3)")
    p.add_argument("--skip-data", action="store_true", help="leave out the input pipeline rows")
    p.add_argument("--data-images", type=int, default=2048, help="generated images of the input pipeline rows")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        args.batch_size, args.image_size, args.width_multiplier = 4, 67, 0.125
        args.warmup, args.steps = 1, 2
    return args


MODES = ["single", "single_channels_last", "single_compile", "ddp", "tower"]


def precision(args) -> str:
    """The precision train.py gives a run on this device when the config leaves it unset."""
    if args.precision:
        return args.precision
    return train_module().default_precision("cpu" if args.cpu_dry_run else "gpu")


def train_module():
    """train.py, the CLI at the repository's root (a script beside the installed packages, not one of them)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "train.py"
    module = sys.modules.get("train")
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == path:
        return module
    spec = importlib.util.spec_from_file_location("train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_kwargs(args) -> dict:
    return dict(
        num_towers=args.num_towers, num_classes=2, width_multiplier=args.width_multiplier, image_size=args.image_size
    )


# --- 1. equivalence ---------------------------------------------------------------------------------


def check_equivalence(args) -> bool:
    from towers.model import TowerAlexNet
    from towers.parallel import TowerParallelAlexNet

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    devices = (
        [f"cuda:{i}" for i in range(min(2, torch.cuda.device_count()))] if not args.cpu_dry_run else ["cpu", "cpu"]
    )
    torch.manual_seed(0)
    model = TowerAlexNet(**model_kwargs(args), init_std=0.03, dropout=0.0).to(devices[0])
    placed = TowerParallelAlexNet(model, devices)
    wrong = [
        (d, name, p.device)
        for d, device in enumerate(placed.devices)
        for part in (placed.conv1_to_pool2[d], placed.conv3_to_pool5[d])
        for name, p in part.named_parameters()
        if p.device != device
    ]
    x = torch.randn(8, 3, args.image_size, args.image_size, device=devices[0]) * 50
    y = torch.arange(8, device=devices[0]) % 2
    outs = []
    for net in (model, placed):
        out = net(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        outs.append(out.detach())
    out_err = ((outs[1] - outs[0]).abs().max() / outs[0].abs().max()).item()
    want = {n: p.grad for n, p in model.named_parameters()}
    got = placed.grouped_state({n: p.grad for n, p in placed.named_parameters()})
    grad_err = max(((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)).item() for k in want)
    native_bf16 = args.cpu_dry_run or torch.cuda.is_bf16_supported(including_emulation=False)
    half = torch.bfloat16 if native_bf16 else torch.float16
    with torch.no_grad(), torch.autocast(torch.device(devices[0]).type, dtype=half):
        half_err = ((placed(x).float() - outs[0]).abs().max() / outs[0].abs().max()).item()
    ok = not wrong and out_err < 1e-4 and grad_err < 1e-3
    print(
        f"towers on {devices} (tower k on device k % {len(placed.devices)}: {placed.towers_on_device}); "
        f"parameters on the wrong device: {wrong or 'none'}"
    )
    print(
        f"fp32, TF32 off: max relative difference to the single-device model: outputs {out_err:.1e}, "
        f"gradients {grad_err:.1e} -> {'OK' if ok else 'FAILED'}"
    )
    print(f"{half} autocast vs fp32 single-device outputs: {half_err:.1e} (rounding, for information)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return {
        "ok": ok,
        "devices": devices,
        "wrong_device": [str(w) for w in wrong],
        "fp32_output_error": out_err,
        "fp32_gradient_error": grad_err,
        "half_dtype": str(half),
        "half_output_error": half_err,
    }


# --- 3. the input pipeline on the GPU ----------------------------------------------------------------


def data_rows(args) -> list[dict]:
    """Images/s of the input pipeline's GPU stages, and of the whole pipeline into the model.

    On ``--data-images`` generated Cats-vs-Dogs-size JPEGs stored at 256 px (raw and JPEG stores,
    :mod:`towers.data.shards`): (a) batched nvJPEG decode of the JPEG store's bytes,
    ``decode_batch(list, "cuda")``; (b) the training augmentation on the device (crop, flip, mean,
    PCA noise) on uint8 batches already there; (c) loader -> pinned uint8 batch -> device -> (decode)
    -> augmentation -> a training step of the model in bf16 and channels_last, per store format, and
    the same without the step (the loader's own rate). The device is synchronised at the ends of each
    timed window only. ``--cpu-dry-run``: the same code on the CPU at 72 px with a tiny net.
    """
    import os
    import tempfile

    from benchmarks.bench_data import make_dataset, paper_augmentation
    from towers.data.shard_reader import StoreImages, collate_encoded, decode_batch
    from towers.data.store import index_images
    from towers.model import TowerAlexNet

    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    resize, size, batch = (72, 67, 8) if dry else (256, args.image_size, args.batch_size)
    count = 4 * batch if dry else args.data_images
    workers = 0 if dry else min(15, max(1, (os.cpu_count() or 2) - 1))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []

    def timed(name: str, step, batches: int, **extra) -> None:
        step(0)  # warm-up: cudnn, nvJPEG handles, the workers
        sync()
        start = time.perf_counter()
        for i in range(batches):
            step(i)
        sync()
        seconds = time.perf_counter() - start
        rows.append(
            dict(row=name, images_per_s=batches * batch / seconds, ms_per_batch=1000 * seconds / batches, **extra)
        )
        print(
            f"{name:<52}{batches * batch / seconds:>11.0f} images/s{1000 * seconds / batches:>9.1f} ms/batch",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="gpu_check-data-") as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "images", count, (100, 130) if dry else (400, 500))
        stores = {
            fmt: index_images(tmp / "images", "auto", tmp / "cache", resize, True, True, workers, store_format=fmt)
            for fmt in ("raw", "jpeg")
        }
        usable = stores["raw"].usable
        labels = [label for _, label in usable]
        datasets = {
            fmt: StoreImages(
                stores[fmt].store_path,
                [stores[fmt].store_rows[f] for f, _ in usable],
                labels,
                decode="device" if fmt == "jpeg" else "cpu",
            )
            for fmt in stores
        }
        encoded = [datasets["jpeg"][i][0] for i in range(batch)]
        timed(f"(a) batched JPEG decode on {device.type}", lambda i: decode_batch(encoded, device), 2 if dry else 20)

        images = torch.stack([datasets["raw"][i][0] for i in range(batch)]).to(device)
        augment_batch = paper_augmentation(resize, size, device)

        def augmented(x, i):
            return augment_batch(x, i * len(x))

        timed(
            f"(b) augmentation on {device.type} (uint8 batch there)", lambda i: augmented(images, i), 2 if dry else 50
        )

        model = TowerAlexNet(args.num_towers, num_classes=1000, width_multiplier=args.width_multiplier, image_size=size)
        model = model.to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        half = torch.bfloat16 if dry or torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        for fmt, data in datasets.items():
            loader = torch.utils.data.DataLoader(
                data,
                batch_size=batch,
                shuffle=True,
                drop_last=True,
                num_workers=workers,
                pin_memory=device.type == "cuda" and fmt == "raw",  # JPEG bytes go to nvJPEG from the host
                persistent_workers=workers > 0,
                collate_fn=collate_encoded if fmt == "jpeg" else None,
                generator=torch.Generator().manual_seed(0),
            )
            for train in (False, True):
                stream = iter(())

                def step(i, loader=loader, fmt=fmt, train=train):
                    nonlocal stream
                    x, y, _ = next(stream, None) or (None, None, None)
                    if x is None:
                        stream = iter(loader)
                        x, y, _ = next(stream)
                    assert (x[0] if fmt == "jpeg" else x).dtype == torch.uint8  # 1 byte a pixel until the device
                    if fmt == "jpeg":
                        x = decode_batch(x, device)
                    else:
                        x = x.to(device, non_blocking=True)
                    x = augmented(x, i)
                    if train:
                        with torch.autocast(device.type, dtype=half):
                            loss = torch.nn.functional.cross_entropy(model(x), y.to(device, non_blocking=True))
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)

                what = "into a training step" if train else "loader, transfer, decode, augmentation"
                steps = 2 * len(loader) if not dry else 1
                timed(f"(c) {fmt} store: {what}", step, steps, store=fmt, workers=workers, train=train)
            del loader
    return rows


# --- 2. throughput, one subprocess per run --------------------------------------------------------


def train_one(args) -> None:
    """Child process: train warmup + steps with one strategy, print one RESULT line (rank 0)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from towers.module import TowerClassifier
    from towers.parallel import TowerParallelAlexNet, TowerParallelStrategy

    class Synthetic(L.LightningDataModule):
        """A few fixed batches made on this process's device, cycled: no loader in the timings."""

        def setup(self, stage):
            device, n = self.trainer.strategy.root_device, args.batch_size
            g = torch.Generator(device=device).manual_seed(self.trainer.global_rank)
            self.batches = [
                (
                    torch.randn(n, 3, args.image_size, args.image_size, device=device, generator=g),
                    torch.randint(0, 2, (n,), device=device, generator=g),
                )
                for _ in range(4)
            ]

        def train_dataloader(self):  # batch_size=None: the items are whole batches already
            return DataLoader([self.batches[i % 4] for i in range(args.warmup + args.steps)], batch_size=None)

    class Classifier(TowerClassifier):
        def on_fit_start(self):
            if args.mode == "single_channels_last":
                self.to(memory_format=torch.channels_last)

        def on_after_batch_transfer(self, batch, dataloader_idx):
            images, labels = batch
            if args.mode == "single_channels_last":
                images = images.contiguous(memory_format=torch.channels_last)
            return images, labels

    def devices_of(trainer) -> list[torch.device]:
        """The GPUs this process computes on (touching others would create CUDA contexts there)."""
        if args.cpu_dry_run:
            return []
        if isinstance(trainer.strategy, TowerParallelStrategy):
            return trainer.lightning_module.model.devices
        return [trainer.strategy.root_device]

    def synchronize(trainer):
        for device in devices_of(trainer):
            torch.cuda.synchronize(device)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                synchronize(trainer)
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            synchronize(trainer)
            seconds = time.perf_counter() - self.start
            if not trainer.is_global_zero:
                return
            images = args.steps * args.batch_size * trainer.world_size
            memory = [round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in devices_of(trainer)]
            if isinstance(trainer.strategy, TowerParallelStrategy):  # the towers really are where they should be
                placed = pl_module.model
                assert isinstance(placed, TowerParallelAlexNet)
                for d, device in enumerate(placed.devices):
                    assert all(p.device == device for p in placed.conv1_to_pool2[d].parameters())
                    assert all(p.device == device for p in placed.conv3_to_pool5[d].parameters())
            print(
                "RESULT "
                + json.dumps(
                    dict(
                        mode=args.mode,
                        gpus=args.devices,
                        precision=trainer.precision,
                        images_per_s=images / seconds,
                        channels_last=args.mode == "single_channels_last",
                        compiled=args.mode == "single_compile",
                        ms_per_step=1000 * seconds / args.steps,
                        peak_gib=memory,
                    )
                ),
                flush=True,
            )

    strategy = TowerParallelStrategy() if args.mode == "tower" else "ddp" if args.mode == "ddp" else "auto"
    trainer = L.Trainer(
        accelerator="cpu" if args.cpu_dry_run else "gpu",
        devices=args.devices,
        strategy=strategy,
        precision=precision(args),
        benchmark=not args.cpu_dry_run,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[Timer()],
    )
    channels_last = args.mode == "single_channels_last"
    module = Classifier(**model_kwargs(args), lr_schedule="constant", channels_last=channels_last)
    # Lightning trains a compiled LightningModule as it is (its forward compiled; the warmup steps compile)
    trainer.fit(torch.compile(module) if args.mode == "single_compile" else module, Synthetic())


def run_all(args) -> int:
    start = time.perf_counter()
    if args.data_only:
        rows = data_rows(args)
        from towers.files import write_atomic

        write_atomic(args.out, json.dumps({"cpu_dry_run": args.cpu_dry_run, "data": rows}, indent=1))
        print(f"wrote {args.out}")
        return 0
    gpus = 2 if args.cpu_dry_run else torch.cuda.device_count()
    names = ["cpu"] * gpus if args.cpu_dry_run else [torch.cuda.get_device_name(i) for i in range(gpus)]
    print(f"{gpus} device(s): {', '.join(names)}; torch {torch.__version__}; default precision {precision(args)}")
    equivalence = check_equivalence(args)
    ok = equivalence["ok"]

    default = precision(args)
    runs = [
        ("single", 1, "32-true"),
        ("single", 1, default),
        ("single_channels_last", 1, default),
        ("single_compile", 1, default),
        ("tower", 1, default),
    ]
    skipped = []
    if args.skip_compile or args.cpu_dry_run:
        # on the CPU the LRN runs as Numba loops (towers/lrn.py), which dynamo cannot trace; on CUDA it is
        # tensor operations, which it compiles
        runs.remove(("single_compile", 1, default))
        skipped.append(
            "single_compile: "
            + ("--skip-compile" if args.skip_compile else "not on the CPU (dynamo cannot trace the LRN's Numba loops)")
        )
        print(f"skipped {skipped[-1]}")
    if default == "32-true":  # the first two are the same run
        runs.remove(("single", 1, default))
    if gpus >= 2:
        runs += [("tower", 2, default), ("ddp", gpus, default)]
    common = [
        f"--num-towers={args.num_towers}",
        f"--batch-size={args.batch_size}",
        f"--image-size={args.image_size}",
        f"--width-multiplier={args.width_multiplier}",
        f"--warmup={args.warmup}",
        f"--steps={args.steps}",
    ]
    if args.cpu_dry_run:
        common.append("--cpu-dry-run")
    results, failures = [], []
    for mode, devices, prec in runs:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            f"--mode={mode}",
            f"--devices={devices}",
            f"--precision={prec}",
            *common,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            print(f"{mode} on {devices} device(s), {prec} FAILED (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            failures.append(
                {
                    "mode": mode,
                    "gpus": devices,
                    "precision": prec,
                    "exit": proc.returncode,
                    "stderr": proc.stderr[-3000:],
                }
            )
            ok = False
            continue
        results.append(json.loads(found[0][len("RESULT ") :]))

    print(
        f"\nAlexNet, {args.num_towers} towers, {args.image_size}px, width x{args.width_multiplier}, "
        f"batch {args.batch_size} per process, {args.steps} timed steps after {args.warmup}"
        + (" (CPU dry run: timings meaningless)" if args.cpu_dry_run else "")
    )
    print(f"{'mode':<22}{'GPUs':>5}{'precision':>12}{'images/s':>11}{'ms/step':>9}  peak GiB per GPU (rank 0's)")
    for r in results:
        print(
            f"{r['mode']:<22}{r['gpus']:>5}{r['precision']:>12}{r['images_per_s']:>11.0f}{r['ms_per_step']:>9.1f}  {r['peak_gib']}"
        )
    data = []
    if not args.skip_data:
        print("\ninput pipeline (towers.data.shards), batch " + str(args.batch_size if not args.cpu_dry_run else 8))
        data = data_rows(args)
    from towers.files import write_atomic

    seconds = time.perf_counter() - start
    report = {
        "data": data,
        "ok": ok,
        "devices": names,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "default_precision": default,
        "cpu_dry_run": args.cpu_dry_run,
        "settings": {
            k: getattr(args, k)
            for k in ("num_towers", "batch_size", "image_size", "width_multiplier", "warmup", "steps")
        },
        "equivalence": equivalence,
        "runs": results,
        "failures": failures,
        "skipped": skipped,
        "seconds": round(seconds, 1),
    }
    write_atomic(args.out, json.dumps(report, indent=1))
    print(f"{'OK' if ok else 'FAILED'} in {seconds:.0f} s; wrote {args.out}")
    return 0 if ok else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(
            "no GPU, skipped: torch.cuda.is_available() is False, so neither the model rows nor the input "
            "pipeline rows (batched nvJPEG decode, augmentation on the device, images/s into the model) were "
            "measured (use --cpu-dry-run to exercise the script on the CPU)"
        )
        return 0
    if args.mode:
        train_one(args)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
