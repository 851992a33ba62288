"""Images/s the input pipeline delivers to the model, against the images/s the training step consumes.

The pipeline is the project's own: ``towers.data.CatsDogsDataModule``'s training loader (its
DistributedSampler order, its workers) followed by the batch augmentation training applies
(``draw_augmentation`` + ``transform``, what ``on_before_batch_transfer`` / ``on_after_batch_transfer``
run: random 227-px crop, horizontal flip, pixel-mean subtraction, PCA colour noise), here on the CPU.
Two ways of reading the images:

    jpeg    fast_path=False: decode every JPEG, shorter side to 256, centre crop, every epoch
    store   fast_path=True: rows of the pre-resized uint8 store (built once, timed here too)

each with 0 loader workers (all in the main process), 1, and one per core. The training step is
bench_step's: TowerAlexNet, 2 towers, full width, 227 px, batch 32, CPU fp32, channels_last, forward
+ loss + backward + SGD step on a batch already in memory, with freed memory kept for reuse, as
train.py trains on the CPU (--default-malloc: glibc's defaults).

Everything is timed round-robin in one process: every round runs one training step, then one full
epoch of every pipeline, so a load spike from another process hits all of them alike; the ratio of a
pipeline to the step is the median over rounds of (its images/s / the step's images/s in that round).
An epoch is timed from ``iter(loader)`` to its last batch, so the workers' restart of each epoch is
included (they are persistent, as in training, and started in a warm-up epoch that is not timed).

The images are synthetic, of Cats-vs-Dogs size (long side 400-500 px, ~30 KB JPEGs at quality 85):
``towers.data.demo``'s pictures (which it draws at 96-160 px) enlarged with PIL, plus fine pixel noise
so that the files are as large as photographs of that size. ``--data-dir`` takes any folder the data
module reads instead (its store is built in a temporary cache folder, so the build is always timed).

Then, per CPU core (one process, ``torch.set_num_threads(1)``), what each stage of a GPU run's input
pipeline costs the host, and from it the cores a node needs to feed a GPU at ``--target`` images/s:

    build raw / jpeg    the store build (decode, check, resize to 256, write; jpeg also re-encodes)
    files               the plain path: decode + resize every file every epoch (``fast_path: false``)
    raw rows            a raw store's rows, random order, collated into uint8 batches
    jpeg bytes          a JPEG store's bytes only (what the host does when the GPU decodes them)
    jpeg + CPU decode   a JPEG store's rows decoded by torchvision's libjpeg-turbo on the CPU
    augmentation (CPU)  the training augmentation per image on the CPU (on a GPU it runs on the device)

and the bytes per image of each format (the disk or page-cache bandwidth at the target rate).

    python benchmarks/bench_data.py                 # 320 images, batch 32, 0 / 1 / all-core workers; per core
    python benchmarks/bench_data.py --part per-core # only the per-core figures
    python benchmarks/bench_data.py --quick         # tiny images and model, seconds: checks that it runs
"""

import argparse
import datetime
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.bench_step import Runner, add_malloc_argument, machine, malloc_as_train_py, save_results
from towers.data import CatsDogsDataModule
from towers.data.demo import demo_image
from towers.model import TowerAlexNet

STEP = "training step"


def paper_augmentation(resize_size: int, image_size: int, device: torch.device):
    """The paper's training augmentation (random crop, flip, pixel mean, PCA colour noise) with synthetic
    statistics, as a function (uint8 batch, index of its first image) -> float batch on ``device``: what
    the per-core and the GPU benchmarks time."""
    from towers.data.augment import augment, draw_augmentation

    g = torch.Generator().manual_seed(0)
    mean_image = (torch.rand(3, resize_size, resize_size, generator=g) * 255).to(device)
    vectors = torch.linalg.qr(torch.randn(3, 3, generator=g))[0].to(device)
    values = torch.tensor([3000.0, 300.0, 30.0], device=device)

    def augmented(images: torch.Tensor, first: int) -> torch.Tensor:
        draws = draw_augmentation(torch.arange(len(images)) + first, 0, 0, resize_size, image_size, 0.1)
        draws = {k: v.to(device, non_blocking=True) for k, v in draws.items()}
        return augment(
            images,
            resize_size,
            image_size,
            draws,
            False,
            mean="pixel",
            mean_image=mean_image,
            channel_mean=mean_image.mean((1, 2)),
            pca_noise_std=0.1,
            rgb_eigenvalues=values,
            rgb_eigenvectors=vectors,
        )

    return augmented


