"""Compare the colour bisection across runs: one table, its figures, an HTML report and a CSV.

    python analysis/compare.py runs/sweeps/demo --out reports/demo          # local run folders
    python analysis/compare.py --wandb ENTITY/PROJECT [--sweep ID] --out reports/demo

Local folders may hold any mix of a sweep's output folder (``sweep.json`` and ``runs/NAME/``, see
``towers/sweep.py``), offline W&B runs (``wandb/offline-run-*/files/``) and Lightning log dirs
(``lightning_logs/version_N/``): a run is a folder with the ``bisection.json`` or ``status.json``
that ``towers.callbacks.KernelBisectionCallback`` and ``towers.runs.RunStatus`` write into the folder
the run owns (``towers.runs.run_dir``), plus every run a ``sweep.json`` lists (a run that failed
before it wrote anything is still a row). From W&B the same files are downloaded from each run,
so both sources give the same table.

One row per run: sweep, seed, tower count, width policy, batch size, learning rate, epochs, test
(and validation) accuracy, eta^2 with its permutation p-value and chance level, the per-tower median
colour score and its initialisation baseline, and how the run ended. Written to ``OUT``:

    table.csv              the table
    report.html            one self-contained file: the figures embedded, the table sortable
    eta2_by_towers.png     eta^2 per seed against tower count, median and bootstrap interval, chance
    significant.png        fraction of seeds with p < alpha per condition, Clopper-Pearson interval
    tower_scores.png       per-tower colour-score distributions, trained against initialisation
    kernels_montage.png    the final Figure-3 grids of chosen runs, side by side
    eta2_over_steps.png    the statistic over training steps for every run

A "condition" is every hyperparameter in the table except the seed; its seeds are the runs that
finished (status "finished", or no status file and a final measurement). Diverged, failed and
unfinished runs stay in the table and are counted, by name, in the report, never in a statistic.
"""

import argparse
import base64
import csv
import html
import io
import json
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from towers.files import read_jsonl, write_atomic  # noqa: E402

# ----------------------------------------------------------------------------- file formats
# Each format the runs leave behind is read by one function below, so a change of schema is an
# edit in one place. Everything after this section sees only plain dicts.

BISECTION_FILE = "bisection.json"  # towers.callbacks.KernelBisectionCallback
HISTORY_FILE = "bisection_history.jsonl"  # the same, one record per measurement
KERNELS_FILE = "kernels.png"  # the same, the latest Figure-3 grid
STATUS_FILE = "status.json"  # towers.runs.RunStatus
SWEEP_FILE = "sweep.json"  # towers.sweep (the offline agent)
RUN_MARKERS = (BISECTION_FILE, STATUS_FILE)  # a folder with one of these is a run's own folder
RUN_FILES = (BISECTION_FILE, HISTORY_FILE, KERNELS_FILE, STATUS_FILE, "config.yaml", "hparams.yaml",
             "wandb-summary.json", "metrics.csv")


def measurement(record: dict | None) -> dict:
    """The numbers of one record of ``bisection.json`` / ``bisection_history.jsonl`` (empty: none)."""
    if not record:
        return {}
    stats = record.get("statistics") or {}
    return {"step": record.get("step"), "epoch": record.get("epoch"), "stage": record.get("stage"),
            "num_towers": record.get("num_towers"), "kernels_per_tower": record.get("kernels_per_tower"),
            "error": record.get("error"), "score": record.get("score"), "tower": record.get("tower"),
            "tower_median": record.get("tower_median"),
            "eta2": stats.get("eta2"), "eta2_null": stats.get("eta2_null"), "p_value": stats.get("p_value"),
            "eta2_split": stats.get("eta2_split"), "p_value_split": stats.get("p_value_split"),
            "color_group": stats.get("color_group"), "control": stats.get("control")}


def read_bisection(path: Path) -> dict:
    """``bisection.json``: {"init": measurement, "last": measurement}."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != "towers.bisection":
        raise ValueError(f"{path}: not a towers.bisection file (format {data.get('format')!r})")
    return {"init": measurement(data.get("init")), "last": measurement(data.get("last"))}


def read_history(path: Path) -> list[dict]:
    """``bisection_history.jsonl``: one measurement per line (a last line cut short by a killed
    process is dropped with a warning)."""
    return [measurement(record) for record in read_jsonl(path)]


def read_status(path: Path) -> dict:
    """``status.json`` of ``towers.runs.RunStatus``: how the run ended and its last metrics."""
    data = json.loads(Path(path).read_text())
    return {"status": data.get("status"), "message": data.get("message") or "",
            "epoch": data.get("epoch"), "step": data.get("step"), "summary": data.get("summary") or {}}


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config -> dotted keys; jsonargparse's ``init_args`` level is dropped
    (``data.init_args.batch_size`` -> ``data.batch_size``)."""
    out = {}
    for key, value in config.items():
        key = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{key}."))
        else:
            out[key] = value
    return {k.replace(".init_args.", ".").removeprefix("init_args."): v for k, v in out.items()}


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
    return {"name": data.get("name") or Path(path).parent.name,
            "runs": [{"name": r["name"], "params": r.get("params") or {}, "status": r.get("status"),
                      "message": r.get("message") or "", "root": Path(path).parent / "runs" / r["name"]}
                     for r in data.get("runs", [])]}


def numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# Table columns taken from the run's config (first key found wins): the CLI's names, then
# hparams.yaml's (read_hparams puts them under model.*), then a plain W&B config.
CONFIG_COLUMNS = {
    "seed": ("seed_everything", "seed"),
    "num_towers": ("model.num_towers", "num_towers"),
    "width_policy": ("model.width_policy", "width_policy"),
    "batch_size": ("data.batch_size", "batch_size"),
    "lr": ("model.lr", "lr"),
    "max_epochs": ("trainer.max_epochs", "max_epochs"),
}
TEST_ACC, VAL_ACC = "test/acc", "val/acc"

# ----------------------------------------------------------------------------- the table

FIXED_COLUMNS = ["run", "sweep", "seed", "num_towers", "width_policy", "batch_size", "lr", "max_epochs",
                 "epochs", "step", "test_acc", "val_acc", "eta2", "eta2_null", "p_value", "significant",
                 "eta2_split", "p_value_split", "eta2_init", "p_value_init", "color_tower"]
CONDITION = ["num_towers", "width_policy", "batch_size", "lr", "max_epochs"]  # all but the seed


@dataclass
class Run:
    """One run: its table row, and what the figures need beyond it."""

    row: dict
    last: dict = field(default_factory=dict)  # measurement() of the final record
    init: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # measurement() per step
    kernels_png: Path | None = None

    @property
    def name(self) -> str:
        return self.row["run"]

    @property
    def usable(self) -> bool:
        """Counts as a seed of its condition: finished, with a final measurement."""
        status = self.row["status"]
        finished = status == "finished" or (status in (None, "") and self.last.get("stage") == "end")
        return finished and self.row["eta2"] is not None


def _status(status: str | None, last: dict) -> str | None:
    if last.get("error") and "not finite" in last["error"]:
        return "diverged"
    return {"crashed": "failed"}.get(status, status)


def make_run(name: str, sweep: str | None, config: dict, summary: dict, status: dict | None,
             bisection: dict | None, history: list, kernels_png: Path | None, source: str,
             alpha: float, fallback_status: str | None = None, message: str = "") -> Run:
    """The table row of one run from what was read (the same function for both sources)."""
    bisection = bisection or {"init": {}, "last": {}}
    last, init = bisection["last"], bisection["init"]
    row = {"run": name, "sweep": sweep}
    for column, keys in CONFIG_COLUMNS.items():
        row[column] = next((config[k] for k in keys if config.get(k) is not None), None)
    if row["num_towers"] is None:
        row["num_towers"] = last.get("num_towers") or init.get("num_towers")
    status = status or {}
    # trainer.current_epoch / global_step when the run ended (for a finished run: epochs completed);
    # the last measurement's epoch is the index of the epoch it was taken in, hence status.json first
    row["epochs"] = status["epoch"] if status.get("epoch") is not None else last.get("epoch")
    row["step"] = status["step"] if status.get("step") is not None else last.get("step")
    row["test_acc"], row["val_acc"] = summary.get(TEST_ACC), summary.get(VAL_ACC)
    for key in ("eta2", "eta2_null", "p_value", "eta2_split", "p_value_split"):
        row[key] = last.get(key)
    row["significant"] = None if row["p_value"] is None else bool(row["p_value"] < alpha)
    row["eta2_init"], row["p_value_init"] = init.get("eta2"), init.get("p_value")
    row["color_tower"] = last.get("color_group")
    for k, median in enumerate(last.get("tower_median") or [], start=1):
        row[f"tower{k}_score"] = median
    for k, median in enumerate(init.get("tower_median") or [], start=1):
        row[f"tower{k}_score_init"] = median
    row["status"] = _status(status.get("status") or fallback_status, last)
    row["message"] = message or status.get("message") or last.get("error") or ""
    row["source"] = source
    return Run(row=row, last=last, init=init, history=history, kernels_png=kernels_png)


