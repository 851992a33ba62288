"""Cats vs dogs with the paper's preprocessing (§2, §4.1), as a LightningDataModule.

    files  -> found by layout, every file checked once (unreadable ones reported and skipped)
           -> split by image with ``split_seed``
           -> each image: shorter side to ``resize_size`` (256), centre crop -> uint8 (3, 256, 256),
              decoded from the file each time (plain path) or read from a pre-resized uint8
              store (fast path); both give the same pixels
    batch  -> moved to the device as uint8, then on the device, vectorised over the batch:
              training: random ``image_size`` (227) crop, horizontal flip, mean subtraction,
              PCA colour noise; evaluation: centre crop, or the paper's ten patches.

Every random draw (the order of the training images, each crop, flip and colour-noise
coefficient) is a function of ``seed``, the epoch and the images of the batch only, never of
global random state, so a run resumed from an end-of-epoch checkpoint sees exactly the batches
of an uninterrupted run.
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from towers.demo_data import make_demo_dataset
from towers.errors import BadOption, MissingData, NotWritable
from towers.files import allocate, atomic_path, shown_path, write_atomic

log = logging.getLogger(__name__)

CLASSES = ("cat", "dog")  # label 0 is cat, 1 is dog
MICROSOFT_URL = ("https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
                 "kagglecatsanddogs_5340.zip")
MICROSOFT_ZIP = "kagglecatsanddogs_5340.zip"
# SHA-256 of the official MICROSOFT_URL archive (824,887,076 bytes), as pinned by Hugging Face's cats_vs_dogs
# loader (huggingface/datasets, datasets/cats_vs_dogs/dataset_infos.json, commit 0129d93b, "download_checksums").
# TensorFlow Datasets' url_checksums/cats_vs_dogs.txt pins only the older kagglecatsanddogs_3367a.zip.
MICROSOFT_SHA256 = "b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9"
KAGGLE_NAME = re.compile(r"^(cat|dog)\.\d+\.\w+$", re.IGNORECASE)
FORMAT_OF_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP",
                    ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
CACHE_VERSION = 2  # bump when the decoding changes, so stores and statistics are rebuilt (2: EXIF orientation)

EXPECTED_LAYOUTS = """expected one of:
  Microsoft archive  ROOT/PetImages/Cat/*.jpg and ROOT/PetImages/Dog/*.jpg  (--data.download true fetches it)
  Kaggle             ROOT/train/cat.0.jpg, ROOT/train/dog.0.jpg, ...         (or the files directly in ROOT)
  Oxford-IIIT Pet    ROOT/oxford-iiit-pet/images and .../annotations         (--data.source oxford_pet --data.download true)
  class folders      ROOT/<class>/* with two or more class folders
  demo               --data.source demo generates a synthetic set in ROOT"""


# ----------------------------------------------------------------------------- finding the images

def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_folder_files(folder: Path, unused: list | None = None) -> list[Path]:
    """The visible files under ``folder``, links included (dangling ones too: :func:`link_problem` sorts
    them out). Folders named like images and linked folders (not followed) go to ``unused`` with why."""
    files = []
    for here, folders, names in os.walk(folder):  # never follows linked folders
        here = Path(here)
        folders[:] = sorted(d for d in folders if not d.startswith("."))
        for name in folders:
            if (here / name).is_symlink():
                _note(unused, here / name, "a link to a folder, not followed")
            elif Path(name).suffix.lower() in FORMAT_OF_SUFFIX:
                _note(unused, here / name, "a folder named like an image (the files in it are read)")
        files += [here / name for name in names if not name.startswith(".")]
    return sorted(files)


def _note(unused: list | None, path: Path, reason: str) -> None:
    if unused is not None:
        unused.append((path, reason))


def link_problem(path: Path, root: Path) -> str | None:
    """Why the symbolic link ``path`` cannot be used (points at nothing, or outside ``root``), else None."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if not target.exists():
        return f"a symbolic link to {shown_path(os.readlink(path))}, which does not exist"
    if not target.is_relative_to(Path(root).resolve()):
        return f"a symbolic link to {shown_path(target)}, outside the data folder (refused)"
    return None


def _class_label(name: str, names: list[str]) -> int:
    """cat/cats -> 0 and dog/dogs -> 1 whatever the case; other class names by sorted order."""
    lower = [n.lower().rstrip("s") for n in names]
    if sorted(lower) == list(CLASSES):
        return CLASSES.index(name.lower().rstrip("s"))
    return sorted(names).index(name)


def find_images(root: str | Path, layout: str = "auto",
                unused: list | None = None) -> tuple[str, Path, list[tuple[str, int]], list[str]]:
    """Detect the layout under ``root``.

    Returns ``(layout, base, [(path relative to base, label)], class names)``, sorted by path.
    Entries of the layout's folders that are not used (folders named like images, Kaggle-layout
    image files without a label in their name) are appended to ``unused`` as (path, reason).
    Raises FileNotFoundError (:class:`MissingData`) listing what was found and what was expected.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingData(f"Dataset folder {root} does not exist; {EXPECTED_LAYOUTS}")
    seen: list = []  # entries not used, collected per layout tried; only the detected layout's are kept
    found: tuple[str, Path, list[tuple[str, int]], list[str]] | None = None

    pet = root / "oxford-iiit-pet" if (root / "oxford-iiit-pet").is_dir() else root
    if layout in ("auto", "oxford_pet") and (pet / "annotations" / "trainval.txt").is_file() and (pet / "images").is_dir():
        files = []
        for split in ("trainval.txt", "test.txt"):  # lines: "<image id> <breed id> <species 1=cat 2=dog> <breed>"
            for line in (pet / "annotations" / split).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    image_id, _, species, *_ = line.split()
                    files.append((f"images/{image_id}.jpg", int(species) - 1))
        found = ("oxford_pet", pet, sorted(set(files)), list(CLASSES))

    petimages = root / "PetImages" if (root / "PetImages").is_dir() else root
    if found is None and layout in ("auto", "microsoft") and (petimages / "Cat").is_dir() and (petimages / "Dog").is_dir():
        seen = []
        files = [(str(p.relative_to(petimages)), label)
                 for label, name in enumerate(("Cat", "Dog")) for p in _class_folder_files(petimages / name, seen)]
        found = ("microsoft", petimages, sorted(files), list(CLASSES))

    if found is None and layout in ("auto", "kaggle", "demo"):
        for base in (root / "train", root):
            entries = sorted(p for p in base.glob("*.*") if _visible(p)) if base.is_dir() else []
            # links are kept whatever they point at (link_problem sorts them out), folders are not
            names = [p.name for p in entries if (p.is_file() or p.is_symlink()) and KAGGLE_NAME.match(p.name)]
            if names:
                files = [(name, CLASSES.index(name.split(".")[0].lower())) for name in names]
                found, used = ("kaggle", base, files, list(CLASSES)), set(names)
                seen = [(p, "a folder named like an image") if p.is_dir() and not p.is_symlink() else
                        (p, "named like an image but not cat.N.ext or dog.N.ext, so it has no label")
                        for p in entries if p.suffix.lower() in FORMAT_OF_SUFFIX and p.name not in used]
                break

    if found is None and layout in ("auto", "folders"):
        folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p) and _class_folder_files(p))
        if len(folders) >= 2:
            names, seen = [f.name for f in folders], []
            files = [(str(p.relative_to(root)), _class_label(f.name, names)) for f in folders for p in _class_folder_files(f, seen)]
            classes = sorted(names, key=lambda n: _class_label(n, names))
            found = ("folders", root, sorted(files), classes)

    if found is None or not found[2]:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} entries)" if len(entries) > 20 else "")
        asked = "" if layout == "auto" else f" in the {layout!r} layout"
        raise MissingData(f"No labelled cat/dog images found{asked} in {root}. "
                          f"Found: {shown or 'an empty folder'}; {EXPECTED_LAYOUTS}")
    if unused is not None and found[0] != "oxford_pet":
        unused += seen
    return found


# ----------------------------------------------------------------------------- reading one image

# EXIF orientation tag values: what a viewer does to show the image upright
EXIF_ORIENTATIONS = {2: "mirrored", 3: "rotated 180°", 4: "flipped upside down", 5: "transposed",
                     6: "rotated 90° clockwise", 7: "transversed", 8: "rotated 90° counter-clockwise"}


def load_image(path: str | Path, resize_size: int = 256, exif_transpose: bool = True) -> tuple[np.ndarray, str]:
    """Decode, turn upright by its EXIF orientation (``exif_transpose``), convert to RGB, rescale the
    shorter side to ``resize_size`` and centre-crop (§2).

    Returns the uint8 (3, resize_size, resize_size) pixels and a note on what was unusual
    (format other than the extension, EXIF orientation, colour mode converted), empty when nothing was.
    Raises ``BadImage`` with the reason when the file cannot be used.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    notes = []
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both as too large.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decodes everything: truncated data fails here, not mid-epoch
                expected = FORMAT_OF_SUFFIX.get(path.suffix.lower())
                if image.format != expected:
                    notes.append(f"{image.format} content with a {path.suffix or 'missing'} extension")
                orientation = image.getexif().get(0x0112, 1)  # 0x0112: the EXIF Orientation tag
                if orientation in EXIF_ORIENTATIONS:
                    if exif_transpose:
                        image = ImageOps.exif_transpose(image)
                        notes.append(f"EXIF orientation {orientation} applied ({EXIF_ORIENTATIONS[orientation]})")
                    else:
                        notes.append(f"EXIF orientation {orientation} ignored (data.exif_transpose is false)")
                if image.mode != "RGB":
                    notes.append(f"{image.mode} converted to RGB" + (" (alpha dropped)" if "A" in image.mode else ""))
                    image = image.convert("RGBA" if image.mode == "P" and "transparency" in image.info else image.mode)
                    image = image.convert("RGB")
                image = ImageOps.fit(image, (resize_size, resize_size), Image.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"larger than Pillow's decompression-bomb limit ({error})") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise BadImage(f"cannot be decoded: {error}") from None
    return pixels, "; ".join(notes)


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason."""


def _check_and_load(args: tuple[Path, int, bool]) -> tuple[np.ndarray | None, bool, str]:
    path, size, exif_transpose = args
    try:
        pixels, note = load_image(path, size, exif_transpose)
        return pixels, True, note
    except BadImage as error:
        return None, False, str(error)


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


# ----------------------------------------------------------------------------- datasets

class ImageFiles(Dataset):
    """The plain path: decode each JPEG every time. Items: (uint8 (3, R, R), label, index)."""

    def __init__(self, base: Path, files: list[str], labels: list[int], resize_size: int, exif_transpose: bool = True):
        self.base, self.files, self.labels, self.resize_size = base, files, labels, resize_size
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        # Every file passed the check in setup; one that changed since then is replaced by the
        # next readable image (with its own label) and reported, so an epoch never crashes.
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                pixels, _ = load_image(self.base / self.files[i], self.resize_size, self.exif_transpose)
                return torch.from_numpy(pixels), self.labels[i], index
            except (BadImage, OSError) as error:
                log.warning("%s became unreadable after the check (%s); using the next image instead",
                            self.base / self.files[i], error)
        raise RuntimeError(f"no readable image left under {self.base}")


class ImageStore(Dataset):
    """The fast path: rows of a pre-resized uint8 (N, 3, R, R) NumPy file, opened as a memmap."""

    def __init__(self, path: Path, rows: list[int], labels: list[int]):
        self.path, self.rows, self.labels = path, rows, labels
        self._array = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        if self._array is None:  # opened lazily, so each loader worker maps the file itself
            self._array = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[self.rows[index]])), self.labels[index], index

    def __getstate__(self):
        return {**self.__dict__, "_array": None}


# ----------------------------------------------------------------------------- augmentation on batches

def crop(images: torch.Tensor, source: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
         size: int) -> torch.Tensor:
    """``size``-square crops of ``images`` (B, C, R, R): crop m is taken from image ``source[m]`` at
    (``top[m]``, ``left[m]``), mirrored left-right where ``flip[m]``. One gather, no loop.

    With ``source`` None, ``images`` is a single (C, R, R) image (the mean image) cropped M times.
    Returns (M, C, size, size).
    """
    steps = torch.arange(size, device=images.device)
    rows = top[:, None] + steps                                                   # (M, size)
    cols = left[:, None] + torch.where(flip[:, None], size - 1 - steps, steps)    # flips folded into the columns
    channels = torch.arange(images.shape[-3], device=images.device)[None, :, None, None]
    rows, cols = rows[:, None, :, None], cols[:, None, None, :]
    if source is None:  # the mean image: (C, R, R)
        return images[channels, rows, cols]
    return images[source[:, None, None, None], channels, rows, cols]


def ten_patches(resize_size: int, size: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flip) of the paper's ten test patches: four corners and the centre, each also mirrored."""
    far, mid = resize_size - size, (resize_size - size) // 2
    top = torch.tensor([0, 0, far, far, mid] * 2, device=device)
    left = torch.tensor([0, far, 0, far, mid] * 2, device=device)
    flip = torch.tensor([False] * 5 + [True] * 5, device=device)
    return top, left, flip


# ----------------------------------------------------------------------------- the data module

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


class CatsDogsDataModule(L.LightningDataModule):
    """Cats vs dogs (cat = 0, dog = 1) with the paper's preprocessing and augmentation.

    Batches are ``(images, labels)``: images float32 (B, 3, S, S) in RGB order and raw 0..255
    pixel units minus the training mean (not divided by a std unless ``divide_std``); labels
    long. With ``ten_patch_test`` test batches are (B, 10, 3, S, S).

    Args:
        root: the dataset folder; the layout is detected (``source: auto``) or given.
        source: ``auto``, ``microsoft`` (PetImages/Cat, PetImages/Dog), ``kaggle`` (train/cat.N.jpg),
            ``folders`` (root/<class>/*), ``oxford_pet`` (Oxford-IIIT Pet through torchvision),
            ``demo`` (a synthetic set generated in ``root`` when missing).
        download: let ``prepare_data`` fetch a missing Microsoft archive or Oxford-IIIT Pet.
        archive_sha256: expected SHA-256 of the Microsoft zip (downloaded, or found as
            ``root/kagglecatsanddogs_5340.zip``); None: the official archive's
            (:data:`MICROSOFT_SHA256`); ``"any"``: not checked (the digest is logged).
        demo_images_per_class, demo_seed: size and seed of the generated demo set.
        test_size, train_size, val_size: a count, a fraction of all usable images, or
            ``"rest"``. The test images are drawn first, then the training pool, and the
            validation images are carved out of the training pool (defaults: 1,000 test and
            24,000 train as in the demul/AlexNet replication, 1,000 of the 24,000 for validation).
        split_seed: the split depends on this only, never on the training seed.
        seed: seed of the training order, crops, flips and colour noise; None takes the run's
            ``seed_everything`` (``PL_GLOBAL_SEED``), or 0.
        batch_size, eval_batch_size: training batch (§5: 128) and evaluation batch (None: the same).
        resize_size: side of the rescaled, centre-cropped images (§2: 256).
        exif_transpose: turn each image upright by its EXIF orientation tag before resizing, as
            a viewer shows it (the paper does not say; on by default, every such file is listed
            in ``bad_files.tsv`` either way).
        image_size: side of the crops fed to the network (227); the CLI links it to the model.
        random_crop, random_flip: §4.1's random crops and horizontal flips at training time
            (off: the centre crop, unflipped).
        mean: subtract the training set's mean image (``pixel``, §2), its mean colour
            (``channel``), or nothing (``none``).
        divide_std: also divide by the per-channel std of the training pixels (not in the paper);
            exposed as ``input_channel_std``.
        pca_noise_std: std of the fancy-PCA coefficients alpha (§4.1: 0.1; 0 switches it off).
        ten_patch_test: test on the average of the ten patches (§4.1) instead of the centre crop.
        fast_path: read from a pre-resized uint8 store (built once, rebuilt when files change)
            instead of decoding JPEGs every epoch.
        cache_dir: where the check results, the store, the statistics and the bad-file report
            live (None: ``root/.towers-cache``).
        num_workers: loader processes (None: CPU count - 1, at most 8).
        pin_memory: None pins only when CUDA is available.
    """

    def __init__(
        self,
        root: str = "data",
        source: Literal["auto", "microsoft", "kaggle", "folders", "oxford_pet", "demo"] = "auto",
        download: bool = False,
        archive_sha256: str | None = None,
        demo_images_per_class: int = 600,
        demo_seed: int = 0,
        test_size: Size = 1000,
        train_size: Size = 24000,
        val_size: Size = 1000,
        split_seed: int = 0,
        seed: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        resize_size: int = 256,
        exif_transpose: bool = True,
        image_size: int = 227,
        random_crop: bool = True,
        random_flip: bool = True,
        mean: Literal["pixel", "channel", "none"] = "pixel",
        divide_std: bool = False,
        pca_noise_std: float = 0.1,
        ten_patch_test: bool = False,
        fast_path: bool = True,
        cache_dir: str | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        if image_size > resize_size:
            raise BadOption(f"image_size={image_size} is larger than resize_size={resize_size}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise BadOption(f"batch_size={batch_size} and eval_batch_size={eval_batch_size} must be at least 1")
        self.save_hyperparameters()
        self.root = Path(root)
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".towers-cache"
        self.num_workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.image_size, self.resize_size = image_size, resize_size
        self.input_channel_std: torch.Tensor | None = None
        self.rgb_eigenvectors: torch.Tensor | None = None
        self.rgb_eigenvalues: torch.Tensor | None = None

    # -------------------------------------------------------------- prepare: downloads, checks, store

    def prepare_data(self) -> None:
        """Generate or download what is missing, check every file, build the fast-path store."""
        hp = self.hparams
        try:
            if hp.source == "demo" and not (self.root / "train").is_dir():
                make_demo_dataset(self.root, hp.demo_images_per_class, hp.demo_seed)
            elif hp.source == "oxford_pet" and hp.download:
                download_oxford_pet(self.root)
            elif hp.source in ("auto", "microsoft"):
                try:
                    find_images(self.root, hp.source)
                except FileNotFoundError:
                    if hp.download or (self.root / MICROSOFT_ZIP).is_file():
                        download_microsoft(self.root, sha256=hp.archive_sha256)
        except OSError as error:
            if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
                raise
            raise NotWritable(f"cannot write the data into {self.root} ({error.strerror}: {error.filename}); "
                              f"give --data.root a folder you may write to") from error
        self._prepare_state()

    def _index(self) -> None:
        """Find, check (cached), and for the fast path store the images; sets the usable file list."""
        hp = self.hparams
        unused: list[tuple[Path, str]] = []  # files under the root that are not read, and why
        self.layout, self.base, found, self.classes = find_images(self.root, hp.source, unused)
        files = []
        for f, label in found:  # links to nothing or out of the data folder, files listed but missing
            problem = link_problem(self.base / f, self.root) or (
                None if (self.base / f).exists() else "listed by the layout but missing")
            if problem:
                unused.append((self.base / f, problem))
            else:
                files.append((f, label))
        if not files:
            raise MissingData(f"None of the {len(found)} files found in {self.base} can be used; "
                              f"{unused[0][0]}: {unused[0][1]}")
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.cache_dir, os.W_OK):
                raise PermissionError(13, "Permission denied", str(self.cache_dir))
        except OSError as error:
            if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
                raise
            raise NotWritable(f"cannot write to the cache folder {self.cache_dir} ({error.strerror}); "
                              f"give --data.cache_dir a folder you may write to") from error
        paths = [self.base / f for f, _ in files]
        stamps = [(f, s.st_size, s.st_mtime_ns) for (f, _), s in zip(files, (p.stat() for p in paths))]

        # the notes (and pixels) depend on exif_transpose, so each setting keeps its own check results
        checks_path = self.cache_dir / ("checks.json" if hp.exif_transpose else "checks-exif-ignored.json")
        checks = json.loads(checks_path.read_text()) if checks_path.is_file() else {}
        fresh = {f: checks[f] for f, size, mtime in stamps if checks.get(f, [None] * 2)[:2] == [size, mtime]}

        fingerprint = hashlib.sha1(json.dumps([CACHE_VERSION, hp.resize_size, hp.exif_transpose, stamps]).encode()).hexdigest()[:16]
        self.store_path = self.cache_dir / f"store-{hp.resize_size}-{fingerprint}.npy"
        if hp.fast_path and not self.store_path.is_file():
            results = self._build_store(paths)
        else:
            todo = [i for i, (f, _, _) in enumerate(stamps) if f not in fresh]
            results = dict(zip(todo, (r for r in _imap(_check, [(paths[i], hp.exif_transpose) for i in todo],
                                                        self.num_workers, f"checking images in {self.base}"))))
        if results:
            for i, (usable, note) in results.items():
                f, size, mtime = stamps[i]
                fresh[f] = [size, mtime, usable, note]
            write_atomic(checks_path, json.dumps(fresh))

        self.store_rows = {f: row for row, (f, _) in enumerate(files)}
        self.usable = [(f, label) for f, label in files if fresh[f][2]]
        notes = [(self.base / f, *fresh[f][2:]) for f, _ in files if not fresh[f][2] or fresh[f][3]]
        for f, _ in files:  # a name that is not valid UTF-8 is read, but said so
            if f != os.fsencode(f).decode("utf-8", "replace"):
                notes.append((self.base / f, True, "the file name is not valid UTF-8 (shown escaped)"))
        self._report(notes + [(path, False, why) for path, why in unused], len(found) + len(unused))

    def _build_store(self, paths: list[Path]) -> dict[int, tuple[bool, str]]:
        """Decode every file once into rows of a uint8 .npy memmap (unreadable files keep a zero row)."""
        size, results = self.hparams.resize_size, {}
        for old in self.cache_dir.glob(f"store-{size}-*.npy"):
            old.unlink()  # a store of files that have since changed
        with atomic_path(self.store_path) as tmp:
            store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
            allocate(tmp, shown=self.store_path)  # a full disk is an OSError here, not a SIGBUS when a row is written
            loaded = _imap(_check_and_load, [(p, size, self.hparams.exif_transpose) for p in paths],
                           self.num_workers, f"building {self.store_path.name}")
            for row, (pixels, usable, note) in enumerate(loaded):
                if pixels is not None:
                    store[row] = pixels
                results[row] = (usable, note)
            store.flush()
            del store
        return results

    def _report(self, notes: list[tuple[Path, bool, str]], total: int) -> None:
        """One report of every skipped, converted or oddly named file: logged, and written to bad_files.tsv
        (names escaped, :func:`towers.files.shown_path`, so any name fits on its line)."""
        self.bad_files_report = self.cache_dir / "bad_files.tsv"
        notes = sorted(notes, key=lambda note: os.fsencode(note[0]))
        lines = ["file\taction\treason"] + [f"{shown_path(path)}\t{'kept' if ok else 'skipped'}\t{why}"
                                            for path, ok, why in notes]
        write_atomic(self.bad_files_report, "\n".join(lines) + "\n")
        skipped = [shown_path(path.name) for path, ok, _ in notes if not ok]
        if notes:
            log.warning("%d of %d files skipped as unusable, %d kept with a note; the list with reasons: %s%s",
                        len(skipped), total, len(notes) - len(skipped), self.bad_files_report,
                        f" (skipped: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})" if skipped else "")

    # -------------------------------------------------------------- setup: splits and statistics

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_files", None) is None:
            self._prepare_state()
        trainer = getattr(self, "trainer", None)
        num_classes = getattr(getattr(trainer, "lightning_module", None), "hparams", {}).get("num_classes")
        if num_classes is not None and num_classes != len(self.classes):
            raise BadOption(f"The data has {len(self.classes)} classes {self.classes} but the model has "
                            f"num_classes={num_classes}; set --model.num_classes {len(self.classes)}")
        if stage in (None, "fit") and trainer is not None:  # only a trainer trains on it
            self._check_steps(trainer)

    def _check_steps(self, trainer) -> None:
        """Refuse a training split that gives no full batch: the loader drops the last partial batch,
        so such a run would train on nothing and still report itself finished."""
        replicas = trainer.world_size
        per_replica = -(-len(self.train_files) // replicas)  # DistributedSampler pads to equal shares
        steps = per_replica // self.hparams.batch_size
        if steps == 0:
            shared = f", shared by {replicas} processes ({per_replica} each)" if replicas > 1 else ""
            raise BadOption(f"the training split has {len(self.train_files)} images{shared}, fewer than one batch "
                            f"of batch_size={self.hparams.batch_size}, so an epoch would have 0 steps; use a smaller "
                            f"--data.batch_size or a larger --data.train_size")

    def _prepare_state(self) -> None:
        """Check the files, split them, compute the training statistics; every step cached on disk."""
        self._index()
        self._split()
        self._statistics()

    def _split(self) -> None:
        hp, n = self.hparams, len(self.usable)
        n_test, n_pool, n_val = (_count(size, n, name) for size, name in
                                 ((hp.test_size, "test_size"), (hp.train_size, "train_size"), (hp.val_size, "val_size")))
        if n_val is None or (n_test is None and n_pool is None):
            raise BadOption("'rest' is allowed for test_size or train_size, not for both nor for val_size")
        n_test = n - n_pool if n_test is None else n_test
        n_pool = n - n_test if n_pool is None else n_pool
        if n_test < 0 or n_pool < 0 or n_test + n_pool > n or n_val >= n_pool:
            raise BadOption(f"{self.base} has {n} usable images, but the splits ask for test {n_test} + training "
                             f"pool {n_pool}, of which validation {n_val} (at least one must be left for training). "
                             f"Use smaller sizes, fractions (--data.train_size 0.8) or 'rest'; skipped files are "
                             f"listed in {self.bad_files_report}")
        order = np.random.default_rng(hp.split_seed).permutation(n)  # by image, from split_seed alone
        pick = lambda idx: [self.usable[i] for i in idx]
        self.test_files = pick(order[:n_test])
        self.val_files = pick(order[n_test:n_test + n_val])
        self.train_files = pick(order[n_test + n_val:n_test + n_pool])

    def dataset(self, files: list[tuple[str, int]]) -> Dataset:
        labels = [label for _, label in files]
        if self.hparams.fast_path:
            return ImageStore(self.store_path, [self.store_rows[f] for f, _ in files], labels)
        return ImageFiles(self.base, [f for f, _ in files], labels, self.hparams.resize_size, self.hparams.exif_transpose)

    def _statistics(self) -> None:
        """Mean image, mean colour and RGB covariance of the training images (cached by their list)."""
        key = hashlib.sha1(json.dumps([CACHE_VERSION, self.hparams.resize_size, self.train_files,
                                       str(self.store_path.name)]).encode()).hexdigest()[:16]
        path = self.cache_dir / f"stats-{key}.pt"
        if path.is_file():
            stats = torch.load(path)
        else:
            size = self.hparams.resize_size
            pixel_sum = torch.zeros(3, size, size, dtype=torch.float64)
            outer_sum = torch.zeros(3, 3, dtype=torch.float64)
            loader = DataLoader(self.dataset(self.train_files), batch_size=64, num_workers=self.num_workers)
            for images, _, _ in tqdm(loader, desc="training-set mean and RGB covariance", disable=len(loader) < 20):
                x = images.double()
                pixel_sum += x.sum(0)
                flat = x.transpose(0, 1).reshape(3, -1)
                outer_sum += flat @ flat.T
            count = len(self.train_files)
            mean_image = pixel_sum / count
            channel_mean = mean_image.mean((1, 2))
            covariance = outer_sum / (count * size * size) - torch.outer(channel_mean, channel_mean)
            stats = {"mean_image": mean_image.float(), "channel_mean": channel_mean.float(), "rgb_covariance": covariance}
            with atomic_path(path) as tmp:
                torch.save(stats, tmp)
        covariance = stats["rgb_covariance"]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        self.mean_image, self.channel_mean = stats["mean_image"], stats["channel_mean"]
        self.rgb_covariance = covariance.float()
        self.rgb_eigenvalues = eigenvalues.flip(0).clamp_min(0).float()      # (3,), largest first, in (0..255)^2
        self.rgb_eigenvectors = eigenvectors.flip(1).float()                  # (3, 3), column k is component k
        self.input_channel_std = covariance.diagonal().sqrt().float() if self.hparams.divide_std else None

    # -------------------------------------------------------------- loaders

    def _loader(self, files, batch_size, sampler=None, drop_last=False) -> DataLoader:
        # Its own generator: otherwise every new iterator takes a draw from the global RNG (for the
        # workers' base seed), which would shift the dropout masks of a resumed run.
        return DataLoader(self.dataset(files), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self._seed()))

    def _seed(self) -> int:
        return self.hparams.seed if self.hparams.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # A DistributedSampler even on one device: its order is a function of (seed, epoch) only, and
        # Lightning calls its set_epoch at every epoch and leaves it alone under DDP.
        sampler = DistributedSampler(self.dataset(self.train_files), shuffle=True, seed=self._seed(),
                                     num_replicas=trainer.world_size if trainer else 1,
                                     rank=trainer.global_rank if trainer else 0)
        return self._loader(self.train_files, self.hparams.batch_size, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_files, self.hparams.eval_batch_size or self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_files, self.hparams.eval_batch_size or self.hparams.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # -------------------------------------------------------------- augmentation on batches

    def draw_augmentation(self, indices: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """Crop offsets, flips and colour-noise coefficients for one training batch.

        Drawn from a generator seeded by (seed, epoch, first image index of the batch): within an
        epoch every image is in one batch, so the draws are a function of (seed, epoch, batch).
        All four are always drawn, so switching one off leaves the others unchanged.
        """
        hp, n = self.hparams, len(indices)
        entropy = np.random.SeedSequence([self._seed(), epoch, int(indices[0])]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
        room = hp.resize_size - hp.image_size
        top = torch.randint(0, room + 1, (n,), generator=generator)
        left = torch.randint(0, room + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        alpha = torch.randn(n, 3, generator=generator) * hp.pca_noise_std
        if not hp.random_crop:
            top, left = torch.full((n,), room // 2), torch.full((n,), room // 2)
        if not hp.random_flip:
            flip = torch.zeros(n, dtype=torch.bool)
        return {"top": top, "left": left, "flip": flip, "alpha": alpha}

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, indices = batch
        trainer = self.trainer
        draws = self.draw_augmentation(indices, trainer.current_epoch) if trainer is not None and trainer.training else None
        return images, labels, draws

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, draws = batch
        trainer = self.trainer
        ten = self.hparams.ten_patch_test and trainer is not None and trainer.testing
        return self.transform(images, draws, ten_patch=ten), labels

    def transform(self, images: torch.Tensor, draws: dict | None = None, ten_patch: bool = False) -> torch.Tensor:
        """uint8 (B, 3, R, R) -> float (B, 3, S, S) crops minus the mean (+ PCA noise when ``draws``).

        ``draws`` from :meth:`draw_augmentation` for training; None for the centre crop, or with
        ``ten_patch`` the ten patches as (B, 10, 3, S, S).
        """
        hp, device, b = self.hparams, images.device, images.shape[0]
        for name in ("mean_image", "channel_mean", "rgb_eigenvectors", "rgb_eigenvalues", "input_channel_std"):
            value = getattr(self, name)
            if value is not None and value.device != device:
                setattr(self, name, value.to(device))  # once: the statistics then live on the device
        if draws is not None:
            top, left, flip = draws["top"], draws["left"], draws["flip"]
            source = torch.arange(b, device=device)
        elif ten_patch:
            top, left, flip = (t.repeat(b) for t in ten_patches(hp.resize_size, hp.image_size, device))
            source = torch.arange(b, device=device).repeat_interleave(10)
        else:
            mid = (hp.resize_size - hp.image_size) // 2
            top = left = torch.full((b,), mid, device=device)
            flip = torch.zeros(b, dtype=torch.bool, device=device)
            source = torch.arange(b, device=device)

        x = crop(images, source, top, left, flip, hp.image_size).float()
        if hp.mean == "pixel":
            x -= crop(self.mean_image, None, top, left, flip, hp.image_size)
        elif hp.mean == "channel":
            x -= self.channel_mean[:, None, None]
        if draws is not None and hp.pca_noise_std > 0:
            # §4.1: add sum_k alpha_k * sigma_k * p_k to every pixel, sigma_k the std along principal
            # component p_k (cuda-convnet2's reading): the noise covariance is pca_noise_std^2 * covariance.
            noise = (draws["alpha"] * self.rgb_eigenvalues.sqrt()) @ self.rgb_eigenvectors.T
            x += noise[:, :, None, None]
        if self.input_channel_std is not None:
            x /= self.input_channel_std[:, None, None]
        return x.view(b, 10, *x.shape[1:]) if ten_patch and draws is None else x

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------- downloads

def safe_extract(archive: str | Path, target: str | Path) -> None:
    """Extract a zip into ``target``, refusing it whole if any member would land outside ``target``."""
    target = Path(target).resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            destination = (target / member.filename).resolve()
            is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
            if is_link or not destination.is_relative_to(target):
                raise ValueError(f"Refusing to extract {archive}: member {member.filename!r} "
                                 f"{'is a symbolic link' if is_link else 'would be written outside ' + str(target)}")
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
        official = (" (the official archive's; if this is another archive on purpose, pass its SHA-256 as "
                    "--data.archive_sha256, or --data.archive_sha256 any to skip the check)"
                    if expected.lower() == MICROSOFT_SHA256 else "")
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
                    f"{root}/PetImages/Dog/*.jpg exist.") from error
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
                f"{root}/oxford-iiit-pet/images/*.jpg and {root}/oxford-iiit-pet/annotations/trainval.txt.") from error
        os.replace(tmp / "oxford-iiit-pet", root / "oxford-iiit-pet")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "oxford-iiit-pet"
