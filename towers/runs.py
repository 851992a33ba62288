"""Where a training run keeps its own files."""

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger


def run_dir(trainer: Trainer) -> Path:
    """The folder that belongs to this run alone (kernel grids, bisection.json, run status).

    W&B: the run's ``files/`` folder, which ``wandb sync`` uploads with the run. Loggers with a
    versioned ``log_dir`` (CSV, TensorBoard): that folder. No logger: ``trainer.default_root_dir``.
    Under DDP only rank 0 has the W&B run; other ranks get ``default_root_dir``.
    """
    logger = trainer.logger
    if isinstance(logger, WandbLogger) and trainer.is_global_zero:
        path = Path(logger.experiment.dir)
    elif logger is not None and getattr(logger, "log_dir", None):
        path = Path(logger.log_dir)
    else:
        path = Path(trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
