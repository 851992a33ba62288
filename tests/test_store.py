"""The sharded store: a killed build resumes to the same bytes, damage is found and rebuilt or refused,
builds wait for each other, both formats give the pixels, and batches reach the model as the step expects."""

import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from towers.data import CatsDogsDataModule, load_image
from towers.data.shard_reader import StoreImages, collate_encoded, decode_batch, open_store
from towers.data.shards import DamagedCache, NotEnoughDisk, build_lock
from towers.data.store import index_images, read_checks, training_statistics
from towers.module import TowerClassifier

REPO = Path(__file__).resolve().parents[1]


def images(root: Path, count: int, side: int = 24) -> Path:
    """``count`` small noisy JPEGs in the Kaggle layout (a smooth colour plus noise, so JPEG is not all noise)."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 1, side)[:, None, None]
    for i in range(count):
        colour = rng.integers(0, 256, 3)
        pixels = ramp * colour + (1 - ramp) * colour[::-1] + rng.normal(0, 12, (side, side, 3))
        name = f"{('cat', 'dog')[i % 2]}.{i // 2}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "train" / name, quality=90)
    return root


def build(root: Path, cache: Path, **kwargs):
    settings = dict(source="auto", cache_dir=cache, resize_size=16, exif_transpose=True, fast_path=True, num_workers=0)
    return index_images(root, **{**settings, "shard_rows": 16, **kwargs})


def shard_files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "store-16-raw").iterdir()) if p.name != "verified.jsonl"}


def build_slowly(root: Path, cache: Path, stderr: Path | None = None) -> None:
    """A forked process's build, 10 ms an image slower, so that a test can kill it half-way."""
    import towers.data.files as files

    if stderr:
        sys.stderr = open(stderr, "w", buffering=1)
    load = files.load_image
    files.load_image = lambda *args, **kwargs: time.sleep(0.01) or load(*args, **kwargs)
    build(root, cache, num_workers=2)


FORK = multiprocessing.get_context("fork")


def test_a_killed_build_resumes_to_the_bytes_of_an_uninterrupted_build(tmp_path):
    root = images(tmp_path / "data", 320)  # 20 shards of 16
    whole = build(root, tmp_path / "whole", num_workers=2)
    cache = tmp_path / "killed"
    proc = FORK.Process(target=build_slowly, args=(root, cache))
    proc.start()
    deadline = time.time() + 120
    while len(list((cache / "store-16-raw").glob("*.json"))) < 6 and time.time() < deadline and proc.is_alive():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up of any kind: what a pre-empted job gets
    proc.join()
    finished = len(list((cache / "store-16-raw").glob("*.json")))
    assert 6 <= finished < 20, finished  # killed half-way, with shards done
    time.sleep(1.5)  # the orphaned workers notice within a second and exit
    resumed = build(root, cache, num_workers=2)
    assert shard_files(cache) == shard_files(tmp_path / "whole")  # every shard byte-identical
    assert resumed.store_path.read_bytes() == whole.store_path.read_bytes()  # the manifest too
    manifest = json.loads(resumed.store_path.read_text())
    assert manifest["count"] == 320 == sum(s["rows"] for s in manifest["shards"])
    assert len({s["id"] for s in manifest["shards"]}) == 20  # each image stored once
    assert not [p for p in (cache / "store-16-raw").iterdir() if p.name.startswith(".")]  # no temporary left
    store = open_store(resumed.store_path)
    for f in ("cat.0.jpg", "dog.77.jpg", "cat.159.jpg"):
        assert np.array_equal(store[resumed.store_rows[f]], load_image(root / "train" / f, 16)[0])
    checks = read_checks(cache / "checks.jsonl")
    assert len(checks) == 320 and all(entry[2] for entry in checks.values())


