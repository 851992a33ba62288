"""CatsDogsDataModule on generated files only: layouts, bad files, splits, augmentation, fast path, downloads."""

import hashlib
import io
import logging
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from towers.data import CatsDogsDataModule, ImageFiles, download_microsoft, find_images, load_image, safe_extract
from towers.data.demo import make_demo_dataset
from towers.data.shard_reader import open_store
from towers.module import TowerClassifier

SMALL = dict(resize_size=32, image_size=27, num_workers=0, batch_size=8)


def jpeg(path: Path, seed: int, size=(40, 30), mode="RGB", fmt="JPEG") -> Path:
    """A small noisy image; class-dependent only through its seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, fmt)
    return path


def kaggle_tree(root: Path, per_class: int) -> Path:
    for i in range(per_class):
        jpeg(root / "train" / f"cat.{i}.jpg", 2 * i)
        jpeg(root / "train" / f"dog.{i}.jpg", 2 * i + 1)
    return root


def module(root: Path, **kwargs) -> CatsDogsDataModule:
    settings = dict(SMALL, test_size=0.2, val_size=0.2, train_size="rest", cache_dir=str(root / "cache"))
    dm = CatsDogsDataModule(root=str(root), **{**settings, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------------- layouts


def test_each_layout_is_detected_with_cat_0_dog_1(tmp_path):
    jpeg(tmp_path / "ms" / "PetImages" / "Cat" / "1.jpg", 0)
    jpeg(tmp_path / "ms" / "PetImages" / "Dog" / "1.jpg", 1)
    jpeg(tmp_path / "ms" / "PetImages" / "Dog" / "2.jpg", 2)
    kaggle_tree(tmp_path / "kaggle", 2)
    jpeg(tmp_path / "kaggle" / "test1" / "1.jpg", 9)  # unlabelled competition test set: ignored
    jpeg(tmp_path / "flat" / "dog.3.jpg", 0)
    jpeg(tmp_path / "flat" / "cat.4.jpg", 1)
    jpeg(tmp_path / "folders" / "Dogs" / "a.jpg", 0)
    jpeg(tmp_path / "folders" / "Cats" / "b.jpg", 1)
    jpeg(tmp_path / "three" / "zebra" / "a.jpg", 0)
    jpeg(tmp_path / "three" / "ant" / "b.jpg", 1)
    jpeg(tmp_path / "three" / "bee" / "c.jpg", 2)
    pet = tmp_path / "oxford" / "oxford-iiit-pet"
    jpeg(pet / "images" / "Abyssinian_1.jpg", 0)
    jpeg(pet / "images" / "beagle_7.jpg", 1)
    (pet / "annotations").mkdir()
    (pet / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\n")
    (pet / "annotations" / "test.txt").write_text("beagle_7 13 2 5\n")

    assert find_images(tmp_path / "ms")[0::2] == ("microsoft", [("Cat/1.jpg", 0), ("Dog/1.jpg", 1), ("Dog/2.jpg", 1)])
    layout, base, files, _ = find_images(tmp_path / "kaggle")
    assert (layout, base.name) == ("kaggle", "train")
    assert files == [("cat.0.jpg", 0), ("cat.1.jpg", 0), ("dog.0.jpg", 1), ("dog.1.jpg", 1)]
    assert find_images(tmp_path / "flat")[0::2] == ("kaggle", [("cat.4.jpg", 0), ("dog.3.jpg", 1)])
    assert find_images(tmp_path / "folders")[0::2] == ("folders", [("Cats/b.jpg", 0), ("Dogs/a.jpg", 1)])
    layout, _, files, classes = find_images(tmp_path / "three")
    assert (layout, classes, sorted(label for _, label in files)) == ("folders", ["ant", "bee", "zebra"], [0, 1, 2])
    assert find_images(tmp_path / "oxford")[0::2] == (
        "oxford_pet",
        [("images/Abyssinian_1.jpg", 0), ("images/beagle_7.jpg", 1)],
    )


def test_unknown_or_empty_layout_says_what_was_found_and_expected(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("hello")
    jpeg(tmp_path / "odd" / "onlyclass" / "a.jpg", 0)
    with pytest.raises(FileNotFoundError) as error:
        find_images(tmp_path / "odd")
    for text in ("notes.txt", "onlyclass/", "PetImages/Cat", "train/cat.0.jpg", "oxford-iiit-pet", "<class>"):
        assert text in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty folder"):
        find_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "missing")
    (tmp_path / "kaggle_empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="in the 'kaggle' layout"):
        find_images(tmp_path / "kaggle_empty", "kaggle")


# ----------------------------------------------------------------------------- bad files


def bad_file_zoo(root: Path) -> dict[str, str]:
    """Twelve good images and the zoo; returns {file name: what the report must say}."""
    kaggle_tree(root, 6)
    train = root / "train"
    (train / "cat.100.jpg").write_bytes(b"")
    good = (train / "cat.0.jpg").read_bytes()
    (train / "cat.101.jpg").write_bytes(good[: len(good) // 2])
    (train / "dog.102.jpg").write_text("this is not an image")
    jpeg(train / "dog.103.jpg", 103, fmt="PNG")
    jpeg(train / "cat.104.jpg", 104, mode="CMYK")
    jpeg(train / "cat.105.jpg", 105, mode="L")
    jpeg(train / "dog.106.png", 106, mode="P", fmt="PNG")
    jpeg(train / "dog.107.png", 107, mode="RGBA", fmt="PNG")
    jpeg(train / "dog.108.jpg", 108, size=(64, 64))  # above the (lowered) decompression-bomb limit
    return {
        "cat.100.jpg": "skipped\tempty file",
        "cat.101.jpg": "skipped\tcannot be decoded",
        "dog.102.jpg": "skipped\tnot an image",
        "dog.108.jpg": "skipped\tlarger than Pillow's decompression-bomb",
        "dog.103.jpg": "kept\tPNG content with a .jpg extension",
        "cat.104.jpg": "kept\tCMYK converted to RGB",
        "cat.105.jpg": "kept\tL converted to RGB",
        "dog.106.png": "kept\tP converted to RGB",
        "dog.107.png": "kept\tRGBA converted to RGB (alpha dropped)",
    }


@pytest.mark.parametrize("fast_path", [True, False])
def test_bad_file_zoo_is_reported_once_and_skipped(tmp_path, monkeypatch, caplog, fast_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)  # 64x64 is a "bomb", the 40x30 images are not
    expected = bad_file_zoo(tmp_path)
    with caplog.at_level(logging.WARNING, logger="towers.data"):
        dm = module(tmp_path, fast_path=fast_path)
    report = dm.bad_files_report.read_text().splitlines()
    assert report[0] == "file\taction\treason" and len(report) == 1 + len(expected)
    for name, text in expected.items():
        assert sum(name in line and text in line for line in report) == 1, (name, report)
    assert "4 of 21 files skipped" in caplog.text and str(dm.bad_files_report) in caplog.text
    used = {f for f, _ in dm.train_files + dm.val_files + dm.test_files}
    assert used == {f for f, _ in dm.usable} and len(used) == 12 + 5
    assert not used & {"cat.100.jpg", "cat.101.jpg", "dog.102.jpg", "dog.108.jpg"}
    # the convertible ones come out as RGB uint8 (3, R, R), on either path
    data = dm.dataset(dm.usable)
    for i, (_file, _) in enumerate(dm.usable):
        image, label, index = data[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and index == i
    cmyk = load_image(tmp_path / "train" / "cat.104.jpg", 32)[0]
    assert cmyk.shape == (3, 32, 32) and cmyk.std() > 10


def test_checks_are_cached_and_a_changed_file_is_rechecked(tmp_path, monkeypatch):
    kaggle_tree(tmp_path, 5)
    module(tmp_path, fast_path=False)
    # Nothing changed: no file is opened again.
    monkeypatch.setattr("towers.data.store._check", lambda path: pytest.fail(f"{path} checked twice"))
    assert len(module(tmp_path, fast_path=False).usable) == 10
    monkeypatch.undo()
    (tmp_path / "train" / "dog.3.jpg").write_bytes(b"GIF89a broken")  # changed size and mtime
    dm = module(tmp_path, fast_path=False)
    assert len(dm.usable) == 9 and "dog.3.jpg\tskipped" in dm.bad_files_report.read_text()


def test_a_file_broken_after_the_check_does_not_crash_the_epoch(tmp_path, caplog):
    kaggle_tree(tmp_path, 3)
    files = [f for f, _ in find_images(tmp_path)[2]]
    data = ImageFiles(tmp_path / "train", files, [0, 0, 0, 1, 1, 1], 32)
    (tmp_path / "train" / files[1]).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="towers.data"):
        items = [data[i] for i in range(len(data))]
    assert torch.equal(items[1][0], items[2][0]) and items[1][1] == items[2][1]  # the next image, its own label
    assert files[1] in caplog.text


# ----------------------------------------------------------------------------- splits


def test_splits_are_disjoint_deterministic_and_independent_of_the_training_seed(tmp_path):
    kaggle_tree(tmp_path, 30)
    a = module(tmp_path, test_size=10, val_size=5, train_size="rest", split_seed=1, seed=0)
    sets = [set(a.train_files), set(a.val_files), set(a.test_files)]
    assert [len(s) for s in sets] == [45, 5, 10]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    b = module(tmp_path, test_size=10, val_size=5, train_size="rest", split_seed=1, seed=123)
    assert (a.train_files, a.val_files, a.test_files) == (b.train_files, b.val_files, b.test_files)
    c = module(tmp_path, test_size=10, val_size=5, train_size="rest", split_seed=2, seed=0)
    assert set(c.test_files) != sets[2]
    d = module(tmp_path, test_size=0.1, val_size=0.25, train_size=30, split_seed=1)
    assert (len(d.test_files), len(d.val_files), len(d.train_files)) == (6, 15, 15)
    with pytest.raises(ValueError, match="has 60 usable images.*test 10 \\+ training pool 55"):
        module(tmp_path, test_size=10, val_size=5, train_size=55)
    with pytest.raises(ValueError, match="has 60 usable images"):  # the paper-scale defaults on a tiny set
        module(tmp_path, test_size=1000, val_size=1000, train_size=24000)


# ----------------------------------------------------------------------------- augmentation


def coordinate_module(resize_size=32, image_size=27, **kwargs) -> CatsDogsDataModule:
    """A module whose statistics are set by hand, for testing the batch transform alone."""
    dm = CatsDogsDataModule(resize_size=resize_size, image_size=image_size, num_workers=0, seed=7, **kwargs)
    dm.mean_image = torch.zeros(3, resize_size, resize_size)
    dm.channel_mean = torch.zeros(3)
    dm.rgb_eigenvalues, dm.rgb_eigenvectors = torch.ones(3), torch.eye(3)
    return dm


def coordinate_images(n: int, size: int) -> torch.Tensor:
    """Channel 0 holds the row, channel 1 the column, channel 2 the image index."""
    grid = torch.arange(size)
    images = torch.stack(
        [grid[:, None].expand(size, size), grid[None, :].expand(size, size), torch.zeros(size, size, dtype=torch.long)]
    )
    images = images.repeat(n, 1, 1, 1)
    images[:, 2] = torch.arange(n)[:, None, None]
    return images.to(torch.uint8)


def test_random_crops_stay_inside_and_flips_mirror_columns():
    dm = coordinate_module(mean="none", pca_noise_std=0.0)
    n, size, room = 200, 27, 32 - 27
    draws = dm.draw_augmentation(torch.arange(n), epoch=0)
    x = dm.transform(coordinate_images(n, 32), draws)
    assert x.shape == (n, 3, size, size)
    steps = torch.arange(size).float()
    assert torch.equal(x[:, 0, :, 0], draws["top"][:, None] + steps)  # rows: top .. top + 26
    cols = torch.where(draws["flip"][:, None], size - 1 - steps, steps) + draws["left"][:, None]
    assert torch.equal(x[:, 1, 0, :], cols)  # columns, reversed when flipped
    assert torch.equal(x[:, 2, 0, 0], torch.arange(n).float())  # each crop from its own image
    assert x[:, :2].min() >= 0 and x[:, :2].max() <= 31
    assert set(draws["top"].tolist()) == set(range(room + 1)) == set(draws["left"].tolist())
    assert 0.35 < draws["flip"].float().mean() < 0.65
    # a pure function of (seed, epoch, images of the batch), not of the global RNG
    torch.manual_seed(123)
    again = dm.draw_augmentation(torch.arange(n), epoch=0)
    assert all(torch.equal(draws[k], again[k]) for k in draws)
    assert not torch.equal(draws["top"], dm.draw_augmentation(torch.arange(n), epoch=1)["top"])
    # switches: no random crop gives the centre, no flip gives none; the other draws stay the same
    fixed = coordinate_module(mean="none", random_crop=False, random_flip=False).draw_augmentation(torch.arange(n), 0)
    assert (fixed["top"] == room // 2).all() and not fixed["flip"].any()
    assert torch.equal(fixed["alpha"], coordinate_module().draw_augmentation(torch.arange(n), 0)["alpha"])


def test_evaluation_centre_crop_and_ten_patches():
    dm = coordinate_module(mean="none")
    images = coordinate_images(3, 32)
    centre = dm.transform(images)
    assert centre.shape == (3, 3, 27, 27) and centre[0, 0, 0, 0] == 2 and centre[0, 1, 0, 0] == 2
    ten = dm.transform(images, ten_patch=True)
    assert ten.shape == (3, 10, 3, 27, 27)
    corners = [(ten[0, p, 0, 0, 0].item(), ten[0, p, 1, 0, 0].item()) for p in range(10)]
    assert corners == [(0, 0), (0, 5), (5, 0), (5, 5), (2, 2), (0, 26), (0, 31), (5, 26), (5, 31), (2, 28)]
    assert torch.equal(ten[:, 4], centre) and torch.equal(ten[:, 9], centre.flip(-1))


def test_pca_noise_has_the_stored_covariance_structure():
    covariance = torch.tensor([[900.0, 700.0, 500.0], [700.0, 800.0, 600.0], [500.0, 600.0, 850.0]])
    values, vectors = torch.linalg.eigh(covariance)
    dm = coordinate_module(resize_size=8, image_size=5, random_crop=True, pca_noise_std=0.1)
    dm.rgb_eigenvalues, dm.rgb_eigenvectors = values.flip(0), vectors.flip(1)
    n = 20000
    images = torch.full((n, 3, 8, 8), 128, dtype=torch.uint8)
    x = dm.transform(images, dm.draw_augmentation(torch.arange(n), epoch=3))
    noise = x[:, :, 0, 0] - 128
    assert torch.allclose(x, noise[:, :, None, None] + 128)  # one colour shift per image, every pixel alike
    empirical = torch.cov(noise.T.double())
    expected = 0.1**2 * covariance.double()
    assert torch.linalg.norm(empirical - expected) / torch.linalg.norm(expected) < 0.05
    assert dm.transform(images).eq(128).all()  # no noise at evaluation


def test_training_statistics_are_those_of_the_training_pixels(tmp_path):
    kaggle_tree(tmp_path, 10)
    dm = module(tmp_path, divide_std=True)
    pixels = np.stack([load_image(dm.base / f, 32)[0] for f, _ in dm.train_files]).astype(np.float64)
    assert np.allclose(dm.mean_image.numpy(), pixels.mean(0), atol=1e-3)
    flat = pixels.transpose(1, 0, 2, 3).reshape(3, -1)
    covariance = torch.tensor(np.cov(flat, bias=True))
    assert torch.allclose(dm.rgb_covariance.double(), covariance, rtol=1e-4)
    rebuilt = dm.rgb_eigenvectors @ torch.diag(dm.rgb_eigenvalues) @ dm.rgb_eigenvectors.T
    assert torch.allclose(rebuilt.double(), covariance, rtol=1e-3)
    assert (dm.rgb_eigenvalues[:-1] >= dm.rgb_eigenvalues[1:]).all()
    assert torch.allclose(dm.input_channel_std.double(), torch.tensor(flat.std(1)), rtol=1e-4)
    # per-channel mean option; std division applied
    channel = module(tmp_path, mean="channel", divide_std=True)
    x = channel.transform(torch.from_numpy(pixels[:4].astype(np.uint8)))
    centre = torch.from_numpy(pixels[:4, :, 2:29, 2:29]).float()
    expected = (centre - channel.channel_mean[:, None, None]) / channel.input_channel_std[:, None, None]
    assert torch.allclose(x, expected, atol=1e-4)
    assert module(tmp_path).input_channel_std is None


def test_fast_path_gives_the_plain_path_pixels(tmp_path):
    kaggle_tree(tmp_path, 8)
    jpeg(tmp_path / "train" / "cat.50.jpg", 50, size=(90, 37), mode="L")  # odd shape, greyscale
    fast = module(tmp_path, fast_path=True, cache_dir=str(tmp_path / "fast"))
    plain = module(tmp_path, fast_path=False, cache_dir=str(tmp_path / "plain"))
    assert fast.train_files == plain.train_files and (tmp_path / "fast" / fast.store_path.name).is_file()
    a, b = fast.dataset(fast.train_files), plain.dataset(plain.train_files)
    batch_a = torch.stack([a[i][0] for i in range(len(a))])
    batch_b = torch.stack([b[i][0] for i in range(len(b))])
    assert torch.equal(batch_a, batch_b)
    draws = fast.draw_augmentation(torch.arange(len(a)), epoch=2)
    assert torch.equal(fast.transform(batch_a, draws), plain.transform(batch_b, draws))
    # the store is reused while the files are unchanged, rebuilt when one changes
    stamp = fast.store_path.stat().st_mtime_ns
    assert module(tmp_path, cache_dir=str(tmp_path / "fast")).store_path.stat().st_mtime_ns == stamp
    jpeg(tmp_path / "train" / "dog.0.jpg", 999)
    rebuilt = module(tmp_path, cache_dir=str(tmp_path / "fast"))
    assert rebuilt.store_path != fast.store_path and not fast.store_path.exists()
    row = rebuilt.store_rows["dog.0.jpg"]
    assert np.array_equal(open_store(rebuilt.store_path)[row], load_image(tmp_path / "train" / "dog.0.jpg", 32)[0])


def test_training_order_and_draws_do_not_depend_on_global_rng(tmp_path):
    """What a run resumed at an epoch boundary needs: epoch e's batches from (seed, e) alone."""
    kaggle_tree(tmp_path, 10)

    def first_batch(global_seed):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        dm = module(tmp_path, seed=5)
        dm.trainer = SimpleNamespace(
            training=True, testing=False, predicting=False, current_epoch=3, world_size=1, global_rank=0
        )
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        batch = dm.on_before_batch_transfer(next(iter(loader)), 0)
        return batch[2]["top"], dm.on_after_batch_transfer(batch, 0)

    (top_a, (x_a, y_a)), (top_b, (x_b, y_b)) = first_batch(0), first_batch(99)
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b) and torch.equal(top_a, top_b)


