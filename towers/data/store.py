"""What the data module knows about a dataset folder, each part cached on disk under ``cache_dir``:

* :func:`index_images`: the layout's files, every file checked once (results appended to the check
  index ``checks.jsonl``, by size and modification time), unusable ones reported in ``bad_files.tsv``
  and skipped; for the fast path, every image decoded once into the pre-resized store
  (:mod:`towers.data.shards`: sharded, built in parallel, resumable, verified);
* :func:`split_files`: test, validation and training images, by image, from ``split_seed`` alone;
* :func:`training_statistics`: mean image, mean colour and RGB covariance of the training images
  (with a SHA-256 of their values: a damaged file is computed again, never used).
"""

import errno
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from towers.data.files import BadImage, find_images, link_problem, load_image
from towers.data.shards import build_store, plan_store
from towers.errors import BadOption, MissingData, NotWritable
from towers.files import append_jsonl, atomic_path, scan_jsonl, shown_path, write_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the decoding changes, so stores and statistics are rebuilt (2: EXIF orientation)


def _check_and_load(args: tuple[Path, int, bool]) -> tuple[np.ndarray | None, bool, str]:
    path, size, exif_transpose = args
    try:
        pixels, note = load_image(path, size, exif_transpose)
        return pixels, True, note
    except BadImage as error:
        return None, False, str(error)
    except Exception as error:  # any failure of one file (a decoder's own error) marks that file, with why
        return None, False, f"cannot be decoded: {type(error).__name__}: {error}"


def _check(args: tuple[Path, bool]) -> tuple[bool, str]:
    """(usable, note) of one file; decoded in full but resized to 8 pixels, which is cheap."""
    path, exif_transpose = args
    return _check_and_load((path, 8, exif_transpose))[1:]


def _imap(function, items: list, num_workers: int, desc: str):
    """``map`` with a progress bar, over ``num_workers`` processes when there are any."""
    if num_workers > 0 and len(items) > 64:
        with get_context("fork" if os.name == "posix" else "spawn").Pool(num_workers) as pool:
            yield from tqdm(pool.imap(function, items, chunksize=16), total=len(items), desc=desc)
    else:
        yield from tqdm(map(function, items), total=len(items), desc=desc, disable=len(items) < 64)


# ----------------------------------------------------------------------------- the index and the store


@dataclass
class Index:
    """The usable images of a dataset folder and where the store and the bad-file report are."""

    layout: str  # the detected layout (see :func:`towers.data.files.find_images`)
    base: Path  # the folder the file names are relative to
    classes: list[str]  # class names, by label
    usable: list[tuple[str, int]]  # (file, label) of every file that decodes, sorted
    store_rows: dict[str, int]  # file -> its row in the store
    store_path: Path  # the fast path's store (built only with fast_path)
    bad_files_report: Path  # bad_files.tsv: every skipped, converted or oddly named file


