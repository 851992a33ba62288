"""The runs' files read into a table: one function per file format, one ``Run`` per run, from local
folders or the W&B API, and a published figure's record (``--reference``). Part of analysis/compare.py."""

import csv
import io
import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from towers import conditions, records
from towers.conditions import flatten
from towers.records import (
    BISECTION_FILE,
    CONFIG_FILE,
    HISTORY_FILE,
    HPARAMS_FILE,
    KERNELS_NPY,
    KERNELS_PNG,
    METRICS_CSV,
    RUN_MARKERS,
    STATUS_FILE,
    SWEEP_FILE,
    TEST_ACC,
    VAL_ACC,
    WANDB_OFFLINE_PREFIX,
    WANDB_SUMMARY_FILE,
    Record,
    read_bisection,
    read_history,
    read_status,
)
from towers.verdict import onset_step

# ----------------------------------------------------------------------------- file formats
# The runs' files are named in towers/records.py, which reads the record and status.json; the other
# formats the runs leave behind (configs, loggers' summaries, the sweep's state) are read by one
# function each below, so a change of schema is an edit in one place. Everything after this section sees only plain dicts.

RUN_FILES = (
    BISECTION_FILE,
    HISTORY_FILE,
    KERNELS_PNG,
    KERNELS_NPY,
    STATUS_FILE,
    CONFIG_FILE,
    HPARAMS_FILE,
    WANDB_SUMMARY_FILE,
    METRICS_CSV,
)


def read_config(path: Path) -> dict:
    """``config.yaml``, Lightning's (as given to the CLI) or W&B's (``{key: {value: ...}}``), flattened."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if "_wandb" in data or all(isinstance(v, dict) and "value" in v for v in data.values()):
        data = {k: v.get("value") for k, v in data.items() if k != "_wandb" and isinstance(v, dict)}
    return flatten(data)


def read_hparams(path: Path) -> dict:
    """Lightning's ``hparams.yaml`` (the LightningModule's ``__init__`` arguments) as ``model.*`` keys."""
    # FullLoader: Lightning writes tuples as !!python/tuple (e.g. lr_milestones); it builds no other objects
    data = yaml.load(Path(path).read_text(), Loader=yaml.FullLoader) or {}
    return {f"model.{k}": v for k, v in flatten(data).items()}


def read_wandb_summary(path: Path) -> dict:
    """W&B's ``wandb-summary.json``: the last value of every logged metric."""
    return numbers(json.loads(Path(path).read_text()))


def read_metrics_csv(path: Path) -> dict:
    """Lightning CSVLogger's ``metrics.csv``: the last non-empty value of every column."""
    last = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            last.update({k: float(v) for k, v in row.items() if k and v not in ("", None)})
    return last


def read_sweep(path: Path) -> dict:
    """``sweep.json`` of ``towers.sweep``: the sweep's name and its runs (name, params, status)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("runs", []), list):
        raise ValueError(f"a JSON {type(data).__name__}, not a sweep's state")
    return {
        "name": data.get("name") or Path(path).parent.name,
        "runs": [
            {
                "name": r["name"],
                "params": r.get("params") or {},
                "status": r.get("status"),
                "message": r.get("message") or "",
                "root": Path(path).parent / "runs" / r["name"],
            }
            for r in data.get("runs", [])
        ],
    }


def numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# Table columns taken from the run's config (first key found wins): the CLI's names, then
# hparams.yaml's (read_hparams puts them under model.*), then a plain W&B config. What is pooled is the
# whole condition (towers.conditions), of which these are the settings a table shows.
CONFIG_COLUMNS = {
    "seed": ("seed_everything", "seed"),
    "num_towers": ("model.num_towers", "num_towers"),
    "width_policy": ("model.width_policy", "width_policy"),
    "color_blind": ("model.color_blind_towers",),  # the positive control's grey towers, e.g. "1"
    "precision": ("trainer.precision", "precision"),
    "data": ("data.source", "data.class_path"),
    "data_root": ("data.root",),
    "batch_size": ("data.batch_size", "batch_size"),
    "lr": ("model.lr", "lr"),
    "lr_schedule": ("model.lr_schedule",),
    "max_epochs": ("trainer.max_epochs", "max_epochs"),
}

# ----------------------------------------------------------------------------- the table

FIXED_COLUMNS = """
    run sweep condition seed num_towers width_policy color_blind precision data data_root batch_size lr lr_schedule
    max_epochs epochs step test_acc val_acc verdict reason margin delta_f p_delta_f
    auc agnostic_tower specific_tower onset_step eta2 eta2_null p_eta2 omega2 eta2_init p_eta2_init
    omega2_init verdict_init permutations version