def test_damaged_shards_are_rebuilt_by_the_build_and_refused_by_open(tmp_path, caplog):
    root = images(tmp_path / "data", 64)
    cache = tmp_path / "cache"
    index = build(root, cache)
    shards = sorted((cache / "store-16-raw").glob("*.npy"))
    original = shards[1].read_bytes()
    stat = shards[1].stat()
    shards[1].write_bytes(b"\0" * len(original))  # zero-filled, same size, same mtime: an interrupted rsync
    os.utime(shards[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DamagedCache, match=f"{shards[1].stem}.*does not match its SHA-256.*delete"):
        open_store(index.store_path)
    shards[2].write_bytes(shards[2].read_bytes()[:1000])  # cut
    with caplog.at_level(logging.WARNING, logger="towers.data"):
        again = build(root, cache)
    assert "rebuilding it" in caplog.text and shards[2].stem in caplog.text
    assert shards[1].read_bytes() == original and open_store(again.store_path) is not None
    # a manifest cut short: the build writes it again; open refuses it in one line
    again.store_path.write_text(again.store_path.read_text()[:30])
    with pytest.raises(DamagedCache, match="not a store manifest"):
        open_store(again.store_path)
    assert open_store(build(root, cache).store_path) is not None


def test_a_built_store_is_not_read_back_and_a_copied_one_is_hashed_again(tmp_path, monkeypatch):
    from towers.data import shards

    root = images(tmp_path / "data", 40)  # 3 shards
    index = build(root, tmp_path / "cache")
    real = shards._sha256_file
    monkeypatch.setattr(shards, "_sha256_file", lambda path: pytest.fail(f"{path} read back"))
    open_store(index.store_path)  # hashed as written: sizes only
    monkeypatch.undo()
    shutil.copytree(tmp_path / "cache", tmp_path / "copy")  # another machine's disk: new inodes and ctimes
    shard = next((tmp_path / "copy" / "store-16-raw").glob("*.npy"))
    shard.write_bytes(bytes(shard.stat().st_size))
    hashed = []
    monkeypatch.setattr(shards, "_sha256_file", lambda path: hashed.append(path) or real(path))
    with pytest.raises(DamagedCache, match="does not match"):
        open_store(tmp_path / "copy" / index.store_path.name)
    assert len(hashed) == 3


def test_damaged_check_index_and_statistics_are_redone_not_used(tmp_path, caplog):
    root = images(tmp_path / "data", 40)
    cache = tmp_path / "cache"
    build(root, cache, fast_path=False)
    checks = cache / "checks.jsonl"
    checks.write_bytes(checks.read_bytes()[:-40])  # the last line cut by a kill
    with caplog.at_level(logging.WARNING, logger="towers.data"):
        index = build(root, cache, fast_path=False)
    assert "1 damaged line(s) skipped" in caplog.text and len(index.usable) == 40
    again = read_checks(checks)
    assert len(again) == 40 and again.broken == 0  # rewritten without the damaged line
    # statistics: zero-filled and cut files are computed again with one warning
    data = StoreImages(build(root, cache).store_path, list(range(40)), [0] * 40)
    first = training_statistics(data, ["key"], cache, 16, False, 0)
    (path,) = cache.glob("stats-*.pt")
    for damage in (bytes(path.stat().st_size), path.read_bytes()[:100]):
        path.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="towers.data"):
            again = training_statistics(data, ["key"], cache, 16, False, 0)
        assert "damaged cached statistics" in caplog.text
        assert torch.equal(again["mean_image"], first["mean_image"])


def test_a_second_build_waits_for_the_first(tmp_path):
    root = images(tmp_path / "data", 20)
    cache, said = tmp_path / "cache", tmp_path / "stderr.txt"
    cache.mkdir()
    with build_lock(cache, "a test"):
        proc = FORK.Process(target=build_slowly, args=(root, cache, said))
        proc.start()
        deadline = time.time() + 60
        while not (said.is_file() and said.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.is_alive() and not list(cache.glob("store-16-raw-*.json"))  # waiting for the lock
    proc.join(60)
    assert proc.exitcode == 0 and f"waiting for process {os.getpid()}" in said.read_text()
    assert "building a test" in said.read_text() and len(list(cache.glob("store-16-raw-*.json"))) == 1


def test_a_store_that_does_not_fit_is_refused_before_the_build(tmp_path, monkeypatch):
    root = images(tmp_path / "data", 20)
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(NotEnoughDisk, match=r"needs 0\.0 GB .* only 0\.0 GB are free.*store_format jpeg"):
        build(root, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "store-16-raw").glob("*.npy"))


def test_the_jpeg_store_is_smaller_and_decodes_to_nearly_the_raw_pixels(tmp_path):
    root = images(tmp_path / "data", 48, side=64)
    raw = build(root, tmp_path / "cache", resize_size=48)
    jpg = build(root, tmp_path / "cache", resize_size=48, store_format="jpeg", jpeg_quality=90)
    size = lambda name: sum(p.stat().st_size for p in (tmp_path / "cache" / name).glob("*.[nb][pi][yn]"))
    assert size("store-48-jpeg") < 0.6 * size("store-48-raw")
    a, b = open_store(raw.store_path), open_store(jpg.store_path)
    pixels_raw = np.stack([a[i] for i in range(48)]).astype(float)
    pixels_jpg = np.stack([b[i] for i in range(48)]).astype(float)
    psnr = 10 * np.log10(255**2 / np.mean((pixels_raw - pixels_jpg) ** 2))
    assert psnr > 30, psnr  # quality 90, 4:4:4
    # the batched decode (what a GPU run does after the transfer) gives the CPU path's pixels
    data = StoreImages(jpg.store_path, list(range(8)), list(range(8)), decode="device")
    encoded, labels, indices = collate_encoded([data[i] for i in range(8)])
    assert isinstance(encoded, list) and encoded[0].dtype == torch.uint8 and encoded[0].dim() == 1
    assert torch.equal(decode_batch(encoded, "cpu"), torch.from_numpy(pixels_jpg[:8].astype(np.uint8)))
    assert labels.tolist() == list(range(8)) and indices.tolist() == list(range(8))


