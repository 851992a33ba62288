"""Downloads and archives: Microsoft's Cats-vs-Dogs zip (checked against its pinned SHA-256) and
Oxford-IIIT Pet (through torchvision), each unpacked in a temporary folder and moved into place whole;
ImageNet's archives are unpacked by :func:`towers.data.sources.imagenet.unpack`."""

import errno
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from towers.data.demo import make_demo_dataset
from towers.data.files import find_images
from towers.data.sources.imagenet import unpack as unpack_imagenet
from towers.errors import BadOption, NotWritable

log = logging.getLogger(__name__)

MICROSOFT_URL = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip"
)
MICROSOFT_ZIP = "kagglecatsanddogs_5340.zip"
# SHA-256 of the official MICROSOFT_URL archive (824,887,076 bytes), as pinned by Hugging Face's cats_vs_dogs
# loader (huggingface/datasets, datasets/cats_vs_dogs/dataset_infos.json, commit 0129d93b, "download_checksums").
# TensorFlow Datasets' url_checksums/cats_vs_dogs.txt pins only the older kagglecatsanddogs_3367a.zip.
MICROSOFT_SHA256 = "b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9"


def obtain(
    root: Path, source: str, download: bool, archive_sha256: str | None, demo_images_per_class: int, demo_seed: int
) -> None:
    """Put what is missing into ``root``: generate the demo set (``source`` ``demo``), download Oxford-IIIT
    Pet (``oxford_pet`` with ``download``), unpack the ImageNet archives found in ``root`` (``imagenet``;
    never downloaded: ImageNet's terms require a login), or fetch or unpack Microsoft's archive
    (``auto`` or ``microsoft`` when no images are found, with ``download`` or a zip already in ``root``)."""
    try:
        if source == "demo" and not (root / "train").is_dir():
            make_demo_dataset(root, demo_images_per_class, demo_seed)
        elif source == "oxford_pet" and download:
            download_oxford_pet(root)
        elif source == "imagenet" and root.is_dir():
            unpack_imagenet(root, check_md5=(archive_sha256 or "").lower() != "any")
        elif source in ("auto", "microsoft"):
            try:
                find_images(root, source)
            except FileNotFoundError:
                if download or (root / MICROSOFT_ZIP).is_file():
                    download_microsoft(root, sha256=archive_sha256)
    except OSError as error:
        if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
            raise
        raise NotWritable(
            f"cannot write the data into {root} ({error.strerror}: {error.filename}); "
            f"give --data.root a folder you may write to"
        ) from error


def safe_extract(archive: str | Path, target: str | Path) -> None:
    """Extract a zip into ``target``, refusing it whole if any member would land outside ``target``."""
    target = Path(target).resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            destination = (target / member.filename).resolve()
            is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
            if is_link or not destination.is_relative_to(target):
                raise ValueError(
                    f"Refusing to extract {archive}: member {member.filename!r} "
                    f"{'is a symbolic link' if is_link else 'would be written outside ' + str(target)}"
                )
        members = zf.infolist()
        for member in tqdm(members, desc=f"extracting {Path(archive).name}", disable=len(members) < 100):
            zf.extract(member, target)


def fetch(url: str, destination: Path, sha256: str | None = None) -> str:
    """Download ``url`` to ``destination`` with a progress bar; return its SHA-256, raise on a mismatch."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {destination.name}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return _verified(digest.hexdigest(), sha256, url)


def _verified(found: str, expected: str | None, what) -> str:
    """``found`` (a SHA-256 hex digest), after checking it against ``expected`` when one is given."""
    if expected is not None and found != expected.lower():
        official = (
            " (the official archive's; if this is another archive on purpose, pass its SHA-256 as "
            "--data.archive_sha256, or --data.archive_sha256 any to skip the check)"
            if expected.lower() == MICROSOFT_SHA256
            else ""
        )
        raise BadOption(f"Checksum mismatch for {what}: expected SHA-256 {expected}{official}, got {found}")
    return found


def download_microsoft(root: str | Path, url: str = MICROSOFT_URL, sha256: str | None = None) -> Path:
    """Fetch and unpack Microsoft's Cats-vs-Dogs archive into ``root/PetImages``.

    A zip already at ``root/kagglecatsanddogs_5340.zip`` is used instead of the network. Either
    is checked against ``sha256``: None means the official archive's (:data:`MICROSOFT_SHA256`),
    ``"any"`` checks nothing (the digest is logged so it can be pinned).
    Everything happens in a temporary folder inside ``root``; only a complete, verified
    ``PetImages`` is moved into place, and the temporary folder is removed whatever happens.
    """
    root = Path(root)
    unchecked = sha256 is not None and sha256.lower() == "any"
    sha256 = None if unchecked else (sha256 or MICROSOFT_SHA256)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        archive = root / MICROSOFT_ZIP
        if archive.is_file():
            digest = hashlib.sha256()
            with open(archive, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            found = _verified(digest.hexdigest(), sha256, archive)
        else:
            archive = tmp / MICROSOFT_ZIP
            try:
                found = fetch(url, archive, sha256)
            except OSError as error:  # URLError, timeouts, DNS failures
                raise RuntimeError(
                    f"Could not download {url} ({error}). Without network, download it elsewhere and put it "
                    f"at {root / MICROSOFT_ZIP}, or unzip it so that {root}/PetImages/Cat/*.jpg and "
                    f"{root}/PetImages/Dog/*.jpg exist."
                ) from error
        if unchecked:
            log.warning("%s has SHA-256 %s (not checked: --data.archive_sha256 any)", archive.name, found)
        safe_extract(archive, tmp / "extracted")
        if not (tmp / "extracted" / "PetImages").is_dir():
            raise ValueError(f"{archive} holds no PetImages folder")
        os.replace(tmp / "extracted" / "PetImages", root / "PetImages")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "PetImages"


def download_oxford_pet(root: str | Path) -> Path:
    """Oxford-IIIT Pet through torchvision (which checks its MD5s), into a temporary folder then moved."""
    from torchvision.datasets import OxfordIIITPet

    root = Path(root)
    if (root / "oxford-iiit-pet" / "annotations" / "trainval.txt").is_file():
        return root / "oxford-iiit-pet"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        try:
            for split in ("trainval", "test"):
                OxfordIIITPet(tmp, split=split, target_types="binary-category", download=True)
        except OSError as error:
            raise RuntimeError(
                f"Could not download Oxford-IIIT Pet ({error}). Without network, put its images.tar.gz and "
                f"annotations.tar.gz (https://www.robots.ox.ac.uk/~vgg/data/pets/) unpacked as "
                f"{root}/oxford-iiit-pet/images/*.jpg and {root}/oxford-iiit-pet/annotations/trainval.txt."
            ) from error
        os.replace(tmp / "oxford-iiit-pet", root / "oxford-iiit-pet")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "oxford-iiit-pet"
