"""ILSVRC-2012 as distributed and as extracted, on a generated mini-ILSVRC (tests/fixtures/ilsvrc.py):
the same classes, labels and splits from every layout; the archives' MD5 check; subsets."""

import pytest
import torch

from tests.fixtures.ilsvrc import extract, make_archives, wnids
from towers.data import ImageDataModule

SMALL = dict(resize_size=32, image_size=27, num_workers=0, batch_size=8, train_size="rest", val_size=10)


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    return make_archives(tmp_path_factory.mktemp("ilsvrc") / "archives", num_classes=10, train_per_class=6)


def module(root, **kwargs) -> ImageDataModule:
    dm = ImageDataModule(root=str(root), source="imagenet", **{**SMALL, "num_classes": 10, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def by_name(files):
    return sorted((f.rsplit("/", 1)[-1], label) for f, label in files)


def test_archives_and_extracted_layouts_give_the_same_classes_labels_and_splits(archives, tmp_path):
    import shutil

    unpacked = tmp_path / "unpacked"
    shutil.copytree(archives, unpacked)
    with pytest.raises(ValueError, match="MD5 is not the official archive's; --data.archive_sha256 any"):
        module(unpacked)  # generated archives cannot match the official MD5s
    assert not (unpacked / "train").exists() and not [p for p in unpacked.iterdir() if p.name.startswith(".")]
    layouts = {
        "archives": module(unpacked, archive_sha256="any"),  # torchvision's parsers, MD5 check off
        "flat val + devkit folder": module(extract(archives, tmp_path / "flat")),
        "flat val + devkit archive": module(extract(archives, tmp_path / "flat2", devkit="archive")),
        "val in synset folders": module(extract(archives, tmp_path / "synsets", val="synsets")),
    }
    reference = layouts["archives"]
    assert reference.layout == "imagenet" and reference.classes == wnids(10)
    assert (len(reference.train_files), len(reference.val_files), len(reference.test_files)) == (50, 10, 40)
    assert all(f.startswith("val/") for f, _ in reference.test_files)  # the official validation set is the test set
    assert not {f for f, _ in reference.val_files} & {f for f, _ in reference.test_files}
    # the devkit's words name the classes (in the archives' and the extracted devkit's layouts)
    assert reference.class_descriptions[3] == f"thing 3, {wnids(10)[3]} object"
    # every training image's label is its synset folder's place in the sorted WordNet ids
    assert all(f.split("/")[1] == reference.classes[label] for f, label in reference.train_files)
    # every validation image's label is the devkit's ground truth (the generator's colour for it)
    for name, dm in layouts.items():
        assert dm.classes == reference.classes, name
        for split in ("train_files", "val_files", "test_files"):
            assert by_name(getattr(dm, split)) == by_name(getattr(reference, split)), (name, split)
    # a split by image from split_seed: another seed carves other validation images
    other = module(tmp_path / "flat", split_seed=1)
    assert by_name(other.test_files) == by_name(reference.test_files)
    assert by_name(other.val_files) != by_name(reference.val_files)


def test_subsets_of_classes_and_images_are_the_same_in_every_layout(archives, tmp_path):
    flat, synsets = extract(archives, tmp_path / "flat"), extract(archives, tmp_path / "syn", val="synsets")
    a = module(flat, classes=4, images_per_class=3, num_classes=4, val_size=2)
    b = module(synsets, classes=4, images_per_class=3, num_classes=4, val_size=2)
    assert a.classes == b.classes and len(a.classes) == 4 and set(a.classes) <= set(wnids(10))
    assert (len(a.train_files) + len(a.val_files), len(a.test_files)) == (12, 16)  # all 4 official images a class
    for split in ("train_files", "val_files", "test_files"):
        assert by_name(getattr(a, split)) == by_name(getattr(b, split))
    assert sorted({label for _, label in a.test_files}) == [0, 1, 2, 3]
    assert a.state_dict()["classes"] == a.classes  # recorded in every checkpoint
    listed = tmp_path / "classes.txt"
    listed.write_text(f"# ImageNet-2 style\n{wnids(10)[7]}\n{wnids(10)[2]}\n")
    c = module(flat, classes=str(listed), num_classes=2, val_size=2)
    assert c.classes == [wnids(10)[2], wnids(10)[7]] and len(c.test_files) == 8
    listed.write_text("n99999999\n")
    with pytest.raises(ValueError, match="1 of its 1 class ids are not in the data \\(n99999999\\)"):
        module(flat, classes=str(listed), num_classes=2)


def test_a_flat_validation_folder_without_its_labels_is_refused(archives, tmp_path):
    root = extract(archives, tmp_path / "flat")
    import shutil

    shutil.rmtree(root / "ILSVRC2012_devkit_t12")
    with pytest.raises(FileNotFoundError, match="40 images in no synset folders, and no devkit gives their labels"):
        module(root)


def test_the_store_format_reaches_the_store(archives, tmp_path):
    root = extract(archives, tmp_path / "flat")
    raw = module(root, cache_dir=str(tmp_path / "raw"))
    jpeg = module(root, store_format="jpeg", cache_dir=str(tmp_path / "jpeg"))
    assert "jpeg" in jpeg.store_path.name and "raw" in raw.store_path.name
    assert by_name(jpeg.train_files) == by_name(raw.train_files)
    a, b = raw.dataset(raw.train_files[:8]), jpeg.dataset(jpeg.train_files[:8])
    difference = [(a[i][0].float() - b[i][0].float()).abs().mean().item() for i in range(8)]
    assert 0 < max(difference) < 8  # re-encoded: close to the raw pixels, not equal


def test_a_jpeg_store_decoded_on_the_device_gives_the_workers_pixels(archives, tmp_path):
    """decode_on_device: the loader yields JPEG bytes and on_before_batch_transfer decodes the batch in one
    call (nvJPEG on a GPU; here the CPU): the same uint8 pixels as the loader workers' decode."""
    root = extract(archives, tmp_path / "flat")
    workers = module(root, store_format="jpeg", cache_dir=str(tmp_path / "c"))
    device = module(root, store_format="jpeg", cache_dir=str(tmp_path / "c"), decode_on_device=True)
    files = workers.train_files[:6]
    a = next(iter(workers._loader(files, 6)))
    b = next(iter(device._loader(files, 6)))
    assert isinstance(b[0], list) and b[0][0].dim() == 1  # bytes, not pixels, leave the loader
    images, labels, draws = device.on_before_batch_transfer(b, 0)
    assert images.dtype == torch.uint8 and torch.equal(images, a[0]) and torch.equal(labels, a[1])
    assert draws is None  # no trainer: not training
