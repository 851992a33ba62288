"""Where a training run keeps its own files, and how it reports how it ended.

Every run of ``train.py`` writes ``status.json`` into its own folder (:func:`run_dir`)::

    {"status": "running" | "finished" | "diverged" | "failed" | "interrupted",
     "step": 1200, "epoch": 3, "message": "...",
     "precision": "bf16-mixed", "world_size": 1,                          # trainer.precision, processes
     "history": [{"epoch": 0, "step": 300, "val/acc": 0.61, ...}, ...],   # one entry per validation
     "summary": {"val/acc": 0.74, ...}}                                    # the last logged values

The sweep agent (``towers/sweep.py``) reads it to learn a run's metrics (for the table, bayes search
and hyperband stopping) and how it ended; ``train.py`` exits with :data:`EXIT_DIVERGED` when the
training loss became NaN or infinite.
"""

import json
import math
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from towers.files import write_atomic

# Exit status of train.py for a run stopped because its loss became NaN or infinite (1 is an uncaught
# Python exception, 2 a command-line error). The sweep agent records such a run as "diverged".
EXIT_DIVERGED = 3


def run_dir(trainer: Trainer) -> Path:
    """The folder that belongs to this run alone (kernel grids, bisection.json, run status).

    W&B: the run's ``files/`` folder, which ``wandb sync`` uploads with the run (with W&B disabled,
    ``<save_dir>/<project>/<run id>``, as Lightning names it). Loggers with a
    versioned ``log_dir`` (CSV, TensorBoard): that folder. No logger: ``trainer.default_root_dir``.
    Call it on global rank zero: other ranks have no W&B run (and must not create one); there it
    falls back to ``default_root_dir`` instead of failing.
    """
    logger = trainer.logger
    if isinstance(logger, WandbLogger) and trainer.is_global_zero and getattr(logger.experiment, "disabled", False):
        # WANDB_MODE=disabled: the run's dir is a scratch folder under /tmp; use Lightning's own folder for
        # this logger's run instead (<save_dir>/<project>/<id>), so files and checkpoints stay under save_dir
        path = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / str(logger.version)
    elif isinstance(logger, WandbLogger) and trainer.is_global_zero:
        path = Path(logger.experiment.dir)
    elif logger is not None and getattr(logger, "log_dir", None):
        path = Path(logger.log_dir)
    else:
        path = Path(trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_folder(trainer: Trainer) -> Path:
    """The one folder that holds everything of this run: its files (:func:`run_dir`) and its checkpoints.

    W&B: the W&B run's own folder, ``<default_root_dir>/wandb/offline-run-<time>-<id>/`` (``run-...``
    online; what ``wandb sync`` takes), with ``files/`` (config, status, kernels, figures, uploaded with
    the run) and ``checkpoints/`` beside it (not uploaded). Other loggers, or none: :func:`run_dir`,
    with ``checkpoints/`` inside. Global rank zero only, like :func:`run_dir`.
    """
    path = run_dir(trainer)
    if isinstance(trainer.logger, WandbLogger) and trainer.is_global_zero and path.name == "files":
        return path.parent
    return path


def place_checkpoints(trainer: Trainer) -> None:
    """Points every ``ModelCheckpoint`` without a ``dirpath`` of its own at ``run_folder/checkpoints``.

    Lightning's default for W&B is ``<save_dir>/<project>/<run id>/checkpoints``, away from the run's
    other files. Call on global rank zero before the checkpoint callbacks' ``setup``: they broadcast
    rank zero's ``dirpath`` to the other ranks.
    """
    folder = run_folder(trainer) / "checkpoints"
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is None:
            callback.dirpath = str(folder)


def newest_last_checkpoint(root) -> Path | None:
    """The most recently written ``last*.ckpt`` anywhere under ``root`` (a run folder or a sweep run's
    folder), or None. Symbolic links count when they point at a file (``save_last: link``)."""
    found = [p for p in Path(root).rglob("last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _scalars(metrics: dict) -> dict:
    # One host-device copy per call; called once per validation, not per step.
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)):
            out[key] = value if math.isfinite(value) else str(value)  # JSON has no NaN
    return out


class RunStatus(Callback):
    """Ends a run whose training loss becomes NaN or infinite as "diverged", and keeps ``status.json``.

    Each step's loss is folded into one on-device flag (no host-device sync); the flag is read, and
    under DDP or-reduced over ranks so every rank stops together, once every ``check_every_n_steps``
    training batches and at the end of each training epoch. A diverged run stops training (no further
    steps on NaN weights), ``status.json`` says where it happened, and train.py exits with
    :data:`EXIT_DIVERGED`. ``train.py`` adds this callback to every config (``--run_status.*``).
    """

    def __init__(self, check_every_n_steps: int = 50):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self.status = None
        self.message = ""
        self.history = []
        self.summary = None
        self._all_finite = None
        self._batches = 0
        self._path = None

    # -- status.json (global rank zero only) --------------------------------------------------------
    def _write(self, trainer: Trainer, summary: dict | None = None) -> None:
        if self._path is None:
            return
        record = {"status": self.status, "step": trainer.global_step, "epoch": trainer.current_epoch,
                  "message": self.message, "precision": str(trainer.precision), "world_size": trainer.world_size,
                  "history": self.history}
        record["summary"] = summary if summary is not None else (self.history[-1] if self.history else {})
        write_atomic(self._path, json.dumps(record, indent=1))

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self.status, self.message, self.history, self.summary = "running", "", [], None
        if trainer.is_global_zero:
            place_checkpoints(trainer)  # here because this callback is in every train.py run, before ModelCheckpoint
            self._path = run_dir(trainer) / "status.json"
            self._write(trainer)

    # -- divergence ---------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        finite = torch.isfinite(loss.detach())
        self._all_finite = finite if self._all_finite is None else self._all_finite & finite
        self._batches += 1
        if self._batches % self.check_every_n_steps == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._check(trainer)

    def _check(self, trainer: Trainer) -> None:
        if self.status == "diverged":
            return
        diverged = self._all_finite is not None and not bool(self._all_finite)  # the one sync
        self._all_finite = None
        # a collective: every rank calls _check at the same batches, so they agree and stop together
        if trainer.strategy.reduce_boolean_decision(diverged, all=False):
            self.status = "diverged"
            self.message = (f"training loss became NaN or infinite at or before step {trainer.global_step} "
                            f"(epoch {trainer.current_epoch}); training stopped")
            trainer.should_stop = True
            self._write(trainer)

    # -- progress and the end -----------------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module):
        # on_validation_end runs after the epoch's metrics are reduced (as ModelCheckpoint relies on)
        if trainer.sanity_checking or self._path is None or self.status != "running":
            return
        entry = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        entry.update(_scalars(trainer.callback_metrics))
        self.history.append(entry)
        self._write(trainer)

    # The history travels in checkpoints, so a run resumed with --ckpt_path reports all its epochs.
    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state_dict):
        self.history = list(state_dict.get("history", []))

    def on_fit_end(self, trainer, pl_module):
        if self.status == "running":
            self.status = "finished"
        self.summary = _scalars(trainer.callback_metrics)
        self._write(trainer, summary=self.summary)

    def on_test_end(self, trainer, pl_module):
        # a test right after fit (train.py's test_after_fit) adds its metrics to the run's summary
        if self._path is None or self.summary is None:
            return
        self.summary.update({k: v for k, v in _scalars(trainer.callback_metrics).items() if k.startswith("test/")})
        self._write(trainer, summary=self.summary)

    def on_exception(self, trainer, pl_module, exception):
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        self.status = "interrupted" if interrupted else "failed"
        self.message = f"{type(exception).__name__}: {exception}"
        self._write(trainer)


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's own folder and stores it in the run.

    Lightning's default writes ``config.yaml`` into ``trainer.log_dir``, which for W&B is the save dir
    that every run shares, so the second run in a folder refuses to start (and ``overwrite=True``
    would let it clobber the first run's file). Here each run's config goes into :func:`run_dir`
    (for W&B the run's ``files/``, uploaded with it) and into the loggers' hyperparameters
    (``wandb.config``), nested as in the YAML so W&B shows ``model.num_towers`` etc.
    """

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage):  # Lightning calls this on global rank zero only
        text = self.parser.dump(self.config, skip_none=False)
        write_atomic(run_dir(trainer) / self.config_filename, text)
        config = yaml.safe_load(text)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
