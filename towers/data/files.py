"""Decoding the images: one image file, whatever its pixel format, turned into the paper's uint8
(3, 256, 256) pixels (§2), and the two datasets that serve them (decoded each time, or read from the
pre-resized store that :mod:`towers.data.store` builds). Finding the files is :mod:`towers.data.sources`'
(re-exported here: ``find_images``, ``link_problem``, ``CLASSES``)."""

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from towers.data.shard_reader import StoreImages
from towers.data.sources import FORMAT_OF_SUFFIX, find_images, link_problem  # noqa: F401  (re-exported)
from towers.data.sources.catsdogs import CLASSES, KAGGLE_NAME  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


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


# The usual ranges of integer and float pixel values, smallest first: a greyscale image whose mode does
# not fix its range (32-bit integer "I", 32-bit float "F") is read in the smallest that holds all its
# values (0..1 for floats only: the convention of float image files), else its own min..max.
USUAL_RANGES = ((0.0, 1.0), (0.0, 255.0), (0.0, 65535.0))


def to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """``image`` as 8-bit RGB, whatever pixel format Pillow read, and a note on the conversion ("" when
    it was RGB already). Wide greyscale (16-bit, 32-bit integer, float) is scaled from its range to
    0..255, never clipped: 16-bit modes from 0..65535, ``I`` and ``F`` by :data:`USUAL_RANGES`.
    Raises ``BadImage`` for non-finite float pixels."""
    mode = image.mode
    if mode == "RGB":
        return image, ""
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise BadImage(f"{mode} image with NaN or infinite pixel values")
        low, high = float(values.min()), float(values.max())
        if mode.startswith("I;16"):
            low, high = 0.0, 65535.0
        else:
            usual = [(a, b) for a, b in USUAL_RANGES if a <= low and high <= b and (mode == "F" or b > 1)]
            low, high = usual[0] if usual else (low, high if high > low else low + 1)
        grey = np.round((values - low) * (255.0 / (high - low))).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), f"{mode} scaled from {low:g}..{high:g} to 0..255, as RGB"
    note = f"{mode} converted to RGB" + (" (alpha dropped)" if "A" in mode or "a" in mode else "")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        image = image.convert("LA")
    return image.convert("RGB"), note


def load_image(path: str | Path, resize_size: int = 256, exif_transpose: bool = True) -> tuple[np.ndarray, str]:
    """Decode, turn upright by its EXIF orientation (``exif_transpose``), convert to RGB
    (:func:`to_rgb`), rescale the shorter side to ``resize_size`` and centre-crop (§2).

    Returns the uint8 (3, resize_size, resize_size) pixels and a note on what was unusual
    (format other than the extension, EXIF orientation, pixel format converted, every pixel the
    same), empty when nothing was. Raises ``BadImage`` with the reason when the file cannot be used:
    any exception while decoding one file (a corrupt EXIF block's ``struct.error`` included) makes
    that file bad, never the run.
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
                image, converted = to_rgb(image)
                notes += [converted] if converted else []
                image = ImageOps.fit(image, (resize_size, resize_size), Image.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"larger than Pillow's decompression-bomb limit ({error})") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise BadImage(f"cannot be decoded: {error}") from None
    except Exception as error:  # anything else one file's bytes provoke (struct.error from EXIF, ...)
        raise BadImage(f"cannot be decoded: {type(error).__name__}: {error}") from None
    if pixels.min() == pixels.max():
        notes.append(f"constant image: every pixel is {pixels.flat[0]} after conversion")
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


# The fast path's dataset: rows of the pre-resized store, uint8 (3, R, R) each, decoded on the CPU (its
# one implementation, shared with the device-decode path, is towers.data.shard_reader.StoreImages).
ImageStore = StoreImages
