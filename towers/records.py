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
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from towers.files import write_atomic
from towers.verdict import Verdict

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the format
FORMAT = "towers.bisection"
# 3: the verdict of towers.verdict's one engine (majority sides, unstructured kernels, eta2 and its p
#    among the verdict's fields); 2: the earlier rule (best bipartition, binomial "largely" tests);
#    1: before the verdict. Records of another version are read but never pooled with these.
VERSION = 3

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


# ----------------------------------------------------------------------------- the record
VERDICT_FIELDS = tuple(Verdict.__dataclass_fields__)
# The run's answer in its W&B summary and in the sweep's state (Record.summary): these verdict fields
# (those the engine has), beside the record's identity.
SUMMARY_FIELDS = (
    "verdict",
    "reason",
    "margin",
    "delta_f",
    "delta_f_low",
    "delta_f_high",
    "p_delta_f",
    "permutations",
    "towers",
    "colour_fraction",
    "colour_fraction_low",
    "colour_fraction_high",
    "agnostic_tower",
    "specific_tower",
    "agnostic_group",
    "specific_group",
    "grey_fraction_agnostic",  # with delta_f: the sides set beside Figure 3 (towers.reference.versus_paper)
    "colour_fraction_specific",
    "unstructured_count",
    "frequency_median",
    "frequency_bands",  # the dominant-frequency description beside the verdict (the sweep table, the report)
    "frequency_grey",
    "frequency_colour",
    "eta2",
    "eta2_null",
    "p_eta2",
    "omega2",
)
LEGACY_STATISTICS = {"eta2": "eta2", "eta2_null": "eta2_null", "p_eta2": "p_value", "omega2": "omega2"}


@dataclass
class Record:
    """One measurement of a run's first-layer kernels, the one type every writer and reader of it uses:
    ``bisection.json`` and ``bisection_history.jsonl`` (:meth:`to_dict`), the W&B summary and the sweep's
    state (:meth:`summary`), the logged scalars (:meth:`metrics`), ``analysis/compare*.py`` and the
    sweep table (:meth:`from_dict`, which reads all of these back).

    The verdict (:class:`towers.verdict.Verdict`) is one typed sub-object, ``record.verdict``; on disk its
    fields sit at the record's top level (``"verdict": "specialised"``, ``"delta_f"``, ...), as
    :func:`towers.measure.measure` writes them. ``version`` is the rule the record was judged by
    (:data:`VERSION`); a record of another version is read as it is but never pooled with this one's.
    Keys this version does not know are kept in ``extra`` and written back.
    """

    version: int | None = VERSION
    stage: str | None = None  # "init", "interval", "end"; None for a file measured afterwards
    step: int | None = None
    epoch: int | None = None
    time: str | None = None
    num_towers: int | None = None
    kernels_per_tower: int | None = None
    error: str | None = None  # why there is no verdict (e.g. weights not finite)
    verdict: Verdict | None = None
    statistics: dict | None = None  # eta2's block as towers.color.Bisection holds it (the score plot reads it)
    tower: list | None = None  # per kernel, its tower
    score: list | None = None  # per kernel, its colour score (total, dc, ac)
    score_dc: list | None = None
    score_ac: list | None = None
    tower_median: list | None = None  # per tower, the median score (total, dc, ac)
    tower_median_dc: list | None = None
    tower_median_ac: list | None = None
    kernel_change: list | None = None  # per tower ||W - W0|| / ||W0||
    kernels_file: str | None = None  # the .npy beside bisection.json holding these kernels
    extra: dict = field(default_factory=dict)

    # --- reading and writing
    @classmethod
    def from_dict(cls, data: dict | None, version: int | None = None) -> "Record":
        """A record from any of its forms (bisection.json's, a history line, a summary). ``version``: the
        file's, for records written before each record carried its own (a missing one reads as 1)."""
        data = dict(data or {})
        own = {k: data.pop(k) for k in list(data) if k in RECORD_FIELDS}
        judged = data.get("verdict") is not None
        # eta2 and its p without a verdict to hold them (a summary or logged scalars): kept in statistics
        legacy = {old: data.get(k) for k, old in LEGACY_STATISTICS.items() if not judged or k not in VERDICT_FIELDS}
        if any(v is not None for v in legacy.values()):
            own["statistics"] = {**{k: v for k, v in legacy.items() if v is not None}, **(own.get("statistics") or {})}
        verdict = Verdict(**{k: data.get(k) for k in VERDICT_FIELDS}) if judged else None
        for k in (*VERDICT_FIELDS, *LEGACY_STATISTICS):
            data.pop(k, None)
        own.setdefault("version", version or 1)
        return cls(**own, verdict=verdict, extra=data)

    def to_dict(self) -> dict:
        """The record as bisection.json and the history file hold it (strict-JSON values)."""
        out = {k: getattr(self, k) for k in RECORD_FIELDS}
        fields = self.verdict.to_dict() if self.verdict is not None else dict.fromkeys(VERDICT_FIELDS)
        return {**self.extra, **out, **fields}

    def value(self, name: str):
        """A verdict field by name (None without a verdict or when the engine has no such field); eta2
        and its p from ``statistics`` for records of engines that kept them there."""
        if self.verdict is not None and name in VERDICT_FIELDS and getattr(self.verdict, name) is not None:
            return getattr(self.verdict, name)
        if name in LEGACY_STATISTICS and self.statistics:
            return self.statistics.get(LEGACY_STATISTICS[name])
        return None

    def summary(self) -> dict:
        """The run's answer for its W&B summary and the sweep's state: identity and SUMMARY_FIELDS
        (a form :meth:`from_dict` reads back)."""
        identity = {k: getattr(self, k) for k in ("version", "stage", "step", "epoch", "num_towers", "error")}
        return {**identity, **{k: self.value(k) for k in SUMMARY_FIELDS}}

    def metrics(self) -> dict:
        """The scalars the callback logs for this record, by key; None values left out."""
        scalars = {ETA2: self.value("eta2"), P_VALUE: self.value("p_eta2"), ETA2_NULL: self.value("eta2_null")}
        stats = self.statistics or {}
        if (self.num_towers or 0) > 2:
            scalars[ETA2_SPLIT] = (
                self.value("eta2_split") if "eta2_split" in VERDICT_FIELDS else stats.get("eta2_split")
            )
            scalars[P_VALUE_SPLIT] = (
                self.value("p_eta2_split") if "p_eta2_split" in VERDICT_FIELDS else stats.get("p_value_split")
            )
        if self.verdict is not None:
            v = self.verdict
            scalars.update(
                {SPECIALISED: float(v.verdict == "specialised"), DELTA_F: v.delta_f, P_DELTA_F: v.p_delta_f, AUC: v.auc}
            )
            for k, fraction in enumerate(v.colour_fraction or (), start=1):
                scalars[colour_fraction_key(k)] = fraction
        for k, change in enumerate(self.kernel_change or (), start=1):
            scalars[kernel_change_key(k)] = change
        if self.tower_median is not None:
            parts = zip(self.tower_median, self.tower_median_dc, self.tower_median_ac)
            for k, (total, dc, ac) in enumerate(parts, start=1):
                scalars.update({color_score_key(k): total, color_score_key(k, "dc"): dc, color_score_key(k, "ac"): ac})
        if self.stage == "init":  # the baseline under its own names too, for side-by-side tables
            scalars.update(
                {
                    f"{k}{INIT_SUFFIX}": v
                    for k, v in list(scalars.items())
                    if k in (ETA2, P_VALUE) or k.endswith("/color_score")
                }
            )
        return {k: v for k, v in scalars.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}

    @property
    def judged(self) -> bool:
        """Judged by this version's rule: what the statistics across seeds may pool."""
        return self.verdict is not None and self.version == VERSION