# ----------------------------------------------------------------------------- downloads


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extraction_refuses_a_member_escaping_the_target(tmp_path):
    archive = zip_of(tmp_path / "evil.zip", {"ok.txt": b"fine", "../evil.txt": b"gotcha"})
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ValueError, match=r"'\.\./evil\.txt' would be written outside"):
        safe_extract(archive, target)
    assert not (tmp_path / "evil.txt").exists() and list(target.iterdir()) == []


def test_microsoft_download_checks_the_checksum_and_leaves_nothing_on_failure(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "JPEG")
    archive = zip_of(
        tmp_path / "kagglecatsanddogs_5340.zip",
        {"PetImages/Cat/1.jpg": buffer.getvalue(), "PetImages/Dog/1.jpg": buffer.getvalue()},
    )
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="Checksum mismatch"):
        download_microsoft(root, url=archive.as_uri(), sha256="0" * 64)
    assert list(root.iterdir()) == []
    with pytest.raises(RuntimeError, match=f"put it at {root / 'kagglecatsanddogs_5340.zip'}.*PetImages/Cat"):
        download_microsoft(root, url="http://127.0.0.1:9/kagglecatsanddogs_5340.zip")  # nothing listens there
    assert list(root.iterdir()) == []
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    download_microsoft(root, url=archive.as_uri(), sha256=digest)
    assert sorted(p.name for p in root.iterdir()) == ["PetImages"]
    assert find_images(root)[0::2] == ("microsoft", [("Cat/1.jpg", 0), ("Dog/1.jpg", 1)])
    # an archive already beside the data is checked the same way before it is unpacked
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(archive, local / "kagglecatsanddogs_5340.zip")
    with pytest.raises(ValueError, match="Checksum mismatch"):
        download_microsoft(local, url="http://127.0.0.1:9/unused.zip", sha256="0" * 64)
    assert sorted(p.name for p in local.iterdir()) == ["kagglecatsanddogs_5340.zip"]


