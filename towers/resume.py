"""Which checkpoint a run resumes: its own, never another run's. No Lightning (the sweep agent imports it).

A run is identified by its seed and its model settings (the LightningModule's hyperparameters, which
Lightning stores in every checkpoint). ``train.py`` adds :data:`CHECKPOINT_KEY` to every checkpoint it
writes (:class:`towers.runs.RunStatus`)::

    {"seed": 0, "wandb_id": "1n5fa0i6", "slurm_job": "4242_3"}   # seed_everything, W&B run id, SLURM job

so that ``--ckpt_path last`` resumes the newest checkpoint of *this* run under a root that many runs
share (:func:`find_own_checkpoint`), a checkpoint with other settings is named with its differences
(:func:`settings_differences`), a SLURM requeue finds what its own job wrote, and a resumed run
continues the W&B run that wrote the checkpoint (:func:`wandb_run_id`).
"""

import json
import logging
import os
import pickle
import re
from pathlib import Path

import torch

from towers.records import LAST_CHECKPOINTS, checkpoint_problem, first_line

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "towers_run"  # the run's identity in each checkpoint train.py writes
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"  # Lightning's SLURM checkpoints (SIGUSR1, before a requeue)
INTERRUPTED_CHECKPOINT = "last-interrupted.ckpt"  # what a run stopped by SIGTERM or SIGUSR1 saves
# Model settings that change how fast a run trains, not what it learns (the weights agree to float
# rounding), and Lightning's own bookkeeping in hyper_parameters: not part of a run's identity.
NOT_SETTINGS = frozenset({"channels_last", "_instantiator", "_class_path"})
_WANDB_FOLDER = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(?P<id>[A-Za-z0-9_-]+)$")


def slurm_job() -> str | None:
    """This process's SLURM job (``JOBID`` or ``ARRAYJOBID_TASKID``), which a requeue keeps; None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def read_checkpoint(path) -> dict | None:
    """A checkpoint's dictionary, its tensors only mapped (cheap); None when it cannot be read this way."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        log.debug("cannot read %s: %s", path, first_line(error))
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def _plain(value):
    """Settings as JSON has them (tuples as lists), so a config and a checkpoint compare equal."""
    return json.loads(json.dumps(value, default=str))


def settings_differences(checkpoint: dict, seed: int | None, model: dict) -> list[str]:
    """How the run that wrote ``checkpoint`` differs from the one asked for (``seed``, ``model``
    settings), one ``"model.num_towers: 1 in the checkpoint, 2 asked"`` each; [] when it is this run.

    A setting only one side has (one added to the model since the checkpoint was written) is not
    compared: the checkpoint's run used its default. A checkpoint that does not record its seed (not
    written by train.py) is compared on its model settings only.
    """
    saved = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k not in NOT_SETTINGS}
    asked = {k: v for k, v in model.items() if k not in NOT_SETTINGS}
    differences = [
        f"model.{key}: {_plain(saved[key])} in the checkpoint, {_plain(asked[key])} asked"
        for key in sorted(saved.keys() & asked.keys())
        if _plain(saved[key]) != _plain(asked[key])
    ]
    identity = checkpoint.get(CHECKPOINT_KEY) or {}
    if "seed" in identity and identity["seed"] != seed:
        differences.insert(0, f"seed_everything: {identity['seed']} in the checkpoint, {seed} asked")
    return differences


def run_checkpoints(root) -> list[Path]:
    """Every checkpoint a run resumes from under ``root``: ``last*.ckpt`` (ModelCheckpoint's, and the one
    saved when a run is interrupted) and Lightning's SLURM ``hpc_ckpt_*.ckpt``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {p for pattern in (LAST_CHECKPOINTS, HPC_CHECKPOINTS) for p in root.rglob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def find_own_checkpoint(root, seed: int | None, model: dict, job: str | None = None) -> tuple[Path | None, list]:
    """The newest checkpoint under ``root`` of the run with this seed and these model settings (written by
    SLURM job ``job``, when given), and the checkpoints passed over as ``(path, why)``.

    A damaged one is passed over, with a warning naming it, for the newest checkpoint beside it (its
    run's folder) that loads; one that does not record its seed is passed over, since whose it is
    cannot be told.
    """
    passed, seen = [], set()
    candidates = run_checkpoints(root)
    while candidates:
        path = candidates.pop(0)
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        problem = checkpoint_problem(path)
        checkpoint = None if problem else read_checkpoint(path)
        if checkpoint is None:
            why = f"damaged and cannot be read ({problem})" if problem else "cannot be read"
            log.warning("%s is %s; looking for the newest checkpoint beside it that loads", path, why)
            passed.append((path, why))
            beside = sorted(path.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
            candidates = [p for p in beside if p.is_file()] + candidates
            continue
        identity = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(identity, dict) or "seed" not in identity:
            passed.append((path, "does not record its run (not written by train.py)"))
            continue
        differences = settings_differences(checkpoint, seed, model)
        if differences:
            passed.append((path, "another run: " + "; ".join(differences)))
        elif job is not None and identity.get("slurm_job") != job:
            passed.append((path, f"written by SLURM job {identity.get('slurm_job')}, not this job {job}"))
        else:
            return path, passed
    return None, passed


def wandb_run_id(checkpoint_path) -> str | None:
    """The W&B run id that a run resumed from ``checkpoint_path`` continues: the run that wrote it.

    One grid point, one run, however often it is interrupted and resumed, is one W&B run. Read from
    the checkpoint (train.py records it), else from the W&B run folder it lies in
    (``wandb/offline-run-<time>-<id>/checkpoints/``); None when neither tells.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    identity = (checkpoint or {}).get(CHECKPOINT_KEY) or {}
    if identity.get("wandb_id"):
        return str(identity["wandb_id"])
    for folder in Path(checkpoint_path).resolve().parents:
        match = _WANDB_FOLDER.match(folder.name)
        if match:
            return match["id"]
    return None
