"""Where a training run keeps its own files, and how it reports how it ended.

Every run of ``train.py`` writes ``status.json`` into its own folder (:func:`run_dir`)::

    {"status": "running" | "finished" | "diverged" | "failed" | "interrupted" | "requeued",
     "step": 1200, "epoch": 3, "message": "...",
     "precision": "bf16-mixed", "world_size": 1,                          # trainer.precision, processes
     "history": [{"epoch": 0, "step": 300, "val/acc": 0.61, ...}, ...],   # one entry per validation
     "summary": {"val/acc": 0.74, ...}}                                    # the last logged values

The sweep agent (``towers/sweep.py``) reads it to learn a run's metrics (for the table, bayes search
and hyperband stopping) and how it ended; ``train.py`` exits with :data:`EXIT_DIVERGED` when the
training loss became NaN or infinite. The file names and :data:`EXIT_DIVERGED` are :mod:`towers.records`'.

SIGTERM and SIGUSR1 (:class:`RunStatus`): the run saves a resumable checkpoint, ``status.json`` says
``interrupted`` (or ``requeued`` when Lightning's SLURM auto-requeue took the SIGUSR1), and train.py
exits with ``128 + signum``. Which checkpoint a run resumes, and its W&B id: :mod:`towers.resume`.
"""

import errno
import json
import logging
import math
import os
import pickle
import signal
import threading
import zipfile
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from towers.conditions import condition, condition_id
from towers.errors import DamagedCheckpoint, Diverged, Interrupted
from towers.files import atomic_path, write_atomic
from towers.records import (  # noqa: F401  EXIT_DIVERGED and the checkpoint finders: Lightning-free, used from here by train.py
    EXIT_DIVERGED,
    STATUS_FILE,
    WANDB_FILES_DIR,
    checkpoint_problem,
    first_line,
    newest_last_checkpoint,
    newest_loadable_checkpoint,
)
from towers.resume import (  # noqa: F401  wandb_run_id: the one place a resumed run's W&B id comes from
    CHECKPOINT_KEY,
    HPC_CHECKPOINTS,
    INTERRUPTED_CHECKPOINT,
    slurm_job,
    wandb_run_id,
)

log = logging.getLogger(__name__)


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
    if isinstance(trainer.logger, WandbLogger) and trainer.is_global_zero and path.name == WANDB_FILES_DIR:
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


