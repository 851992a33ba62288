"""The run record: what a run leaves in its own folder, under which names, and how it is read back.

Every writer (:class:`towers.callbacks.KernelBisectionCallback`, :class:`towers.runs.RunStatus`, the
offline sweep agent) and every reader (``analysis/compare*.py``, ``analysis/kernels.py``,
``analysis/dashboard.py``, the sweep agent's table) takes the file names, the logged metric keys and
the readers from here, so a change of schema is an edit in one place. No Lightning: the sweep agent
and the analysis scripts load it without it.

A run's own folder (:func:`towers.runs.run_dir`; for W&B ``wandb/offline-run-<time>-<id>/files/``)::

    config.yaml                        the resolved config (towers.runs.SaveRunConfig)
    status.json                        how the run ended, its metrics per validation (towers.runs.RunStatus)
    bisection.json                     {"format": FORMAT, "version": VERSION, "init": record, "last": record, ...}
    bisection_history.jsonl            one record per measurement, appended
    kernels.npy, kernels_init.npy      the raw conv1 weights (towers, kernels per tower, 3, h, w), RGB
    kernels.png, scores.png            the latest Figure-3 style grid and score strip plot (and *_init.png)
    kernels/step_0001234.{png,npy}     the grid and weights of every measurement

A record (one measurement) is built by :func:`towers.measure.measure`; the callback adds when it was
taken (stage, step, epoch, time) and which kernels file holds its weights.
"""

import json
import logging
import pickle
import zipfile
from pathlib import Path

import torch

from towers.files import read_jsonl, write_atomic
from towers.verdict import Verdict

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the format
FORMAT = "towers.bisection"
VERSION = 2  # 2: the verdict's keys (towers.verdict.Verdict) in every record; the control's halves are random

# ----------------------------------------------------------------------------- file names
BISECTION_FILE = "bisection.json"  # KernelBisectionCallback: the first and the latest record
HISTORY_FILE = "bisection_history.jsonl"  # the same, one record per measurement
KERNELS_NPY = "kernels.npy"  # the latest kernels (T, n, 3, h, w): analysis redraws them
KERNELS_INIT_NPY = "kernels_init.npy"  # the kernels at initialisation
KERNELS_PNG = "kernels.png"  # the latest Figure-3 grid
SCORES_PNG = "scores.png"  # the latest score strip plot
INIT_SUFFIX = "_init"  # kernels_init.png, scores_init.png; and the baseline's metric keys
STEPS_DIR = "kernels"  # kernels/step_0001234.png and .npy: every measurement
STATUS_FILE = "status.json"  # towers.runs.RunStatus
CONFIG_FILE = "config.yaml"  # towers.runs.SaveRunConfig (W&B writes its own config.yaml into files/ too)
SWEEP_FILE = "sweep.json"  # towers.sweep_state: the offline sweep's state
SWEEP_LOCK_FILE = "sweep.json.lock"
WANDB_OFFLINE_PREFIX = "offline-run-"  # W&B's folder of an offline run: wandb/offline-run-<time>-<id>/
WANDB_ONLINE_PREFIX = "run-"  # ... and of an online one
WANDB_FILES_DIR = "files"  # the W&B run folder's files/, which `wandb sync` uploads: the run's own folder
LAST_CHECKPOINTS = "last*.ckpt"  # ModelCheckpoint(save_last=...): last.ckpt, last-v1.ckpt, ...
RUN_MARKERS = (BISECTION_FILE, STATUS_FILE)  # a folder with one of these is a run's own folder
# what the loggers leave in a run's folder (analysis/compare_read.py reads them)
HPARAMS_FILE = "hparams.yaml"  # Lightning's loggers: the LightningModule's arguments
WANDB_SUMMARY_FILE = "wandb-summary.json"  # W&B: the last value of every logged metric
METRICS_CSV = "metrics.csv"  # Lightning's CSVLogger

# Exit status of train.py for a run stopped because its loss became NaN or infinite (1 is an uncaught
# Python exception, 2 a command-line error). The sweep agent records such a run as "diverged".
EXIT_DIVERGED = 3


GRID, SCORE_PLOT = "kernels", "scores"  # the callback's two pictures: their file names and logged image keys


def picture_file(name: str, init: bool = False) -> str:
    """``kernels.png`` / ``scores.png``, or the baseline's ``kernels_init.png`` / ``scores_init.png``."""
    return f"{name}{INIT_SUFFIX if init else ''}.png"


def kernels_file(init: bool = False) -> str:
    return KERNELS_INIT_NPY if init else KERNELS_NPY


def step_file(step: int, suffix: str) -> str:
    """The file of one measurement under the run's folder, ``kernels/step_0001234.png`` (suffix ``.png``/``.npy``)."""
    return f"{STEPS_DIR}/step_{step:07d}{suffix}"


def is_wandb_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is W&B's ``files/`` folder of a run (``wandb/[offline-]run-<time>-<id>/files``)."""
    return folder.name == WANDB_FILES_DIR and folder.parent.name.startswith((WANDB_OFFLINE_PREFIX, WANDB_ONLINE_PREFIX))


