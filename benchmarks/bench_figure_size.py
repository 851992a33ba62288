"""How the figure reader's score error grows as the cells shrink: the table behind
``towers.figure_reader.MIN_PX_PER_KERNEL_PX`` (BENCHMARKS.md, "Reading figures: size").

    python benchmarks/bench_figure_size.py            # synthetic figures (known kernels) and the paper's Figure 3
    python benchmarks/bench_figure_size.py paper      # the paper's Figure 3 only

1. A paper-style figure of known kernels (tests/figure_layouts.paper: 6 x 16 cells, one global scale, dark
   2-px lines; the kernels of tests/test_figure_reader.spread_towers, fine tinted Gabors and opponent gratings,
   the hard case for colour), resized (bicubic) from 1x down to 0.25x, saved as PNG and as JPEG quality 75,
   read with the size rule off: the largest error of any kernel's score against the kernels' own scores.
2. The paper's Figure 3 (``../shared/reference``), resized the same way: there is no truth, so the error is
   against the full-size read; kernels whose class (grey/colour/weak) changes are counted.
Then the same pictures read as a user would (size rule on): read or refused.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import figure_layouts as layouts  # noqa: E402
from tests.test_figure_reader import spread_towers  # noqa: E402
from towers.color import color_specificity  # noqa: E402
from towers.figure_reader import FigureError, read_figure  # noqa: E402
from towers.verdict import verdict  # noqa: E402

SCALES = (1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.33, 0.3, 0.25)
FIGURE = next(  # the project's shared folder beside the checkout, or beside the folder of worktrees
    (p for p in (d / "shared/reference/krizhevsky2012-figure3.png" for d in ROOT.parents[:2]) if p.is_file()),
    ROOT.parent / "shared/reference/krizhevsky2012-figure3.png",
)


def read(picture: np.ndarray, chroma, refuse: bool):
    try:
        return read_figure(picture, towers=2, chroma=chroma, refuse_small=refuse)
    except FigureError as e:
        return str(e)


def row(scale, picture, fmt, truth, classes=None):
    small = Image.fromarray(picture)
    if scale != 1:
        small = small.resize((round(small.width * scale), round(small.height * scale)), Image.BICUBIC)
    saved = layouts.saved(np.asarray(small), fmt)
    chroma = (2, 2) if fmt == "JPEG" else None
    measured, used = read(saved, chroma, refuse=False), read(saved, chroma, refuse=True)
    if isinstance(measured, str):
        return f"| {scale:g} | – | – | – | not read: {measured[:70]} |"
    cell = measured.info()["cell_px"]
    if measured.kernels.shape != truth.shape:
        error, flips = "misread grid", ""
    else:
        error = f"{np.abs(color_specificity(measured.kernels).numpy() - color_specificity(truth).numpy()).max():.3f}"
        got = np.array(verdict(measured.kernels, permutations=999, sensitivity=False).kernel_class)
        flips = "" if classes is None else f" ({(got != classes).sum()} kernel(s) change class)"
    outcome = "read" if not isinstance(used, str) else "refused: " + used.split(":")[0][:60]
    return f"| {scale:g} | {min(cell):g} | {min(cell) / 11:.1f} | {error}{flips} | {outcome} |"


def main():
    head = "| scale | cell px | px per kernel px | largest score error | as a user reads it |\n|---|---|---|---|---|"
    kernels = spread_towers()
    for fmt, zoom in () if sys.argv[1:] == ["paper"] else (("PNG", 5), ("JPEG", 9)):
        print(f"\nsynthetic paper-style figure (kernel pixels of {zoom} px at 1x), {fmt}\n{head}")
        picture = layouts.paper(kernels, zoom=zoom)
        for scale in SCALES:
            print(row(scale, picture, fmt, kernels))
    if FIGURE.is_file():
        picture = np.asarray(Image.open(FIGURE).convert("RGB"))
        full = read_figure(picture / 255, towers=2)
        classes = np.array(verdict(full.kernels, permutations=999, sensitivity=False).kernel_class)
        print(f"\nthe paper's Figure 3 ({FIGURE.name}), PNG, error against its full-size read\n{head}")
        for scale in SCALES[1:]:
            print(row(scale, picture, "PNG", full.kernels, classes))


if __name__ == "__main__":
    main()