def load_run_folder(folder: Path | None, name: str, alpha: float, sweep: str | None = None,
                    config: dict | None = None, summary: dict | None = None, status: str | None = None,
                    fallback_status: str | None = None, message: str = "",
                    history: list | None = None, source: str | None = None) -> Run:
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
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError, csv.Error) as err:
            problems.append(f"unreadable {file_name}: {err}")
            warnings.warn(f"run {name}: cannot read {files[file_name]}: {err}")
            return default

    merged_config = {**read(read_hparams, "hparams.yaml", {}), **read(read_config, "config.yaml", {}), **(config or {})}
    status_json = read(read_status, STATUS_FILE)
    merged_summary = {**numbers(status_json["summary"] if status_json else {}),
                      **read(read_metrics_csv, "metrics.csv", {}),
                      **read(read_wandb_summary, "wandb-summary.json", {}), **(summary or {})}
    bisection = read(read_bisection, BISECTION_FILE)
    if history is None:
        history = read(read_history, HISTORY_FILE, [])
    if status:
        status_json = dict(status_json or {}, status=status)
    message = "; ".join(m for m in [message or (status_json or {}).get("message", ""), *problems] if m)
    return make_run(name, sweep, merged_config, merged_summary, status_json, bisection, history,
                    files.get(KERNELS_FILE), source or str(folder), alpha, fallback_status, message)


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
        linked = any((folder.joinpath(*parts[:i + 1])).is_symlink() for i in range(len(parts)))
        found.setdefault(path.resolve(), []).append((linked, path))
    return [min(candidates)[1] for _, candidates in sorted(found.items())]


def collect_local(folders, alpha: float = 0.05) -> list[Run]:
    """Every run under the given folders: the runs of each ``sweep.json`` (in its order), then every
    other folder holding a ``bisection.json`` or ``status.json``."""
    runs, claimed = [], set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise SystemExit(f"{folder}: no such folder")
        for sweep_file in sorted(folder.rglob(SWEEP_FILE)):
            try:
                sweep = read_sweep(sweep_file)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise SystemExit(f"{sweep_file}: not a readable towers.sweep state file: {err}") from None
            for entry in sweep["runs"]:
                run_folder = _newest_run_folder(entry["root"])
                if entry["root"].is_dir():
                    claimed.add(entry["root"].resolve())
                runs.append(load_run_folder(run_folder, entry["name"], alpha, sweep=sweep["name"],
                                            config=entry["params"], status=entry["status"],
                                            message=entry["message"], source=str(run_folder or entry["root"])))
        for run_folder in _run_folders(folder):
            resolved = run_folder.resolve()
            if any(resolved == c or c in resolved.parents for c in claimed):
                continue
            claimed.add(resolved)
            if run_folder.name == "files" and run_folder.parent.name.startswith(("offline-run-", "run-")):
                run_folder = run_folder.parent  # name a W&B run by its folder, offline-run-<time>-<id>
            name = str(run_folder.relative_to(folder)) if run_folder != folder else resolved.name
            runs.append(load_run_folder(resolved, name, alpha))
    if not runs:
        raise SystemExit(
            f"no runs found under {', '.join(map(str, folders))}: looked for {SWEEP_FILE} (a towers.sweep output "
            f"folder) and for folders holding {BISECTION_FILE} or {STATUS_FILE} (written by "
            f"KernelBisectionCallback / RunStatus into each run's folder: wandb/offline-run-*/files/, "
            f"lightning_logs/version_N/, or the trainer's default_root_dir)")
    return runs


def _wandb_state(state: str | None) -> str | None:
    return {"crashed": "failed"}.get((state or "").lower(), (state or "").lower() or None)


def collect_wandb(path: str, sweep: str | None = None, api=None, cache: Path | None = None,
                  alpha: float = 0.05) -> list[Run]:
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
            if f.name in RUN_FILES and f.name not in ("config.yaml", "wandb-summary.json"):
                f.download(root=str(folder), replace=True)
        history = None
        if not (folder / HISTORY_FILE).is_file():  # fall back on the logged scalars
            history = [{"step": h.get("_step"), "eta2": h.get("bisection/eta2"), "p_value": h.get("bisection/p_value"),
                        "eta2_null": h.get("bisection/eta2_null")}
                       for h in run.scan_history(keys=["bisection/eta2", "bisection/p_value"])]
        sweep_name = run.sweep.id if getattr(run, "sweep", None) is not None else getattr(run, "group", None)
        summary = numbers(dict(run.summary.items()))
        runs.append(load_run_folder(folder, run.name or run.id, alpha, sweep=sweep_name,
                                    config=read_wandb_config(run.config), summary=summary,
                                    fallback_status=_wandb_state(run.state), history=history,
                                    source=f"wandb:{path}/{run.id}"))
    if not runs:
        raise SystemExit(f"no runs found in W&B {'sweep ' + sweep + ' of ' if sweep else 'project '}{path}")
    return runs