# ----------------------------------------------------------------------------- metric keys
# What the callback logs to every logger (W&B, TensorBoard, CSV); the dashboard's panels read them.
ETA2, ETA2_NULL, P_VALUE = "bisection/eta2", "bisection/eta2_null", "bisection/p_value"
ETA2_SPLIT, P_VALUE_SPLIT = "bisection/eta2_split", "bisection/p_value_split"  # three or more towers
SPECIALISED, DELTA_F, P_DELTA_F, AUC = "verdict/specialised", "verdict/delta_f", "verdict/p_delta_f", "verdict/auc"


def accuracy_key(stage: str, top_k: int = 1) -> str:
    """What towers.module.TowerClassifier logs as a stage's accuracy: ``train/acc``, ``val/acc``, ``test/acc``
    (top-1), and ``val/acc_top5``, ``test/acc_top5`` (``top_k=5``)."""
    return f"{stage}/acc" if top_k == 1 else f"{stage}/acc_top{top_k}"


TEST_ACC, VAL_ACC = accuracy_key("test"), accuracy_key("val")
# The run's answer in its W&B summary, under the record's own keys (the last measurement wins).
SUMMARY_KEYS = (
    "verdict",
    "delta_f",
    "delta_f_low",
    "delta_f_high",
    "p_delta_f",
    "colour_fraction",
    "colour_fraction_low",
    "colour_fraction_high",
    "agnostic_tower",
    "specific_tower",
)
SUMMARY_STATISTICS = ("eta2", "p_value")  # from the record's statistics


def image_key(name: str) -> str:
    """The logged image of the grid (``kernels``) or the score plot (``scores``): ``bisection/kernels``."""
    return f"bisection/{name}"


def colour_fraction_key(tower: int) -> str:
    return f"tower_{tower}/colour_fraction"


def kernel_change_key(tower: int) -> str:
    return f"tower_{tower}/kernel_change"


def color_score_key(tower: int, part: str = "", init: bool = False) -> str:
    """A tower's median colour score: ``part`` "" (total), "dc" or "ac"; ``init``: the baseline's key."""
    return f"tower_{tower}/color_score" + (f"_{part}" if part else "") + (INIT_SUFFIX if init else "")


def record_metrics(record: dict) -> dict:
    """The scalars the callback logs for one record, by key; None values left out."""
    scalars = {}
    stats = record["statistics"]
    if stats is not None:
        scalars.update({ETA2: stats["eta2"], P_VALUE: stats["p_value"], ETA2_NULL: stats["eta2_null"]})
        if record["num_towers"] > 2:
            scalars.update({ETA2_SPLIT: stats["eta2_split"], P_VALUE_SPLIT: stats["p_value_split"]})
    if record.get("verdict") is not None:
        scalars.update(
            {
                SPECIALISED: float(record["verdict"] == "specialised"),
                DELTA_F: record["delta_f"],
                P_DELTA_F: record["p_delta_f"],
                AUC: record["auc"],
            }
        )
        for k, fraction in enumerate(record["colour_fraction"], start=1):
            scalars[colour_fraction_key(k)] = fraction
    for k, change in enumerate(record.get("kernel_change") or (), start=1):
        scalars[kernel_change_key(k)] = change
    if record["tower_median"] is not None:
        for k, (total, dc, ac) in enumerate(
            zip(record["tower_median"], record["tower_median_dc"], record["tower_median_ac"]), start=1
        ):
            scalars.update({color_score_key(k): total, color_score_key(k, "dc"): dc, color_score_key(k, "ac"): ac})
    if record["stage"] == "init":  # the baseline under its own names too, for side-by-side tables
        scalars.update(
            {
                f"{key}{INIT_SUFFIX}": value
                for key, value in list(scalars.items())
                if key in (ETA2, P_VALUE) or key.endswith("/color_score")
            }
        )
    return {k: v for k, v in scalars.items() if v is not None}


def record_summary(record: dict) -> dict:
    """The run's answer for its W&B summary: the verdict's keys and eta2 with its p."""
    stats = record["statistics"] or {}
    return {**{k: record[k] for k in SUMMARY_KEYS}, **{k: stats.get(k) for k in SUMMARY_STATISTICS}}


# ----------------------------------------------------------------------------- writing


def write_json(path: Path, obj) -> None:
    """Strict JSON (no NaN), written atomically."""
    write_atomic(path, json.dumps(obj, indent=1, allow_nan=False))


def bisection_file(init: dict | None, last: dict | None, measurement_seconds: float, fit_seconds: float | None) -> dict:
    """The contents of ``bisection.json``: the first and the latest record, each naming its kernels file."""

    def with_file(record, name):
        return None if record is None else dict(record, kernels_file=name)

    return {
        "format": FORMAT,
        "version": VERSION,
        "init": with_file(init, kernels_file(init=True)),
        "last": with_file(last, kernels_file()),
        "history": HISTORY_FILE,
        "measurement_seconds": round(measurement_seconds, 4),  # all measurements of this fit so far
        "fit_seconds": None if fit_seconds is None else round(fit_seconds, 4),
    }  # set at the end


