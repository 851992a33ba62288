"""Nothing lost, nothing silent (issue 16), on generated files: odd names and links under the data root,
EXIF orientation, a full disk (a writer patched to fail with ENOSPC), diverged and damaged checkpoints,
a batch larger than the training split, the pinned archive hash, and user errors as one line, exit 2."""

import errno
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image
from test_data import jpeg, kaggle_tree, module, zip_of
from test_train import ROOT, tiny

import train
from towers.data import MICROSOFT_SHA256, MICROSOFT_ZIP, download_microsoft, load_image
from towers.errors import BadOption, DamagedCheckpoint, Diverged
from towers.files import write_atomic
from towers.runs import AtomicCheckpointIO, checkpoint_problem, newest_last_checkpoint


def microsoft_tree(root: Path, per_class: int) -> Path:
    for i in range(per_class):
        jpeg(root / "PetImages" / "Cat" / f"{i}.jpg", 2 * i)
        jpeg(root / "PetImages" / "Dog" / f"{i}.jpg", 2 * i + 1)
    return root


def report_lines(dm) -> list[str]:
    return dm.bad_files_report.read_text().splitlines()[1:]


# ----------------------------------------------------------------------------- names, links, EXIF


@pytest.mark.parametrize("fast_path", [True, False])
def test_file_names_that_are_not_utf8_are_reported_escaped_and_never_fatal(tmp_path, fast_path):
    root = microsoft_tree(tmp_path / "data", 4)
    cat = os.fsencode(root / "PetImages" / "Cat")
    good = Path(os.fsdecode(cat + b"/caf\xe9.jpg"))  # Latin-1, not UTF-8: a readable image
    broken = Path(os.fsdecode(cat + b"/\xff\xfe.jpg"))  # and one that is not an image
    jpeg(good, 99)
    broken.write_bytes(b"not an image")
    dm = module(root, fast_path=fast_path)
    lines = report_lines(dm)
    assert any(
        line.startswith(str(root / "PetImages/Cat/caf\\xe9.jpg") + "\tkept\t") and "not valid UTF-8" in line
        for line in lines
    ), lines
    assert any(
        line.startswith(str(root / "PetImages/Cat/\\xff\\xfe.jpg") + "\tskipped\tnot an image") for line in lines
    )
    assert dm.bad_files_report.read_bytes().decode("utf-8")  # the report itself is valid UTF-8
    assert (str(good.relative_to(root / "PetImages")), 0) in dm.usable and len(dm.usable) == 9


