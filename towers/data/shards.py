"""The pre-resized image store: shards built in parallel, resumable, shared by every run on a node,
and verified by their SHA-256 before anything is trained on them.

A store is a folder of shards, ``cache_dir/store-<R>-<format>/``, and a manifest naming the shards of
one file list, ``cache_dir/store-<R>-<format>-<fingerprint>.json``. Each shard holds ``shard_rows``
consecutive images of the sorted file list, in one of two formats:

    raw    a ``.npy`` of uint8 (n, 3, R, R): read as a memory map, no decoding (3·R² bytes per image)
    jpeg   the images re-encoded as JPEG (quality ``jpeg_quality``, no chroma subsampling), one after
           the other in a ``.bin`` with their offsets in the sidecar; decoded on the CPU when read, or
           in batches on the GPU (:func:`towers.data.shard_reader.decode_batch`)

A shard is named by a digest of what it is made of (the decoding version, format, quality, size, EXIF
setting, and its files' names, sizes and modification times), so a changed file rebuilds only its
shard, and a build killed at any point resumes with the shards it finished: each is written under a
temporary name, renamed, and only then given its sidecar (``<id>.json``: rows, bytes, SHA-256, offsets,
and each file's check result), which is what marks it complete. Builds take an exclusive lock on
``cache_dir/.store.lock`` (POSIX record lock: released when the process dies, not inherited by its
workers), so concurrent runs and ranks on a node wait for one build and then share it.

Every shard's size is checked whenever the store is opened, and its SHA-256 the first time the file is
seen (by inode, size, modification and change time, appended to ``verified.jsonl``): a store copied to
another machine, cut or zero-filled (an interrupted rsync) is hashed there, and a damaged shard is
rebuilt by :func:`build_store` or refused by :func:`towers.data.shard_reader.open_store` (:class:`DamagedCache`, naming the
shard and the command that rebuilds it), never read.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from towers.errors import UserError
from towers.files import allocate, append_jsonl, atomic_path, scan_jsonl, write_atomic

log = logging.getLogger(__name__)

FORMATS = ("raw", "jpeg")
STORE_VERSION = 1  # the shard and manifest layout; the decoding's version is store.CACHE_VERSION
# Bytes per image of a JPEG shard as a fraction of raw, for the disk check before a build only.
# bench_data.py measured 0.11 (synthetic photograph-size images) and 0.14 (tiny ones) at quality 90,
# 4:4:4 (BENCHMARKS.md); photographs with more fine detail compress less, so the check assumes 0.25.
JPEG_SIZE_ESTIMATE = 0.25
# The raw store is chosen while it fits in this fraction of the memory (so the page cache holds it and
# every epoch after the first reads no disk), leaving the rest to the training process and its workers.
PAGE_CACHE_SHARE = 0.5


class DamagedCache(UserError, ValueError):
    """A cached store, check index or statistics file that is cut, zeroed or otherwise not what was written."""


class NotEnoughDisk(UserError, OSError):
    """The store does not fit on the disk of ``cache_dir``."""


def choose_format(count: int, resize_size: int, gpu: bool, memory_bytes: int | None = None) -> tuple[str, str]:
    """(format, why) for ``count`` images at ``resize_size``, by the rule BENCHMARKS.md derives from the
    per-core costs: raw while the store fits in the page cache (``PAGE_CACHE_SHARE`` of the memory),
    since it costs the host least per image and its pixels equal the plain path's; beyond that, on a
    GPU, JPEG decoded on the GPU (about a ninth of the bytes, so it is read from memory again); with no
    GPU, raw all the same (the CPU's training step, not the reads, bounds the rate)."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    raw = count * 3 * resize_size**2
    fits = raw <= PAGE_CACHE_SHARE * memory_bytes
    if fits or not gpu:
        why = "fits in the page cache" if fits else "no GPU to decode JPEG; the CPU's step bounds the rate"
        return "raw", f"raw store {_gigabytes(raw)} ({why}, memory {_gigabytes(memory_bytes)})"
    return "jpeg", (
        f"raw store {_gigabytes(raw)} exceeds {PAGE_CACHE_SHARE:.0%} of memory ({_gigabytes(memory_bytes)}): "
        f"JPEG store, about {_gigabytes(raw * JPEG_SIZE_ESTIMATE)} at most, decoded on the GPU"
    )


# ----------------------------------------------------------------------------- shards and manifests


@dataclass(frozen=True)
class Layout:
    """Where the shards and manifests of one (cache_dir, resize size, format, EXIF setting) live."""

    cache_dir: Path
    resize_size: int
    store_format: str
    exif_transpose: bool

    @property
    def name(self) -> str:
        return f"store-{self.resize_size}-{self.store_format}" + ("" if self.exif_transpose else "-exif-ignored")

    @property
    def shard_dir(self) -> Path:
        return self.cache_dir / self.name

    def manifest(self, fingerprint: str) -> Path:
        return self.cache_dir / f"{self.name}-{fingerprint}.json"


def _suffix(store_format: str) -> str:
    return ".npy" if store_format == "raw" else ".bin"


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path):
    """The JSON in ``path``, or None when it is missing, cut or not JSON."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _identity(path: Path) -> list[int]:
    """What changes when a file is rewritten, copied or restored: inode, size, mtime, ctime."""
    s = path.stat()
    return [s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns]


# ----------------------------------------------------------------------------- building one shard


def _watch_parent(parent: int) -> None:
    """Pool initializer: a worker whose parent was killed exits within a second instead of finishing
    the queued shards and waiting forever for more."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


