"""KernelBisectionCallback: measures, pictures and logs the colour split of the first-layer kernels.

At initialisation (the baseline), every N epochs or steps, and at the end of training it scores
every conv1 kernel (:mod:`towers.color`), tests whether the towers differ, and writes into the run's
own folder (:func:`towers.runs.run_dir`):

    kernels.png, scores.png            the latest Figure-3 style grid and score strip plot
    kernels_init.png, scores_init.png  the same at initialisation
    kernels.npy, kernels_init.npy      the raw conv1 weights (towers, kernels per tower, 3, h, w), RGB
    kernels/step_0001234.png           the grid at every measurement (keep_history_images)
    kernels/step_0001234.npy           the raw conv1 weights at every measurement
    bisection.json                     {"init": record, "last": record, ...}
    bisection_history.jsonl            one record per measurement, appended

and logs the scalars and images to every logger the trainer has (W&B and TensorBoard images).
"""

import functools
import io
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from towers.color import RANDOM_KERNEL_SCORE, Bisection, bisection, color_energy, tower_labels, unit_axis
from towers.files import atomic_path, write_atomic
from towers.runs import run_dir
from towers.verdict import Verdict, format_p, verdict

FORMAT = "towers.bisection"
VERSION = 2  # 2: the verdict's keys (towers.verdict.Verdict) in every record; the control's halves are random


# ----------------------------------------------------------------------------- pictures

LABEL_FONT_PX = 14  # tower labels: 14 px is 10.5 pt at 96 dpi, 8.4 pt even read at 120 dpi
WEAK_FRAME = (220, 30, 30)  # the frame around a weak kernel (towers.verdict: too small to judge)


def kernel_grid(kernels, global_scale: bool = False, order=None, columns: int = 16, zoom: int = 4,
                pad: int = 2, gap: int = 12, labels: bool = True, weak=None) -> np.ndarray:
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
        weak: (T, n) bool, in the input order: kernels framed in red (the verdict's weak kernels,
            which per-kernel scaling would otherwise stretch to look like any other).
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
            draw.text((2, pad + tower * block + min(rows * ch, ch) // 2), f"tower {tower + 1}", fill=(0, 0, 0),
                      font=font, anchor="lm")
    if weak is not None:
        for tower, i in weak.nonzero().tolist():  # a frame in the white border around each weak cell
            r, c = divmod(i, cols)
            y, x = pad + tower * block + r * ch, margin + pad + c * cw
            draw.rectangle((x - pad, y - pad, x + w * zoom + pad - 1, y + h * zoom + pad - 1), outline=WEAK_FRAME,
                           width=max(1, pad))
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
    if stats is not None and stats.control:  # one tower: show the two halves the control compares
        idx = (np.arange(len(s)) >= len(s) // 2).astype(np.int64)
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
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.15 / width, bottom=1.25 / height,
                        top=1 - (0.12 + 0.2 * title_lines) / height)
    ax = fig.add_subplot()
    ax.axhline(RANDOM_KERNEL_SCORE, color="0.6", ls="--", lw=1, label="random kernels (2/3)")
    if init_scores is not None:
        ax.scatter(idx + 0.38 + jitter * 0.25, np.asarray(init_scores, dtype=float), s=8, color="0.7",
                   label="at initialisation")
    ax.scatter(idx + jitter, s, s=14, c=s, cmap="viridis", vmin=0, vmax=1, edgecolors="none")
    if stats is not None:
        med, lo, hi = map(np.asarray, (stats.median, stats.ci_low, stats.ci_high))
        x = np.arange(len(ticks))
        ax.hlines(med, x - 0.28, x + 0.28, color="k", lw=2, label="median")
        ax.errorbar(x + 0.28, med, yerr=[med - lo, hi - med], fmt="none", ecolor="k", elinewidth=2, capsize=4,
                    label=f"{stats.ci_level:.0%} bootstrap interval")
    ax.set_xticks(np.arange(len(ticks)), ticks)
    ax.tick_params(labelsize=SCORE_PLOT_FONT_PT)
    ax.set_xlim(-0.6, len(ticks) - 0.3)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("colour score (chromatic energy fraction)", fontsize=SCORE_PLOT_FONT_PT)
    if stats is not None:
        title += (f"\n{'control (halves): ' if stats.control else ''}η² = {stats.eta2:.3f} "
                  f"(chance {stats.eta2_null:.3f}), p = {stats.p_value:.2g}")
        if len(stats.groups) > 2:
            title += (f"\nbest split: towers {', '.join(map(str, stats.color_side))} vs rest, "
                      f"η² = {stats.eta2_split:.3f}, p = {stats.p_value_split:.2g}")
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


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, allow_nan=False))