def make_dataset(root: Path, count: int, long_side: tuple[int, int], seed: int = 0) -> dict:
    """``count`` JPEGs in the Kaggle layout (root/train/cat.N.jpg, dog.N.jpg); returns their sizes."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    pixels, sizes = [], []
    for i in tqdm(range(count), desc=f"synthetic JPEGs -> {root}"):
        name = ("cat", "dog")[i % 2]
        long = int(rng.integers(long_side[0], long_side[1] + 1))
        short = int(long * rng.uniform(0.6, 0.8))
        w, h = (long, short) if rng.random() < 0.7 else (short, long)  # most photographs are landscape
        image = Image.fromarray(demo_image(rng, name)).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 3.0, (h, w, 3))
        path = root / "train" / f"{name}.{i // 2}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=85)
        pixels.append(w * h)
        sizes.append(path.stat().st_size)
    return dict(images=count, mean_kb=float(np.mean(sizes)) / 1024, mean_megapixels=float(np.mean(pixels)) / 1e6)


def data_module(
    root: Path, cache: Path, fast_path: bool, workers: int, batch_size: int, resize_size: int, image_size: int
) -> CatsDogsDataModule:
    """The paper's training pipeline (configs/paper.yaml's data section) on every image of ``root``."""
    return CatsDogsDataModule(
        root=str(root),
        source="auto",
        test_size=0,
        val_size=0,
        train_size="rest",
        seed=0,
        batch_size=batch_size,
        resize_size=resize_size,
        image_size=image_size,
        random_crop=True,
        random_flip=True,
        mean="pixel",
        pca_noise_std=0.1,
        fast_path=fast_path,
        cache_dir=str(cache),
        num_workers=workers,
        pin_memory=False,
    )


class Pipeline:
    """One data module's training loader plus the batch augmentation, one epoch at a time."""

    def __init__(self, dm: CatsDogsDataModule):
        self.dm = dm
        self.loader = dm.train_dataloader()
        self.epoch = 0

    def run_epoch(self) -> tuple[int, float, float]:
        """(images delivered, seconds, seconds spent in the batch augmentation) of one epoch."""
        self.loader.sampler.set_epoch(self.epoch)  # what Lightning does at every epoch
        images, augment = 0, 0.0
        start = time.perf_counter()
        for x, _, indices in self.loader:
            t = time.perf_counter()
            batch = self.dm.transform(x, self.dm.draw_augmentation(indices, self.epoch))
            augment += time.perf_counter() - t
            images += batch.shape[0]
        seconds = time.perf_counter() - start
        self.epoch += 1
        return images, seconds, augment


