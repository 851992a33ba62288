"""A synthetic cats-vs-dogs set in the Kaggle layout, so the demo runs anywhere without a download.

The two classes differ in two ways a first-layer kernel can see:

* colour: "cats" have warm backgrounds, "dogs" cool ones, with per-image jitter large enough
  that colour alone separates them only partly;
* oriented luminance texture: a grating that modulates brightness but not hue, oriented
  around 45 degrees for cats and around 135 degrees for dogs.

So a network that learns both colour-blobs and oriented luminance edges does best, which is
the kind of first layer whose split between towers the experiment measures.
"""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

# Mean background colour (RGB) of each class and the per-image jitter around it.
CLASS_COLORS = {"cat": (165.0, 120.0, 90.0), "dog": (110.0, 120.0, 150.0)}
COLOR_JITTER = 30.0
# Orientation of the luminance grating (degrees) and its spread.
CLASS_ORIENTATIONS = {"cat": 45.0, "dog": 135.0}
ORIENTATION_SPREAD = 25.0


def demo_image(rng: np.random.Generator, name: str) -> np.ndarray:
    """One (height, width, 3) uint8 image of class ``name``, drawn from ``rng``."""
    height, width = rng.integers(96, 161, size=2)
    color = np.asarray(CLASS_COLORS[name]) + rng.normal(0.0, COLOR_JITTER, 3)
    angle = np.deg2rad(CLASS_ORIENTATIONS[name] + rng.uniform(-ORIENTATION_SPREAD, ORIENTATION_SPREAD))
    wavelength, contrast, phase = rng.uniform(8, 16), rng.uniform(0.3, 0.6), rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:height, 0:width]
    grating = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / wavelength + phase)
    image = color * (1.0 + contrast * grating)[..., None]  # luminance only: every channel scaled alike
    image += rng.normal(0.0, 8.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_demo_dataset(root: str | Path, images_per_class: int = 600, seed: int = 0) -> Path:
    """Write ``root/train/cat.N.jpg`` and ``root/train/dog.N.jpg``; the same seed gives the same bytes.

    The images are written into a temporary folder next to ``root`` and moved into place at
    the end, so an interrupted run never leaves a half-written dataset behind.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
        (tmp / "train").mkdir()
        for i in tqdm(range(images_per_class), desc=f"demo dataset -> {root}", unit="pair"):
            for name in ("cat", "dog"):
                Image.fromarray(demo_image(rng, name)).save(tmp / "train" / f"{name}.{i}.jpg", quality=90)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
