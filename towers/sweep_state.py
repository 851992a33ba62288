"""The state of an offline sweep (``OUT/sweep.json``), shared by any number of agents.

Every change is a read-modify-write under an exclusive ``fcntl.flock`` on ``OUT/sweep.json.lock``
(:meth:`Sweep.locked`) and is written atomically, so agents in several processes, or on machines
sharing the folder, never corrupt it and never see half of it. An agent claims a run in the state
(``owner``: its host, pid, the pid's start time and a heartbeat) before it starts it; a run is held
while its owner is alive (:func:`owner_alive`): on the same host the pid, with the same start time
(against pid reuse), must still run; on another host the heartbeat, which the owner refreshes while
it runs, must be younger than STALE_SECONDS (the hosts' clocks must agree, as NTP keeps them).

The state is checked whenever it is read: a file that is not JSON or not a sweep's state, or one that
is missing or empty while ``OUT/runs`` holds run folders, stops the agent with one line
(:class:`DamagedState`) that names the copy it keeps, ``OUT/sweep.json.bak`` (written before every
save, so it holds the last good state), rather than start the sweep afresh and train its runs again.

Also here: the sweep file as ``wandb sweep`` reads it and the command ``wandb agent`` renders from
it, and how a run's results are read from its own files.
"""

import copy
import datetime
import fcntl
import json
import math
import os
import platform
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path

import jsonschema
import yaml
from wandb.sdk.launch.sweeps import utils as sweep_utils
from wandb.sdk.lib.runid import generate_id

from towers import conditions, records
from towers.errors import UserError
from towers.files import shown_path, write_atomic

with warnings.catch_warnings():  # sweeps' pydantic models use a pydantic-1 config key; harmless
    warnings.simplefilter("ignore", UserWarning)
    import sweeps

STATE_FILE = records.SWEEP_FILE
LOCK_FILE = records.SWEEP_LOCK_FILE
BACKUP_SUFFIX = ".bak"  # OUT/sweep.json.bak: the state as it was saved last, to restore a damaged sweep.json from
STATUSES = ("pending", "running", "interrupted", "finished", "failed", "diverged", "stopped")
STALE_SECONDS = 120  # a run held by an agent on another host whose heartbeat is this old is taken over
SEED_KEYS = ("seed_everything",)  # swept values that are not part of a run's condition (sweep_disk)
HOST = socket.gethostname()


class SweepFileError(UserError, ValueError):
    """A sweep file that cannot be read or is not a W&B sweep config, or an output folder of another sweep."""


class DamagedState(UserError):
    """``OUT/sweep.json`` that is not a sweep's state (or is gone while its runs are there)."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


# -- the sweep file ---------------------------------------------------------------------------------
def load_sweep(path) -> dict:
    """The sweep config as ``wandb sweep`` reads it (``yaml.safe_load``, as ``load_sweep_config`` does),
    checked against W&B's schema; a file that cannot be read or checked is one :class:`SweepFileError`."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise SweepFileError(
            f"cannot read the sweep file {shown_path(path)}: {getattr(err, 'strerror', err)}"
        ) from None
    except yaml.YAMLError as err:
        raise SweepFileError(f"{shown_path(path)} is not YAML: {_one_line(err)}") from None
    if not isinstance(config, dict) or not config:
        raise SweepFileError(
            f"{shown_path(path)} is not a W&B sweep config (a YAML mapping with method, parameters, ...)"
        )
    try:
        sweeps.SweepConfig(config)
    except jsonschema.ValidationError as err:
        raise SweepFileError(f"{shown_path(path)} is not a valid W&B sweep config: {_one_line(err.message)}") from None
    if not config.get("program"):
        raise SweepFileError(f"{shown_path(path)} names no program: add e.g. `program: train.py`")
    try:  # what the schema allows but the engine cannot run (a continuous parameter in a grid, `custom`)
        next_params(config, [])
    except ValueError as err:
        raise SweepFileError(f"{shown_path(path)}: W&B's sweep engine cannot run it: {_one_line(err)}") from None
    return config


def render_command(config: dict, params: dict, interpreter: str = "python", args_json_file: str = "") -> list:
    """The command ``wandb agent`` runs for one set of sweep parameters.

    The same steps as ``wandb.wandb_agent.Agent._command_run``, with wandb's own builders
    (``create_sweep_command`` fills ``${envvar:…}``, ``create_sweep_command_args`` renders the
    parameters). The agent uses the interpreter name ``python``; ours passes its own interpreter.
    """
    command = sweep_utils.create_sweep_command(copy.deepcopy(config.get("command")))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars["interpreter"] = [interpreter]
    sweep_vars["program"] = [config["program"]]
    sweep_vars["args_json_file"] = [args_json_file]
    if platform.system() != "Windows":
        sweep_vars["env"] = ["/usr/bin/env"]
    rendered = []
    for chunk in command:
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            rendered += sweep_vars.get(chunk[2:-1]) or []
        else:
            rendered.append(chunk)
    return rendered