# ----------------------------------------------------------------------------- demo and training


def test_demo_generator_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        make_demo_dataset(tmp_path / name, images_per_class=3, seed=seed)
    files = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert files == ["cat.0.jpg", "cat.1.jpg", "cat.2.jpg", "dog.0.jpg", "dog.1.jpg", "dog.2.jpg"]
    read = lambda name: [(tmp_path / name / "train" / f).read_bytes() for f in files]
    assert read("a") == read("b") and read("a") != read("c")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_the_data_module_feeds_tower_classifier(tmp_path):
    L.seed_everything(0)
    root = tmp_path / "demo"
    dm = CatsDogsDataModule(
        root=str(root),
        source="demo",
        demo_images_per_class=12,
        test_size=8,
        val_size=8,
        train_size="rest",
        resize_size=76,
        image_size=67,
        batch_size=4,
        num_workers=0,
        ten_patch_test=True,
    )
    model = TowerClassifier(width_multiplier=0.125, image_size=dm.image_size)
    before = model.model.features.conv1.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        limit_test_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert (root / "train" / "cat.0.jpg").is_file()  # prepare_data generated the demo set
    assert torch.isfinite(trainer.callback_metrics["train/loss_step"])
    assert not torch.equal(before, model.model.features.conv1.weight)
    results = trainer.test(model, dm, verbose=False)  # ten-patch batches, averaged by the module
    assert 0.0 <= results[0]["test/acc"] <= 1.0