def index_images(
    root: Path,
    source: str,
    cache_dir: Path,
    resize_size: int,
    exif_transpose: bool,
    fast_path: bool,
    num_workers: int,
    store_format: str = "raw",
    jpeg_quality: int = 90,
    shard_rows: int = 1024,
) -> Index:
    """Find, check (cached), and for the fast path store the images of ``root``
    (:func:`towers.data.shards.build_store`: ``store_format`` raw or jpeg, ``shard_rows`` images a shard)."""
    unused: list[tuple[Path, str]] = []  # files under the root that are not read, and why
    layout, base, found, classes = find_images(root, source, unused)
    files = []
    for f, label in found:  # links to nothing or out of the data folder, files listed but missing
        problem = link_problem(base / f, root) or (None if (base / f).exists() else "listed by the layout but missing")
        if problem:
            unused.append((base / f, problem))
        else:
            files.append((f, label))
    if not files:
        raise MissingData(f"None of the {len(found)} files found in {base} can be used; {unused[0][0]}: {unused[0][1]}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(cache_dir, os.W_OK):
            raise PermissionError(13, "Permission denied", str(cache_dir))
    except OSError as error:
        if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
            raise
        raise NotWritable(
            f"cannot write to the cache folder {cache_dir} ({error.strerror}); "
            f"give --data.cache_dir a folder you may write to"
        ) from error
    paths = [base / f for f, _ in files]
    stamps = [(f, s.st_size, s.st_mtime_ns) for (f, _), s in zip(files, (p.stat() for p in paths))]

    # the notes (and pixels) depend on exif_transpose, so each setting keeps its own check results
    checks_path = cache_dir / ("checks.jsonl" if exif_transpose else "checks-exif-ignored.jsonl")
    checks = read_checks(checks_path)
    fresh = {f: checks[f] for f, size, mtime in stamps if checks.get(f, [None] * 2)[:2] == [size, mtime]}

    if fast_path:
        store_path, results = build_store(
            cache_dir,
            base,
            stamps,
            resize_size,
            exif_transpose,
            num_workers,
            store_format,
            jpeg_quality,
            shard_rows,
            CACHE_VERSION,
        )
        new = [
            [*stamp, *result] for stamp, result in zip(stamps, results) if fresh.get(stamp[0]) != [*stamp[1:], *result]
        ]
        append_checks(checks_path, new)
    else:
        # not built, but named by the files' stamps all the same: the statistics' cache key holds it
        store_path = plan_store(
            cache_dir, stamps, resize_size, exif_transpose, store_format, jpeg_quality, shard_rows, CACHE_VERSION
        )[1]
        todo = [i for i, (f, _, _) in enumerate(stamps) if f not in fresh]
        checked = _imap(_check, [(paths[i], exif_transpose) for i in todo], num_workers, f"checking images in {base}")
        new, batch = [], []
        for i, (usable, note) in zip(todo, checked):  # appended every 4,096 files, so a killed check resumes
            batch.append([*stamps[i], usable, note])
            if len(batch) == 4096:
                append_checks(checks_path, batch)
                new, batch = new + batch, []
        append_checks(checks_path, batch)
        new += batch
    fresh.update({f: entry for f, *entry in new})
    compact_checks(checks_path, fresh, checks)

    notes = [(base / f, *fresh[f][2:]) for f, _ in files if not fresh[f][2] or fresh[f][3]]
    for f, _ in files:  # a name that is not valid UTF-8 is read, but said so
        if f != os.fsencode(f).decode("utf-8", "replace"):
            notes.append((base / f, True, "the file name is not valid UTF-8 (shown escaped)"))
    report = _report(
        cache_dir / "bad_files.tsv", notes + [(path, False, why) for path, why in unused], len(found) + len(unused)
    )
    return Index(
        layout=layout,
        base=base,
        classes=classes,
        usable=[(f, label) for f, label in files if fresh[f][2]],
        store_rows={f: row for row, (f, _) in enumerate(files)},
        store_path=store_path,
        bad_files_report=report,
    )


# ----------------------------------------------------------------------------- the check index


def read_checks(path: Path) -> dict[str, list]:
    """The check index: ``{file: [size, mtime_ns, usable, note]}`` from the appended lines of ``path``
    (each ``{"checks": [[file, size, mtime_ns, usable, note], ...]}``, appended by
    :func:`towers.files.append_jsonl`; later lines win). A line that does not parse (cut by a killed
    process, or damaged) is skipped with one warning: its files are checked again."""
    checks, entries = Checks(), 0
    if not path.is_file():
        return checks
    records, broken = scan_jsonl(path)
    broken = len(broken)
    for record in records:
        try:
            for f, size, mtime, usable, note in record["checks"]:
                checks[f] = [size, mtime, usable, note]
                entries += 1
        except (KeyError, ValueError, TypeError):
            broken += 1
    if broken:
        log.warning("%s: %d damaged line(s) skipped; their files are checked again", path, broken)
    checks.broken, checks.entries = broken, entries
    return checks


class Checks(dict):
    """The check index as read, with ``broken``, how many of its lines did not parse, and ``entries``,
    how many entries its lines hold (superseded ones included)."""

    broken = entries = 0


def append_checks(path: Path, entries: list[list]) -> None:
    """``entries`` ([file, size, mtime_ns, usable, note] each) appended to the check index as one line."""
    if entries:
        append_jsonl(path, {"checks": entries})


def compact_checks(path: Path, current: dict[str, list], read: Checks) -> None:
    """Rewrite the check index as ``current`` alone (atomically) when, as ``read``, it had damaged lines
    or held more than twice as many entries (files since changed or gone); otherwise leave it."""
    if current and (read.broken or read.entries > 2 * len(current)):
        write_atomic(path, json.dumps({"checks": [[f, *entry] for f, entry in sorted(current.items())]}) + "\n")


def _report(path: Path, notes: list[tuple[Path, bool, str]], total: int) -> Path:
    """One report of every skipped, converted or oddly named file: logged, and written to ``path``
    (names escaped, :func:`towers.files.shown_path`, so any name fits on its line)."""
    notes = sorted(notes, key=lambda note: os.fsencode(note[0]))
    lines = ["file\taction\treason"] + [
        f"{shown_path(file)}\t{'kept' if ok else 'skipped'}\t{why}" for file, ok, why in notes
    ]
    write_atomic(path, "\n".join(lines) + "\n")
    skipped = [shown_path(file.name) for file, ok, _ in notes if not ok]
    if notes:
        log.warning(
            "%d of %d files skipped as unusable, %d kept with a note; the list with reasons: %s%s",
            len(skipped),
            total,
            len(notes) - len(skipped),
            path,
            f" (skipped: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})" if skipped else "",
        )
    return path


# ----------------------------------------------------------------------------- splits

Size = int | float | Literal["rest"]


def _count(size: Size, total: int, name: str) -> int | None:
    if size == "rest":
        return None
    if isinstance(size, float):
        if not 0.0 <= size <= 1.0:
            raise BadOption(f"{name}={size}: a fraction must lie in [0, 1]")
        return round(size * total)
    if size < 0:
        raise BadOption(f"{name}={size} must not be negative")
    return int(size)


def split_files(
    usable: list[tuple[str, int]],
    test_size: Size,
    train_size: Size,
    val_size: Size,
    split_seed: int,
    base: Path,
    bad_files_report: Path,
) -> tuple[list, list, list]:
    """(training, validation, test) files: the test images drawn first, then the training pool, the
    validation images carved out of the pool; by image, from ``split_seed`` alone."""
    n = len(usable)
    n_test, n_pool, n_val = (
        _count(size, n, name)
        for size, name in ((test_size, "test_size"), (train_size, "train_size"), (val_size, "val_size"))
    )
    if n_val is None or (n_test is None and n_pool is None):
        raise BadOption("'rest' is allowed for test_size or train_size, not for both nor for val_size")
    n_test = n - n_pool if n_test is None else n_test
    n_pool = n - n_test if n_pool is None else n_pool
    if n_test < 0 or n_pool < 0 or n_test + n_pool > n or n_val >= n_pool:
        raise BadOption(
            f"{base} has {n} usable images, but the splits ask for test {n_test} + training "
            f"pool {n_pool}, of which validation {n_val} (at least one must be left for training). "
            f"Use smaller sizes, fractions (--data.train_size 0.8) or 'rest'; skipped files are "
            f"listed in {bad_files_report}"
        )
    order = np.random.default_rng(split_seed).permutation(n)  # by image, from split_seed alone
    pick = lambda idx: [usable[i] for i in idx]
    return pick(order[n_test + n_val : n_test + n_pool]), pick(order[n_test : n_test + n_val]), pick(order[:n_test])


# ----------------------------------------------------------------------------- training statistics


def training_statistics(
    dataset: Dataset, key: list, cache_dir: Path, resize_size: int, divide_std: bool, num_workers: int
) -> dict[str, torch.Tensor | None]:
    """Mean image, mean colour and RGB covariance of the images of ``dataset`` (the training split),
    cached under ``key`` (what identifies the split), with the covariance's principal components.

    Returns ``mean_image`` (3, R, R), ``channel_mean`` (3,), ``rgb_covariance`` (3, 3),
    ``rgb_eigenvalues`` (3,) largest first in (0..255)^2 units, ``rgb_eigenvectors`` (3, 3) column k
    component k, and ``input_channel_std`` (3,), the per-channel std, with ``divide_std`` (else None).
    """
    digest = hashlib.sha1(json.dumps([CACHE_VERSION, resize_size, *key]).encode()).hexdigest()[:16]
    path = cache_dir / f"stats-{digest}.pt"
    stats = _load_statistics(path) if path.is_file() else None
    if stats is None:
        size = resize_size
        pixel_sum = torch.zeros(3, size, size, dtype=torch.float64)
        outer_sum = torch.zeros(3, 3, dtype=torch.float64)
        loader = DataLoader(dataset, batch_size=64, num_workers=num_workers)
        for images, _, _ in tqdm(loader, desc="training-set mean and RGB covariance", disable=len(loader) < 20):
            x = images.double()
            pixel_sum += x.sum(0)
            flat = x.transpose(0, 1).reshape(3, -1)
            outer_sum += flat @ flat.T
        count = len(dataset)
        mean_image = pixel_sum / count
        channel_mean = mean_image.mean((1, 2))
        covariance = outer_sum / (count * size * size) - torch.outer(channel_mean, channel_mean)
        stats = {"mean_image": mean_image.float(), "channel_mean": channel_mean.float(), "rgb_covariance": covariance}
        with atomic_path(path) as tmp:
            torch.save({**stats, "sha256": _statistics_digest(stats)}, tmp)
    covariance = stats["rgb_covariance"]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    return {
        "mean_image": stats["mean_image"],
        "channel_mean": stats["channel_mean"],
        "rgb_covariance": covariance.float(),
        "rgb_eigenvalues": eigenvalues.flip(0).clamp_min(0).float(),
        "rgb_eigenvectors": eigenvectors.flip(1).float(),
        "input_channel_std": covariance.diagonal().sqrt().float() if divide_std else None,
    }


STATISTICS = ("mean_image", "channel_mean", "rgb_covariance")


def _statistics_digest(stats: dict) -> str:
    digest = hashlib.sha256()
    for name in STATISTICS:
        digest.update(stats[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_statistics(path: Path) -> dict | None:
    """The cached statistics in ``path``, or None (with one warning) when the file is cut, zeroed, not
    a statistics file, or its values do not match the SHA-256 stored with them: they are computed again."""
    try:
        stats = torch.load(path, weights_only=True)
        if isinstance(stats, dict) and stats.get("sha256") == _statistics_digest(stats):
            return stats
        why = "its values do not match their SHA-256"
    except Exception as error:  # a cut or zeroed zip, another file: whatever torch.load raises
        why = f"cannot be read ({type(error).__name__})"
    log.warning("%s: damaged cached statistics (%s); computing them again", path, why)
    return None
