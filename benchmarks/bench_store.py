"""The sharded store at scale: a build killed half-way and restarted gives the bytes of an uninterrupted one.

    python benchmarks/bench_store.py                    # 20,000 generated 64-px JPEGs, stored at 48 px
    python benchmarks/bench_store.py --images 2000      # smaller
    python benchmarks/bench_store.py --format jpeg      # the JPEG store instead of raw uint8

Steps, each timed, in a temporary folder:

1. generate ``--images`` small JPEGs in the Kaggle layout (a colour ramp plus noise, quality 90);
2. build the store uninterrupted with one process per core (``towers.data.store.index_images``, what
   ``prepare_data`` runs), then once more in a fresh cache with a single process on the first
   ``--single-images`` files: the build rate per core;
3. start the same build in a separate process (``python -c``, a real process with its own workers),
   SIGKILL it once about half of the shards are finished, count them, and restart it;
4. check that the restarted build holds every image once (the manifest's rows and shards, no left-over
   temporary or unreferenced shard) and that every shard file and the manifest are byte-identical to the
   uninterrupted build's; decode a sample of images afresh and compare them with their rows.

Exit status 1 if any check fails. Writes the figures as JSON (``--out``, default
``benchmarks/results/bench_store-<time>.json``).
"""

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.bench_step import machine, save_results
from towers.data.files import load_image
from towers.data.shard_reader import decode_batch, open_store
from towers.data.shards import Layout, encode_jpeg
from towers.data.store import index_images

REPO = Path(__file__).resolve().parents[1]
BUILD = """
import sys
from pathlib import Path
from towers.data.store import index_images
root, cache, size, fmt, rows, workers = sys.argv[1:]
index_images(Path(root), "auto", Path(cache), int(size), True, True, int(workers), store_format=fmt, shard_rows=int(rows))
"""


