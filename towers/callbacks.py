"""KernelBisectionCallback: measures, pictures and logs the colour split of the first-layer kernels.

At initialisation (the baseline), every N epochs or steps, and at the end of training it scores
every conv1 kernel (:mod:`towers.color`), tests whether the towers differ, and writes into the run's
own folder (:func:`towers.runs.run_dir`; the names are :mod:`towers.records`'):

    kernels.png, scores.png            the latest Figure-3 style grid and score strip plot
    kernels_init.png, scores_init.png  the same at initialisation
    kernels.npy, kernels_init.npy      the raw conv1 weights (towers, kernels per tower, 3, h, w), RGB
    kernels/step_0001234.png           the grid at every measurement (keep_history_images)
    kernels/step_0001234.npy           the raw conv1 weights at every measurement
    bisection.json                     {"init": record, "last": record, ...}
    bisection_history.jsonl            one record per measurement, appended

and logs the scalars and images to every logger the trainer has (W&B and TensorBoard images).
"""

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from towers import records
from towers.color import Bisection, unit_axis
from towers.figures import framed_kernels, kernel_grid, png_bytes, score_plot, write_png
from towers.files import append_jsonl, atomic_path
from towers.measure import floats, measure, summary_line
from towers.runs import run_dir


class KernelBisectionCallback(Callback):
    """Measures how the first-layer kernels split by colour across the towers, during training.

    Args:
        every_n_epochs: measure after every N-th training epoch (None: never by epoch). A measurement
            costs a fraction of a second of CPU time, mostly drawing (0.3-1 s on a busy two-core
            machine); the default 5 gives 19 measurements in the paper's 90 epochs. Every fit prints
            the total cost and its share of the fit, and keeps both in bisection.json.
        every_n_steps: measure after every N-th optimizer step (None: never by step).
            Initialisation (before the first step) and the end of training are always measured.
        permutations, bootstrap, seed: of :func:`towers.verdict.verdict`.
        axis: ``"luminance"`` scores against u = (1, 1, 1)/sqrt(3); ``"pca"`` against the data's first
            RGB principal component (``trainer.datamodule.rgb_eigenvectors[:, 0]``, in raw-RGB units).
        global_scale: one colour scale for all kernels in the grid (default; False: each kernel its own).
        sort_by_score: order the kernels of each tower by score in the grid (grey first).
        columns, zoom: grid layout, see :func:`towers.figures.kernel_grid`.
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
        global_scale: bool = True,
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
        # the kernels at initialisation, kept in checkpoints too: the verdict judges untrained kernels by how
        # far they moved from them, also for a checkpoint read without its run folder (analysis/kernels.py)
        self.initial_kernels: torch.Tensor | None = None
        self.last_record: dict | None = None
        self.channel_std = None
        self.axis_vector = None
        self._dir: Path | None = None
        self._cost = 0.0
        self._fit_start = 0.0
        self._fit_seconds: float | None = None

    # --- state in checkpoints: the baseline, and the settings analysis/kernels.py needs to agree
    def state_dict(self) -> dict:
        return {
            "version": records.VERSION,
            "init": self.init_record,
            "initial_kernels": self.initial_kernels,
            "channel_std": self.channel_std,
            "axis": self.axis_vector,
            "axis_name": self.axis,
            "permutations": self.permutations,
            "bootstrap": self.bootstrap,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.init_record = state_dict.get("init")
        self.initial_kernels = state_dict.get("initial_kernels")

    # --- hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not callable(getattr(pl_module, "conv1_kernels", None)):
            raise TypeError(
                f"KernelBisectionCallback needs a LightningModule with conv1_kernels() returning "
                f"(towers, kernels per tower, 3, h, w); {type(pl_module).__name__} has none"
            )
        if not trainer.is_global_zero:
            return
        self._fit_start, self._cost, self._fit_seconds = time.perf_counter(), 0.0, None
        from towers.data import colour_inputs  # the data's side of the interface: towers.data.ColourInputs

        std, eigenvectors = colour_inputs(getattr(trainer, "datamodule", None))
        self.channel_std = None if std is None else floats(torch.as_tensor(std).flatten())
        if self.axis == "pca":
            if eigenvectors is None:
                raise ValueError(
                    "KernelBisectionCallback(axis='pca') needs trainer.datamodule.rgb_eigenvectors "
                    "(3x3, columns the RGB principal components); this data module has none. "
                    "Use axis='luminance'."
                )
            self.axis_vector = floats(torch.as_tensor(eigenvectors)[:, 0])
        else:
            self.axis_vector = floats(unit_axis())
        self._dir = run_dir(trainer)
        if self.init_record is not None:  # resumed: the baseline came with the checkpoint
            self._write_json()
        elif trainer.ckpt_path is not None:
            rank_zero_warn(
                "KernelBisectionCallback: resuming from a checkpoint without its initial kernels; "
                "the run has no initialisation baseline."
            )
        else:
            self._measure(trainer, pl_module, "init")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (
            trainer.is_global_zero
            and self.every_n_steps
            and step % self.every_n_steps == 0
            and not self._measured(step)
        ):
            self._measure(trainer, pl_module, "interval")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            trainer.is_global_zero
            and self.every_n_epochs
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and not self._measured(trainer.global_step)
        ):
            self._measure(trainer, pl_module, "interval")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._measure_end(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A fit resumed from a checkpoint at its very end trains nothing, and Lightning then skips
        # on_train_end: the final weights are measured here, so every finished run has its verdict.
        if trainer.is_global_zero and self._fit_seconds is None and self._dir is not None:
            self._measure_end(trainer, pl_module)

    def _measure_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._measured(trainer.global_step):  # the weights were measured at this very step
            self.last_record = dict(self.last_record, stage="end")
        else:
            self._measure(trainer, pl_module, "end")
        self._fit_seconds = time.perf_counter() - self._fit_start
        self._write_json()
        rank_zero_info(f"Verdict at step {self.last_record['step']}: {summary_line(self.last_record)}")
        change = self.last_record.get("kernel_change")
        if change is not None:
            rank_zero_info(
                "conv1 kernels moved ||W - W0|| / ||W0|| = "
                + ", ".join(f"{'n/a' if c is None else f'{c:.2f}'} (tower {k})" for k, c in enumerate(change, start=1))
                + " from their initialisation"
            )
        rank_zero_info(
            f"KernelBisectionCallback: measurements took {self._cost:.2f} s, "
            f"{100 * self._cost / max(self._fit_seconds, 1e-9):.2f}% of the {self._fit_seconds:.1f} s "
            f"of fitting; files in {self._dir}"
        )

    # --- the measurement
    def _measured(self, step: int) -> bool:
        return self.last_record is not None and self.last_record["step"] == step

    @torch.no_grad()
    def _measure(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        start = time.perf_counter()
        kernels = pl_module.conv1_kernels().detach().to("cpu", torch.float32)  # the one host copy
        record = {
            "stage": stage,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "axis_name": self.axis,
        }
        record.update(
            measure(
                kernels,
                self.channel_std,
                self.axis_vector,
                self.permutations,
                self.bootstrap,
                self.seed,
                initial=self._initial_kernels(kernels, stage),
            )
        )
        record["kernel_change"] = self._kernel_change(kernels, stage)
        stats = None if record["statistics"] is None else Bisection(**record["statistics"])
        if record["error"]:
            rank_zero_warn(f"KernelBisectionCallback at step {record['step']}: {record['error']}")

        baselines = (False, True) if stage == "init" else (False,)  # the latest files, and the baseline's own
        (self._dir / records.STEPS_DIR).mkdir(exist_ok=True)  # every measurement's weights (140 kB at paper size)
        images = {}
        if record["score"] is not None:
            order = torch.tensor(record["score"]).view(kernels.shape[:2]).argsort(1) if self.sort_by_score else None
            framed = framed_kernels(record.get("kernel_class"), kernels.shape[:2])
            images[records.GRID] = kernel_grid(kernels, self.global_scale, order, self.columns, self.zoom, weak=framed)
            init_scores = None if self.init_record is None or stage == "init" else self.init_record["score"]
            images[records.SCORE_PLOT] = score_plot(
                record["score"],
                record["tower"],
                stats,
                init_scores,
                f"{stage} · step {record['step']} · epoch {record['epoch']}",
            )
            pngs = {name: png_bytes(image) for name, image in images.items()}
            for name, data in pngs.items():
                for init in baselines:
                    write_png(self._dir / records.picture_file(name, init), data)
            if self.keep_history_images:
                write_png(self._dir / records.step_file(record["step"], ".png"), pngs[records.GRID])
        for path in [self._dir / records.kernels_file(init) for init in baselines] + [
            self._dir / records.step_file(record["step"], ".npy")
        ]:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, kernels.numpy())

        record["seconds"] = round(time.perf_counter() - start, 4)
        if stage == "init":
            self.init_record, self.initial_kernels = record, kernels.clone()
        self.last_record = record
        self._write_json()
        append_jsonl(self._dir / records.HISTORY_FILE, records.as_record(record).to_dict())  # a whole line or nothing
        self._log(trainer, record, images)
        self._cost += time.perf_counter() - start

    def _initial_kernels(self, kernels: torch.Tensor, stage: str) -> torch.Tensor | None:
        """The kernels at initialisation, so the verdict judges untrained kernels by how far they moved
        (at initialisation: the kernels themselves; None without the file, e.g. resumed without it)."""
        if stage == "init":
            return kernels
        initial = self.initial_kernels
        path = self._dir / records.kernels_file(init=True)
        if initial is None and path.is_file():
            initial = torch.from_numpy(np.load(path))
        return initial.to(kernels.dtype) if initial is not None and initial.shape == kernels.shape else None

    def _kernel_change(self, kernels: torch.Tensor, stage: str) -> list | None:
        """Per tower ||W - W0|| / ||W0||, W0 the kernels at initialisation (its file; None without one):
        above 1, the kernels moved further than their initial size, so the grid shows learned kernels."""
        path = self._dir / records.kernels_file(init=True)
        if stage == "init":
            return [0.0] * kernels.shape[0]
        if not path.is_file():
            return None
        initial = torch.from_numpy(np.load(path)).to(kernels.dtype)
        if initial.shape != kernels.shape:
            return None
        change = (kernels - initial).flatten(1).norm(dim=1) / initial.flatten(1).norm(dim=1).clamp_min(1e-30)
        return floats(change)

    def _write_json(self) -> None:
        records.write_json(
            self._dir / records.BISECTION_FILE,
            records.bisection_file(self.init_record, self.last_record, self._cost, self._fit_seconds),
        )

    def _log(self, trainer: Trainer, record: dict, images: dict) -> None:
        scalars = records.record_metrics(record)
        caption = f"{record['stage']} step {record['step']} epoch {record['epoch']}"
        for logger in trainer.loggers:
            for name, image in images.items():
                if isinstance(logger, WandbLogger):
                    logger.log_image(
                        key=records.image_key(name), images=[image], step=record["step"], caption=[caption]
                    )
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(records.image_key(name), image, record["step"], dataformats="HWC")
            if scalars:
                logger.log_metrics(scalars, step=record["step"])
            if isinstance(logger, WandbLogger) and record.get("verdict") is not None:
                # The run's answer in its W&B summary, under the record's own keys (the last measurement wins).
                logger.experiment.summary.update(records.record_summary(record))
