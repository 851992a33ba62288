"""A synthetic cats-vs-dogs set in the Kaggle layout, so the demo runs anywhere without a download.

The set needs both kinds of first-layer feature the experiment is about. Every image is a coloured
background with a luminance grating on it, and shows its class in exactly one of two ways, chosen
at random with probability 1/2 (the *cue*):

* colour cue: the background is warm (cats) or cool (dogs), along the red-minus-blue axis, which
  carries no luminance; the grating is horizontal or vertical (within ``ORIENTATION_SPREAD``),
  the same for both classes;
* texture cue: the grating is oriented around 45 degrees (cats) or 135 degrees (dogs); the
  background varies along the green-minus-magenta axis only, the same for both classes.

The grating adds the same amount to R, G and B (pure luminance, grey in raw RGB), every image gets a
random brightness and pixel noise. The uninformative cue of an image sits where the other class's
informative values are not (no warm-cool component; diagonal structure zero on average), so a linear
read-out of both cues solves the task, while each cue alone solves only its half of the images:
about 75% (``tests/test_known_answers.py`` checks this with linear probes on the mean colour and on
the oriented gradient energy).
"""

import errno
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

GREY = 128.0
# The colour cue: +1 (cat) or -1 (dog) times COLOUR_STRENGTH along the warm-cool axis (no luminance).
WARM_AXIS = np.array([1.0, 0.0, -1.0]) / np.sqrt(2)
NEUTRAL_AXIS = np.array([-1.0, 2.0, -1.0]) / np.sqrt(6)  # green-magenta: the uninformative colours
COLOUR_STRENGTH, COLOUR_JITTER = 45.0, 10.0
BRIGHTNESS_JITTER = 20.0
# The texture cue: grating orientation (degrees); 0 / 90 are the uninformative orientations.
CLASS_ORIENTATIONS = {"cat": 45.0, "dog": 135.0}
NEUTRAL_ORIENTATIONS = (0.0, 90.0)
ORIENTATION_SPREAD = 15.0
GRATING_AMPLITUDE = (30.0, 50.0)  # added to every channel alike
PIXEL_NOISE = 8.0
CUES = ("colour", "texture")


def demo_image(rng: np.random.Generator, name: str, cue: str | None = None) -> np.ndarray:
    """One (height, width, 3) uint8 image of class ``name`` showing it by ``cue`` (None: drawn at random)."""
    sign = {"cat": 1.0, "dog": -1.0}[name]
    cue = CUES[rng.integers(2)] if cue is None else cue
    height, width = rng.integers(96, 161, size=2)
    if cue == "colour":
        color = GREY + sign * COLOUR_STRENGTH * WARM_AXIS + rng.normal(0, COLOUR_JITTER) * NEUTRAL_AXIS
        orientation = NEUTRAL_ORIENTATIONS[rng.integers(2)]
    elif cue == "texture":
        color = GREY + rng.uniform(-COLOUR_STRENGTH, COLOUR_STRENGTH) * NEUTRAL_AXIS
        orientation = CLASS_ORIENTATIONS[name]
    else:
        raise ValueError(f"cue must be one of {CUES} or None, got {cue!r}")
    color = color + rng.normal(0, COLOUR_JITTER / 3) * WARM_AXIS + rng.uniform(-1, 1) * BRIGHTNESS_JITTER
    angle = np.deg2rad(orientation + rng.uniform(-ORIENTATION_SPREAD, ORIENTATION_SPREAD))
    wavelength, amplitude, phase = rng.uniform(8, 16), rng.uniform(*GRATING_AMPLITUDE), rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:height, 0:width]
    grating = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / wavelength + phase)
    image = color + amplitude * grating[..., None]  # luminance only: every channel gets the same
    image += rng.normal(0.0, PIXEL_NOISE, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_demo_dataset(root: str | Path, images_per_class: int = 600, seed: int = 0) -> Path:
    """Write ``root/train/cat.N.jpg`` and ``root/train/dog.N.jpg``; the same seed gives the same bytes.

    The images are written into a temporary folder of this call's own next to ``root`` and moved into
    place at the end, so an interrupted run never leaves a half-written dataset behind. Processes
    that generate it at once (sharded sweep agents on a fresh data folder) each write their own; the
    first rename wins and the others, finding a complete ``root/train``, use it (same seed, same bytes).
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
        try:
            os.replace(tmp, root)
        except OSError as error:  # root is there and not empty: another process's rename came first
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (root / "train").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