def exif_image(path: Path, orientation: int) -> np.ndarray:
    """A 40x20 image, left half red and right half blue, stored with an EXIF orientation tag; returns
    the pixels as stored."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "PNG", exif=exif)
    return pixels


def test_exif_orientation_is_applied_by_default_and_can_be_switched_off(tmp_path):
    stored = exif_image(tmp_path / "rotated.png", 6)  # 6: shown turned 90 degrees clockwise
    Image.fromarray(np.rot90(stored, k=-1).copy()).save(tmp_path / "upright.png")
    Image.fromarray(stored).save(tmp_path / "as_stored.png")
    upright, note = load_image(tmp_path / "rotated.png", 16)
    assert np.array_equal(upright, load_image(tmp_path / "upright.png", 16)[0])
    assert "EXIF orientation 6 applied (rotated 90° clockwise)" in note
    # upright, red is on top and blue below; as stored, red is on the left
    assert upright[0, :4].mean() > 200 and upright[2, -4:].mean() > 200
    ignored, note = load_image(tmp_path / "rotated.png", 16, exif_transpose=False)
    assert np.array_equal(ignored, load_image(tmp_path / "as_stored.png", 16)[0]) and "ignored" in note


def test_every_file_under_the_root_that_is_not_used_gets_a_line(tmp_path):
    root = microsoft_tree(tmp_path / "data", 4)
    cat, dog = root / "PetImages" / "Cat", root / "PetImages" / "Dog"
    (cat / "folder.jpg").mkdir()  # a folder named like an image
    (cat / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # a link to nothing
    outside = jpeg(tmp_path / "elsewhere" / "secret.jpg", 7)
    (dog / "escape.jpg").symlink_to(outside)  # a link out of the data folder
    (dog / "inside.jpg").symlink_to(cat / "0.jpg")  # a link inside it: used
    exif_image(dog / "sideways.png", 8)
    for exif_transpose, action in ((True, "applied"), (False, "ignored")):
        dm = module(
            root, fast_path=True, exif_transpose=exif_transpose, cache_dir=str(tmp_path / f"cache-{exif_transpose}")
        )
        lines = report_lines(dm)
        expect = {
            cat / "folder.jpg": "a folder named like an image",
            cat / "gone.jpg": "skipped\ta symbolic link to",
            dog / "escape.jpg": "outside the data folder (refused)",
            dog / "sideways.png": f"kept\tEXIF orientation 8 {action}",
        }
        for path, text in expect.items():
            assert sum(line.startswith(f"{path}\t") and text in line for line in lines) == 1, (path, lines)
        assert len(lines) == len(expect)
        used = {f for f, _ in dm.usable}
        assert "Dog/inside.jpg" in used and "Dog/sideways.png" in used
        assert not used & {"Dog/escape.jpg", "Cat/gone.jpg"}
    # the Kaggle layout too: a folder named like an image and an image without a label in its name
    kaggle = kaggle_tree(tmp_path / "kaggle", 4)
    (kaggle / "train" / "cat.50.jpg").mkdir()
    jpeg(kaggle / "train" / "kitten.jpg", 3)
    lines = report_lines(module(kaggle))
    assert any(line.startswith(f"{kaggle / 'train' / 'cat.50.jpg'}\tskipped\ta folder named like") for line in lines)
    assert any(
        line.startswith(f"{kaggle / 'train' / 'kitten.jpg'}\tskipped\tnamed like an image but not") for line in lines
    )


# ----------------------------------------------------------------------------- full disks


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_the_store_is_built_is_an_error_naming_it_and_leaves_nothing(tmp_path, monkeypatch):
    root = kaggle_tree(tmp_path / "data", 4)
    monkeypatch.setattr(os, "posix_fallocate", enospc)  # what a full disk answers when the space is reserved
    with pytest.raises(OSError) as raised:
        module(root, fast_path=True)
    assert raised.value.errno == errno.ENOSPC
    shard = Path(raised.value.filename)  # a shard of the store (towers/data/shards.py)
    assert shard.parent.name.startswith("store-") and shard.suffix == ".npy"
    left = [p for p in (root / "cache").rglob("*") if p.is_file() and p.name != ".store.lock"]
    assert left == []  # no shard, no sidecar, no temporary file


def test_a_failed_write_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError) as raised:
        write_atomic(tmp_path / "status.json", "{}")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "status.json")
    assert list(tmp_path.iterdir()) == []


def half_then_enospc(real_save):
    """A torch.save that writes half of the checkpoint, then fails as a full disk does."""

    def save(obj, f, *args, **kwargs):
        if not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_full_disk_while_checkpointing_fails_the_run_in_one_line(demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", half_then_enospc(torch.save))
    status = train.command_line(
        ["fit", *tiny(demo_root, tmp_path, "--trainer.max_steps=2", "--trainer.limit_val_batches=1")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and "Traceback" not in "\n".join(err)
    run_folder = tmp_path / "lightning_logs" / "version_0"
    assert err[-1] == (
        f"train.py: error: No space left on device: {run_folder / 'checkpoints' / 'epoch=0-step=2.ckpt'}; "
        f"the run stopped (disk full)"
    )
    record = json.loads((run_folder / "status.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["message"]
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("*.tmp"))  # nothing half-written


# ----------------------------------------------------------------------------- divergence


class PoisonAt(Callback):
    """Sets every weight to NaN after the training step that reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


# step 4: the next losses are NaN; step 6 is the last step of epoch 1, so only the weights tell
@pytest.mark.parametrize("step", [4, 6])
def test_a_diverged_run_keeps_its_last_finite_checkpoints(demo_root, tmp_path, step):
    cli = train.main(tiny(demo_root, tmp_path, "--trainer.max_epochs=3"), run=False)
    cli.trainer.callbacks.append(PoisonAt(step))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    record = json.loads((tmp_path / "lightning_logs" / "version_0" / "status.json").read_text())
    assert record["status"] == "diverged" and "NaN or infinite" in record["message"]
    assert train.exit_status(cli) == 3
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert {p.name for p in checkpoints} >= {"last.ckpt", "epoch=0-step=3.ckpt"}
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["global_step"] == 3, path  # the end of epoch 0, before the poison
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values()), path
    # any other save of non-finite weights is refused before a byte is written
    with pytest.raises(Diverged):
        cli.trainer.save_checkpoint(tmp_path / "late.ckpt")
    assert not (tmp_path / "late.ckpt").exists()
    assert train._error_line(Diverged("loss NaN")) == (3, "the run diverged: loss NaN")  # train.py's exit status


# ----------------------------------------------------------------------------- damaged checkpoints