def one_quiet_step(root) -> list:
    """train.py options for one training step and one validation batch, no logger, checkpoints or bar."""
    return [
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]


def test_the_cli_links_the_crop_size_to_the_model(tmp_path, monkeypatch):
    from train import main

    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = main(
        [
            "fit",
            "--data.root",
            str(tmp_path / "demo"),
            "--data.source",
            "demo",
            "--data.demo_images_per_class",
            "8",
            "--data.test_size",
            "4",
            "--data.val_size",
            "4",
            "--data.train_size",
            "rest",
            "--data.resize_size",
            "76",
            "--data.image_size",
            "67",
            "--data.batch_size",
            "4",
            "--data.num_workers",
            "0",
            "--model.width_multiplier",
            "0.125",
            *one_quiet_step(tmp_path),
        ]
    )
    assert cli.model.hparams.image_size == 67 == cli.datamodule.image_size


def test_the_data_states_its_classes_and_the_cli_gives_the_count_to_the_model(tmp_path, monkeypatch):
    from train import main

    for c, name in enumerate(("ant", "bee", "zebra")):
        for i in range(6):
            jpeg(tmp_path / "three" / name / f"{i}.jpg", 10 * c + i)
    settings = dict(
        SMALL,
        resize_size=76,
        image_size=67,
        root=str(tmp_path / "three"),
        source="folders",
        test_size=3,
        val_size=3,
        train_size="rest",
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    dm = CatsDogsDataModule(**settings)  # num_classes 2 by default: cat and dog
    dm.prepare_data()
    with pytest.raises(
        ValueError, match=r"3 classes \['ant', 'bee', 'zebra'\] but num_classes=2; set --data.num_classes 3"
    ):
        dm.setup("fit")
    monkeypatch.setattr("sys.argv", ["train.py"])
    cli = main(
        [
            "fit",
            *(f"--data.{k}={v}" for k, v in settings.items()),
            "--data.num_classes",
            "3",
            "--model.width_multiplier",
            "0.125",
            *one_quiet_step(tmp_path),
        ]
    )
    assert cli.model.hparams.num_classes == 3 == cli.datamodule.num_classes
    assert cli.model.model.classifier.fc8.out_features == 3


def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_run(tmp_path):
    """Through Lightning itself: set_epoch on the sampler, the epoch in the draws, checkpoint resume."""
    kaggle_tree(tmp_path / "data", 12)

    class Record(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.current_epoch, batch[0].sum().item(), batch[1].tolist()))

    def fit(max_epochs, ckpt_path=None, global_seed=0):
        torch.manual_seed(global_seed)  # the data must not depend on it
        record = Record()
        dm = CatsDogsDataModule(
            root=str(tmp_path / "data"),
            **dict(SMALL, resize_size=76, image_size=67),
            seed=3,
            test_size=4,
            val_size=4,
            train_size="rest",
        )
        trainer = L.Trainer(
            max_epochs=max_epochs,
            limit_val_batches=0,
            logger=False,
            callbacks=[record],
            default_root_dir=tmp_path,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = TowerClassifier(width_multiplier=0.125, image_size=67, lr_schedule="constant")
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return record.seen, trainer

    whole, _ = fit(2)
    first, trainer = fit(1, global_seed=1)
    resumed, _ = fit(2, ckpt_path=trainer.checkpoint_callback.best_model_path, global_seed=2)
    assert len(whole) == 4 and {e for e, _, _ in whole} == {0, 1}
    assert first + resumed == whole
    assert whole[:2] != whole[2:]  # a new order and new crops each epoch
