"""First-layer kernels read back from a picture of a kernel grid: a published figure or a run's ``kernels.png``.

Pure NumPy and Pillow (no Lightning), so a figure is judged by the same :mod:`towers.verdict` as a checkpoint:

    read = read_figure("figure3.png", towers=2)        # or grid=(8, 12) when the lines cannot be found, order="kernels"
    read.kernels                                       # (towers, kernels per tower, 3, 11, 11), RGB
    read.info()                                        # how it was read (grid, cell size, offset), JSON-able

What a grid picture is taken to be: cells of one size on a rectangular grid, separated by lines of one
colour (dark lines, white padding, a wider gap between tower blocks), possibly inside a larger picture
(a page, a slide: :func:`find_grid` finds the grid and the notes say what was cropped). Blank cells
(separator colour, no content: ``kernel_grid`` fills a tower's last row with them, ``vis_square`` the end of
its square) are dropped. The towers get the cells by rows (each tower an equal block of rows, top to
bottom: the paper's Figure 3) or in kernel order (the non-blank cells left to right, top to bottom, in equal
runs: Caffe's ``vis_square``); ``order`` chooses, and without it the only reading that gives equal towers is
used and stated (:func:`_choose_order`). Cells smaller than :func:`minimum_cell` are refused with the size
needed: below it the scores are no longer read within 0.05 (BENCHMARKS.md, "Reading figures: size").

1. **Cells.** The picture's uniform outer margin is trimmed. The separator colour is the median level
   of the interior rows and columns that are uniform (low luminance spread; if none is, the 3% least
   varied: blurred lines); a row (column) is a separator when its mean distance from that level is
   under half the median row's (column's): content differs from the separator colour wherever it is.
   The runs between separators are the cell rows (columns); slivers are dropped, a run about k cells
   long (a line lost to blur or JPEG) is split in k. Pixels at a cell's edge that a blurred line has
   dimmed take the value of their nearest clean neighbour (a dark frame would be grey energy).
   With ``grid`` given, these runs are used when there are as many as asked for; otherwise the whole
   picture (crop it to the grid) is cut into that many equal cells. A grid whose cells differ in size
   by more than a third is refused (give ``grid``, or crop).
2. **Resampling.** Every cell is averaged onto the kernel's ``size`` x ``size`` pixels by exact area
   weights (any cell size; a cell smaller than the kernel is repeated, not invented, and noted).
3. **The display offset.** A display maps a weight w to a pixel a*w + b with an unknown scale a and grey
   offset b (the three channels share one scale, or grey kernels would not look grey). The colour score
   is the chromatic fraction of the energy: the chromatic part of a*w + b is a times that of w whatever b
   is, but the grey part, and so the energy the score divides by, is not. So b must be removed, and
   which b depends on the display, which the picture shows:
   - *per-kernel stretch* (every kernel spans the full range; ``kernel_grid``'s default, many
     visualisations): every kernel has its own b, and nothing but the kernel says what it is. Its mean
     grey level is removed: the minimum-energy choice, exact for kernels without a grey mean (Gabors,
     opponent gratings); a kernel that has one (a coloured blob brighter than its surround) then reads
     slightly more colour-specific (+0.04 at most on ``tests/fixtures/kernels.py``). Kernel norms mean
     nothing after such a stretch, so no kernel can be told weak.
   - *one global scale* (the paper's Figure 3, cuda-convnet's shownet, Caffe's ``vis_square``): one b
     for all. It is the median grey level over all kernels' pixels: trained first-layer kernels are
     localised on a zero background and about as often negative as positive, so the typical pixel is
     weight 0; this keeps every kernel's own grey mean, which is part of its score, and kernel norms
     stay comparable (the weak-kernel rule applies).
   ``offset="auto"`` chooses per kernel when at least 90% of the cells reach within 15% of both ends
   of the picture's range, global otherwise; ``"kernel"`` or ``"global"`` forces one.
   A display gamma is not undone: it maps grey to grey, so it changes scores but not which kernels are
   grey.
4. **JPEG.** A JPEG keeps chroma at a lower resolution than luma (4:2:0: half each way) and quantises it
   more coarsely, so fine colour detail loses chroma energy but keeps its luma and reads less colourful.
   The luma is brought down to the chroma's resolution (:func:`match_chroma_resolution`; the file's own
   subsampling, or ``chroma`` for a picture that was a JPEG once). What quantisation took is gone:
   on quality 75, scores of fine colour detail read low by up to 0.05 at 5 picture pixels per kernel
   pixel, more at fewer; the chroma noise keeps grey kernels far under the colour cut
   (``tests/test_figure_reader.py``).
"""