def read_wandb_config(config: dict) -> dict:
    """``run.config`` of the public API (plain values; nested as logged) flattened like a config.yaml."""
    return flatten({k: v for k, v in config.items() if not k.startswith("_")})


def table_columns(runs: list[Run]) -> list[str]:
    towers = max([r.row.get("num_towers") or 0 for r in runs]
                 + [len(r.last.get("tower_median") or []) for r in runs])
    per_tower = [c for k in range(1, towers + 1) for c in (f"tower{k}_score", f"tower{k}_score_init")]
    return FIXED_COLUMNS + per_tower + ["status", "message", "source"]


def table_csv(runs: list[Run]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, table_columns(runs), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for run in runs:
        writer.writerow({k: ("" if v is None else v) for k, v in run.row.items()})
    return out.getvalue()


# ----------------------------------------------------------------------------- statistics

def median_interval(values, level: float = 0.95, resamples: int = 9999, seed: int = 0):
    """Median of ``values`` and its percentile-bootstrap interval (scipy.stats.bootstrap) over them;
    (median, nan, nan) for fewer than two values."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    med = float(np.median(x))
    if x.size < 2:
        return med, math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-equal values: a degenerate (but correct) interval
        ci = stats.bootstrap((x,), np.median, confidence_level=level, n_resamples=resamples,
                             method="percentile", random_state=seed).confidence_interval
    return med, float(ci.low), float(ci.high)


def clopper_pearson(k: int, n: int, level: float = 0.95):
    """Two-sided exact (Clopper-Pearson) interval of a proportion k/n."""
    from scipy import stats

    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def conditions(runs: list[Run]) -> dict:
    """Usable runs grouped by every CONDITION column: {condition tuple: [runs]} in a stable order."""
    groups = {}
    for run in runs:
        if run.usable:
            groups.setdefault(tuple(run.row[c] for c in CONDITION), []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: tuple((v is None, str(v) if not isinstance(v, (int, float))
                                                              else v) for v in kv[0])))


def condition_label(key: tuple, varying: list[str], short: bool = False, sep: str = ", ",
                    towers: bool = True) -> str:
    """``T=2, lr=0.01``: the tower count and the CONDITION columns that differ between runs."""
    names = {"num_towers": "T", "width_policy": "width", "batch_size": "batch", "lr": "lr", "max_epochs": "epochs"}
    parts = [f"{names[c] if short else c}={v:g}" if isinstance(v, float) else f"{names[c] if short else c}={v}"
             for c, v in zip(CONDITION, key) if c in varying or (c == "num_towers" and towers)]
    return sep.join(parts)


def varying_columns(runs: list[Run]) -> list[str]:
    return [c for c in CONDITION if len({r.row[c] for r in runs}) > 1]


def summarize(runs: list[Run], alpha: float, level: float = 0.95, seed: int = 0) -> list[dict]:
    """Per condition: seeds, how many significant with the Clopper-Pearson interval, eta^2 median
    with its bootstrap interval over seeds, and the chance level."""
    varying = varying_columns(runs)
    out = []
    for key, group in conditions(runs).items():
        eta2 = [r.row["eta2"] for r in group]
        k, n = sum(bool(r.row["p_value"] < alpha) for r in group), len(group)
        med, lo, hi = median_interval(eta2, level, seed=seed)
        cp_lo, cp_hi = clopper_pearson(k, n, level)
        out.append({"condition": dict(zip(CONDITION, key)), "label": condition_label(key, varying, short=True),
                    "seeds": n, "significant": k, "cp_low": cp_lo, "cp_high": cp_hi,
                    "eta2_median": med, "eta2_low": lo, "eta2_high": hi,
                    "eta2_null": float(np.mean([r.row["eta2_null"] for r in group])),
                    "control": bool(group[0].last.get("control")), "runs": [r.name for r in group]})
    return out


# ----------------------------------------------------------------------------- figures

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _empty(fig, ax, text: str) -> bytes:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return _png(fig)


def _jitter(n: int, width: float = 0.18) -> np.ndarray:
    return ((np.arange(n) * 0.618034) % 1 - 0.5) * 2 * width  # deterministic, evenly spread


def fig_eta2_by_towers(runs: list[Run], summary: list[dict], alpha: float) -> bytes:
    """eta^2 per seed against tower count: median and bootstrap interval over seeds, the chance
    level (T-1)/(K-1), and the eta^2 at initialisation."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    if not summary:
        return _empty(fig, ax, "no finished run with a measurement")
    groups = conditions(runs)
    towers = sorted({s["condition"]["num_towers"] for s in summary}, key=lambda t: (t is None, t))
    per_t = {t: [s for s in summary if s["condition"]["num_towers"] == t] for t in towers}
    others = max(len(v) for v in per_t.values())
    width = 0.8 / others
    varying = [c for c in varying_columns(runs) if c != "num_towers"]
    rest = sorted({condition_label(tuple(s["condition"][c] for c in CONDITION), varying, True, towers=False)
                   for s in summary})  # the condition without the tower count: one colour each
    labels_done = set()
    for xi, t in enumerate(towers):
        for j, s in enumerate(per_t[t]):
            x = xi + (j - (len(per_t[t]) - 1) / 2) * width
            group = groups[tuple(s["condition"][c] for c in CONDITION)]
            eta2 = np.array([r.row["eta2"] for r in group])
            sig = np.array([r.row["p_value"] < alpha for r in group])
            xs = x + _jitter(len(eta2), width * 0.3)
            other = condition_label(tuple(s["condition"][c] for c in CONDITION), varying, True, towers=False)
            color = f"C{rest.index(other) % 10}"
            label = None if (not other or other in labels_done) else other
            labels_done.add(other)
            ax.scatter(xs[sig], eta2[sig], s=22, color=color, zorder=3, label=label)
            ax.scatter(xs[~sig], eta2[~sig], s=22, facecolors="white", edgecolors=color, zorder=3)
            init = np.array([r.row["eta2_init"] for r in group if r.row["eta2_init"] is not None])
            ax.scatter(x + width * 0.35 + _jitter(len(init), 0.02), init, marker="x", s=14, color="0.6",
                       zorder=2, label=None if "init" in labels_done else "at initialisation")
            labels_done.add("init")
            ax.hlines(s["eta2_median"], x - width * 0.35, x + width * 0.35, color="k", lw=2, zorder=4,
                      label=None if "med" in labels_done else "median over seeds")
            labels_done.add("med")
            if not math.isnan(s["eta2_low"]):
                ax.vlines(x - width * 0.38, s["eta2_low"], s["eta2_high"], color="k", lw=1.2,
                          label=None if "ci" in labels_done else "95% bootstrap interval of the median")
                labels_done.add("ci")
            ax.hlines(s["eta2_null"], x - width * 0.45, x + width * 0.45, color="r", ls="--", lw=1,
                      label=None if "null" in labels_done else "chance (T-1)/(K-1)")
            labels_done.add("null")
            ax.annotate(f"{s['significant']}/{s['seeds']}", (x, 1.0), xycoords=("data", "axes fraction"),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(towers)), [f"{t} tower{'s' if t != 1 else ''}" + (" (halves)" if t == 1 else "")
                                       for t in towers])
    ax.set_ylabel("η² (score variance explained by tower)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"η² per seed (filled: p < {alpha:g}; n/m above: significant seeds)", fontsize=9, pad=14)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return _png(fig)


def fig_significant(summary: list[dict], alpha: float, level: float = 0.95) -> bytes:
    """Fraction of seeds with a significant split per condition, Clopper-Pearson interval, n of m."""
    fig = _figure(max(5, 1.1 * len(summary) + 2), 4)
    ax = fig.add_subplot()
    if not summary:
        return _empty(fig, ax, "no finished run with a measurement")
    x = np.arange(len(summary))
    frac = np.array([s["significant"] / s["seeds"] for s in summary])
    lo = np.array([s["cp_low"] for s in summary])
    hi = np.array([s["cp_high"] for s in summary])
    ax.errorbar(x, frac, yerr=[frac - lo, hi - frac], fmt="o", color="k", capsize=4)
    for xi, s in zip(x, summary):
        ax.annotate(f"{s['significant']} of {s['seeds']}\n[{s['cp_low']:.2f}, {s['cp_high']:.2f}]", (xi, s["cp_low"]),
                    textcoords="offset points", xytext=(0, -22), ha="center", fontsize=7)
    varying = [c for c in CONDITION if len({s["condition"][c] for s in summary}) > 1]
    ax.set_xticks(x, [condition_label(tuple(s["condition"][c] for c in CONDITION), varying, True, "\n")
                      + ("\n(control)" if s["control"] else "") for s in summary], fontsize=7)
    ax.set_ylim(-0.25, 1.05)
    ax.set_xlim(-0.6, len(summary) - 0.4)
    ax.axhline(1, color="0.8", lw=0.8)
    ax.set_ylabel(f"fraction of seeds with p < {alpha:g}")
    ax.set_title(f"Seeds with a significant tower split, {level:.0%} Clopper–Pearson interval", fontsize=9)
    return _png(fig)


def fig_tower_scores(runs: list[Run]) -> bytes:
    """Per-tower kernel colour scores, trained against initialisation, pooled over the seeds of each
    condition, towers ranked within each run by their trained median (the paper's "modulo a
    renumbering of the GPUs")."""
    groups = conditions(runs)
    varying = varying_columns(runs)
    panels = [(k, g) for k, g in groups.items() if any(r.last.get("score") for r in g)]
    fig = _figure(max(4.5, 3.2 * min(len(panels), 4)), 3.8 * max(1, math.ceil(len(panels) / 4)))
    if not panels:
        return _empty(fig, fig.add_subplot(), "no finished run with per-kernel scores")
    cols = min(len(panels), 4)
    for i, (key, group) in enumerate(panels):
        ax = fig.add_subplot(math.ceil(len(panels) / cols), cols, i + 1)
        control = bool(group[0].last.get("control"))  # one tower: its two halves, as eta^2 compares them
        t = 2 if control else group[0].last["num_towers"]
        trained, init = [[] for _ in range(t)], [[] for _ in range(t)]
        for run in group:
            score, tower = np.asarray(run.last["score"], float), np.asarray(run.last["tower"])
            if control:
                tower = (np.arange(len(score)) >= len(score) // 2).astype(int)
            names = np.unique(tower)
            order = sorted(names, key=lambda n: np.median(score[tower == n]))  # least coloured first
            init_score = np.asarray(run.init["score"], float) if run.init.get("score") else None
            for rank, n in enumerate(order):
                trained[rank].extend(score[tower == n])
                if init_score is not None:
                    init[rank].extend(init_score[tower == n])
        pos = np.arange(t)
        b1 = ax.boxplot(trained, positions=pos - 0.18, widths=0.3, patch_artist=True, showfliers=False)
        for patch in b1["boxes"]:
            patch.set_facecolor("C2")
        if any(init):
            b2 = ax.boxplot([v if v else [math.nan] for v in init], positions=pos + 0.18, widths=0.3,
                            patch_artist=True, showfliers=False)
            for patch in b2["boxes"]:
                patch.set_facecolor("0.8")
        ax.axhline(2 / 3, color="0.5", ls=":", lw=0.8)
        ax.set_xticks(pos, [f"{r + 1}" for r in range(t)])
        ax.set_xlabel(f"{'half of the one tower' if control else 'tower'}, ranked by trained median", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{condition_label(key, varying, True, chr(10))}\n({len(group)} seeds)", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("kernel colour score")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="C2", label="trained"), Patch(color="0.8", label="initialisation"),
                        Patch(color="white", label="dotted: random kernels (2/3)")],
               loc="lower center", ncol=3, fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.subplots_adjust(bottom=0.18, hspace=0.5)
    return _png(fig)


def choose_montage(runs: list[Run], names: list[str] | None, limit: int = 8) -> list[Run]:
    """The runs named, or else the first seed of every condition (then more seeds) up to ``limit``."""
    with_grid = [r for r in runs if r.kernels_png is not None]
    if names:
        by_name = {r.name: r for r in runs}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SystemExit(f"--montage: no run named {', '.join(missing)}; runs: {', '.join(by_name)}")
        return [by_name[n] for n in names]
    groups = list(conditions(runs).values()) or [with_grid]
    chosen, depth = [], 0
    while len(chosen) < limit and any(len(g) > depth for g in groups):
        chosen += [g[depth] for g in groups if len(g) > depth and g[depth].kernels_png is not None]
        depth += 1
    return sorted(chosen[:limit], key=lambda r: (str(r.row["num_towers"]), str(r.row["seed"]), r.name))


def fig_montage(chosen: list[Run]) -> bytes:
    """The final Figure-3 kernel grids of the chosen runs, side by side, labelled."""
    from PIL import Image

    if not chosen:
        fig = _figure(6, 2)
        return _empty(fig, fig.add_subplot(), f"no run has a {KERNELS_FILE}")
    images = [None if r.kernels_png is None else np.asarray(Image.open(r.kernels_png).convert("RGB")) for r in chosen]
    aspect = max([im.shape[1] / im.shape[0] for im in images if im is not None] or [1.0])
    cols = min(len(chosen), 4 if aspect < 1.5 else 2)  # wide grids (16 kernels a row) get two columns
    width = 13 / cols
    rows = math.ceil(len(chosen) / cols)
    fig = _figure(width * cols, (width / aspect + 0.7) * rows)
    for i, (run, image) in enumerate(zip(chosen, images)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        r = run.row
        p = "" if r["p_value"] is None else f", p = {r['p_value']:.2g}"
        eta = "" if r["eta2"] is None else f"η² = {r['eta2']:.3f}{p}"
        ax.set_title(f"{run.name}: T={r['num_towers']}, seed {r['seed']}, step {r['step']}\n{eta}", fontsize=8)
        if image is None:
            ax.text(0.5, 0.5, f"no {KERNELS_FILE}", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.imshow(image, interpolation="nearest")
    return _png(fig)


def fig_over_steps(runs: list[Run], alpha: float) -> bytes:
    """eta^2 and its p-value over training steps, one line per run, coloured by condition."""
    fig = _figure(9, 4)
    with_history = [r for r in runs if any(h.get("eta2") is not None for h in r.history)]
    if not with_history:
        return _empty(fig, fig.add_subplot(), "no run has a bisection history")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    varying = varying_columns(runs)
    keys = sorted({tuple(r.row[c] for c in CONDITION) for r in with_history}, key=str)
    labelled = set()
    for run in with_history:
        h = [x for x in run.history if x.get("eta2") is not None and x.get("step") is not None]
        key = tuple(run.row[c] for c in CONDITION)
        color = f"C{keys.index(key) % 10}"
        label = None if key in labelled else condition_label(key, varying, short=True)
        labelled.add(key)
        steps = [x["step"] for x in h]
        ax1.plot(steps, [x["eta2"] for x in h], color=color, lw=1, marker=".", ms=3, label=label)
        pv = [(x["step"], x["p_value"]) for x in h if x.get("p_value") is not None]
        if pv:
            ax2.plot(*zip(*pv), color=color, lw=1, marker=".", ms=3)
        nulls = {x["eta2_null"] for x in h if x.get("eta2_null") is not None}
        for null in nulls:
            ax1.axhline(null, color=color, ls="--", lw=0.6)
    ax2.axhline(alpha, color="r", ls=":", lw=0.8, label=f"α = {alpha:g}")
    ax1.set_xlabel("step")
    ax2.set_xlabel("step")
    ax1.set_ylabel("η²")
    ax2.set_ylabel("permutation p-value")
    ax2.set_yscale("log")
    ax1.set_title("η² over training (dashed: chance)", fontsize=9)
    ax2.set_title("p-value over training", fontsize=9)
    ax2.legend(fontsize=7, frameon=False)
    fig.legend(*ax1.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(3, len(keys)), fontsize=7, frameon=False)
    fig.subplots_adjust(wspace=0.3)
    return _png(fig)


# ----------------------------------------------------------------------------- report

SORT_SCRIPT = """
document.querySelectorAll("table.runs th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], asc = th.dataset.order !== "asc";
  th.closest("tr").querySelectorAll("th").forEach(h => delete h.dataset.order);
  th.dataset.order = asc ? "asc" : "desc";
  const key = r => { const t = r.cells[col].textContent.trim(), n = parseFloat(t);
                     return t === "" ? null : (isNaN(n) || !/^[-+.\\deE]+$/.test(t) ? t : n); };
  const rows = Array.from(body.rows).sort((a, b) => { const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    const c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
    return asc ? c : -c; });
  rows.forEach(r => body.appendChild(r));
}));
"""

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
table.runs { border-collapse: collapse; font-size: 12px; }
table.runs th, table.runs td { border: 1px solid #ccc; padding: 2px 6px; white-space: nowrap; }
table.runs th { background: #eee; cursor: pointer; position: sticky; top: 0; }
table.runs th[data-order=asc]::after { content: " \\25B2"; } table.runs th[data-order=desc]::after { content: " \\25BC"; }
tr.diverged, tr.failed { background: #fdd; } .note { color: #555; font-size: 13px; }
"""


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def report_html(runs: list[Run], summary: list[dict], figures: dict, alpha: float, source: str) -> str:
    columns = table_columns(runs)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join(f'<tr class="{html.escape(str(r.row["status"] or ""))}">'
                     + "".join(f"<td>{_cell(r.row.get(c))}</td>" for c in columns) + "</tr>" for r in runs)
    lines = []
    for s in summary:
        kind = " (one-tower control: first vs second half of the kernels)" if s["control"] else ""
        ci = "" if math.isnan(s["eta2_low"]) else f" [{s['eta2_low']:.3f}, {s['eta2_high']:.3f}]"
        lines.append(f"<li><b>{html.escape(s['label'])}</b>{kind}: {s['significant']} of {s['seeds']} seeds "
                     f"significant at α = {alpha:g} (95% Clopper–Pearson interval of the fraction "
                     f"[{s['cp_low']:.2f}, {s['cp_high']:.2f}]); median η² {s['eta2_median']:.3f}{ci} "
                     f"(chance {s['eta2_null']:.4f})</li>")
    left_out = [r for r in runs if not r.usable]
    if left_out:
        lines.append("<li>Not counted in any statistic: " + ", ".join(
            f"{html.escape(r.name)} ({html.escape(str(r.row['status'] or 'no final measurement'))})"
            for r in left_out) + "</li>")
    imgs = "\n".join(f"<h2>{html.escape(title)}</h2>\n<p class=note>{html.escape(note)}</p>\n"
                     f'<img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                     for title, (note, png) in figures.items())
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>towers: bisection across runs</title>
<style>{STYLE}</style></head><body>
<h1>Colour bisection of the first-layer kernels across runs</h1>
<p class=note>{len(runs)} runs from {html.escape(source)}, {when}. η²: fraction of the kernel colour-score
variance explained by the tower, with a permutation p-value; chance level (T−1)/(K−1) for T towers and
K kernels. With one tower the statistic compares the first and second half of the kernels (a control).</p>
<ul>{''.join(lines)}</ul>
{imgs}
<h2>Runs</h2><p class=note>Click a column header to sort.</p>
<table class="runs"><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
<script>{SORT_SCRIPT}</script>
</body></html>
"""


def write_report(runs: list[Run], out: Path, alpha: float = 0.05, montage: list[str] | None = None,
                 source: str = "", seed: int = 0) -> dict:
    """Write table.csv, the figures and report.html into ``out``; returns {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, alpha, seed=seed)
    chosen = choose_montage(runs, montage)
    figures = {
        "η² against tower count": (
            "One point per seed (filled: significant); black bar: median over seeds with its 95% bootstrap "
            "interval; red dashes: chance (T−1)/(K−1); grey crosses: η² at initialisation.",
            fig_eta2_by_towers(runs, summary, alpha), "eta2_by_towers.png"),
        "Seeds with a significant split": (
            "Per condition: the fraction of seeds with p < α, its exact 95% Clopper–Pearson interval, and "
            "“n of m seeds”. 5 of 5 gives a lower bound of 0.48, 10 of 10 of 0.69.",
            fig_significant(summary, alpha), "significant.png"),
        "Per-tower colour scores, trained against initialisation": (
            "Kernel scores pooled over the seeds of a condition; towers ranked within each run by their "
            "trained median, since tower numbers are arbitrary.", fig_tower_scores(runs), "tower_scores.png"),
        "Final kernel grids": ("Figure-3 grids (kernels.png) of " + (", ".join(r.name for r in chosen) or "no run")
                               + "; tower 1 on top.", fig_montage(chosen), "kernels_montage.png"),
        "The statistic over training": ("When does the split appear? One line per run.",
                                        fig_over_steps(runs, alpha), "eta2_over_steps.png"),
    }
    paths = {}
    for title, (note, png, name) in figures.items():
        write_atomic(out / name, png)
        paths[name] = out / name
    write_atomic(out / "table.csv", table_csv(runs).encode())
    paths["table.csv"] = out / "table.csv"
    page = report_html(runs, summary, {t: (n, p) for t, (n, p, _) in figures.items()}, alpha, source)
    write_atomic(out / "report.html", page.encode())
    paths["report.html"] = out / "report.html"
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python analysis/compare.py", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, help="run folders, sweep output folders, log dirs")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs of a W&B project instead")
    parser.add_argument("--sweep", metavar="ID", help="with --wandb: only the runs of this sweep")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.html, table.csv, figures")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of a run's split")
    parser.add_argument("--montage", nargs="+", metavar="RUN", help="runs whose kernel grids to show")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap over seeds")
    args = parser.parse_args(argv)
    if bool(args.folders) == bool(args.wandb):
        parser.error("give run folders or --wandb ENTITY/PROJECT (one of the two)")
    if args.sweep and not args.wandb:
        parser.error("--sweep needs --wandb")
    if args.wandb:
        if args.wandb.count("/") != 1:
            parser.error(f"--wandb wants ENTITY/PROJECT, got {args.wandb!r}")
        runs = collect_wandb(args.wandb, args.sweep, cache=args.out / "wandb-files", alpha=args.alpha)
        source = f"W&B {args.wandb}" + (f" sweep {args.sweep}" if args.sweep else "")
    else:
        runs = collect_local(args.folders, alpha=args.alpha)
        source = ", ".join(map(str, args.folders))
    paths = write_report(runs, args.out, args.alpha, args.montage, source, args.seed)
    counts = {}
    for r in runs:
        counts[r.row["status"] or "unknown"] = counts.get(r.row["status"] or "unknown", 0) + 1
    print(f"{len(runs)} runs ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    for s in summarize(runs, args.alpha, seed=args.seed):
        print(f"  {s['label']}: {s['significant']} of {s['seeds']} seeds p < {args.alpha:g} "
              f"(95% CP [{s['cp_low']:.2f}, {s['cp_high']:.2f}]), median eta2 {s['eta2_median']:.3f}")
    print(f"report: {paths['report.html']}\ntable:  {paths['table.csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