""".split()
# No per-run interval of delta f: the verdict's Newcombe interval of its data-chosen sides does not cover
# where no real split exists (benchmarks/seed_simulation.py); the record keeps it.
ROW_FIELDS = ("verdict", "reason", "margin", "delta_f", "p_delta_f", "auc")
PER_TOWER = (
    "colour_fraction",
    "colour_fraction_low",
    "colour_fraction_high",
    "grey_share",
    "colour_share",
    "unstructured_count",
    "frequency_median",
    "frequency_grey",  # kernels per dominant-frequency band, low/mid/high: "13/23/9"
    "frequency_colour",
)


@dataclass
class Run:
    """One run: its table row, its records and its condition (towers.conditions)."""

    row: dict
    last: Record | None = None  # the final measurement
    init: Record | None = None
    history: list = field(default_factory=list)  # a Record per measurement
    kernels_png: Path | None = None
    kernels_npy: Path | None = None
    config: dict = field(default_factory=dict)  # the run's flattened config, as read (shown in the report)
    condition: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.row["run"]

    @property
    def usable(self) -> bool:
        """Finished, with a final measurement."""
        status = self.row["status"]
        finished = status == "finished" or (status in (None, "") and self.last is not None and self.last.stage == "end")
        return (
            finished
            and self.last is not None
            and (self.last.verdict is not None or self.last.value("eta2") is not None)
        )

    @property
    def judged(self) -> bool:
        """A seed with a verdict of this version's rule: what the statistics across seeds count."""
        return self.usable and self.last.judged


def _status(status: str | None, last: Record | None) -> str | None:
    if last is not None and last.error and "not finite" in last.error:
        return "diverged"
    return {"crashed": "failed"}.get(status, status)