from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
OFFSET_MODES = ("auto", "kernel", "global")
ORDERS = ("rows", "kernels")

# Detection constants, mostly in units of the picture's own spread (none fitted to any one figure):
UNIFORM = 0.3  # a row is uniform when its luminance spread is under this fraction of the median row's
FLAT = 0.03  # ... and the margin trimmed off is flat in absolute terms too (8 of 255 levels: JPEG noise, no kernel)
SEPARATOR = 0.5  # a row is a separator when its distance from the separators' level is under this share of the
# median row's
EDGE = 0.9  # a cell's edge row is dimmed by a blurred line when its distance from the line's level is under this
# share of the cell middle's
SLIVER = 0.4  # a run shorter than this fraction of the median cell is no cell
IRREGULAR = 4 / 3  # cells may differ in size by this factor at most
STRETCH_REACH, STRETCH_SHARE = 0.15, 0.9  # per-kernel stretch: this share of the cells reaches within this of both ends
BLANK_RANGE, BLANK_LEVEL = 0.03, 0.1  # a blank cell: flat, at the separator colour
MAX_PICTURE_PIXELS = 30_000_000  # read as float64 RGB: 720 MB; a figure, even a page at 600 dpi, is smaller
PAGE_CONTRAST = 0.12  # content differs from the page colour by more than this (30 of 255 levels; JPEG noise is under)
GRID_SHARE = 0.5  # one connected piece covering this share of all content's box is the grid (lines join it)
PAGE_MARGIN = 4  # a page has a margin of at least this many pixels on some side; a frame line is thinner
# Picture pixels per kernel pixel below which a cell is refused (measured with tests/figure_layouts.py's
# paper-style figure from 1x down to 0.25x, BENCHMARKS.md "Reading figures: size"): with full colour resolution
# the error stays within 0.036 down to 13-px cells; 2 px a kernel pixel keeps a blurred 1-2 px separating line
# off all but a kernel's edge pixels. A JPEG's 4:2:0 colour (one chroma sample per 2x2 pixels, quantised in
# 16x16 blocks at quality 75) takes fine colour detail away: at 5-6 px a kernel pixel the error reached
# 0.048-0.058, at 7 and more it stayed at or under 0.046.
MIN_PX_PER_KERNEL_PX = {"full": 2.0, "subsampled": 7.0}


class FigureError(ValueError):
    """The picture cannot be read as a kernel grid (the message says what to give or do)."""


@dataclass(frozen=True)
class FigureKernels:
    kernels: np.ndarray  # (towers, n, 3, size, size), float64, display offset removed; units of the full pixel range
    rows: list  # [(start, stop)] pixel rows of every cell row, in the picture
    cols: list  # [(start, stop)] pixel columns of every cell column
    separator_level: float  # luminance of the separating lines in [0, 1] (of the least varied rows if there are none)
    row_blocks: list  # cell rows per block of rows, blocks split by a wider gap ([rows] when there is none)
    blank: int  # blank cells dropped
    offset: str  # "kernel" or "global": the offset that was removed
    offset_value: float | None  # the global offset (luminance in [0, 1]); None per kernel
    chroma: tuple  # the JPEG chroma subsampling (h, v) the luma was matched to; (1, 1): none
    order: str = "rows"  # how the cells went to the towers: "rows" (blocks of rows) or "kernels" (reading order)
    notes: list = field(default_factory=list)  # what a reader should know (small cells, blocks not matching the towers)

    def info(self) -> dict:
        h = [b - a for a, b in self.rows]
        w = [b - a for a, b in self.cols]
        return {
            "grid": [len(self.rows), len(self.cols)],
            "cell_px": [float(np.median(h)), float(np.median(w))],
            "kernel_size": list(self.kernels.shape[3:]),
            "separator_level": self.separator_level,
            "row_blocks": self.row_blocks,
            "blank_cells": self.blank,
            "offset": self.offset,
            "offset_value": self.offset_value,
            "chroma_subsampling": list(self.chroma),
            "order": self.order,
            "notes": list(self.notes),
        }


