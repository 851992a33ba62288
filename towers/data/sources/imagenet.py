"""ILSVRC-2012 (the paper's ImageNet) as distributed and as commonly extracted.

As distributed, in ROOT: ``ILSVRC2012_img_train.tar`` (one tar per synset), ``ILSVRC2012_img_val.tar``
(50,000 flat JPEGs) and ``ILSVRC2012_devkit_t12.tar.gz`` (``data/meta.mat`` and the validation ground
truth). :func:`unpack` (run by ``prepare_data``) turns them into the extracted layout with torchvision's
parsers, which check each archive's MD5 (switchable: generated archives cannot match it), in a
temporary folder moved into place whole.

As extracted: ``ROOT/train/nXXXXXXXX/*.JPEG``, and ``ROOT/val`` either in synset folders or flat
(``ILSVRC2012_val_00000001.JPEG``, ...) labelled by the devkit (``ROOT/meta.bin`` as torchvision writes
it, an unpacked ``ROOT/ILSVRC2012_devkit_t12/`` or the ``.tar.gz``).

Labels are the sorted WordNet ids of the training folders (torchvision's and Caffe's numbering); the
class ids are the WordNet ids, their descriptions the devkit's words. The validation set is the
official test split (the paper's test set, Table 1).
"""

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from towers.data.sources import FORMAT_OF_SUFFIX, Found, class_folder_files, visible
from towers.errors import BadOption, MissingData

log = logging.getLogger(__name__)

WNID = re.compile(r"^n\d{8}$")
TRAIN_ARCHIVE, VAL_ARCHIVE = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE, DEVKIT_FOLDER = "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_devkit_t12"
TEST_PREFIX = "val/"


def find(root: Path, unused: list) -> Found | None:
    """The extracted layout under ``root``; None when ``root/train`` holds no synset folders."""
    train = root / "train"
    wnids = sorted(p.name for p in train.iterdir() if p.is_dir() and WNID.match(p.name)) if train.is_dir() else []
    if not wnids:
        return None
    label = {wnid: i for i, wnid in enumerate(wnids)}
    files = [(str(p.relative_to(root)), label[w]) for w in wnids for p in class_folder_files(train / w, unused)]
    words, val_wnids = devkit(root)
    test = _validation(root, label, val_wnids, unused)
    descriptions = [", ".join(words[w]) if w in words else "" for w in wnids] if words else []
    return Found("imagenet", root, sorted(files + test), wnids, descriptions, TEST_PREFIX if test else None)


def _validation(root: Path, label: dict, val_wnids: list[str] | None, unused: list) -> list[tuple[str, int]]:
    val = root / "val"
    if not val.is_dir():
        log.warning("%s has no val/ folder: no official test split, the test images are drawn from training", root)
        return []
    folders = sorted(p for p in val.iterdir() if p.is_dir() and WNID.match(p.name))
    if folders:
        for folder in folders:
            if folder.name not in label:
                unused.append((folder, "a validation synset with no training folder"))
        return [
            (str(p.relative_to(root)), label[f.name]) for f in folders if f.name in label for p in class_folder_files(f)
        ]
    flat = sorted(p for p in val.iterdir() if (p.is_file() or p.is_symlink()) and visible(p))
    images = [p for p in flat if p.suffix.lower() in FORMAT_OF_SUFFIX]
    unused += [(p, "not an image file in the flat validation folder") for p in flat if p not in images]
    if not images:
        return []
    if val_wnids is None:
        raise MissingData(
            f"{val} holds {len(images)} images in no synset folders, and no devkit gives their labels: put "
            f"{DEVKIT_ARCHIVE} (or its unpacked {DEVKIT_FOLDER}/ folder) in {root}"
        )
    if len(images) != len(val_wnids):
        raise MissingData(
            f"{val} holds {len(images)} images but the devkit's validation ground truth has {len(val_wnids)} "
            f"labels; the flat folder must hold the whole official validation set (ILSVRC2012_val_*.JPEG)"
        )
    test = []
    for path, wnid in zip(images, val_wnids):  # the ground truth's line i labels the i-th image by name
        if wnid in label:
            test.append((str(path.relative_to(root)), label[wnid]))
        else:
            unused.append((path, f"its class {wnid} has no training folder"))
    return test


# ----------------------------------------------------------------------------- the devkit