def grid_size(config: dict) -> int | None:
    if config["method"] != "grid":
        return None
    size = 1
    for spec in config["parameters"].values():
        if "values" in spec:
            size *= len(spec["values"])
        elif "min" in spec and "max" in spec:  # int_uniform / q_uniform, as the grid engine expands them
            size *= (
                len(range(spec["min"], spec["max"] + 1))
                if "q" not in spec
                else math.ceil((spec["max"] - spec["min"]) / spec["q"])
            )
    return size


def condition(config: dict, params: dict) -> str:
    """The run's condition within its sweep, for W&B's job type: the swept settings that are part of a
    condition (:func:`towers.conditions.in_condition`; not the seed), as the report names them, e.g.
    ``towers: 2``; a swept value that is a partial config (``model: {num_towers: 2, color_blind_towers:
    [1]}``) by its leaves. Everything not swept is the same in every run of the sweep."""
    swept = [k for k, spec in config["parameters"].items() if "value" not in spec]

    def leaves(key, value):
        if isinstance(value, dict):
            return [leaf for k, v in value.items() for leaf in leaves(f"{key}.{k}", v)]
        return [(key, value)] if conditions.in_condition(key) else []

    found = [leaf for k in swept if k in params for leaf in leaves(k, params[k])]
    text = "; ".join(conditions.show(k, v) for k, v in found)
    return (text or "all")[:64]  # W&B's limit for a job type


# -- state ------------------------------------------------------------------------------------------
RUN_SCHEMA = {
    "type": "object",
    "required": ["name", "params", "status", "exit_code", "message", "log", "attempts", "history", "summary"],
    "properties": {
        "name": {"type": "string"},
        "params": {"type": "object"},
        "status": {"enum": list(STATUSES)},
        "exit_code": {"type": ["integer", "null"]},
        "message": {"type": "string"},
        "log": {"type": ["string", "null"]},
        "attempts": {"type": "array", "items": {"type": "object"}},
        "owner": {"type": ["object", "null"], "required": ["host", "pid", "start", "heartbeat"]},
        "history": {"type": "array", "items": {"type": "object"}},
        "summary": {"type": "object"},
        "wandb_id": {"type": "string"},
    },
}
STATE_SCHEMA = {  # what the agent reads from sweep.json; other keys are kept as they are
    "type": "object",
    "required": ["sweep", "name", "runs"],
    "properties": {
        "sweep": {"type": "object"},
        "name": {"type": "string"},
        "shards": {"type": "integer", "minimum": 1},
        "runs": {"type": "array", "items": RUN_SCHEMA},
    },
}


def state_problem(text: bytes) -> str | None:
    """What is wrong with the bytes of a ``sweep.json`` (None: a sweep's state), in a few words."""
    try:
        state = json.loads(text)
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        return f"is not JSON ({_one_line(err)})"
    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(STATE_SCHEMA).iter_errors(state))
    if error is None:
        return None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    message = _one_line(error.message)
    return f"is not a sweep's state ({'state' + where + ': ' if where else ''}{message[:200]})"