@dataclass(frozen=True)
class _Job:
    shard_dir: Path
    shard_id: str
    base: Path
    files: tuple[str, ...]
    resize_size: int
    exif_transpose: bool
    store_format: str
    jpeg_quality: int


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """uint8 (3, R, R) as JPEG bytes, 4:4:4 (no chroma subsampling: the colour detail is what the
    experiment is about)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buffer, "JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _build_shard(job: _Job) -> tuple[str, int, list]:
    """Decode the shard's files and write the shard, then its sidecar. Returns (id, rows, [usable, note] each)."""
    from towers.data.files import BadImage, load_image

    r = job.resize_size
    results, offsets = [], [0]
    final = job.shard_dir / f"{job.shard_id}{_suffix(job.store_format)}"
    digest = hashlib.sha256()
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:

            def put(data: bytes) -> None:
                f.write(data)
                digest.update(data)

            if job.store_format == "raw":
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    header, {"descr": "|u1", "fortran_order": False, "shape": (len(job.files), 3, r, r)}
                )
                f.truncate(len(header.getvalue()) + len(job.files) * 3 * r * r)
                allocate(tmp, shown=final)  # a full disk: an OSError naming the shard now, not half-way
                put(header.getvalue())
            for name in job.files:
                try:
                    pixels, note = load_image(job.base / name, r, job.exif_transpose)
                    results.append([True, note])
                except BadImage as error:
                    pixels = None
                    results.append([False, str(error)])
                except Exception as error:  # any failure of one file (a decoder's own error) marks that file
                    pixels = None
                    results.append([False, f"cannot be decoded: {type(error).__name__}: {error}"])
                if job.store_format == "raw":
                    put((pixels if pixels is not None else np.zeros((3, r, r), np.uint8)).tobytes())
                else:
                    put(encode_jpeg(pixels, job.jpeg_quality) if pixels is not None else b"")
                    offsets.append(f.tell())
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
    sidecar = dict(rows=len(job.files), bytes=size, sha256=digest.hexdigest(), results=results)
    if job.store_format == "jpeg":
        sidecar["offsets"] = offsets
    write_atomic(job.shard_dir / f"{job.shard_id}.json", json.dumps(sidecar))
    # hashed as it was written: opening the store need not read it back (for ImageNet raw, 252 GB)
    append_jsonl(job.shard_dir / "verified.jsonl", {"sha256": sidecar["sha256"], "file": _identity(final)})
    return job.shard_id, len(job.files), results


def _complete(shard_dir: Path, shard_id: str, store_format: str) -> dict | None:
    """The sidecar of a finished shard (its data file there, of the size the sidecar says), else None."""
    sidecar = _read_json(shard_dir / f"{shard_id}.json")
    data = shard_dir / f"{shard_id}{_suffix(store_format)}"
    if not isinstance(sidecar, dict) or not data.is_file() or data.stat().st_size != sidecar.get("bytes"):
        return None
    return sidecar


# ----------------------------------------------------------------------------- the lock


@contextmanager
def build_lock(cache_dir: Path, what: str):
    """Hold ``cache_dir/.store.lock`` (a POSIX record lock, so it dies with its process and is not
    inherited by forked workers); a second process says whom it waits for, once, and waits."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent builds write identical shards under temporary names
        yield
        return
    path = cache_dir / ".store.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            tqdm.write(f"waiting for {holder} ({path})", file=sys.stderr)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {os.uname().nodename} building {what}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------- building a store


def _gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def plan_store(
    cache_dir: Path,
    stamps: list[tuple[str, int, int]],
    resize_size: int,
    exif_transpose: bool,
    store_format: str = "raw",
    jpeg_quality: int = 90,
    shard_rows: int = 1024,
    decoding_version: int = 0,
) -> tuple[Layout, Path, list[list], list[str]]:
    """(layout, manifest path, each shard's stamps, each shard's id) of the store of ``stamps``, built
    or not: the manifest's name changes whenever a file, the format or the decoding does."""
    if store_format not in FORMATS:
        raise ValueError(f"store_format={store_format!r}: one of {FORMATS}")
    layout = Layout(Path(cache_dir), resize_size, store_format, exif_transpose)
    key = [STORE_VERSION, decoding_version, store_format, jpeg_quality if store_format == "jpeg" else None]
    key += [resize_size, exif_transpose]
    chunks = [stamps[i : i + shard_rows] for i in range(0, len(stamps), shard_rows)]
    ids = [_digest([key, chunk]) for chunk in chunks]
    return layout, layout.manifest(_digest([key, ids])), chunks, ids