def devkit(root: Path) -> tuple[dict[str, tuple[str, ...]], list[str] | None]:
    """``({wnid: words}, wnid of each validation image in order)`` from torchvision's ``meta.bin``, an
    unpacked devkit folder or the devkit archive in ``root``; ``({}, None)`` when there is none."""
    if (root / "meta.bin").is_file():
        from torchvision.datasets.imagenet import load_meta_file

        return load_meta_file(str(root))
    if (root / DEVKIT_FOLDER / "data" / "meta.mat").is_file():
        return read_devkit(root / DEVKIT_FOLDER)
    if (root / DEVKIT_ARCHIVE).is_file():
        from torchvision.datasets.utils import extract_archive

        with tempfile.TemporaryDirectory() as tmp:
            extract_archive(str(root / DEVKIT_ARCHIVE), tmp)
            return read_devkit(Path(tmp) / DEVKIT_FOLDER)
    return {}, None


def read_devkit(folder: Path) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """An unpacked devkit: the leaf synsets of ``data/meta.mat`` (num_children 0, the 1,000 classes) and
    ``data/ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per validation image), read as
    torchvision's ``parse_devkit_archive`` reads them."""
    import scipy.io

    synsets = scipy.io.loadmat(folder / "data" / "meta.mat", squeeze_me=True)["synsets"]
    leaves = synsets[synsets["num_children"] == 0]
    wnid_of = {int(i): str(w) for i, w in zip(leaves["ILSVRC2012_ID"], leaves["WNID"])}
    words = {str(w): tuple(str(text).split(", ")) for w, text in zip(leaves["WNID"], leaves["words"])}
    truth = (folder / "data" / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    return words, [wnid_of[int(i)] for i in truth]


# ----------------------------------------------------------------------------- the archives


@contextmanager
def _md5_check(enabled: bool):
    """torchvision's parsers check each archive against the official MD5; ``enabled`` False skips that
    check (generated or re-packed archives), by replacing their check with a no-op while they run."""
    import torchvision.datasets.imagenet as tv

    if enabled:
        yield
        return
    if not hasattr(tv, "_verify_archive"):
        raise BadOption("this torchvision cannot skip the ImageNet archives' MD5 check; unpack them by hand")
    original = tv._verify_archive
    tv._verify_archive = lambda root, file, md5: None
    try:
        yield
    finally:
        tv._verify_archive = original


def unpack(root: Path, check_md5: bool = True) -> None:
    """Unpack the official archives in ``root`` that are not unpacked yet: the training tar into
    ``root/train/<wnid>/``, the validation tar into ``root/val/<wnid>/`` by the devkit's ground truth.
    Each is unpacked in a temporary folder in ``root`` and moved into place only when complete."""
    todo_train = (root / TRAIN_ARCHIVE).is_file() and not (root / "train").is_dir()
    todo_val = (root / VAL_ARCHIVE).is_file() and not (root / "val").is_dir()
    if not (todo_train or todo_val):
        return
    from torchvision.datasets.imagenet import (
        load_meta_file,
        parse_devkit_archive,
        parse_train_archive,
        parse_val_archive,
    )

    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        with _md5_check(check_md5):
            if todo_train:
                log.warning("unpacking %s into %s (once)", root / TRAIN_ARCHIVE, root / "train")
                parse_train_archive(str(tmp), file=str(root / TRAIN_ARCHIVE))
                os.replace(tmp / "train", root / "train")
            if todo_val:
                if (root / DEVKIT_ARCHIVE).is_file():
                    parse_devkit_archive(str(tmp), file=str(root / DEVKIT_ARCHIVE))
                    val_wnids = load_meta_file(str(tmp))[1]
                else:
                    val_wnids = devkit(root)[1]
                if val_wnids is None:
                    raise MissingData(f"{root / VAL_ARCHIVE} needs the devkit's labels: put {DEVKIT_ARCHIVE} in {root}")
                log.warning("unpacking %s into %s (once)", root / VAL_ARCHIVE, root / "val")
                parse_val_archive(str(tmp), file=str(root / VAL_ARCHIVE), wnids=val_wnids)
                os.replace(tmp / "val", root / "val")
    except RuntimeError as error:
        if "corrupted" not in str(error):
            raise
        raise BadOption(
            f"{error} (its MD5 is not the official archive's; --data.archive_sha256 any skips the check)"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