def test_a_changed_file_rebuilds_only_its_shard(tmp_path):
    root = images(tmp_path / "data", 64)
    cache = tmp_path / "cache"
    build(root, cache)
    before = shard_files(cache)
    time.sleep(0.01)
    images(tmp_path / "other", 1, side=30)
    shutil.copy(tmp_path / "other" / "train" / "cat.0.jpg", root / "train" / "dog.31.jpg")  # the last shard's
    index = build(root, cache)
    after = shard_files(cache)
    assert len(set(before) - set(after)) == 2 and len(set(after) - set(before)) == 2  # one .npy + one .json
    assert np.array_equal(
        open_store(index.store_path)[index.store_rows["dog.31.jpg"]], load_image(root / "train" / "dog.31.jpg", 16)[0]
    )


def test_batches_stay_uint8_until_the_device_and_reach_the_model_channels_last(tmp_path):
    images(tmp_path / "data", 32, side=80)
    dm = CatsDogsDataModule(
        root=str(tmp_path / "data"),
        cache_dir=str(tmp_path / "cache"),
        test_size=0,
        val_size=4,
        train_size="rest",
        resize_size=72,
        image_size=67,
        batch_size=4,
        num_workers=0,
    )
    seen = {}
    before, after = dm.on_before_batch_transfer, dm.on_after_batch_transfer

    def on_before(batch, i):
        seen.setdefault("loader", (batch[0].dtype, batch[0].shape, batch[0].is_contiguous()))
        return before(batch, i)

    def on_after(batch, i):
        out = after(batch, i)
        seen.setdefault("step", (out[0].dtype, out[0].shape))
        return out

    dm.on_before_batch_transfer, dm.on_after_batch_transfer = on_before, on_after
    model = TowerClassifier(width_multiplier=0.125, image_size=67, channels_last=True)

    def conv1_formats(conv, inputs, output) -> None:
        channels_last = torch.channels_last
        seen.setdefault(
            "conv1",
            (conv.weight.is_contiguous(memory_format=channels_last), output.is_contiguous(memory_format=channels_last)),
        )

    model.model.features.conv1.register_forward_hook(conv1_formats)
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert seen["loader"] == (torch.uint8, (4, 3, 72, 72), True)  # 1 byte a pixel through the loader and the copy
    assert seen["step"] == (torch.float32, (4, 3, 67, 67))  # converted on the device, after the transfer
    assert seen["conv1"] == (True, True)  # the step's convolutions run in channels_last


def test_gpu_check_data_rows_run_on_the_cpu_and_skip_without_a_gpu(capsys):
    """The GPU rows' code (batched decode, augmentation on the device, images/s into the model) on the
    CPU; without a GPU and without --cpu-dry-run the script says what it did not measure."""
    from benchmarks import gpu_check

    rows = gpu_check.data_rows(gpu_check.parse_args(["--cpu-dry-run"]))
    assert [r["row"][:3] for r in rows] == ["(a)", "(b)"] + ["(c)"] * 4
    assert all(r["images_per_s"] > 0 for r in rows)
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 0
        assert "no GPU, skipped" in capsys.readouterr().out


def test_the_format_follows_the_dataset_size_memory_and_gpu():
    from towers.data.shards import choose_format

    gib = 2**30
    imagenet, subset = 1_281_167, 126_689  # ILSVRC-2012 train, an ImageNet-100 subset
    assert choose_format(subset, 256, gpu=True, memory_bytes=128 * gib)[0] == "raw"  # 25 GB: cached
    fmt, why = choose_format(imagenet, 256, gpu=True, memory_bytes=128 * gib)  # 252 GB
    assert fmt == "jpeg" and "251.9 GB" in why and "decoded on the GPU" in why
    assert choose_format(imagenet, 256, gpu=False, memory_bytes=128 * gib)[0] == "raw"
    assert choose_format(imagenet, 256, gpu=True, memory_bytes=1024 * gib)[0] == "raw"


def test_the_check_index_is_appended_and_rewritten_only_when_mostly_superseded(tmp_path):
    root = images(tmp_path / "data", 20)
    cache = tmp_path / "cache"
    build(root, cache, fast_path=False)
    checks = cache / "checks.jsonl"
    first = checks.read_bytes()
    for round_ in range(3):  # each round changes one file: one line appended, nothing rewritten
        time.sleep(0.01)
        images(tmp_path / f"new{round_}", 1, side=20 + round_)
        shutil.copy(tmp_path / f"new{round_}" / "train" / "cat.0.jpg", root / "train" / "dog.3.jpg")
        build(root, cache, fast_path=False)
        assert checks.read_bytes().startswith(first) and len(checks.read_bytes().splitlines()) == 2 + round_
    index = read_checks(checks)
    assert index.entries == 23 and len(index) == 20
    for n in range(19):  # superseded entries pile up past twice the live ones (41 > 40): rewritten as one line
        (root / "train" / "dog.3.jpg").touch()
        os.utime(root / "train" / "dog.3.jpg", ns=(n, n))
        build(root, cache, fast_path=False)
    index = read_checks(checks)
    assert len(index) == 20 and index.entries == 20 and len(checks.read_bytes().splitlines()) == 1