def make_run(
    name: str,
    sweep: str | None,
    config: dict,
    summary: dict,
    status: dict | None,
    bisection: dict | None,
    history: list,
    kernels_png: Path | None,
    source: str,
    fallback_status: str | None = None,
    message: str = "",
    kernels_npy: Path | None = None,
) -> Run:
    """The table row of one run from what was read (the same function for both sources)."""
    last, init = (bisection or {}).get("last"), (bisection or {}).get("init")
    value = lambda rec, k: None if rec is None else rec.value(k)  # noqa: E731
    row = {"run": name, "sweep": sweep}
    for column, keys in CONFIG_COLUMNS.items():
        row[column] = next((config[k] for k in keys if config.get(k) is not None), None)
    if isinstance(row["color_blind"], (list, tuple)):  # a list of tower numbers: "1", "1,3"
        row["color_blind"] = ",".join(map(str, row["color_blind"])) or None
    if row["num_towers"] is None:
        row["num_towers"] = (last or init or Record()).num_towers
    condition = conditions.condition({**config, conditions.TOWERS: row["num_towers"]})
    row["condition"] = conditions.condition_id(condition)
    status = status or {}
    # trainer.current_epoch / global_step when the run ended (for a finished run: epochs completed);
    # the last measurement's epoch is the index of the epoch it was taken in, hence status.json first
    row["epochs"] = status["epoch"] if status.get("epoch") is not None else getattr(last, "epoch", None)
    row["step"] = status["step"] if status.get("step") is not None else getattr(last, "step", None)
    row["test_acc"], row["val_acc"] = summary.get(TEST_ACC), summary.get(VAL_ACC)
    for key in (*ROW_FIELDS, "eta2", "eta2_null", "p_eta2", "omega2", "permutations"):
        row[key] = value(last, key)
    # named only when specialised (the verdict leaves them None otherwise)
    row["agnostic_tower"], row["specific_tower"] = value(last, "agnostic_tower"), value(last, "specific_tower")
    row["onset_step"] = onset_step([h.to_dict() for h in history if h.verdict]) if value(last, "verdict") else None
    row["version"] = getattr(last, "version", None)
    for key in ("eta2", "p_eta2", "omega2", "verdict"):
        row[f"{key}_init"] = value(init, key)
    # per tower (the one-tower control: its random groups)
    for part in PER_TOWER:
        for k, x in enumerate(value(last, part) or [], start=1):
            row[f"tower{k}_{part}"] = "/".join(map(str, x)) if isinstance(x, list) else x
    for k, median in enumerate(getattr(last, "tower_median", None) or [], start=1):
        row[f"tower{k}_score"] = median
    row["status"] = _status(status.get("status") or fallback_status, last)
    older = last is not None and last.verdict is not None and not last.judged
    messages = [
        message or status.get("message") or getattr(last, "error", None) or "",
        f"judged by an earlier rule (record version {last.version}, this is {records.VERSION}): not pooled; "
        "measure it again with analysis/kernels.py"
        if older
        else "",
    ]
    row["message"] = "; ".join(m for m in messages if m)
    row["source"] = source
    return Run(row, last, init, history, kernels_png, kernels_npy, config, condition)


def load_run_folder(
    folder: Path | None,
    name: str,
    sweep: str | None = None,
    config: dict | None = None,
    summary: dict | None = None,
    status: str | None = None,
    fallback_status: str | None = None,
    message: str = "",
    history: list | None = None,
    source: str | None = None,
) -> Run:
    """A run from the files in its own folder (any may be missing). ``config`` / ``summary`` given
    here (a sweep's parameters, a W&B run's config) take precedence over the files'; ``status`` (the
    sweep agent's verdict) over ``status.json``, and that over ``fallback_status`` (W&B's run state).
    A file that cannot be read is named in the row's message and warned about; the rest is kept."""
    files = {n: folder / n for n in RUN_FILES if folder is not None and (folder / n).is_file()}
    problems = []

    def read(reader, file_name, default=None):
        if file_name not in files:
            return default
        try:
            return reader(files[file_name])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError, csv.Error) as err:
            problems.append(f"unreadable {file_name}: {err}")
            warnings.warn(f"run {name}: cannot read {files[file_name]}: {err}", stacklevel=2)
            return default

    merged_config = {
        **read(read_hparams, HPARAMS_FILE, {}),
        **read(read_config, CONFIG_FILE, {}),
        **flatten(config or {}),
    }
    status_json = read(read_status, STATUS_FILE)
    merged_summary = {
        **numbers(status_json["summary"] if status_json else {}),
        **read(read_metrics_csv, METRICS_CSV, {}),
        **read(read_wandb_summary, WANDB_SUMMARY_FILE, {}),
        **(summary or {}),
    }
    bisection = read(read_bisection, BISECTION_FILE)
    if history is None:
        history, broken = read(read_history, HISTORY_FILE, ([], 0))
        if broken:
            problems.append(f"{HISTORY_FILE}: {broken} broken line{'s' * (broken > 1)} skipped")
    if status:
        status_json = dict(status_json or {}, status=status)
    message = "; ".join(m for m in [message or (status_json or {}).get("message", ""), *problems] if m)
    return make_run(
        name,
        sweep,
        merged_config,
        merged_summary,
        status_json,
        bisection,
        history,
        files.get(KERNELS_PNG),
        source or str(folder),
        fallback_status,
        message,
        files.get(KERNELS_NPY),
    )