# ----------------------------------------------------------------------------- reading


def load_bisection(path: Path) -> dict:
    """``bisection.json`` as written (records in full); ValueError when it is not one."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a {FORMAT} file (format {data.get('format') if isinstance(data, dict) else None!r})"
        )
    return data


# the eta2 numbers are read from the record's statistics (older files have them only there)
VERDICT_KEYS = [
    k
    for k in Verdict.__dataclass_fields__
    if k not in ("control", "permutations", "eta2", "eta2_null", "omega2", "eta2_split")
]


def measurement(record: dict | None) -> dict:
    """The numbers of one record of ``bisection.json`` / ``bisection_history.jsonl`` (empty: none)."""
    if not record:
        return {}
    stats = record.get("statistics") or {}
    return {
        "step": record.get("step"),
        "epoch": record.get("epoch"),
        "stage": record.get("stage"),
        "num_towers": record.get("num_towers"),
        "kernels_per_tower": record.get("kernels_per_tower"),
        "error": record.get("error"),
        "score": record.get("score"),
        "tower": record.get("tower"),
        "tower_median": record.get("tower_median"),
        "eta2": stats.get("eta2"),
        "eta2_null": stats.get("eta2_null"),
        "p_value": stats.get("p_value"),
        "eta2_split": stats.get("eta2_split"),
        "p_value_split": stats.get("p_value_split"),
        "omega2": stats.get("omega2"),
        "permutations": stats.get("permutations"),
        # the verdict (bisection.json format 2; None in older files): every Verdict field by its name
        **{k: record.get(k) for k in VERDICT_KEYS},
        "control": record.get("control", stats.get("control")),
        "p_permutations": record.get("permutations"),
    }  # the verdict's (the p_delta_f floor)


def read_bisection(path: Path) -> dict:
    """``bisection.json``: {"init": measurement, "last": measurement} (format version 1 lacks the verdict's keys)."""
    data = load_bisection(path)
    return {"init": measurement(data.get("init")), "last": measurement(data.get("last"))}


def read_history(path: Path) -> list[dict]:
    """``bisection_history.jsonl``: one measurement per line (a last line cut short by a killed
    process is dropped with a warning)."""
    return [measurement(record) for record in read_jsonl(path)]


def read_status(path: Path) -> dict:
    """``status.json`` of ``towers.runs.RunStatus``: how the run ended and its last metrics."""
    data = json.loads(Path(path).read_text())
    return {
        "status": data.get("status"),
        "message": data.get("message") or "",
        "epoch": data.get("epoch"),
        "step": data.get("step"),
        "summary": data.get("summary") or {},
    }


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_problem(path) -> str | None:
    """Why the checkpoint ``path`` cannot be read, or None when it can.

    Cheap: the zip's directory and the pickled structure are read, the tensors only mapped
    (``mmap``), so a truncated file (a killed write, a full disk) is caught without reading the
    weights; damage inside a tensor's bytes shows only when it is loaded.
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            return None  # intact, only holding an object the weights-only loader refuses; Lightning decides
        return f"cannot be unpickled: {first_line(error)}"
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as error:
        return first_line(error)
    return None


def first_line(error: BaseException) -> str:
    """The first sentence of an error's message (torch's zip reader adds a paragraph of advice)."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


def newest_loadable_checkpoint(folder, exclude=()) -> Path | None:
    """The most recently written ``*.ckpt`` in ``folder`` (not below it) that :func:`checkpoint_problem` passes."""
    skip = {Path(p).resolve() for p in exclude}
    found = sorted(
        (p for p in Path(folder).glob("*.ckpt") if p.is_file() and p.resolve() not in skip),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    return next((p for p in found if checkpoint_problem(p) is None), None)


def newest_last_checkpoint(root, check: bool = False) -> Path | None:
    """The most recently written ``last*.ckpt`` anywhere under ``root`` (a run folder or a sweep run's
    folder), or None. Symbolic links count when they point at a file (``save_last: link``).

    With ``check`` (what ``train.py --ckpt_path last`` uses), a damaged one (:func:`checkpoint_problem`)
    is passed over with a warning naming it, for the newest checkpoint beside it (the same run's folder)
    that loads, said so too. Without, files are not opened (the sweep agent resumes with it; the sweep
    tests' stand-in writes JSON ones).
    """
    found = sorted(
        (p for p in Path(root).rglob(LAST_CHECKPOINTS) if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if not check:
        return found[0] if found else None
    for last in found:
        problem = checkpoint_problem(last)
        if problem is None:
            return last
        fallback = newest_loadable_checkpoint(last.parent, exclude=[last, last.resolve()])
        log.warning(
            "%s is damaged and cannot be read (%s); %s",
            last,
            problem,
            f"falling back to {fallback}, the newest checkpoint of that run that loads"
            if fallback
            else "no other checkpoint of that run loads",
        )
        if fallback is not None:
            return fallback
    return None
