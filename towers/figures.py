"""Pictures of first-layer kernels and their colour scores: the Figure-3 style grid, the score strip
plot, and PNG files of them. Pure functions (torch, NumPy, Pillow, matplotlib's object API; no
Lightning, no pyplot state): the callback draws with them during training, ``analysis/`` afterwards.
"""

import functools
import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from towers.color import RANDOM_KERNEL_SCORE, Bisection
from towers.files import write_atomic
from towers.verdict import format_p

LABEL_FONT_PX = 14  # tower labels: 14 px is 10.5 pt at 96 dpi, 8.4 pt even read at 120 dpi
WEAK_FRAME = (220, 30, 30)  # the frame around a weak kernel (towers.verdict: too small to judge)


FRAMED_CLASSES = ("weak", "unstructured")  # the verdict's kernel classes that are neither grey nor colour


def framed_kernels(kernel_class, shape) -> np.ndarray | None:
    """(T, n) bool: the kernels the verdict does not judge (weak, unstructured), to be framed in the grid;
    None without classes."""
    if not kernel_class:
        return None
    return np.isin(np.asarray(kernel_class), FRAMED_CLASSES).reshape(tuple(shape))


def kernel_grid(
    kernels,
    global_scale: bool = False,
    order=None,
    columns: int = 16,
    zoom: int = 4,
    pad: int = 2,
    gap: int = 12,
    labels: bool = True,
    weak=None,
) -> np.ndarray:
    """Figure-3 style picture of first-layer kernels, (H, W, 3) uint8, RGB.

    One block of ``ceil(n / columns)`` rows per tower, tower 1 on top, blocks separated by ``gap``
    white rows; kernels ``zoom`` times enlarged, ``pad`` white pixels around each.
    H = pad + T * rows * (h * zoom + pad) + (T - 1) * gap, W = L + pad + columns * (w * zoom + pad)
    (columns = min(columns, n); L = :func:`label_width` with ``labels``, else 0: a left margin that
    names every block "tower k").

    Args:
        kernels: (T, n, 3, h, w), RGB.
        global_scale: one min/max for all kernels (shows which kernels are strong); default: every
            kernel stretched to its own min/max (shows the pattern of weak kernels too). Either way
            the three channels of a kernel share one scale, so grey stays grey.
        order: (T, n) indices: the order of the kernels within each tower (e.g. sorted by score).
        labels: the "tower k" margin on the left.
        weak: (T, n) bool, in the input order: kernels framed in red (the verdict's weak and
            unstructured kernels, :func:`framed_kernels`, which would otherwise look like any other).
    """
    k = torch.as_tensor(np.asarray(kernels) if not isinstance(kernels, torch.Tensor) else kernels)
    k = k.detach().to("cpu", torch.float64)
    if k.dim() != 5 or k.shape[2] != 3:
        raise ValueError(f"expected kernels (towers, n, 3, h, w), got {tuple(k.shape)}")
    t, n, _, h, w = k.shape
    weak = None if weak is None else torch.as_tensor(np.asarray(weak, dtype=bool)).view(t, n)
    if order is not None:
        order = torch.as_tensor(order).view(t, n)
        k = torch.take_along_dim(k, order.view(t, n, 1, 1, 1), dim=1)
        weak = None if weak is None else torch.take_along_dim(weak, order, dim=1)
    flat = k.flatten(2)
    lo, hi = (flat.min(), flat.max()) if global_scale else (flat.amin(2, True), flat.amax(2, True))
    scaled = torch.where(hi > lo, (flat - lo) / (hi - lo).clamp_min(1e-300), torch.full_like(flat, 0.5))
    img = (scaled * 255).round().to(torch.uint8).view(t, n, 3, h, w)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    img = torch.cat([img, torch.full((t, rows * cols - n, 3, h, w), 255, dtype=torch.uint8)], 1)
    img = img.repeat_interleave(zoom, 3).repeat_interleave(zoom, 4)
    img = F.pad(img, (0, pad, 0, pad), value=255)  # right and bottom border of every cell
    ch, cw = h * zoom + pad, w * zoom + pad
    img = img.view(t, rows, cols, 3, ch, cw).permute(0, 1, 4, 2, 5, 3).reshape(t, rows * ch, cols * cw, 3)
    img = F.pad(img, (0, 0, 0, 0, 0, gap), value=255).flatten(0, 1)  # a gap under every tower block ...
    img = img[: img.shape[0] - gap]  # ... but the last
    margin = label_width(t) if labels else 0
    img = F.pad(img, (0, 0, pad + margin, 0, pad, 0), value=255)  # left (labels) and top border
    if not labels and (weak is None or not bool(weak.any())):
        return img.numpy()
    from PIL import Image, ImageDraw

    picture = Image.fromarray(img.numpy())
    draw = ImageDraw.Draw(picture)
    block = rows * ch + gap
    if labels:
        font = _label_font()
        for tower in range(t):  # T text labels: drawing, not a hot path
            draw.text(
                (2, pad + tower * block + min(rows * ch, ch) // 2),
                f"tower {tower + 1}",
                fill=(0, 0, 0),
                font=font,
                anchor="lm",
            )
    if weak is not None:
        for tower, i in weak.nonzero().tolist():  # a frame in the white border around each weak cell
            r, c = divmod(i, cols)
            y, x = pad + tower * block + r * ch, margin + pad + c * cw
            draw.rectangle(
                (x - pad, y - pad, x + w * zoom + pad - 1, y + h * zoom + pad - 1),
                outline=WEAK_FRAME,
                width=max(1, pad),
            )
    return np.asarray(picture).copy()


def label_width(num_towers: int) -> int:
    """Width of kernel_grid's label margin: "tower N" in LABEL_FONT_PX type, plus a little air."""
    return int(_label_font().getlength(f"tower {num_towers}")) + 8


@functools.cache
def _label_font():
    from PIL import ImageFont

    return ImageFont.load_default(LABEL_FONT_PX)  # Pillow's own TrueType font: no system fonts needed


SCORE_PLOT_FONT_PT = 9  # the smallest text on the score plot, at the saved size (100 dpi)


def score_figure(scores, towers, stats: Bisection | None = None, init_scores=None, title: str = ""):
    """The matplotlib Figure behind :func:`score_plot` (no pyplot state). Every text is at least
    SCORE_PLOT_FONT_PT; the legend sits under the axes and their tick labels, off the data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = np.asarray(scores, dtype=float)
    if stats is not None and stats.control:  # one tower: show the random halves the control compares
        idx = np.ones(len(s), dtype=np.int64)
        idx[np.asarray(stats.control_split or [], dtype=np.int64)] = 0
        ticks = [f"tower {np.asarray(towers).flat[0]}\n{half}" for half in stats.groups]
    else:
        names, idx = np.unique(np.asarray(towers), return_inverse=True)
        ticks = [f"tower {n}" for n in names]
    rank = np.arange(len(s)) - np.searchsorted(np.sort(idx), idx)  # position of a kernel in its group
    jitter = ((rank * 0.618034) % 1 - 0.5) * 0.4  # deterministic, evenly spread
    width, height = max(4.8, 2.4 + 1.1 * len(ticks)), 4.8
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    title_lines = 1 + (stats is not None) + (stats is not None and len(stats.groups) > 2)
    # fixed margins in inches: tight_layout would cost more than all the rest of the plot. Bottom:
    # two lines of tick labels, then two rows of legend; top: the title's lines.
    fig.subplots_adjust(
        left=0.85 / width, right=1 - 0.15 / width, bottom=1.25 / height, top=1 - (0.12 + 0.2 * title_lines) / height
    )
    ax = fig.add_subplot()
    ax.axhline(RANDOM_KERNEL_SCORE, color="0.6", ls="--", lw=1, label="random kernels (2/3)")
    if init_scores is not None:
        ax.scatter(
            idx + 0.38 + jitter * 0.25,
            np.asarray(init_scores, dtype=float),
            s=8,
            color="0.7",
            label="at initialisation",
        )
    ax.scatter(idx + jitter, s, s=14, c=s, cmap="viridis", vmin=0, vmax=1, edgecolors="none")
    if stats is not None:
        med, lo, hi = map(np.asarray, (stats.median, stats.ci_low, stats.ci_high))
        x = np.arange(len(ticks))
        ax.hlines(med, x - 0.28, x + 0.28, color="k", lw=2, label="median")
        ax.errorbar(
            x + 0.28,
            med,
            yerr=[med - lo, hi - med],
            fmt="none",
            ecolor="k",
            elinewidth=2,
            capsize=4,
            label=f"{stats.ci_level:.0%} bootstrap interval",
        )
    ax.set_xticks(np.arange(len(ticks)), ticks)
    ax.tick_params(labelsize=SCORE_PLOT_FONT_PT)
    ax.set_xlim(-0.6, len(ticks) - 0.3)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("colour score (chromatic energy fraction)", fontsize=SCORE_PLOT_FONT_PT)
    if stats is not None:
        title += (
            f"\n{'control (halves): ' if stats.control else ''}η² = {stats.eta2:.3f} "
            f"(chance {stats.eta2_null:.3f}), p {format_p(stats.p_value, stats.permutations)}"
        )
        if len(stats.groups) > 2:
            title += (
                f"\nbest split: towers {', '.join(map(str, stats.color_side))} vs rest, "
                f"η² = {stats.eta2_split:.3f}, p {format_p(stats.p_value_split, stats.permutations)}"
            )
    ax.set_title(title, fontsize=SCORE_PLOT_FONT_PT)
    fig.legend(fontsize=SCORE_PLOT_FONT_PT, loc="lower center", bbox_to_anchor=(0.5, 0.01), ncol=2, frameon=False)
    return fig


def score_plot(scores, towers, stats: Bisection | None = None, init_scores=None, title: str = "") -> np.ndarray:
    """Strip plot of the scores per tower, (H, W, 3) uint8: trained kernels (dots), their median
    with its bootstrap interval, the kernels at initialisation (grey), and the random-kernel level 2/3."""
    fig = score_figure(scores, towers, stats, init_scores, title)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# ----------------------------------------------------------------------------- files


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)  # fast; kernels hardly compress anyway
    return buffer.getvalue()


def write_png(path: Path, image: np.ndarray | bytes) -> None:
    data = image if isinstance(image, bytes) else png_bytes(image)
    write_atomic(path, data)
