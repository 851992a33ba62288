"""Finding and decoding the images: the layouts a dataset folder may have, one image file turned into
the paper's uint8 (3, 256, 256) pixels (§2), and the two datasets that serve them (decoded each time,
or read from the pre-resized store that :mod:`towers.data.store` builds)."""

import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from towers.errors import MissingData
from towers.files import shown_path

log = logging.getLogger(__name__)

CLASSES = ("cat", "dog")  # label 0 is cat, 1 is dog
KAGGLE_NAME = re.compile(r"^(cat|dog)\.\d+\.\w+$", re.IGNORECASE)
FORMAT_OF_SUFFIX = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

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


def find_images(
    root: str | Path, layout: str = "auto", unused: list | None = None
) -> tuple[str, Path, list[tuple[str, int]], list[str]]:
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
    if (
        layout in ("auto", "oxford_pet")
        and (pet / "annotations" / "trainval.txt").is_file()
        and (pet / "images").is_dir()
    ):
        files = []
        for split in ("trainval.txt", "test.txt"):  # lines: "<image id> <breed id> <species 1=cat 2=dog> <breed>"
            for line in (pet / "annotations" / split).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    image_id, _, species, *_ = line.split()
                    files.append((f"images/{image_id}.jpg", int(species) - 1))
        found = ("oxford_pet", pet, sorted(set(files)), list(CLASSES))

    petimages = root / "PetImages" if (root / "PetImages").is_dir() else root
    if (
        found is None
        and layout in ("auto", "microsoft")
        and (petimages / "Cat").is_dir()
        and (petimages / "Dog").is_dir()
    ):
        seen = []
        files = [
            (str(p.relative_to(petimages)), label)
            for label, name in enumerate(("Cat", "Dog"))
            for p in _class_folder_files(petimages / name, seen)
        ]
        found = ("microsoft", petimages, sorted(files), list(CLASSES))

    if found is None and layout in ("auto", "kaggle", "demo"):
        for base in (root / "train", root):
            entries = sorted(p for p in base.glob("*.*") if _visible(p)) if base.is_dir() else []
            # links are kept whatever they point at (link_problem sorts them out), folders are not
            names = [p.name for p in entries if (p.is_file() or p.is_symlink()) and KAGGLE_NAME.match(p.name)]
            if names:
                files = [(name, CLASSES.index(name.split(".")[0].lower())) for name in names]
                found, used = ("kaggle", base, files, list(CLASSES)), set(names)
                seen = [
                    (p, "a folder named like an image")
                    if p.is_dir() and not p.is_symlink()
                    else (p, "named like an image but not cat.N.ext or dog.N.ext, so it has no label")
                    for p in entries
                    if p.suffix.lower() in FORMAT_OF_SUFFIX and p.name not in used
                ]
                break

    if found is None and layout in ("auto", "folders"):
        folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p) and _class_folder_files(p))
        if len(folders) >= 2:
            names, seen = [f.name for f in folders], []
            files = [
                (str(p.relative_to(root)), _class_label(f.name, names))
                for f in folders
                for p in _class_folder_files(f, seen)
            ]
            classes = sorted(names, key=lambda n: _class_label(n, names))
            found = ("folders", root, sorted(files), classes)

    if found is None or not found[2]:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} entries)" if len(entries) > 20 else "")
        asked = "" if layout == "auto" else f" in the {layout!r} layout"
        raise MissingData(
            f"No labelled cat/dog images found{asked} in {root}. "
            f"Found: {shown or 'an empty folder'}; {EXPECTED_LAYOUTS}"
        )
    if unused is not None and found[0] != "oxford_pet":
        unused += seen
    return found


# ----------------------------------------------------------------------------- reading one image

# EXIF orientation tag values: what a viewer does to show the image upright
EXIF_ORIENTATIONS = {
    2: "mirrored",
    3: "rotated 180°",
    4: "flipped upside down",
    5: "transposed",
    6: "rotated 90° clockwise",
    7: "transversed",
    8: "rotated 90° counter-clockwise",
}


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
                log.warning(
                    "%s became unreadable after the check (%s); using the next image instead",
                    self.base / self.files[i],
                    error,
                )
        raise RuntimeError(f"no readable image left under {self.base}")


class ImageStore(Dataset):
    """The fast path: rows of the pre-resized store (:mod:`towers.data.shard_reader`), uint8 (3, R, R) each."""

    def __init__(self, path: Path, rows: list[int], labels: list[int]):
        self.path, self.rows, self.labels = path, rows, labels
        self._array = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        if self._array is None:  # opened lazily, so each loader worker maps the file itself
            from towers.data.shard_reader import open_store  # the sharded store (raw or JPEG), sizes checked

            self._array = open_store(self.path, verify=False)
        return torch.from_numpy(np.array(self._array[self.rows[index]])), self.labels[index], index

    def __getstate__(self):
        return {**self.__dict__, "_array": None}
