"""The state of an offline sweep (``OUT/sweep.json``), shared by any number of agents.

Every change is a read-modify-write under an exclusive ``fcntl.flock`` on ``OUT/sweep.json.lock``
(:meth:`Sweep.locked`) and is written atomically, so agents in several processes, or on machines
sharing the folder, never corrupt it and never see half of it. An agent claims a run in the state
(``owner``: its host, pid, the pid's start time and a heartbeat) before it starts it; a run is held
while its owner is alive (:func:`owner_alive`): on the same host the pid, with the same start time
(against pid reuse), must still run; on another host the heartbeat, which the owner refreshes while
it runs, must be younger than STALE_SECONDS (the hosts' clocks must agree, as NTP keeps them).

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
from wandb.sdk.launch.sweeps import utils as sweep_utils

from towers import conditions, records
from towers.files import write_atomic

with warnings.catch_warnings():  # sweeps' pydantic models use a pydantic-1 config key; harmless
    warnings.simplefilter("ignore", UserWarning)
    import sweeps

STATE_FILE = records.SWEEP_FILE
LOCK_FILE = records.SWEEP_LOCK_FILE
STALE_SECONDS = 120  # a run held by an agent on another host whose heartbeat is this old is taken over
SEED_KEYS = ("seed_everything",)  # swept values that are not part of a run's condition (sweep_disk)
HOST = socket.gethostname()


# -- the sweep file ---------------------------------------------------------------------------------
def load_sweep(path) -> dict:
    """The sweep config as ``wandb sweep`` reads it, checked against W&B's schema."""
    config = sweep_utils.load_sweep_config(str(path))
    if config is None:
        raise SystemExit(f"cannot read sweep file {path}")
    try:
        sweeps.SweepConfig(config)
    except jsonschema.ValidationError as err:
        raise SystemExit(f"{path} is not a valid W&B sweep config:\n{err.message}") from None
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
class Sweep:
    """The sweep's state file and the runs in it.

    Change the state only inside ``with sweep.locked():``, which reads it afresh under the lock and
    writes it back when the block ends; run dicts from before the block are stale inside it.
    """

    def __init__(self, sweep_file: Path, out: Path):
        self.out = out
        self.path = out / STATE_FILE
        self.config = load_sweep(sweep_file)
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
                raise SystemExit(
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
                text = self.path.read_text() if self.path.exists() else None
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
        write_atomic(self.path, json.dumps(self.state, indent=1))

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
