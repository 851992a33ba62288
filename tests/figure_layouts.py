"""Kernel pictures drawn the way the tools people publish them with draw them, re-implemented from each
tool's documented behaviour (REFERENCES.md), for round trips through towers.figure_reader.

Every function takes kernels (towers, n, 3, h, w), RGB, and returns an (H, W, 3) uint8 picture."""

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def global_range(kernels) -> np.ndarray:
    """(K, h, w, 3) in [0, 1]: one min-max over all kernels (the paper, shownet, vis_square, save_W1)."""
    k = np.asarray(kernels, dtype=np.float64).reshape(-1, *np.shape(kernels)[2:]).transpose(0, 2, 3, 1)
    return (k - k.min()) / (k.max() - k.min())


def paper(kernels, columns: int = 16, zoom: int = 5, line: int = 2, line_level: int = 20) -> np.ndarray:
    """Figure 3: one global scale, kernels enlarged, dark separating lines and frame, tower after tower."""
    k = np.round(255 * global_range(kernels)).astype(np.uint8)
    rows = len(k) // columns
    cell = k.shape[1] * zoom
    cells = k.repeat(zoom, 1).repeat(zoom, 2).reshape(rows, columns, cell, cell, 3)
    canvas = np.full((rows, columns, cell + line, cell + line, 3), line_level, np.uint8)
    canvas[:, :, line:, line:] = cells  # a line above and left of every cell ...
    picture = canvas.transpose(0, 2, 1, 3, 4).reshape(rows * (cell + line), columns * (cell + line), 3)
    return np.pad(picture, ((0, line), (0, line), (0, 0)), constant_values=line_level)  # ... and a frame


def _render(figure) -> np.ndarray:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi, facecolor="white")
    return np.asarray(Image.open(buffer).convert("RGB")).copy()


def vis_square(kernels, inches: float = 8.0, dpi: int = 100) -> np.ndarray:
    """Caffe's classification example: data normalised by one global min-max, kernels row-major in a
    ceil(sqrt(n)) x ceil(sqrt(n)) grid, one pixel of white (1.0) padding right of and below every kernel, the
    missing cells of the last rows white; shown with imshow (nearest) and the axis off, in a notebook figure."""
    from matplotlib.figure import Figure

    k = global_range(kernels)
    n = int(np.ceil(np.sqrt(len(k))))
    k = np.pad(k, ((0, n * n - len(k)), (0, 1), (0, 1), (0, 0)), constant_values=1.0)
    tiled = k.reshape(n, n, *k.shape[1:]).transpose(0, 2, 1, 3, 4).reshape(n * k.shape[1], n * k.shape[2], 3)
    figure = Figure(figsize=(inches, inches), dpi=dpi)
    axes = figure.add_subplot()
    axes.imshow(tiled, interpolation="nearest")
    axes.axis("off")
    return _render(figure)


def shownet(kernels, inches: float = 12.0, dpi: int = 100) -> np.ndarray:
    """cuda-convnet's shownet filter plot: one global min-max, 16 filters a row in a black (zero) canvas with
    a one-pixel line between and around them, imshow (nearest) without ticks, a title line above."""
    from matplotlib.figure import Figure

    k = global_range(kernels)
    size, per_row = k.shape[1], 16
    rows = int(np.ceil(len(k) / per_row))
    canvas = np.zeros((rows * (size + 1) + 1, per_row * (size + 1) + 1, 3))
    for i, kernel in enumerate(k):  # 96 kernels: test drawing, not a hot path
        y, x = divmod(i, per_row)
        canvas[1 + (size + 1) * y : 1 + (size + 1) * y + size, 1 + (size + 1) * x : 1 + (size + 1) * x + size] = kernel
    figure = Figure(figsize=(inches, inches * canvas.shape[0] / canvas.shape[1] + 0.8), dpi=dpi)
    figure.text(0.5, 0.95, f"Layer conv1 {size}x{size} filters 0-{len(k) - 1}", horizontalalignment="center")
    axes = figure.add_axes((0.05, 0.05, 0.9, 0.8))
    axes.imshow(canvas, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    return _render(figure)


def subplots(kernels, rows: int = 6, columns: int = 16, inches_per_axes: float = 1.0, dpi: int = 100) -> np.ndarray:
    """A matplotlib subplot grid like demul/AlexNet's save_W1: rows x columns axes, one kernel each, all
    normalised by one global min-max, axis off, matplotlib's default white gaps."""
    from matplotlib.figure import Figure

    k = global_range(kernels)
    figure = Figure(figsize=(columns * inches_per_axes, rows * inches_per_axes), dpi=dpi)
    for i, axes in enumerate(figure.subplots(rows, columns).ravel()):
        axes.imshow(k[i])
        axes.axis("off")
    return _render(figure)


def on_a_page(picture: np.ndarray, seed: int = 0) -> np.ndarray:
    """The picture pasted into a white page with text above, below and beside it (a slide or a paper page)."""
    h, w = picture.shape[:2]
    page = Image.new("RGB", (w + 420, h + 300), "white")
    page.paste(Image.fromarray(picture), (60, 140))
    draw = ImageDraw.Draw(page)
    title, body = ImageFont.load_default(40), ImageFont.load_default(16)
    draw.text((60, 30), "ImageNet Classification with Deep CNNs", fill=(0, 0, 0), font=title)
    draw.text((60, 95), "Krizhevsky, Sutskever & Hinton (NIPS 2012)", fill=(40, 40, 160), font=body)
    caption = "Figure 3: 96 convolutional kernels of size 11x11x3 learned by the first convolutional layer"
    draw.text((60, h + 160), caption, fill=(0, 0, 0), font=body)
    draw.text(
        (60, h + 190),
        "on the 224x224x3 input images. The top 48 kernels were learned on GPU 1",
        fill=(0, 0, 0),
        font=body,
    )
    for i in range(8):  # a column of notes to the right
        draw.text((w + 90, 150 + 40 * i), f"- note {i}: colour", fill=(200, 30, 30) if i % 2 else (0, 0, 0), font=body)
    return np.asarray(page).copy()


def saved(picture: np.ndarray, format: str) -> np.ndarray:
    """The picture after saving as PNG or as JPEG quality 75 (4:2:0, Pillow's default) and reading back."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format=format, **({"quality": 75} if format == "JPEG" else {}))
    return np.asarray(Image.open(buffer).convert("RGB")) / 255