def _newest_run_folder(root: Path) -> Path | None:
    """The run folder under a sweep run's root written last (a resumed run may have several)."""
    found = [p for marker in RUN_MARKERS for p in root.rglob(marker)] if root.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime).parent.resolve() if found else None  # not via latest-run


def _run_folders(folder: Path) -> list[Path]:
    """Folders under ``folder`` holding a run marker, each once: W&B's ``wandb/latest-run`` is a link
    to a run folder that is also found under its own name, which is the one kept."""
    found = {}
    for path in sorted({p.parent for marker in RUN_MARKERS for p in folder.rglob(marker)}):
        parts = path.relative_to(folder).parts
        linked = any((folder.joinpath(*parts[: i + 1])).is_symlink() for i in range(len(parts)))
        found.setdefault(path.resolve(), []).append((linked, path))
    return [min(candidates)[1] for _, candidates in sorted(found.items())]


def unreadable(name: str, source, error: BaseException, sweep: str | None = None) -> Run:
    """A run whose folder cannot be read at all: a row that says why, counted nowhere."""
    warnings.warn(f"run {name}: cannot read {source}: {error}", stacklevel=2)
    row = dict.fromkeys(FIXED_COLUMNS)
    row.update(run=name, sweep=sweep, status="unreadable", message=f"cannot be read: {error}", source=str(source))
    return Run(row)


def collect_local(folders) -> list[Run]:
    """Every run under the given folders: the runs of each ``sweep.json`` (in its order), then every
    other folder holding a ``bisection.json`` or ``status.json``. A sweep file or a run folder that
    cannot be read is a row that says why; the others are read on."""
    runs, claimed = [], set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise SystemExit(f"{folder}: no such folder")
        for sweep_file in sorted(folder.rglob(SWEEP_FILE)):
            try:
                sweep = read_sweep(sweep_file)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                runs.append(unreadable(str(sweep_file.relative_to(folder)), sweep_file, err))
                continue
            for entry in sweep["runs"]:
                run_folder = _newest_run_folder(entry["root"])
                if entry["root"].is_dir():
                    claimed.add(entry["root"].resolve())
                try:
                    run = load_run_folder(
                        run_folder,
                        entry["name"],
                        sweep=sweep["name"],
                        config=entry["params"],
                        status=entry["status"],
                        message=entry["message"],
                        source=str(run_folder or entry["root"]),
                    )
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                    run = unreadable(entry["name"], run_folder or entry["root"], err, sweep["name"])
                runs.append(run)
        for run_folder in _run_folders(folder):
            resolved = run_folder.resolve()
            if any(resolved == c or c in resolved.parents for c in claimed):
                continue
            claimed.add(resolved)
            if run_folder.name == "files" and records.is_wandb_run_folder(run_folder):
                run_folder = run_folder.parent  # name a W&B run by its folder, offline-run-<time>-<id>
            name = str(run_folder.relative_to(folder)) if run_folder != folder else resolved.name
            try:
                runs.append(load_run_folder(resolved, name))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                runs.append(unreadable(name, resolved, err))
    if not runs:
        raise SystemExit(
            f"no runs found under {', '.join(map(str, folders))}: looked for {SWEEP_FILE} (a towers.sweep output "
            f"folder) and for folders holding {BISECTION_FILE} or {STATUS_FILE} (written by "
            f"KernelBisectionCallback / RunStatus into each run's folder: wandb/{WANDB_OFFLINE_PREFIX}*/files/, "
            f"lightning_logs/version_N/, or the trainer's default_root_dir)"
        )
    return runs


def _wandb_state(state: str | None) -> str | None:
    return {"crashed": "failed"}.get((state or "").lower(), (state or "").lower() or None)