RECORD_FIELDS = tuple(f for f in Record.__dataclass_fields__ if f not in ("verdict", "extra"))


def as_record(record) -> Record:
    """A Record from a Record or any of its dict forms."""
    return record if isinstance(record, Record) else Record.from_dict(record, VERSION)


def record_metrics(record) -> dict:
    """The scalars the callback logs for one record (:meth:`Record.metrics`)."""
    return as_record(record).metrics()


def record_summary(record) -> dict:
    """The run's answer for its W&B summary (:meth:`Record.summary`)."""
    return as_record(record).summary()


def history_line(record) -> str:
    """One line of ``bisection_history.jsonl``: the record as :meth:`Record.to_dict` writes it."""
    return json.dumps(as_record(record).to_dict(), allow_nan=False) + "\n"


# ----------------------------------------------------------------------------- writing


def write_json(path: Path, obj) -> None:
    """Strict JSON (no NaN), written atomically."""
    write_atomic(path, json.dumps(obj, indent=1, allow_nan=False))


def bisection_file(init, last, measurement_seconds: float, fit_seconds: float | None) -> dict:
    """The contents of ``bisection.json``: the first and the latest record (:class:`Record` or its dict),
    each naming its kernels file."""

    def with_file(record, name):
        return None if record is None else dict(as_record(record).to_dict(), kernels_file=name)

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


def read_bisection(path: Path) -> dict:
    """``bisection.json``: {"init": Record | None, "last": Record | None}; ValueError when it is not one."""
    data = load_bisection(path)
    version = data.get("version")
    return {k: None if data.get(k) is None else Record.from_dict(data[k], version) for k in ("init", "last")}


def read_history(path: Path) -> tuple[list[Record], int]:
    """``bisection_history.jsonl``: one Record per line, and how many lines were skipped because they do
    not parse (a line cut short by a killed process; the reader names the count, never drops the file)."""
    found, broken = [], 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            broken += 1
            continue
        if isinstance(data, dict):
            found.append(Record.from_dict(data))  # a line without its version predates version 3
        else:
            broken += 1
    return found, broken


def read_status(path: Path) -> dict:
    """``status.json`` of ``towers.runs.RunStatus``: how the run ended and its last metrics."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("summary") or {}, dict):
        raise ValueError(f"not a {STATUS_FILE} of towers.runs.RunStatus (a JSON {type(data).__name__})")
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