def build_store(
    cache_dir: Path,
    base: Path,
    stamps: list[tuple[str, int, int]],
    resize_size: int,
    exif_transpose: bool,
    num_workers: int,
    store_format: str = "raw",
    jpeg_quality: int = 90,
    shard_rows: int = 1024,
    decoding_version: int = 0,
) -> tuple[Path, list[list]]:
    """The store of ``stamps`` (``(file relative to base, size, mtime_ns)``, sorted), built where missing.

    Returns the manifest and, for every file, ``[usable, note]`` from its shard. Under the build lock:
    finished shards are kept, the others built over ``num_workers`` processes with a progress bar
    (disk space checked and printed first), the manifest written, every shard verified (damaged ones
    rebuilt once), and shards and manifests of other file lists of this layout removed.
    """
    layout, manifest, chunks, ids = plan_store(
        cache_dir, stamps, resize_size, exif_transpose, store_format, jpeg_quality, shard_rows, decoding_version
    )
    layout.shard_dir.mkdir(parents=True, exist_ok=True)

    with build_lock(layout.cache_dir, manifest.name):
        for _attempt in range(2):
            sidecars = {i: _complete(layout.shard_dir, i, store_format) for i in set(ids)}
            todo = [(i, chunk) for i, chunk in zip(ids, chunks) if sidecars[i] is None]
            for i, _ in todo:
                if (layout.shard_dir / f"{i}.json").is_file():  # finished once, its data since cut or removed
                    log.warning("store shard %s: cut, damaged or missing; rebuilding it", layout.shard_dir / i)
            if todo:
                _build(layout, base, todo, len(chunks), jpeg_quality, num_workers)
                sidecars = {i: _complete(layout.shard_dir, i, store_format) for i in set(ids)}
            shards = [
                dict(id=i, rows=sidecars[i]["rows"], bytes=sidecars[i]["bytes"], sha256=sidecars[i]["sha256"])
                for i in ids
            ]
            record = dict(
                version=STORE_VERSION,
                format=store_format,
                resize_size=resize_size,
                jpeg_quality=jpeg_quality if store_format == "jpeg" else None,
                exif_transpose=exif_transpose,
                count=len(stamps),
                shards=shards,
            )
            if _read_json(manifest) != record:
                write_atomic(manifest, json.dumps(record, indent=0))
            damaged = damaged_shards(manifest)
            if not damaged:
                break
            for shard_id, why in damaged:
                log.warning("store shard %s: %s; rebuilding it", layout.shard_dir / shard_id, why)
                for suffix in (".json", _suffix(store_format)):
                    (layout.shard_dir / f"{shard_id}{suffix}").unlink(missing_ok=True)
        else:
            raise DamagedCache(
                f"{manifest}: shards still damaged after a rebuild ({damaged[0][1]}); is the disk failing?"
            )
        _remove_others(layout, manifest, set(ids))
    return manifest, [result for i in ids for result in sidecars[i]["results"]]