def _floats(x) -> list:
    return [v if math.isfinite(v) else None for v in torch.as_tensor(x, dtype=torch.float64).tolist()]


# ----------------------------------------------------------------------------- measurement

def measure(kernels, channel_std=None, axis=None, permutations: int = 9999, bootstrap: int = 2000,
            seed: int = 0) -> dict:
    """Score kernels (T, n, 3, h, w), test the tower split and judge it: the measurement part of a record
    (what the callback and ``analysis/kernels.py`` both compute). Beside the scores and ``statistics``
    (eta2, its permutation p, the medians; :class:`towers.color.Bisection`) the record holds every field of
    :class:`towers.verdict.Verdict` at its top level: ``verdict``, ``delta_f``, ``colour_fraction``,
    ``agnostic_tower``, ``specific_tower`` and the rest (all None when the weights are not finite)."""
    kernels = torch.as_tensor(kernels)
    t, n = kernels.shape[:2]
    towers = tower_labels(t, n)
    record = {"num_towers": t, "kernels_per_tower": n, "kernel_size": list(kernels.shape[3:]),
              "channel_std": None if channel_std is None else _floats(torch.as_tensor(channel_std).flatten()),
              "axis": _floats(unit_axis(axis)), "tower": towers.tolist(), "error": None}
    if not bool(torch.isfinite(kernels).all()):
        record["error"] = "conv1 weights are not finite (NaN or inf): training diverged?"
        record.update(score=None, score_dc=None, score_ac=None, tower_median=None, tower_median_dc=None,
                      tower_median_ac=None, statistics=None)
        record.update(dict.fromkeys(Verdict.__dataclass_fields__))
        return record
    energy = color_energy(kernels, channel_std, axis)
    per_tower = torch.stack(list(energy)).view(3, t, n).nanquantile(0.5, dim=2)  # (total/dc/ac, T)
    record.update(score=_floats(energy.total), score_dc=_floats(energy.dc), score_ac=_floats(energy.ac),
                  tower_median=_floats(per_tower[0]), tower_median_dc=_floats(per_tower[1]),
                  tower_median_ac=_floats(per_tower[2]))
    try:
        record["statistics"] = bisection(energy.total, towers, permutations, seed, bootstrap).to_dict()
    except ValueError as e:
        record["statistics"], record["error"] = None, str(e)
    try:
        record.update(verdict(kernels, None, channel_std, axis, permutations, seed).to_dict())
    except ValueError as e:
        record.update(dict.fromkeys(Verdict.__dataclass_fields__))
        record["error"] = record["error"] or str(e)
    return record


def summary_line(record: dict) -> str:
    """One line that says a record's answer: the verdict with delta f, the towers' colour fractions
    with their intervals, and eta2 with its p (as the end of a fit prints it)."""
    if record.get("verdict") is None:
        return f"no verdict: {record.get('error') or 'not measured'}"
    line = Verdict(**{k: record[k] for k in Verdict.__dataclass_fields__}).summary()
    stats = record.get("statistics")
    if stats:
        line += f"; η² = {stats['eta2']:.3f} (chance {stats['eta2_null']:.3f}), p {format_p(stats['p_value'], stats['permutations'])}"
    return line