def load_image(path) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) float64 in [0, 1], RGB (transparency laid on white), and the JPEG's chroma subsampling
    (horizontal, vertical): (2, 2) for 4:2:0, (1, 1) for no subsampling or not a JPEG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # reads the header only
            if im.width * im.height > MAX_PICTURE_PIXELS:
                raise FigureError(
                    f"{path}: {im.width}x{im.height} pixels, more than the {MAX_PICTURE_PIXELS // 10**6} million this "
                    f"reads (a decompression bomb, or a page scanned very finely): crop it to the figure or scale it down"
                )
            im.load()
            chroma = (1, 1)
            layers = getattr(im, "layer", None)  # JPEG: (component id, h, v, table) per component
            if im.format == "JPEG" and layers and len(layers) == 3:
                chroma = (layers[0][1] // layers[1][1], layers[0][2] // layers[1][2])
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(canvas, rgba)
            return np.asarray(im.convert("RGB"), dtype=np.float64) / 255, chroma
    except Image.DecompressionBombError as e:  # past twice Pillow's own limit: refused while opening
        raise FigureError(f"{path}: {e}; crop it to the figure or scale it down") from None
    except (UnidentifiedImageError, OSError) as e:
        raise FigureError(f"{path}: cannot be read as a picture ({e})") from None


def _upsample(x: np.ndarray, factor: int, axis: int, length: int) -> np.ndarray:
    """Centre-aligned linear interpolation by ``factor`` along ``axis``, cut to ``length`` (libjpeg's
    "fancy" upsampling of chroma is this triangle filter)."""
    position = np.clip((np.arange(length) + 0.5) / factor - 0.5, 0, x.shape[axis] - 1)
    lo = np.floor(position).astype(int)
    hi = np.minimum(lo + 1, x.shape[axis] - 1)
    t = position - lo
    shape = [1, 1]
    shape[axis] = length
    return np.take(x, lo, axis) * (1 - t).reshape(shape) + np.take(x, hi, axis) * t.reshape(shape)


def match_chroma_resolution(image: np.ndarray, chroma: tuple[int, int]) -> np.ndarray:
    """The picture with its luma (JPEG's Y) brought down to the resolution of its chroma.

    A JPEG keeps chroma at (1/h, 1/v) of the luma's resolution (4:2:0: half each way). Fine colour
    detail (an opponent-colour grating drawn at a few pixels per kernel pixel) then loses chroma energy
    but keeps its luma, and reads less colour-specific than it is (by 0.1 for 3-pixel kernel pixels).
    Averaging the luma over the same blocks and upsampling it the way the decoder upsamples chroma gives
    every channel one resolution: a kernel g(p) * c then keeps its score exactly, only slightly blurred."""
    h, v = chroma
    if (h, v) == (1, 1):
        return image
    luma = image @ np.array([0.299, 0.587, 0.114])  # JPEG's Y; its column in the inverse transform is (1, 1, 1)
    rows, cols = luma.shape
    padded = np.pad(luma, ((0, -rows % v), (0, -cols % h)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // v, v, padded.shape[1] // h, h).mean((1, 3))
    low = _upsample(_upsample(blocks, v, 0, rows), h, 1, cols)
    return image + (low - luma)[..., None]


def parse_grid(text: str) -> tuple[int, int]:
    """``"8x12"`` -> (8, 12) (a grid's rows and columns, or a JPEG's chroma subsampling)."""
    try:
        rows, cols = (int(x) for x in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise FigureError(f"{text!r}: expected two counts such as 8x12") from None
    if rows < 1 or cols < 1:
        raise FigureError(f"{text!r}: both counts must be positive")
    return rows, cols


# ----------------------------------------------------------------------------- the grid


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop)] of the runs of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _trim(lum: np.ndarray) -> tuple[slice, slice]:
    """The box inside the picture's uniform outer margin (rows or columns of one level, any level)."""

    def inner(spread):
        busy = np.flatnonzero(spread >= min(UNIFORM * np.median(spread), FLAT))
        if busy.size == 0:
            raise FigureError("the picture is uniform: no kernels in it")
        return slice(int(busy[0]), int(busy[-1]) + 1)

    return inner(lum.std(1)), inner(lum.std(0))


def _separator_level(lum: np.ndarray) -> float:
    """Median level of the uniform interior rows and columns; when none is uniform (thin lines blurred by
    resizing), of the 3% least varied ones, which are the lines' centres if there are lines."""
    spreads = np.concatenate([lum.std(1), lum.std(0)])
    levels = np.concatenate([lum.mean(1), lum.mean(0)])
    uniform = spreads < UNIFORM * np.median(spreads)
    if not uniform.any():
        uniform = spreads <= np.quantile(spreads, 0.03)
    # Rows along the cells' edges can be as uniform as the lines: the kernels' zero background. The lines
    # are the candidates farthest from the picture's typical level (that background), dark or light.
    away = np.abs(levels - np.median(lum))
    far = uniform & (away >= 0.5 * away[uniform].max())
    return float(np.median(levels[far]))


def _split(band: tuple[int, int], parts: int) -> list[tuple[int, int]]:
    a, b = band
    edges = np.round(a + (b - a) * np.arange(parts + 1) / parts).astype(int)
    return [(int(x), int(y)) for x, y in pairwise(edges)]


def _fit(bands: list) -> list:
    """Cell runs from content runs: slivers dropped, a run about k cells long split in k."""
    if not bands:
        return bands
    length = np.array([b - a for a, b in bands], dtype=float)
    bands = [b for b, n in zip(bands, length) if n >= SLIVER * np.median(length)]
    length = np.array([b - a for a, b in bands], dtype=float)
    gaps = np.array([c - b for (_, b), (c, _) in pairwise(bands)], dtype=float)
    cell, line = np.median(length), (np.median(gaps) if gaps.size else 0.0)
    parts = np.maximum(1, np.round((length + line) / (cell + line))).astype(int)
    return [cell for band, k in zip(bands, parts) for cell in _split(band, int(k))]


def _cells_on_axis(lum: np.ndarray, level: float, count: int | None, axis: int, name: str):
    """Cell runs along one axis of the trimmed luminance (axis 0: rows), and their cores: the runs less
    the edge pixels a blurred line has dimmed or brightened (closer to the line's level than the cell's
    middle half is, by EDGE; at most a sixth of the cell from each side)."""
    distance = np.abs(lum - level).mean(1 - axis)
    cells = _fit(_runs(distance >= SEPARATOR * np.median(distance)))
    if count is not None and len(cells) != count:  # the lines do not give the grid asked for: equal cells
        return None, None  # of the whole picture (read_figure), margins included
    sizes = np.array([b - a for a, b in cells])
    if len(cells) < 2 and count is None:
        raise FigureError(f"found no separating lines between the cell {name}; give --grid ROWSxCOLS")
    if sizes.max() > IRREGULAR * sizes.min() + 1:
        raise FigureError(
            f"the cell {name} found are of irregular size ({sizes.min()} to {sizes.max()} px): "
            f"crop the picture to the kernel grid, or give --grid ROWSxCOLS"
        )
    cores = []
    for a, b in cells:  # a few dozen cells
        d = distance[a:b]
        n = len(d)
        middle = np.median(d[n // 4 : n - n // 4]) if n >= 4 else 0.0
        clean = d >= EDGE * middle
        cap = n // 6
        start = min(int(np.argmax(clean)) if clean.any() else 0, cap)
        stop = min(int(np.argmax(clean[::-1])) if clean.any() else 0, cap)
        cores.append((a + start, b - stop))
    return cells, cores


def _nearest(bands: list, extent: int) -> np.ndarray:
    """(extent,) index of the nearest pixel inside a cell, for every pixel along one axis."""
    inside = np.concatenate([np.arange(a, b) for a, b in bands])
    at = np.clip(np.searchsorted(inside, np.arange(extent)), 1, len(inside) - 1) if len(inside) > 1 else 0
    left, right = inside[np.maximum(at - 1, 0)], inside[at]
    x = np.arange(extent)
    return np.where(x - left <= right - x, left, right)


def _blocks(rows: list) -> list[int]:
    """Cell rows per block, blocks split by a gap clearly wider than the usual line."""
    gaps = np.array([c - b for (_, b), (c, _) in pairwise(rows)])
    if gaps.size == 0:
        return [len(rows)]
    wide = np.flatnonzero(gaps > max(2 * np.median(gaps), np.median(gaps) + 3))
    edges = np.concatenate([[0], wide + 1, [len(rows)]])
    return np.diff(edges).tolist()


# ----------------------------------------------------------------------------- cells to kernels


def _area_weights(bands: list, size: int, extent: int) -> np.ndarray:
    """(bands, size, extent): row i of band j averages the picture pixels under the i-th of ``size``
    equal parts of the band, each pixel weighted by its overlap."""
    a = np.array([b[0] for b in bands], dtype=float)[:, None]
    b = np.array([b[1] for b in bands], dtype=float)[:, None]
    edges = a + (b - a) * np.arange(size + 1) / size  # (bands, size + 1)
    x = np.arange(extent, dtype=float)
    lo = np.maximum(x, edges[:, :-1, None])
    hi = np.minimum(x + 1, edges[:, 1:, None])
    return np.clip(hi - lo, 0, None) / (edges[:, 1:, None] - edges[:, :-1, None])


def resample(image: np.ndarray, rows: list, cols: list, size: int) -> np.ndarray:
    """(rows, cols, 3, size, size): every cell averaged onto size x size pixels."""
    wr = _area_weights(rows, size, image.shape[0])
    wc = _area_weights(cols, size, image.shape[1])
    by_rows = np.tensordot(wr, image, axes=(2, 0))  # (rows, size, W, 3); tensordot: BLAS, not einsum's loops
    by_both = np.tensordot(by_rows, wc, axes=(2, 2))  # (rows, size, 3, cols, size)
    return by_both.transpose(0, 3, 2, 1, 4)


def per_kernel_stretch(cells: np.ndarray) -> bool:
    """Whether (nearly) every cell reaches both ends of the picture's range (a per-kernel min/max display)."""
    flat = cells.reshape(len(cells), -1)
    lo, hi = flat.min(1), flat.max(1)
    reach = STRETCH_REACH * (hi.max() - lo.min())
    return bool(np.mean((lo <= lo.min() + reach) & (hi >= hi.max() - reach)) >= STRETCH_SHARE)


def remove_offset(cells: np.ndarray, offset: str = "auto") -> tuple[np.ndarray, str, float | None]:
    """(K, 3, h, w) pixels -> kernels without the display's grey offset; the mode used and the global
    offset (None per kernel). See the module docstring for the choice."""
    if offset not in OFFSET_MODES:
        raise FigureError(f"offset {offset!r}: expected one of {', '.join(OFFSET_MODES)}")
    if offset == "auto":
        offset = "kernel" if per_kernel_stretch(cells) else "global"
    if offset == "kernel":
        return cells - cells.mean((1, 2, 3), keepdims=True), offset, None
    level = float(np.median(cells.mean(1)))  # grey level of every pixel (its luminance projection), median
    return cells - level, offset, level


def find_grid(image: np.ndarray) -> tuple[tuple[slice, slice], str | None]:
    """The box of the kernel grid inside a larger picture (a page, a slide, a plot with a title), and a
    note saying what was cropped away (None when nothing but an empty margin was).

    The page is the colour of the picture's border; everything else that differs from it by more than
    PAGE_CONTRAST is content, in connected pieces. A grid drawn with separating lines (the paper's, shownet's)
    is one piece, larger than any text: when one piece covers GRID_SHARE of the content's box, or more than
    all other pieces together (a slide with a logo, a page of text), it is the grid. A grid whose cells are
    separated by the page colour (Caffe's ``vis_square``, matplotlib subplots, ``kernel_grid``) is many
    pieces of about one size: the grid is the box around the pieces of at least a quarter of a cell's area
    (text glyphs and labels are smaller). A picture whose border is not one colour, or whose border colour
    is only a frame line (under PAGE_MARGIN pixels on every side), is no page: nothing is cropped."""
    from scipy import ndimage

    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    page = np.median(border, 0)
    content = np.abs(image - page).max(2) > PAGE_CONTRAST
    whole_picture = (slice(0, image.shape[0]), slice(0, image.shape[1])), None
    if np.mean(np.abs(border - page).max(1) > PAGE_CONTRAST) > 0.1:  # no page around it: the grid fills the picture
        return whole_picture
    rows, cols = content.any(1), content.any(0)
    margins = [np.argmax(rows), np.argmax(cols), np.argmax(rows[::-1]), np.argmax(cols[::-1])]
    if max(margins) < PAGE_MARGIN:  # a frame line around the grid (the paper's), not a page
        return whole_picture
    if not content.any():
        raise FigureError("the picture is uniform: no kernels in it")
    labels, count = ndimage.label(content, structure=np.ones((3, 3)))
    boxes = np.array([[s[0].start, s[0].stop, s[1].start, s[1].stop] for s in ndimage.find_objects(labels)])
    h, w = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    area = h * w
    whole = [boxes[:, 0].min(), boxes[:, 1].max(), boxes[:, 2].min(), boxes[:, 3].max()]
    largest = int(np.argmax(area))
    if area[largest] >= min(GRID_SHARE * (whole[1] - whole[0]) * (whole[3] - whole[2]), area.sum() - area[largest]):
        chosen = boxes[largest : largest + 1]
    else:
        cell = np.median(area[area >= 0.25 * area.max()])  # a cell, or a few cells joined by a blurred line
        chosen = boxes[area >= 0.25 * cell]
    y0, y1, x0, x1 = chosen[:, 0].min(), chosen[:, 1].max(), chosen[:, 2].min(), chosen[:, 3].max()
    outside = content.copy()
    outside[y0:y1, x0:x1] = False
    note = None
    if outside.sum() > 0.001 * content.sum():
        note = (
            f"found the kernel grid at rows {y0}-{y1}, columns {x0}-{x1} of the {image.shape[0]}x{image.shape[1]} "
            f"picture and cropped the rest away ({100 * outside.sum() / content.sum():.0f}% of the non-background "
            f"pixels: text, labels, axes); crop by hand if that is not the grid"
        )
    return (slice(int(y0), int(y1)), slice(int(x0), int(x1))), note


def minimum_cell(size: int, chroma: tuple[int, int]) -> int:
    """The smallest cell (picture pixels a side) read within 0.05 of the kernels' scores: MIN_PX_PER_KERNEL_PX
    picture pixels per kernel pixel, more where the picture's colour was subsampled (a JPEG's 4:2:0)."""
    per_pixel = MIN_PX_PER_KERNEL_PX["subsampled" if tuple(chroma) != (1, 1) else "full"]
    return int(np.ceil(per_pixel * size))


def _tower_readings(blank: np.ndarray, towers: int) -> dict:
    """{order: (R, C) tower index of every cell, -1 for blank cells} for every order in which the cells can go
    to ``towers`` towers equally (at least 2 kernels each): "rows" (blocks of rows, top to bottom) and
    "kernels" (the non-blank cells in reading order, left to right, top to bottom, in equal runs)."""
    rows, cols = blank.shape
    readings = {}
    if rows % towers == 0:
        tower = np.repeat(np.arange(towers), rows // towers)[:, None].repeat(cols, 1)
        counts = np.bincount(tower[~blank], minlength=towers)
        if len(set(counts.tolist())) == 1 and counts[0] >= 2:
            readings["rows"] = np.where(blank, -1, tower)
    kept = int((~blank).sum())
    if kept % towers == 0 and kept // towers >= 2:
        tower = np.full(blank.shape, -1)
        tower[~blank] = np.arange(kept) // (kept // towers)
        readings["kernels"] = tower
    return readings


def _choose_order(readings: dict, order: str | None, blocks: list, rows: int, cols: int, kept: int, towers: int):
    """The order used and a note saying why (or a FigureError saying what to give)."""
    shape = f"{rows}x{cols} cells holding {kept} kernels"
    if order is not None:
        if order not in ORDERS:
            raise FigureError(f"order {order!r}: expected rows or kernels")
        if order not in readings:
            other = [o for o in readings if o != order]
            hint = f"; --order {other[0]} can" if other else "; check the grid found (--grid ROWSxCOLS) or crop"
            raise FigureError(f"found {shape}: they cannot go to {towers} towers equally by --order {order}{hint}")
        return order, f"towers by --order {order} (given)"
    if not readings:
        raise FigureError(
            f"found {shape}, which go to {towers} towers equally neither by rows nor in kernel order: if that "
            f"grid is wrong, give --grid ROWSxCOLS or crop the picture to the kernels"
        )
    if len(readings) == 2:
        if np.array_equal(readings["rows"], readings["kernels"]):
            return "rows", f"towers by rows = by kernel order ({shape}: both readings agree)"
        if len(blocks) == towers and len(set(blocks)) == 1:
            return (
                "rows",
                f"towers by rows: the picture's {towers} blocks of rows ({shape}); --order kernels reads otherwise",
            )
        raise FigureError(
            f"found {shape}: by rows and in kernel order they go to the towers differently; give --order rows "
            f"(each tower a block of rows, as in the paper) or --order kernels (kernels in reading order, as "
            f"Caffe's vis_square draws them)"
        )
    (only,) = readings
    other = "kernels" if only == "rows" else "rows"
    return only, f"towers by {only}: the only reading of {shape} ({other} would not give {towers} equal towers)"


def read_figure(
    picture,
    towers: int,
    grid: tuple[int, int] | None = None,
    size: int = 11,
    offset: str = "auto",
    chroma: tuple[int, int] | None = None,
    order: str | None = None,
    crop: bool = True,
    refuse_small: bool = True,
) -> FigureKernels:
    """Kernels (towers, n, 3, size, size) from a picture of a kernel grid (a path or an (H, W, 3) array
    in [0, 1]). ``order``: how cells go to the towers, "rows" (blocks of rows, top to bottom) or "kernels"
    (reading order); None: the only one possible, stated in ``notes``. ``chroma``: the chroma subsampling
    of the JPEG the picture was (h, v), e.g. (2, 2) for 4:2:0; None: read from the file (a JPEG's own), or
    (1, 1) for an array. ``crop``: find the grid inside a larger picture first (:func:`find_grid`).
    ``refuse_small``: refuse cells under :func:`minimum_cell` (False: read them, with a note; to measure).
    See the module docstring."""
    if isinstance(picture, (str, Path)):
        image, own = load_image(picture)
        chroma = chroma or own
    else:
        image = np.asarray(picture, dtype=np.float64)
    chroma = tuple(chroma or (1, 1))
    if image.ndim != 3 or image.shape[2] != 3:
        raise FigureError(f"expected an RGB picture, got an array of shape {image.shape}")
    if towers < 1 or size < 1:
        raise FigureError(f"towers ({towers}) and the kernel size ({size}) must be positive")
    notes = []
    if crop:
        box, note = find_grid(image)
        image = image[box]
        if note:
            notes.append(note)
    lum = image.mean(2)  # luminance: the projection on the grey axis (1, 1, 1)/sqrt(3), up to a factor
    box = _trim(lum)
    lum = lum[box]
    level = _separator_level(lum)
    rows, row_cores = _cells_on_axis(lum, level, grid and grid[0], 0, "rows")
    cols, col_cores = _cells_on_axis(lum, level, grid and grid[1], 1, "columns")
    if rows is None:
        rows = row_cores = _split((-box[0].start, image.shape[0] - box[0].start), grid[0])
    if cols is None:
        cols = col_cores = _split((-box[1].start, image.shape[1] - box[1].start), grid[1])
    blocks = _blocks(rows)
    cell_px = min(np.median([b - a for a, b in rows]), np.median([b - a for a, b in cols]))
    smallest = minimum_cell(size, chroma)
    if cell_px < smallest and not refuse_small:
        notes.append(f"cells of {cell_px:g} px are under the {smallest} px at which scores read within 0.05")
    elif cell_px < smallest:
        raise FigureError(
            f"the cells are {cell_px:g} px, smaller than the {smallest} px at which {size}x{size} kernels read "
            f"within 0.05 of their scores ({MIN_PX_PER_KERNEL_PX['subsampled' if chroma != (1, 1) else 'full']:g} "
            f"px a kernel pixel{', colour subsampled as in a JPEG' if chroma != (1, 1) else ''}): use a copy at "
            f"least {smallest / cell_px:.2f} times larger (from the PDF at a higher resolution"
            f"{', saved as PNG' if chroma != (1, 1) else ''})"
        )

    rows, row_cores, cols, col_cores = (
        [(a + box[i].start, b + box[i].start) for a, b in x]  # in the whole picture
        for i, x in ((0, rows), (0, row_cores), (1, cols), (1, col_cores))
    )
    # Every pixel outside a cell's core takes the value of the core's nearest pixel: a line blurred
    # into a cell's edge would add grey energy to the kernel (a dark frame), and the chroma
    # matching below would blur the lines further in.
    image = image[_nearest(row_cores, image.shape[0])][:, _nearest(col_cores, image.shape[1])]
    image = match_chroma_resolution(image, chroma)
    cells = resample(image, rows, cols, size)  # (R, C, 3, size, size)
    flat = cells.reshape(*cells.shape[:2], -1)
    blank = (np.ptp(flat, 2) < BLANK_RANGE) & (np.abs(flat.mean(2) - level) < BLANK_LEVEL)
    readings = _tower_readings(blank, towers)
    used, why = _choose_order(readings, order, blocks, len(rows), len(cols), int((~blank).sum()), towers)
    notes.append(why)
    tower = readings[used]
    if used == "rows" and len(blocks) > 1 and blocks != [len(rows) // towers] * towers:
        notes.append(
            f"the picture's blocks of rows ({'+'.join(map(str, blocks))}) do not match {towers} "
            f"towers; rows were given to the towers equally, top to bottom"
        )
    picked = cells[~blank]  # reading order
    kernels = picked[np.argsort(tower[~blank], kind="stable")]
    kernels, mode, value = remove_offset(kernels, offset)
    if mode == "kernel":
        notes.append(
            "offset removed per kernel (each kernel stretched to its own range): no kernel can be "
            "told weak, and a kernel's grey mean is lost"
        )
    return FigureKernels(
        kernels.reshape(towers, -1, 3, size, size),
        rows=rows,
        cols=cols,
        separator_level=level,
        row_blocks=blocks,
        blank=int(blank.sum()),
        offset=mode,
        offset_value=value,
        chroma=chroma,
        order=used,
        notes=notes,
    )