def generate(root: Path, count: int, side: int, seed: int = 0) -> float:
    """``count`` JPEGs of side ``side`` under root/train; returns their mean size in KB."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
    total = 0
    for i in tqdm(range(count), desc="generating JPEGs", mininterval=2):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        pixels = ramp * colour + (1 - ramp) * colour[::-1] + rng.normal(0, 12, (side, side, 3)).astype(np.float32)
        path = root / "train" / f"{('cat', 'dog')[i % 2]}.{i // 2}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total / count / 1024


def shard_bytes(layout: Layout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(layout.shard_dir.iterdir()) if p.name != "verified.jsonl"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--side", type=int, default=64, help="side of the generated JPEGs")
    parser.add_argument("--resize-size", type=int, default=48, help="side of the stored images")
    parser.add_argument("--format", choices=["raw", "jpeg"], default="raw")
    parser.add_argument("--shard-rows", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="build processes (default: cores)")
    parser.add_argument("--single-images", type=int, default=2000, help="images of the one-process build")
    parser.add_argument("--sample", type=int, default=500, help="images decoded afresh and compared")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started, info = datetime.datetime.now(datetime.timezone.utc), machine()
    checks, figures = {}, {}

    with tempfile.TemporaryDirectory(prefix="bench_store-") as tmp:
        tmp = Path(tmp)
        root = tmp / "images"
        t = time.perf_counter()
        figures["jpeg_kb"] = generate(root, args.images, args.side)
        figures["generate_s"] = time.perf_counter() - t
        settings = dict(resize_size=args.resize_size, exif_transpose=True, fast_path=True)
        settings.update(store_format=args.format, shard_rows=args.shard_rows)
        shards = -(-args.images // args.shard_rows)

        # 2. uninterrupted, all cores; then one process on a part
        t = time.perf_counter()
        whole = index_images(root, "auto", tmp / "whole", num_workers=args.workers, **settings)
        seconds = time.perf_counter() - t
        figures["build"] = dict(images=args.images, shards=shards, workers=args.workers, seconds=seconds)
        figures["build"]["images_per_s"] = args.images / seconds
        single_root = tmp / "single"
        (single_root / "train").mkdir(parents=True)
        for f, _ in sorted(whole.usable)[: args.single_images]:
            os.link(root / "train" / f, single_root / "train" / f)
        t = time.perf_counter()
        index_images(single_root, "auto", tmp / "single-cache", num_workers=0, **settings)
        seconds = time.perf_counter() - t
        figures["build_one_process"] = dict(images=args.single_images, seconds=seconds)
        figures["build_one_process"]["images_per_s"] = args.single_images / seconds

        # 3. killed half-way, restarted
        cache = tmp / "killed"
        layout = Layout(cache, args.resize_size, args.format, True)
        command = [sys.executable, "-c", BUILD, str(root), str(cache), str(args.resize_size), args.format]
        command += [str(args.shard_rows), str(args.workers)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        t = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(list(layout.shard_dir.glob("*.json"))) < shards // 2:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = len(list(layout.shard_dir.glob("*.json")))
        figures["killed"] = dict(after_s=time.perf_counter() - t, shards_done=done, of=shards, exit=proc.returncode)
        checks["killed half-way"] = 0 < done < shards and proc.returncode == -signal.SIGKILL
        time.sleep(1.5)  # orphaned workers see their parent gone within a second and exit (a shard they
        # were about to finish may still land, whole: it is written under a temporary name and renamed)
        figures["killed"]["shards_done_at_restart"] = len(list(layout.shard_dir.glob("*.json")))
        t = time.perf_counter()
        resumed = index_images(root, "auto", cache, num_workers=args.workers, **settings)
        figures["resumed_s"] = time.perf_counter() - t

        # 4. checks
        manifest = json.loads(resumed.store_path.read_text())
        ids = [s["id"] for s in manifest["shards"]]
        checks["every image once"] = manifest["count"] == args.images == sum(s["rows"] for s in manifest["shards"])
        checks["every shard once"] = len(set(ids)) == len(ids) == shards
        a, b = shard_bytes(Layout(tmp / "whole", args.resize_size, args.format, True)), shard_bytes(layout)
        checks["nothing else in the shard folder"] = set(b) == {
            f"{i}{s}" for i in ids for s in (".json", ".npy" if args.format == "raw" else ".bin")
        }
        checks["shards byte-identical"] = a == b
        checks["manifest byte-identical"] = resumed.store_path.read_bytes() == whole.store_path.read_bytes()
        store = open_store(resumed.store_path)
        rng = np.random.default_rng(1)
        sample = rng.choice(len(resumed.usable), min(args.sample, len(resumed.usable)), replace=False)
        same = 0
        for i in sample:
            f = resumed.usable[i][0]
            fresh = load_image(root / "train" / f, args.resize_size)[0]
            if args.format == "jpeg":  # what the store holds: the fresh pixels through the same encoder
                fresh = decode_batch([torch.frombuffer(bytearray(encode_jpeg(fresh, 90)), dtype=torch.uint8)], "cpu")
                fresh = fresh[0].numpy()
            same += int(np.array_equal(store[resumed.store_rows[f]], fresh))
        what = "a fresh decode" + (" re-encoded at quality 90" if args.format == "jpeg" else "")
        checks[f"{len(sample)} sampled rows equal {what}"] = same == len(sample)
        figures["store_mb"] = sum(len(v) for v in b.values()) / 2**20

    build, one = figures["build"], figures["build_one_process"]
    print(
        f"\n{args.images:,} images of {args.side} px ({figures['jpeg_kb']:.1f} KB), stored {args.format} at {args.resize_size} px in {shards} shards of {args.shard_rows}: {figures['store_mb']:.0f} MB"
    )
    print(
        f"build, {build['workers']} processes: {build['seconds']:.1f} s, {build['images_per_s']:.0f} images/s ({build['images_per_s'] / build['workers']:.0f} per process)"
    )
    print(f"build, 1 process ({one['images']} images): {one['seconds']:.1f} s, {one['images_per_s']:.0f} images/s")
    k = figures["killed"]
    print(
        f"killed (SIGKILL) after {k['after_s']:.1f} s with {k['shards_done']} of {k['of']} shards done "
        f"({k['shards_done_at_restart']} when restarted); the restart finished in {figures['resumed_s']:.1f} s"
    )
    for name, ok in checks.items():
        print(f"  {'OK  ' if ok else 'FAIL'} {name}")
    save_results(
        "bench_store",
        args.out,
        argv,
        started,
        info,
        settings=vars(args) | {"out": str(args.out)},
        figures=figures,
        checks=checks,
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