class KernelBisectionCallback(Callback):
    """Measures how the first-layer kernels split by colour across the towers, during training.

    Args:
        every_n_epochs: measure after every N-th training epoch (None: never by epoch). A measurement
            costs a fraction of a second of CPU time, mostly drawing (0.3-1 s on a busy two-core
            machine); the default 5 gives 19 measurements in the paper's 90 epochs. Every fit prints
            the total cost and its share of the fit, and keeps both in bisection.json.
        every_n_steps: measure after every N-th optimizer step (None: never by step).
            Initialisation (before the first step) and the end of training are always measured.
        permutations, bootstrap, seed: of :func:`towers.color.bisection`.
        axis: ``"luminance"`` scores against u = (1, 1, 1)/sqrt(3); ``"pca"`` against the data's first
            RGB principal component (``trainer.datamodule.rgb_eigenvectors[:, 0]``, in raw-RGB units).
        global_scale: one colour scale for all kernels in the grid (default: each kernel its own).
        sort_by_score: order the kernels of each tower by score in the grid (grey first).
        columns, zoom: grid layout, see :func:`kernel_grid`.
        keep_history_images: also keep the grid of every measurement as ``kernels/step_NNNNNNN.png``.

    Kernels are scored in raw-RGB units: if ``trainer.datamodule.input_channel_std`` exists, the
    weights of channel c are divided by it. Runs on global rank 0 only; the only host copy of the
    weights happens at a measurement.
    """

    def __init__(
        self,
        every_n_epochs: int | None = 5,
        every_n_steps: int | None = None,
        permutations: int = 9999,
        bootstrap: int = 2000,
        seed: int = 0,
        axis: Literal["luminance", "pca"] = "luminance",
        global_scale: bool = False,
        sort_by_score: bool = False,
        columns: int = 16,
        zoom: int = 4,
        keep_history_images: bool = True,
    ):
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value}")
        if permutations < 999:
            raise ValueError(f"permutations must be at least 999, got {permutations}")
        if axis not in ("luminance", "pca"):
            raise ValueError(f"axis must be 'luminance' or 'pca', got {axis!r}")
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.permutations, self.bootstrap, self.seed, self.axis = permutations, bootstrap, seed, axis
        self.global_scale, self.sort_by_score, self.columns, self.zoom = global_scale, sort_by_score, columns, zoom
        self.keep_history_images = keep_history_images
        self.init_record: dict | None = None  # kept in checkpoints, so a resumed run keeps its baseline
        self.last_record: dict | None = None
        self.channel_std = None
        self.axis_vector = None
        self._dir: Path | None = None
        self._cost = 0.0
        self._fit_start = 0.0
        self._fit_seconds: float | None = None

    # --- state in checkpoints: the baseline, and the settings analysis/kernels.py needs to agree
    def state_dict(self) -> dict:
        return {"version": VERSION, "init": self.init_record, "channel_std": self.channel_std,
                "axis": self.axis_vector, "axis_name": self.axis, "permutations": self.permutations,
                "bootstrap": self.bootstrap, "seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.init_record = state_dict.get("init")

    # --- hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not callable(getattr(pl_module, "conv1_kernels", None)):
            raise TypeError(f"KernelBisectionCallback needs a LightningModule with conv1_kernels() returning "
                            f"(towers, kernels per tower, 3, h, w); {type(pl_module).__name__} has none")
        if not trainer.is_global_zero:
            return
        self._fit_start, self._cost, self._fit_seconds = time.perf_counter(), 0.0, None
        from towers.data import colour_inputs  # the data's side of the interface: towers.data.ColourInputs

        std, eigenvectors = colour_inputs(getattr(trainer, "datamodule", None))
        self.channel_std = None if std is None else _floats(torch.as_tensor(std).flatten())
        if self.axis == "pca":
            if eigenvectors is None:
                raise ValueError("KernelBisectionCallback(axis='pca') needs trainer.datamodule.rgb_eigenvectors "
                                 "(3x3, columns the RGB principal components); this data module has none. "
                                 "Use axis='luminance'.")
            self.axis_vector = _floats(torch.as_tensor(eigenvectors)[:, 0])
        else:
            self.axis_vector = _floats(unit_axis())
        self._dir = run_dir(trainer)
        if self.init_record is not None:  # resumed: the baseline came with the checkpoint
            self._write_json()
        elif trainer.ckpt_path is not None:
            rank_zero_warn("KernelBisectionCallback: resuming from a checkpoint without its initial kernels; "
                           "the run has no initialisation baseline.")
        else:
            self._measure(trainer, pl_module, "init")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (trainer.is_global_zero and self.every_n_steps and step % self.every_n_steps == 0
                and not self._measured(step)):
            self._measure(trainer, pl_module, "interval")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.is_global_zero and self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0
                and not self._measured(trainer.global_step)):
            self._measure(trainer, pl_module, "interval")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self._measured(trainer.global_step):  # the weights were measured at this very step
            self.last_record = dict(self.last_record, stage="end")
        else:
            self._measure(trainer, pl_module, "end")
        self._fit_seconds = time.perf_counter() - self._fit_start
        self._write_json()
        rank_zero_info(f"Verdict at step {self.last_record['step']}: {summary_line(self.last_record)}")
        change = self.last_record.get("kernel_change")
        if change is not None:
            rank_zero_info("conv1 kernels moved ||W - W0|| / ||W0|| = "
                           + ", ".join(f"{'n/a' if c is None else f'{c:.2f}'} (tower {k})"
                                       for k, c in enumerate(change, start=1))
                           + " from their initialisation")
        rank_zero_info(f"KernelBisectionCallback: measurements took {self._cost:.2f} s, "
                       f"{100 * self._cost / max(self._fit_seconds, 1e-9):.2f}% of the {self._fit_seconds:.1f} s "
                       f"of fitting; files in {self._dir}")

    # --- the measurement
    def _measured(self, step: int) -> bool:
        return self.last_record is not None and self.last_record["step"] == step

    @torch.no_grad()
    def _measure(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        start = time.perf_counter()
        kernels = pl_module.conv1_kernels().detach().to("cpu", torch.float32)  # the one host copy
        record = {"stage": stage, "step": trainer.global_step, "epoch": trainer.current_epoch,
                  "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "axis_name": self.axis}
        record.update(measure(kernels, self.channel_std, self.axis_vector, self.permutations, self.bootstrap,
                              self.seed))
        record["kernel_change"] = self._kernel_change(kernels, stage)
        stats = None if record["statistics"] is None else Bisection(**record["statistics"])
        if record["error"]:
            rank_zero_warn(f"KernelBisectionCallback at step {record['step']}: {record['error']}")

        suffixes = ("", "_init") if stage == "init" else ("",)  # the latest files, and the baseline's own
        images = {}
        if record["score"] is not None:
            order = (torch.tensor(record["score"]).view(kernels.shape[:2]).argsort(1)
                     if self.sort_by_score else None)
            weak = (None if record.get("kernel_class") is None
                    else np.asarray(record["kernel_class"]).reshape(kernels.shape[:2]) == "weak")
            images["kernels"] = kernel_grid(kernels, self.global_scale, order, self.columns, self.zoom, weak=weak)
            init_scores = None if self.init_record is None or stage == "init" else self.init_record["score"]
            images["scores"] = score_plot(record["score"], record["tower"], stats, init_scores,
                                          f"{stage} · step {record['step']} · epoch {record['epoch']}")
            pngs = {name: png_bytes(image) for name, image in images.items()}
            for name, data in pngs.items():
                for suffix in suffixes:
                    write_png(self._dir / f"{name}{suffix}.png", data)
            if self.keep_history_images:
                (self._dir / "kernels").mkdir(exist_ok=True)
                write_png(self._dir / "kernels" / f"step_{record['step']:07d}.png", pngs["kernels"])
        (self._dir / "kernels").mkdir(exist_ok=True)  # the weights of every measurement: 140 kB at paper size
        for path in [self._dir / f"kernels{suffix}.npy" for suffix in suffixes] + [
                self._dir / "kernels" / f"step_{record['step']:07d}.npy"]:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, kernels.numpy())

        record["seconds"] = round(time.perf_counter() - start, 4)
        if stage == "init":
            self.init_record = record
        self.last_record = record
        self._write_json()
        with open(self._dir / "bisection_history.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        self._log(trainer, record, images)
        self._cost += time.perf_counter() - start

    def _kernel_change(self, kernels: torch.Tensor, stage: str) -> list | None:
        """Per tower ||W - W0|| / ||W0||, W0 the kernels at initialisation (its file; None without one):
        above 1, the kernels moved further than their initial size, so the grid shows learned kernels."""
        path = self._dir / "kernels_init.npy"
        if stage == "init":
            return [0.0] * kernels.shape[0]
        if not path.is_file():
            return None
        initial = torch.from_numpy(np.load(path)).to(kernels.dtype)
        if initial.shape != kernels.shape:
            return None
        change = (kernels - initial).flatten(1).norm(dim=1) / initial.flatten(1).norm(dim=1).clamp_min(1e-30)
        return _floats(change)

    def _write_json(self) -> None:
        def with_file(record, name):
            return None if record is None else dict(record, kernels_file=name)

        write_json(self._dir / "bisection.json", {
            "format": FORMAT, "version": VERSION,
            "init": with_file(self.init_record, "kernels_init.npy"),
            "last": with_file(self.last_record, "kernels.npy"),
            "history": "bisection_history.jsonl",
            "measurement_seconds": round(self._cost, 4),  # all measurements of this fit so far
            "fit_seconds": None if self._fit_seconds is None else round(self._fit_seconds, 4),  # set at the end
        })

    def _log(self, trainer: Trainer, record: dict, images: dict) -> None:
        scalars = {}
        stats = record["statistics"]
        if stats is not None:
            scalars.update({"bisection/eta2": stats["eta2"], "bisection/p_value": stats["p_value"],
                            "bisection/eta2_null": stats["eta2_null"]})
            if record["num_towers"] > 2:
                scalars.update({"bisection/eta2_split": stats["eta2_split"],
                                "bisection/p_value_split": stats["p_value_split"]})
        if record.get("verdict") is not None:
            scalars.update({"verdict/specialised": float(record["verdict"] == "specialised"),
                            "verdict/delta_f": record["delta_f"], "verdict/p_delta_f": record["p_delta_f"],
                            "verdict/auc": record["auc"]})
            for k, fraction in enumerate(record["colour_fraction"], start=1):
                scalars[f"tower_{k}/colour_fraction"] = fraction
        for k, change in enumerate(record.get("kernel_change") or (), start=1):
            scalars[f"tower_{k}/kernel_change"] = change
        if record["tower_median"] is not None:
            for k, (total, dc, ac) in enumerate(zip(record["tower_median"], record["tower_median_dc"],
                                                    record["tower_median_ac"]), start=1):
                scalars.update({f"tower_{k}/color_score": total, f"tower_{k}/color_score_dc": dc,
                                f"tower_{k}/color_score_ac": ac})
        if record["stage"] == "init":  # the baseline under its own names too, for side-by-side tables
            scalars.update({f"{key}_init": value for key, value in list(scalars.items())
                            if key in ("bisection/eta2", "bisection/p_value") or key.endswith("/color_score")})
        scalars = {k: v for k, v in scalars.items() if v is not None}
        caption = f"{record['stage']} step {record['step']} epoch {record['epoch']}"
        for logger in trainer.loggers:
            for name, image in images.items():
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"bisection/{name}", images=[image], step=record["step"], caption=[caption])
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"bisection/{name}", image, record["step"], dataformats="HWC")
            if scalars:
                logger.log_metrics(scalars, step=record["step"])
            if isinstance(logger, WandbLogger) and record.get("verdict") is not None:
                # The run's answer in its W&B summary, under the record's own keys (the last measurement wins).
                stats = record["statistics"] or {}
                logger.experiment.summary.update({
                    "verdict": record["verdict"], "delta_f": record["delta_f"],
                    "delta_f_low": record["delta_f_low"], "delta_f_high": record["delta_f_high"],
                    "p_delta_f": record["p_delta_f"], "colour_fraction": record["colour_fraction"],
                    "agnostic_tower": record["agnostic_tower"], "specific_tower": record["specific_tower"],
                    "eta2": stats.get("eta2"), "p_value": stats.get("p_value")})