def damaged_checkpoint(path, problem: str) -> DamagedCheckpoint:
    """The one-line error for a checkpoint that cannot be read: it, why, and the newest checkpoint beside it
    that loads (what to give instead)."""
    fallback = newest_loadable_checkpoint(Path(path).parent, exclude=[path])
    instead = (
        f"the newest checkpoint beside it that loads is {fallback}" if fallback else "no checkpoint beside it loads"
    )
    return DamagedCheckpoint(f"{path} is damaged and cannot be read ({problem}); {instead}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, but a checkpoint appears under its final name only when complete.

    ``torch.save`` writes a temporary file beside the target, which is flushed to the disk and then
    renamed onto it (:func:`towers.files.atomic_path`); a failed write (a full disk) leaves neither a
    half-written checkpoint nor the temporary file, and is raised as an OSError naming the checkpoint.
    A checkpoint that cannot be read is :class:`towers.errors.DamagedCheckpoint`, one line that names
    it and the newest checkpoint beside it that loads. ``train.py`` gives it to every run.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # Lightning's own: it raises, or writes remotely
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            try:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            except RuntimeError as error:
                # torch's zip writer reports a short write (what a full disk gives) as a RuntimeError
                # ("unexpected pos ..."); told as the OSError it is, naming the checkpoint
                space = os.statvfs(path.parent)
                full = space.f_bavail * space.f_frsize < (
                    1 << 20
                )  # checked while the partial file still holds its blocks
                code = errno.ENOSPC if full else errno.EIO
                raise OSError(
                    code, os.strerror(code) + ("" if full else f" ({first_line(error)})"), str(path)
                ) from error

    def load_checkpoint(self, path, *args, **kwargs):
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
            problem = checkpoint_problem(path)
            if problem is None:
                raise  # the file reads; what failed is not the file
            raise damaged_checkpoint(path, problem) from error


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

    No checkpoint of non-finite weights is written: before each validation's checkpoints (Lightning
    runs ModelCheckpoint callbacks after all others) the flag and the weights are checked, and a
    diverged run switches its ModelCheckpoints off, so ``last.ckpt`` and ``best-*.ckpt`` keep the last
    finite weights. Any other save of non-finite weights is refused with :class:`towers.errors.Diverged`.

    Pre-emption. Every checkpoint carries the run's identity (:data:`towers.resume.CHECKPOINT_KEY`:
    ``seed``, which train.py sets, the W&B run id, the SLURM job). SIGTERM (Lightning stops the loop
    with ``SIGTERMException``) and SIGUSR1 outside SLURM (here: the run stops after the current batch
    with :class:`towers.errors.Interrupted`) save ``last-interrupted.ckpt`` beside the run's other
    checkpoints and set ``interrupted``. Under SLURM with Lightning's auto-requeue, SIGUSR1 is
    Lightning's: it saves ``hpc_ckpt_N.ckpt`` into ``default_root_dir``, which every run there shares,
    and requeues the job; this callback moves that file into the run's own ``checkpoints/`` (so no
    other run can resume it) and sets ``requeued``; the SIGTERM that follows saves nothing more when
    the step has not changed.
    """

    def __init__(self, check_every_n_steps: int = 50):
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self.seed: int | None = None  # seed_everything, recorded in every checkpoint (train.py sets it)
        self.resumable: Path | None = None  # the checkpoint saved when the run was stopped by a signal
        self._stop_signal: int | None = None
        self._previous_sigusr1 = None
        self._hpc_step: int | None = None
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
        record = {
            "status": self.status,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "message": self.message,
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "history": self.history,
        }
        record["summary"] = summary if summary is not None else (self.history[-1] if self.history else {})
        write_atomic(self._path, json.dumps(record, indent=1))

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self.status, self.message, self.history, self.summary = "running", "", [], None
        self.resumable, self._stop_signal, self._hpc_step = None, None, None
        if trainer.is_global_zero:
            place_checkpoints(trainer)  # here because this callback is in every train.py run, before ModelCheckpoint
            self._path = run_dir(trainer) / STATUS_FILE
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
        self._check(trainer, pl_module)  # before a ModelCheckpoint that saves at the end of the epoch

    def _check(self, trainer: Trainer, pl_module=None) -> None:
        """Stop the run if the loss since the last check (and, given ``pl_module``, a weight) is not finite."""
        if self.status == "diverged":
            return
        loss_diverged = self._all_finite is not None and not bool(self._all_finite)  # the one sync
        weights_diverged = pl_module is not None and not loss_diverged and not _finite_weights(pl_module)
        self._all_finite = None
        # a collective: every rank calls _check at the same batches, so they agree and stop together
        if trainer.strategy.reduce_boolean_decision(loss_diverged or weights_diverged, all=False):
            self.status = "diverged"
            what = "weights" if weights_diverged else "training loss"
            self.message = (
                f"{what} became NaN or infinite at or before step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); training stopped, no checkpoint written after it"
            )
            trainer.should_stop = True
            for checkpoint in trainer.checkpoint_callbacks:  # the files on disk stay the last finite ones
                checkpoint.save_top_k, checkpoint.save_last = 0, False
            self._write(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Called on every rank while a checkpoint is assembled, before anything is written: the guard
        # for saves that the checks above do not precede (every_n_train_steps, a trainer.save_checkpoint).
        if self.status == "diverged" or trainer.strategy.reduce_boolean_decision(
            not _finite_weights(pl_module), all=False
        ):
            self._refuse(trainer)
        logger = trainer.logger
        wandb_id = logger.version if isinstance(logger, WandbLogger) and trainer.is_global_zero else None
        checkpoint[CHECKPOINT_KEY] = {"seed": self.seed, "wandb_id": wandb_id, "slurm_job": slurm_job()}

    def _refuse(self, trainer: Trainer) -> None:
        if self.status != "diverged":
            self.status = "diverged"
            self.message = (
                f"weights became NaN or infinite at or before step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); training stopped, no checkpoint written after it"
            )
        self._write(trainer)
        raise Diverged(self.message)

    # -- progress and the end -----------------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module):
        # on_validation_end runs after the epoch's metrics are reduced (as ModelCheckpoint relies on),
        # and before ModelCheckpoint's: a run found diverged here saves nothing more
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self._check(trainer, pl_module)
        if self._path is None or self.status != "running":
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

    # -- pre-emption: SIGTERM, SIGUSR1 ------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        # Lightning installs its signal handlers just before training starts (and restores the earlier
        # ones at its teardown); SIGUSR1 is chained here, after Lightning's SLURM handler if it set one.
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
            self._previous_sigusr1 = signal.getsignal(signal.SIGUSR1)
            signal.signal(signal.SIGUSR1, lambda signum, frame: self._on_sigusr1(trainer, signum, frame))

    def _on_sigusr1(self, trainer, signum, frame):
        root = Path(trainer.default_root_dir)
        before = set(root.glob(HPC_CHECKPOINTS))
        if callable(self._previous_sigusr1):
            self._previous_sigusr1(signum, frame)  # Lightning's SLURM handler: saves hpc_ckpt_N.ckpt, requeues
        written = sorted(set(root.glob(HPC_CHECKPOINTS)) - before)
        if not written:  # no SLURM requeue took it: stop after this batch, like SIGTERM
            self._stop_signal = signum
            return
        self._hpc_step = trainer.global_step
        if trainer.is_global_zero:
            folder = _checkpoint_folder(trainer)
            folder.mkdir(parents=True, exist_ok=True)
            for path in written:  # out of the shared root, so no other run's fresh fit resumes it
                target = folder / path.name
                while target.exists():
                    target = target.with_name(f"{target.stem}-1{target.suffix}")
                os.replace(path, target)
                self.resumable = target
            self.status = "requeued"
            self.message = (
                f"SLURM pre-emption (signal {signum}) at step {trainer.global_step}: Lightning saved "
                f"{self.resumable} and requeued the job; it resumes with --ckpt_path last"
            )
            self._write(trainer)

    def _stop_if_signalled(self, trainer):
        if self._stop_signal is not None:
            signum, self._stop_signal = self._stop_signal, None
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stop_if_signalled(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.state.fn == "fit":
            self._stop_if_signalled(trainer)

    def _save_resumable(self, trainer) -> None:
        """A checkpoint to resume from, unless Lightning's SLURM handler saved one at this very step."""
        if self._hpc_step == trainer.global_step:  # decided alike on every rank that got the signal
            return
        path = _checkpoint_folder(trainer) / INTERRUPTED_CHECKPOINT
        trainer.save_checkpoint(path)
        self.resumable = path

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, Diverged):
            return  # status.json already says diverged
        signalled = isinstance(exception, (SIGTERMException, Interrupted))
        if signalled and trainer.state.fn == "fit":
            try:
                self._save_resumable(trainer)
            except (OSError, RuntimeError, Diverged) as error:  # told in status.json; the signal still ends the run
                log.error("could not save a checkpoint to resume from: %s", error)
                self.resumable = None
        interrupted = signalled or isinstance(exception, KeyboardInterrupt)
        self.status = (
            "requeued" if signalled and self.status == "requeued" else "interrupted" if interrupted else "failed"
        )
        if signalled:
            name = "SIGTERM" if isinstance(exception, SIGTERMException) else signal.Signals(exception.signum).name
            self.message = f"stopped by {name} at step {trainer.global_step}; " + (
                f"resume with --ckpt_path last (it continues {self.resumable})"
                if self.resumable
                else "no checkpoint could be saved"
            )
            exception.towers_message = self.message  # train.py's one line
        else:
            self.message = f"{type(exception).__name__}: {exception}"
        try:
            self._write(trainer)
        except OSError as error:  # the disk that made the run fail may refuse status.json too
            log.error("could not record the failure in %s (%s); the failure: %s", self._path, error, self.message)


def _checkpoint_folder(trainer: Trainer) -> Path:
    """Where the run keeps its checkpoints: the first ModelCheckpoint's folder, else ``run_folder/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return run_folder(trainer) / "checkpoints" if trainer.is_global_zero else Path(trainer.default_root_dir)


def _finite_weights(pl_module) -> bool:
    """True when every parameter is finite; one host-device sync per device."""
    flags = [torch.isfinite(p).all() for p in pl_module.parameters()]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True


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
        config["condition"] = condition_id(condition(config))  # what the dashboard groups by (towers.conditions)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