def collect_wandb(path: str, sweep: str | None = None, api=None, cache: Path | None = None) -> list[Run]:
    """Every run of a W&B project (``ENTITY/PROJECT``) or of one of its sweeps, through ``wandb.Api()``.

    The run's own files (``bisection.json`` etc., uploaded from its ``files/`` folder) are
    downloaded into ``cache`` and read as for a local run; its config and summary come from the API.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    cache = Path(cache or tempfile.mkdtemp(prefix="towers-compare-"))
    runs_api = api.sweep(f"{path}/{sweep}").runs if sweep else api.runs(path)
    runs = []
    for run in runs_api:
        folder = cache / run.id
        folder.mkdir(parents=True, exist_ok=True)
        for f in run.files():
            if f.name in RUN_FILES and f.name not in (CONFIG_FILE, WANDB_SUMMARY_FILE):
                f.download(root=str(folder), replace=True)
        history = None
        if not (folder / HISTORY_FILE).is_file():  # fall back on the logged scalars
            history = [
                Record.from_dict(
                    {
                        "step": h.get("_step"),
                        "eta2": h.get(records.ETA2),
                        "p_eta2": h.get(records.P_VALUE),
                        "delta_f": h.get(records.DELTA_F),
                        "verdict": None
                        if h.get(records.SPECIALISED) is None
                        else ("specialised" if h[records.SPECIALISED] else "not specialised"),
                    },
                    records.VERSION,
                )
                for h in run.scan_history(keys=[records.ETA2, records.P_VALUE, records.DELTA_F, records.SPECIALISED])
            ]
        sweep_name = run.sweep.id if getattr(run, "sweep", None) is not None else getattr(run, "group", None)
        summary = numbers(dict(run.summary.items()))
        runs.append(
            load_run_folder(
                folder,
                run.name or run.id,
                sweep=sweep_name,
                config=read_wandb_config(run.config),
                summary=summary,
                fallback_status=_wandb_state(run.state),
                history=history,
                source=f"wandb:{path}/{run.id}",
            )
        )
    if not runs:
        raise SystemExit(f"no runs found in W&B {'sweep ' + sweep + ' of ' if sweep else 'project '}{path}")
    return runs


def read_wandb_config(config: dict) -> dict:
    """``run.config`` of the public API (plain values; nested as logged) flattened like a config.yaml."""
    return flatten({k: v for k, v in config.items() if not k.startswith("_")})


def table_columns(runs: list[Run]) -> list[str]:
    towers = max(
        [r.row.get("num_towers") or 0 for r in runs]
        + [len(r.last.value("colour_fraction") or []) for r in runs if r.last is not None]
    )
    per_tower = [f"tower{k}_{part}" for k in range(1, towers + 1) for part in (*PER_TOWER, "score")]
    return FIXED_COLUMNS + per_tower + ["status", "message", "source"]


def table_csv(runs: list[Run]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, table_columns(runs), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for run in runs:
        writer.writerow({k: ("" if v is None else v) for k, v in run.row.items()})
    return out.getvalue()


# ----------------------------------------------------------------------------- a published figure


def read_reference(path: Path) -> dict:
    """The record of a published figure, as ``python analysis/kernels.py FIGURE.png --towers 2 --json OUT``
    writes it (a record of ``towers.measure.measure``), or wrapped as {"last": record} like
    ``bisection.json``. Returns its name (the file's stem) and the numbers the report shows."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--reference {path}: cannot read it as JSON: {err}") from None
    record = data.get("last") if isinstance(data, dict) and isinstance(data.get("last"), dict) else data
    if not isinstance(record, dict) or record.get("verdict") is None:
        raise SystemExit(
            f"--reference {path}: no verdict in it (write it with python analysis/kernels.py "
            f"FIGURE.png --towers 2 --json {path.name})"
        )
    rec = Record.from_dict(record, records.VERSION)
    return {
        "name": path.stem,
        "source": str(path),
        "record": rec,
        "num_towers": rec.num_towers,
        **{k: rec.value(k) for k in (*records.SUMMARY_FIELDS, "auc")},
    }
