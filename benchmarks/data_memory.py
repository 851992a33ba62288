"""Resident memory of the data module per index entry: ImageDataModule set up over N generated files.

    python benchmarks/data_memory.py                       # 20,000 and 100,000 entries
    python benchmarks/data_memory.py --entries 2000        # one size, quicker

Each size runs in a fresh process: it writes an ImageNet-layout tree of N files (100 classes, 4% of
the files official validation images as in ILSVRC-2012, the rest training, 2% of it carved for validation; hard links to 100 small JPEGs, so writing costs
little and every entry is a real file that is decoded and checked), then measures the process's
anonymous resident memory (``RssAnon`` in /proc/self/status: the heap, not the mapped files or the
page cache) after importing everything and after ``prepare_data`` + ``setup("fit")``, and ``VmHWM``
(the peak). One loader process is used (``num_workers=0``) so every byte is in the measured process.
The images are resized to 64×64 (12,288 bytes each): a module that held them would grow by at least
that per entry. Linux only (/proc).
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES, SIZE = 100, 64


def status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def write_tree(root: Path, entries: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sources = []
    for c in range(CLASSES):
        path = root / "sources" / f"{c}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(path)
        sources.append(path)
    test_per_class = max(1, entries // CLASSES // 25)
    for c in range(CLASSES):
        wnid = f"n{c:08d}"
        for split, count in (("train", entries // CLASSES - test_per_class), ("val", test_per_class)):
            folder = root / "data" / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                os.link(sources[c], folder / f"{wnid}_{split}_{i}.JPEG")


def measure(entries: int, fast_path: bool) -> dict:
    import torch  # noqa: F401  everything the module imports, before the baseline

    from towers.data import ImageDataModule

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        write_tree(root, entries)
        gc.collect()
        before = status("RssAnon")
        start = time.perf_counter()
        dm = ImageDataModule(
            root=str(root / "data"),
            source="imagenet",
            num_classes=CLASSES,
            train_size="rest",
            val_size=0.02,
            resize_size=SIZE,
            image_size=SIZE - 7,
            num_workers=0,
            fast_path=fast_path,
            cache_dir=str(root / "cache"),
        )
        dm.prepare_data()
        dm.setup("fit")
        seconds = time.perf_counter() - start
        gc.collect()
        after = status("RssAnon")
        held = len(dm.train_files) + len(dm.val_files) + len(dm.test_files)
        return {
            "entries": held,
            "fast_path": fast_path,
            "rss_anon_before_MB": before / 1e6,
            "rss_anon_after_MB": after / 1e6,
            "module_MB": (after - before) / 1e6,
            "bytes_per_entry": (after - before) / held,
            "image_bytes": 3 * SIZE * SIZE,
            "peak_MB": status("VmHWM") / 1e6,
            "setup_s": seconds,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, nargs="*", default=[20_000, 100_000])
    parser.add_argument("--fast_path", type=int, choices=(0, 1), default=0)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        import logging

        logging.getLogger("towers.data").setLevel(logging.ERROR)
        print(json.dumps(measure(args.entries[0], bool(args.fast_path))))
        return
    for n in args.entries:
        command = [sys.executable, __file__, "--one", "--entries", str(n), "--fast_path", str(args.fast_path)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(
            f"{result['entries']:>7,} entries (fast_path {result['fast_path']}): module {result['module_MB']:6.1f} MB "
            f"resident ({result['bytes_per_entry']:,.0f} bytes per entry; an image is {result['image_bytes']:,}), "
            f"RssAnon {result['rss_anon_before_MB']:.0f} -> {result['rss_anon_after_MB']:.0f} MB, "
            f"peak {result['peak_MB']:.0f} MB, setup {result['setup_s']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