def _build(layout: Layout, base: Path, todo: list, total_shards: int, quality: int, num_workers: int) -> None:
    """Build the shards ``todo`` ((id, stamps)), after checking that they fit on the disk."""
    for stale in layout.shard_dir.glob(".*.tmp"):  # left by a killed build (we hold the lock)
        stale.unlink(missing_ok=True)
    images = sum(len(chunk) for _, chunk in todo)
    per_image = 3 * layout.resize_size**2 * (1 if layout.store_format == "raw" else JPEG_SIZE_ESTIMATE)
    need, free = images * per_image, shutil.disk_usage(layout.shard_dir).free
    about = "" if layout.store_format == "raw" else "about "
    done = total_shards - len(todo)
    tqdm.write(
        f"building the {layout.store_format} store of {images:,} images at {layout.resize_size} px in "
        f"{len(todo):,} shard(s){f' ({done:,} of {total_shards:,} shards done earlier)' if done else ''}: "
        f"{about}{_gigabytes(need)} needed, {_gigabytes(free)} free in {layout.shard_dir}",
        file=sys.stderr,
    )
    if need > free:
        hint = "" if layout.store_format == "jpeg" else " or --data.store_format jpeg (a fraction of the size)"
        raise NotEnoughDisk(
            f"the store needs {about}{_gigabytes(need)} in {layout.shard_dir} but only {_gigabytes(free)} are free; "
            f"free space, or give --data.cache_dir a larger disk{hint}"
        )
    jobs = [
        _Job(
            layout.shard_dir,
            i,
            base,
            tuple(f for f, _, _ in chunk),
            layout.resize_size,
            layout.exif_transpose,
            layout.store_format,
            quality,
        )
        for i, chunk in todo
    ]
    bar = tqdm(total=images, unit="img", desc=f"building {layout.name}", smoothing=0.05, disable=images < 64)
    try:
        if num_workers > 0 and len(jobs) > 1:
            context = get_context("fork" if os.name == "posix" else "spawn")
            with context.Pool(min(num_workers, len(jobs)), initializer=_watch_parent, initargs=(os.getpid(),)) as pool:
                for _, rows, _ in pool.imap_unordered(_build_shard, jobs):
                    bar.update(rows)
        else:
            for job in jobs:
                bar.update(_build_shard(job)[1])
    finally:  # a disk that fills up all the same: the OSError naming the shard (train.py: one line)
        bar.close()


def _remove_others(layout: Layout, manifest: Path, keep: set[str]) -> None:
    """Manifests and shards of this layout for other file lists (files since changed), and legacy stores."""
    for old in layout.cache_dir.glob(f"{layout.name}-*.json"):
        if old != manifest:
            old.unlink(missing_ok=True)
    for path in layout.shard_dir.iterdir():
        if path.name != "verified.jsonl" and not path.name.startswith(".") and path.name.split(".")[0] not in keep:
            path.unlink(missing_ok=True)
    for legacy in layout.cache_dir.glob(f"store-{layout.resize_size}-*.npy"):  # the single-file store of before
        legacy.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- opening and verifying


def _rebuild_hint(manifest: Path) -> str:
    return f"delete {manifest} and run again (prepare_data rebuilds the damaged shards)"


def _load_manifest(manifest: Path) -> dict:
    record = _read_json(manifest)
    if not (
        isinstance(record, dict)
        and record.get("version") == STORE_VERSION
        and record.get("format") in FORMATS
        and isinstance(record.get("shards"), list)
    ):
        if not manifest.is_file():
            raise DamagedCache(f"the image store {manifest} is missing; run again to build it")
        raise DamagedCache(f"{manifest} is not a store manifest (cut or overwritten); {_rebuild_hint(manifest)}")
    return record


def damaged_shards(manifest: Path, verify: bool = True) -> list[tuple[str, str]]:
    """(shard id, what is wrong) of every shard of ``manifest`` that is missing, of the wrong size, or
    (``verify``) whose SHA-256 differs from the one recorded when it was built. A shard is hashed once
    per file identity; the identities that passed are appended to ``verified.jsonl``."""
    record = _load_manifest(manifest)
    shard_dir = manifest.parent / manifest.name.rsplit("-", 1)[0]
    suffix = _suffix(record["format"])
    damaged, unverified = [], []
    log_path = shard_dir / "verified.jsonl"
    seen = set()
    if verify and log_path.is_file():  # a line cut by a kill is skipped: its shard is hashed again
        seen = {(r.get("sha256"), *r.get("file", ())) for r in scan_jsonl(log_path)[0]}
    for shard in record["shards"]:
        path = shard_dir / f"{shard['id']}{suffix}"
        if not path.is_file():
            damaged.append((shard["id"], "missing"))
        elif path.stat().st_size != shard["bytes"]:
            damaged.append((shard["id"], f"cut or overwritten ({path.stat().st_size:,} of {shard['bytes']:,} bytes)"))
        elif verify and (shard["sha256"], *_identity(path)) not in seen:
            unverified.append((shard, path))
    if unverified:
        total = sum(shard["bytes"] for shard, _ in unverified)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {shard_dir.name}", disable=total < 2**30)

        def check(item):
            shard, path = item
            identity = _identity(path)
            digest = _sha256_file(path)  # hashlib releases the GIL: the threads hash in parallel
            bar.update(shard["bytes"])
            return shard, identity, digest

        with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
            for shard, identity, digest in pool.imap_unordered(check, unverified):
                if digest != shard["sha256"]:
                    damaged.append(
                        (shard["id"], "its content does not match its SHA-256 (zeroed or changed after the build)")
                    )
                else:
                    append_jsonl(log_path, {"sha256": shard["sha256"], "file": identity})
        bar.close()
    return damaged