class Sweep:
    """The sweep's state file and the runs in it.

    Change the state only inside ``with sweep.locked():``, which reads it afresh under the lock and
    writes it back when the block ends; run dicts from before the block are stale inside it.
    """

    def __init__(self, sweep_file: Path, out: Path, config: dict | None = None):
        self.out = out
        self.path = out / STATE_FILE
        self.backup = out / (STATE_FILE + BACKUP_SUFFIX)
        self.config = load_sweep(sweep_file) if config is None else config
        self.state = None
        self._depth = 0
        out.mkdir(parents=True, exist_ok=True)
        with self.locked():
            if self.state is None:
                self.state = {
                    "sweep_file": str(sweep_file),
                    "sweep": self.config,
                    "name": out.name,
                    "created": _now(),
                    "runs": [],
                }
            elif self.state["sweep"] != self.config:
                raise SweepFileError(
                    f"{self.path} belongs to a different sweep config than {sweep_file}; "
                    f"give another --out, or remove {out} to start this sweep afresh"
                )

    @contextmanager
    def locked(self):
        """Hold the sweep's lock with ``self.state`` read from disk; saved when the block succeeds.

        flock is per open file, so nested blocks of one agent share the outer block's lock. On a
        shared file system the lock needs one that supports it (NFS does; Lustre with ``-o flock``).
        """
        if self._depth:
            self._depth += 1
            try:
                yield self.state
            finally:
                self._depth -= 1
            return
        with open(self.path.parent / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            self._depth = 1
            try:
                text = self._read()
                self.state = json.loads(text) if text else None
                yield self.state
                if self.state is not None and json.dumps(self.state, indent=1) != text:
                    self.save()
            finally:
                self._depth = 0

    @property
    def runs(self) -> list:
        return self.state["runs"]

    def run(self, name: str) -> dict:
        return next(r for r in self.runs if r["name"] == name)

    def save(self) -> None:
        text = json.dumps(self.state, indent=1)
        write_atomic(self.backup, text)  # both whole: whichever of the two survives holds this state
        write_atomic(self.path, text)

    def run_folders(self) -> list[Path]:
        runs = self.out / "runs"
        return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []

    def _read(self) -> str | None:
        """The state file's text; None for a new sweep. A damaged one stops the agent: :class:`DamagedState`."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = None
        if data:
            problem = state_problem(data)
            if problem is None:
                return data.decode()
        elif self.run_folders():  # a new sweep has no runs yet: these belong to a state that was lost
            problem = (
                f"is {'missing' if data is None else 'empty (0 bytes)'} while {self.out / 'runs'} holds "
                f"{len(self.run_folders())} run folders, so this is not a new sweep"
            )
        else:
            return None
        raise DamagedState(
            f"{shown_path(self.path)} {problem}; the agent stops so that no run is repeated. {self._restore()}"
        )

    def _restore(self) -> str:
        """How to go on from a damaged state: the backup to copy back, if it is good."""
        try:
            data = self.backup.read_bytes()
        except FileNotFoundError:
            data = None
        problem = "is missing" if data is None else state_problem(data) if data else "is empty"
        if problem:
            return (
                f"Its copy {shown_path(self.backup)} {problem}, so there is nothing to restore: the runs' own "
                f"files are in {shown_path(self.out / 'runs')}; start this sweep in another --out"
            )
        state = json.loads(data)
        done = sum(r["status"] == "finished" for r in state["runs"])
        return (
            f"Its last good copy, {shown_path(self.backup)}, holds {len(state['runs'])} runs ({done} finished): "
            f"`cp {shown_path(self.backup)} {shown_path(self.path)}` and start the agent again"
        )

    def new_run(self, params: dict) -> dict:
        """A new pending run in ``self.state`` (the agent calls it under the lock; saved with the state)."""
        run = {
            "name": f"run-{len(self.runs):03d}",
            "params": params,
            "status": "pending",
            "exit_code": None,
            "message": "",
            "log": None,
            "attempts": [],
            "owner": None,
            "history": [],
            "summary": {},
            "bisection": None,
            "wandb_dir": None,
            "wandb_id": generate_id(),  # one W&B run for the grid point, however many attempts it takes
        }
        self.runs.append(run)
        return run

    def sweep_runs(self) -> list:
        """The runs as the sweep engine sees them."""
        engine_state = {"finished": "finished", "stopped": "finished", "failed": "failed", "diverged": "failed"}
        return [
            sweeps.SweepRun(
                name=r["name"],
                state=engine_state.get(r["status"], "running"),
                config={k: {"value": v} for k, v in r["params"].items()},
                history=r["history"],
                summary_metrics=r["summary"],
            )
            for r in self.runs
        ]

    def next_params(self) -> dict | None:
        return next_params(self.config, self.sweep_runs())


def next_params(config: dict, runs: list) -> dict | None:
    """The sweep engine's next parameter set (None: the grid is done), as plain Python values."""
    suggestion = sweeps.next_run(config, runs)
    if suggestion is None:
        return None
    # random/bayes draw numpy scalars; the server would send JSON numbers, so do as it does
    return json.loads(json.dumps({k: v["value"] for k, v in suggestion.config.items()}, default=lambda x: x.item()))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_results(run_root: Path, since: float) -> tuple[dict | None, Path | None]:
    """The newest ``status.json`` under a run's folder written by the current attempt, and its folder."""
    candidates = [p for p in run_root.rglob(records.STATUS_FILE) if p.stat().st_mtime >= since - 1]
    if not candidates:
        return None, None
    path = max(candidates, key=lambda p: p.stat().st_mtime)
    try:
        return json.loads(path.read_text()), path.parent
    except (OSError, json.JSONDecodeError):  # written atomically, so only a vanished file lands here
        return None, path.parent


def read_bisection(folder: Path, run_root: Path) -> dict | None:
    """The final measurement of the run's ``bisection.json``: the attempt's own, else the run's newest.

    A run resumed from its final checkpoint trains no further and measures nothing, so its result
    is the one the earlier attempt wrote (its epoch and step say when it was measured). Returns the
    record's summary (:meth:`towers.records.Record.summary`, what the sweep's state keeps and its
    table shows) with the file it came from, or None.
    """
    own = folder / records.BISECTION_FILE
    found = (
        [own]
        if own.exists()
        else sorted(run_root.rglob(records.BISECTION_FILE), key=lambda p: p.stat().st_mtime, reverse=True)
    )
    for path in found:
        try:
            last = records.read_bisection(path)["last"]
        except (OSError, ValueError, TypeError):  # vanished, or not a bisection record: the next one
            continue
        if last is not None and (last.verdict is not None or last.value("eta2") is not None):
            return {**last.summary(), "file": str(path)}
    return None


# -- owners ---------------------------------------------------------------------------
def process_start(pid: int) -> int | None:
    """When a live process started (clock ticks since boot; 0 where /proc is missing), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (macOS): alive or not, without a start time
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (name)": state is field 3, starttime field 22
    return None if fields[0] in ("Z", "X") else int(fields[19])


def owner_alive(owner: dict | None, now: float) -> bool:
    """Whether the agent holding a run is alive: its pid (and start time) on this host, else its heartbeat."""
    if not owner:
        return False
    if owner["host"] == HOST:
        return process_start(owner["pid"]) == owner["start"]
    return now - owner["heartbeat"] < STALE_SECONDS