def test_a_truncated_checkpoint_is_named_and_last_falls_back_to_one_that_loads(demo_root, tmp_path, capsys, caplog):
    args = tiny(demo_root, tmp_path, "--trainer.limit_val_batches=1")
    assert train.command_line(["fit", *args, "--trainer.max_epochs=2"]) == 0
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    newest = last.resolve()  # save_last: link, so last.ckpt is a link to the newest epoch's file
    assert newest.name == "epoch=1-step=6.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    assert "central directory" in checkpoint_problem(last)
    with caplog.at_level(logging.WARNING, logger="towers.runs"):
        fallback = newest_last_checkpoint(tmp_path, check=True)
    assert fallback is not None and checkpoint_problem(fallback) is None and fallback.resolve() != newest
    assert str(last) in caplog.text and "damaged" in caplog.text and f"falling back to {fallback}" in caplog.text
    # given by path: one line naming it and the one that loads, exit 2
    capsys.readouterr()
    assert train.command_line(["fit", *args, "--trainer.max_epochs=3", f"--ckpt_path={newest}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"train.py: error: {newest} is damaged and cannot be read ({checkpoint_problem(newest)}); "
        f"the newest checkpoint beside it that loads is {fallback}"
    )
    # --ckpt_path last resumes from the fallback
    assert train.command_line(["fit", *args, "--trainer.max_epochs=3", "--ckpt_path=last"]) == 0
    resumed = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["global_step"] == 9


def test_checkpoint_io_writes_complete_files_only_and_names_damaged_ones(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "a.ckpt")
    assert torch.equal(io_.load_checkpoint(tmp_path / "a.ckpt")["state_dict"]["w"], torch.ones(3))
    monkeypatch.setattr(torch, "save", half_then_enospc(torch.save))
    with pytest.raises(OSError) as raised:
        io_.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "a.ckpt")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "a.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]  # the old one, whole
    assert torch.equal(io_.load_checkpoint(tmp_path / "a.ckpt")["state_dict"]["w"], torch.ones(3))
    # a damaged one is named, with the newest one beside it that loads
    monkeypatch.undo()
    io_.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "b.ckpt")
    (tmp_path / "b.ckpt").write_bytes((tmp_path / "b.ckpt").read_bytes()[:100])
    with pytest.raises(
        DamagedCheckpoint,
        match=f"{tmp_path / 'b.ckpt'} is damaged and cannot be read .*"
        f"the newest checkpoint beside it that loads is {tmp_path / 'a.ckpt'}",
    ):
        io_.load_checkpoint(tmp_path / "b.ckpt")


# ----------------------------------------------------------------------------- configs that cannot train


def test_a_batch_larger_than_the_training_split_is_refused_with_the_numbers(demo_root, tmp_path, capsys):
    status = train.command_line(["fit", *tiny(demo_root, tmp_path, "--data.batch_size=64")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1] == (
        "train.py: error: the training split has 24 images, fewer than one batch of batch_size=64, so an epoch "
        "would have 0 steps; use a smaller --data.batch_size or a larger --data.train_size"
    )
    assert not list(tmp_path.rglob("*.ckpt"))


# ----------------------------------------------------------------------------- the archive's checksum


def test_the_official_archive_hash_is_pinned_and_checked_for_a_local_archive(tmp_path, caplog):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "JPEG")
    root = tmp_path / "data"
    root.mkdir()
    archive = zip_of(
        root / MICROSOFT_ZIP, {"PetImages/Cat/1.jpg": buffer.getvalue(), "PetImages/Dog/1.jpg": buffer.getvalue()}
    )
    assert MICROSOFT_SHA256 == "b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9"
    with pytest.raises(
        BadOption, match=f"expected SHA-256 {MICROSOFT_SHA256} \\(the official archive's; .*--data.archive_sha256 any"
    ):
        download_microsoft(root, url="http://127.0.0.1:9/unused.zip")  # no hash given: the official one
    assert sorted(p.name for p in root.iterdir()) == [MICROSOFT_ZIP]  # nothing extracted
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with caplog.at_level(logging.WARNING, logger="towers.data"):
        download_microsoft(root, url="http://127.0.0.1:9/unused.zip", sha256="any")  # an explicit opt-out
    assert (root / "PetImages" / "Cat" / "1.jpg").is_file() and digest in caplog.text


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "option, message",
    [
        ("--model.num_towers=0", "num_towers must be at least 1, got 0"),
        ("--model.lr=-0.01", "model.lr=-0.01 is negative"),
        ("--data.image_size=80", "image_size=80 is larger than resize_size=76"),
        ("--data.train_size=1000", "usable images, but the splits ask for test 4 + training pool 1000"),
        (
            "--data.source=kaggle --data.root=/nonexistent/towers-data",
            "Dataset folder /nonexistent/towers-data does not exist",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(demo_root, tmp_path, capsys, monkeypatch, option, message):
    args = ["fit", *tiny(demo_root, tmp_path, "--trainer.logger=false"), *option.split()]
    assert train.command_line(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "train.py: error: " in err and message in err.split("train.py: error: ")[-1]
    monkeypatch.setenv("TOWERS_DEBUG", "1")
    with pytest.raises(ValueError if "nonexistent" not in option else FileNotFoundError):
        train.command_line(args)


def test_a_read_only_cache_folder_is_a_user_error(demo_root, tmp_path, capsys, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # what a read-only file system answers (root ignores chmod)
        if "cache" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    args = ["fit", *tiny(demo_root, tmp_path, "--trainer.logger=false", f"--data.cache_dir={tmp_path / 'cache'}")]
    assert train.command_line(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"train.py: error: cannot write to the cache folder {tmp_path / 'cache'} (Permission denied); "
        f"give --data.cache_dir a folder you may write to"
    )


def test_train_py_user_error_in_a_real_process_has_no_traceback(demo_root, tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    bad = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", *tiny(demo_root, tmp_path, "--model.num_towers=0")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == "train.py: error: num_towers must be at least 1, got 0"
    # jsonargparse's own errors keep their exit status 2
    typo = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--data.batch_size=many"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert typo.returncode == 2 and "Traceback" not in typo.stderr and "data.batch_size" in typo.stderr