def _timed_epochs(loader, min_seconds: float = 1.0) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of whole passes over ``loader`` after one untimed pass (page
    cache, mappings), until at least ``min_seconds`` have passed."""
    for _ in loader:
        pass
    images, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        for batch in loader:
            images += len(batch[1])
        if time.perf_counter() - start >= min_seconds:
            return images, time.perf_counter() - start, time.process_time() - cpu


def per_core(count: int, batch_size: int, resize_size: int, image_size: int, target: float, quick: bool) -> dict:
    """The host's cost per image of each stage, on one core, and the cores ``target`` images/s needs."""
    from torch.utils.data import DataLoader, RandomSampler

    from towers.data.files import ImageFiles
    from towers.data.shard_reader import StoreImages, collate_encoded, open_store
    from towers.data.store import index_images

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows, sizes = {}, {}

    def row(name: str, images: int, seconds: float, cpu: float, what: str) -> None:
        """The CPU time (``time.process_time``, one thread) is the cost; on a shared machine the wall
        time also holds the waits for a core another process has."""
        rows[name] = dict(
            images_per_cpu_s=images / cpu,
            ms_per_image=1000 * cpu / images,
            images_per_s_wall=images / seconds,
            what=what,
        )
        print(
            f"  {name:<20} {images / cpu:8.0f} images per CPU-second ({images / seconds:6.0f}/s wall)  ({what})",
            flush=True,
        )

    try:
        with tempfile.TemporaryDirectory(prefix="bench_data-core-") as tmp:
            tmp = Path(tmp)
            root = tmp / "images"
            dataset = make_dataset(root, count, (100, 130) if quick else (400, 500), seed=1)
            print(f"per core (1 process, 1 thread), {count} images of {dataset['mean_kb']:.1f} KB:", flush=True)
            index = {}
            for fmt in ("raw", "jpeg"):
                start, cpu = time.perf_counter(), time.process_time()
                index[fmt] = index_images(root, "auto", tmp / fmt, resize_size, True, True, 0, store_format=fmt)
                what = "decode, resize, write" + (", re-encode at quality 90 4:4:4" if fmt == "jpeg" else "")
                row(f"build {fmt}", count, time.perf_counter() - start, time.process_time() - cpu, what)
                sizes[fmt] = (
                    sum(p.stat().st_size for p in (tmp / fmt).glob(f"store-*/*.{'npy' if fmt == 'raw' else 'bin'}"))
                    / count
                )
            usable = index["raw"].usable
            labels = [label for _, label in usable]

            def loader(data, collate=None):
                sampler = RandomSampler(data, generator=torch.Generator().manual_seed(0))
                kwargs = dict(collate_fn=collate) if collate else {}
                return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=0, **kwargs)

            files = ImageFiles(index["raw"].base, [f for f, _ in usable], labels, resize_size)
            row("files", *_timed_epochs(loader(files)), "decode + resize every file (fast_path false)")
            stores = {fmt: [index[fmt].store_rows[f] for f, _ in usable] for fmt in index}
            raw = StoreImages(index["raw"].store_path, stores["raw"], labels)
            row("raw rows", *_timed_epochs(loader(raw)), "store rows from the page cache, collated")
            encoded = StoreImages(index["jpeg"].store_path, stores["jpeg"], labels, decode="device")
            row("jpeg bytes", *_timed_epochs(loader(encoded, collate_encoded)), "the bytes only: the GPU decodes")
            decoded = StoreImages(index["jpeg"].store_path, stores["jpeg"], labels)
            row("jpeg + CPU decode", *_timed_epochs(loader(decoded)), "torchvision.io.decode_jpeg on the CPU")

            a, b = open_store(index["raw"].store_path), open_store(index["jpeg"].store_path)
            pairs = [(a[r].astype(np.float64), b[s].astype(np.float64)) for r, s in zip(stores["raw"], stores["jpeg"])]
            mse = float(np.mean([np.mean((x - y) ** 2) for x, y in pairs]))
            jpeg_psnr = 10 * np.log10(255**2 / mse)

            images = next(iter(loader(raw)))[0]
            augmented = paper_augmentation(resize_size, image_size, torch.device("cpu"))
            n, start, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start < 1.0:
                augmented(images, n)
                n += len(images)
            row(
                "augmentation (CPU)",
                n,
                time.perf_counter() - start,
                time.process_time() - cpu,
                "crop, flip, mean, PCA noise; on a GPU: the device's",
            )
    finally:
        torch.set_num_threads(threads)

    feeds = {
        "raw store, GPU augments": ("raw rows", sizes["raw"]),
        "jpeg store, GPU decodes and augments": ("jpeg bytes", sizes["jpeg"]),
        "jpeg store, CPU decodes, GPU augments": ("jpeg + CPU decode", sizes["jpeg"]),
        "files, CPU decodes, GPU augments": ("files", dataset["mean_kb"] * 1024),
        "files, CPU decodes and augments": (("files", "augmentation (CPU)"), dataset["mean_kb"] * 1024),
    }
    plan = []
    for name, (stages, per_image) in feeds.items():
        stages = (stages,) if isinstance(stages, str) else stages
        ms = sum(rows[stage]["ms_per_image"] for stage in stages)
        plan.append(
            dict(pipeline=name, host_ms_per_image=ms, cores=target * ms / 1000, read_mb_per_s=target * per_image / 1e6)
        )
    print(
        f"\nhost cores (CPU time per image x rate) to feed {target:,.0f} images/s (1 per {1000 / target:.3f} ms), and the read bandwidth:"
    )
    for p in plan:
        print(
            f"  {p['pipeline']:<40} {p['host_ms_per_image']:7.3f} ms/image -> {p['cores']:6.1f} cores, {p['read_mb_per_s']:7.0f} MB/s"
        )
    print(
        f"  bytes per image: raw {sizes['raw']:,.0f}, jpeg {sizes['jpeg']:,.0f} ({sizes['jpeg'] / sizes['raw']:.2f} of raw, PSNR {jpeg_psnr:.1f} dB against raw)"
    )
    return dict(
        dataset=dataset, threads=1, rows=rows, bytes_per_image=sizes, jpeg_psnr_db=jpeg_psnr, target=target, plan=plan
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| pipeline | workers | images/s | × training step | ms per batch (min–max) | augmentation ms per batch |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        workers = "–" if r["workers"] is None else r["workers"]
        augment = "–" if r["augment_ms_per_batch"] is None else f"{r['augment_ms_per_batch']:.0f}"
        lines.append(
            f"| {r['pipeline']} | {workers} | {r['images_per_s']:.1f} | {r['ratio_to_step']:.1f} | "
            f"{r['ms_per_batch']:.0f} ({r['ms_per_batch_min']:.0f}–{r['ms_per_batch_max']:.0f}) | {augment} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, help="synthetic images to generate (default 320; --quick 16)")
    parser.add_argument("--data-dir", type=Path, help="read this dataset instead of generating one")
    parser.add_argument("--batch-size", type=int, help="of the loader and the training step (default 32; --quick 4)")
    parser.add_argument("--workers", type=int, nargs="+", help="loader processes (default: 0, 1 and one per core)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5; --quick 1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, all cores)")
    parser.add_argument("--quick", action="store_true", help="tiny images, model and batch: checks that it runs")
    parser.add_argument("--part", choices=["all", "pipeline", "per-core"], default="all")
    parser.add_argument("--target", type=float, default=15000.0, help="images/s the GPU trains (per-core part)")
    parser.add_argument("--per-core-images", type=int, help="images of the per-core part (default 400; --quick 32)")
    add_malloc_argument(parser)
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_data-<time>.json)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cores = os.cpu_count() or 1
    count = args.images or (16 if args.quick else 320)
    batch_size = args.batch_size or (4 if args.quick else 32)
    workers = args.workers if args.workers is not None else sorted({0, 1, cores})
    rounds = args.rounds or (1 if args.quick else 5)
    # --quick: 1/4-width model at 67 px on 72-px images; otherwise the paper's 256 / 227 and full width
    resize_size, image_size, width = (72, 67, 0.25) if args.quick else (256, 227, 1.0)
    if count < 2 * batch_size:
        parser.error(f"--images {count} gives fewer than two batches of {batch_size}")
    logging.getLogger("towers.data").setLevel(logging.ERROR)  # a generated set has no bad files to report

    started, info = datetime.datetime.now(datetime.timezone.utc), machine()
    per_core_results = None
    if args.part in ("all", "per-core"):
        images = args.per_core_images or (32 if args.quick else 400)
        per_core_results = per_core(
            images, 128 if not args.quick else 8, resize_size, image_size, args.target, args.quick
        )
    if args.part == "per-core":
        info["loadavg_at_end"] = os.getloadavg()
        return save_results("bench_data", args.out, argv, started, info, per_core=per_core_results)
    info["keep_freed_memory"] = malloc_as_train_py(args, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        tmp = Path(tmp)
        if args.data_dir:
            root, dataset = (
                args.data_dir,
                dict(images=None, mean_kb=None, mean_megapixels=None, folder=str(args.data_dir)),
            )
        else:
            root = tmp / "images"
            dataset = make_dataset(root, count, (100, 130) if args.quick else (400, 500))
        cache = tmp / "cache"

        # The store, built once on a fresh cache with one process per core (decode, check, write),
        # then the training set's mean image and RGB covariance from it.
        build = data_module(root, cache, True, cores, batch_size, resize_size, image_size)
        start = time.perf_counter()
        build.prepare_data()
        build_seconds = time.perf_counter() - start
        store_build = dict(
            images=len(build.usable),
            seconds=build_seconds,
            images_per_s=len(build.usable) / build_seconds,
            workers=cores,
            store_mb=build.store_path.stat().st_size / 2**20,
        )
        dataset["images"] = len(build.usable)
        print(
            f"store build (decode + check every file, write the store, training statistics): "
            f"{build_seconds:.1f} s for {len(build.usable)} images, {store_build['images_per_s']:.0f} images/s "
            f"with {cores} processes",
            flush=True,
        )

        model = TowerAlexNet(2, num_classes=2, width_multiplier=width, image_size=image_size)
        # channels_last, as TowerClassifier trains on the CPU
        step = Runner(
            model, image_size, batch_size, torch.device("cpu"), bf16=False, compile_=False, channels_last=True
        )
        step.y = step.y % 2  # Runner draws 1000-class labels; the paper config has 2 classes

        pipelines = {}
        for name, fast in (("jpeg", False), ("store", True)):
            for w in workers:
                dm = data_module(root, cache, fast, w, batch_size, resize_size, image_size)
                dm.prepare_data()  # finds the store, the checks and the statistics in the cache
                dm.setup("fit")
                pipelines[(name, w)] = Pipeline(dm)

        for _ in tqdm(range(1), desc="warm-up", leave=False):
            step.timed(1)
            for pipeline in pipelines.values():
                pipeline.run_epoch()  # starts the persistent workers, maps the store, moves nothing
        step_times, epochs = [], {key: [] for key in pipelines}
        for _ in tqdm(range(rounds), desc="rounds", leave=False):
            step_times.append(step.timed(1))
            for key, pipeline in pipelines.items():
                epochs[key].append(pipeline.run_epoch())

        step_rates = [batch_size / t for t in step_times]
        rows = [
            dict(
                pipeline=STEP,
                workers=None,
                images_per_s=statistics.median(step_rates),
                ratio_to_step=1.0,
                ms_per_batch=1000 * statistics.median(step_times),
                ms_per_batch_min=1000 * min(step_times),
                ms_per_batch_max=1000 * max(step_times),
                augment_ms_per_batch=None,
            )
        ]
        for (name, w), runs in epochs.items():
            per_batch = [seconds / (images / batch_size) for images, seconds, _ in runs]
            rows.append(
                dict(
                    pipeline=name,
                    workers=w,
                    images_per_s=statistics.median(images / seconds for images, seconds, _ in runs),
                    ratio_to_step=statistics.median(
                        images / seconds / r for (images, seconds, _), r in zip(runs, step_rates)
                    ),
                    ms_per_batch=1000 * statistics.median(per_batch),
                    ms_per_batch_min=1000 * min(per_batch),
                    ms_per_batch_max=1000 * max(per_batch),
                    augment_ms_per_batch=1000 * statistics.median(a / (images / batch_size) for images, _, a in runs),
                )
            )
        for pipeline in pipelines.values():
            del pipeline.loader  # shuts the persistent workers down before the folder goes

    info["loadavg_at_end"] = os.getloadavg()
    print(f"\n{table(rows)}")
    return save_results(
        "bench_data",
        args.out,
        argv,
        started,
        info,
        dataset=dataset,
        batch_size=batch_size,
        resize_size=resize_size,
        image_size=image_size,
        width_multiplier=width,
        rounds=rounds,
        store_build=store_build,
        results=rows,
        per_core=per_core_results,
    )


if __name__ == "__main__":
    main()
