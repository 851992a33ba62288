"""Run a W&B sweep file without a W&B server.

    python -m towers.sweep sweeps/demo.yaml                    # the whole grid, one run at a time
    python -m towers.sweep sweeps/lr_batch.yaml --count 20 --jobs 2 --out runs/lr_batch

The runs are chosen by W&B's own open-source sweep engine (the ``sweeps`` package behind ``wandb
sweep``: grid, random, bayes, hyperband stopping) and each is launched as its own process with the
command the YAML names, rendered as ``wandb agent`` renders it (``${env} ${interpreter} ${program}
${args}``), in W&B offline mode, grouped and tagged by the sweep. Two LightningCLI arguments are
appended: ``--trainer.default_root_dir=OUT/runs/NAME`` (each run owns a folder) and, for a run that
was interrupted, ``--ckpt_path=…/last.ckpt`` to resume it.

Everything the agent knows lives in ``OUT/sweep.json``, rewritten atomically after every change: a
killed agent started again with the same arguments goes on where it stopped. Finished runs are not
repeated; a run that was in flight is resumed from its last checkpoint (or rerun if it wrote none);
each run is one entry, however many attempts it took. A run that fails is recorded with its exit
status and log and the sweep goes on; a run whose loss became NaN/inf (train.py exit status 3) is
recorded as "diverged". At the end a table of the runs and the ``wandb sync`` command are printed.
"""

import argparse
import copy
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jsonschema
from tqdm import tqdm
from wandb.sdk.launch.sweeps import utils as sweep_utils
from wandb.sdk.lib import config_util

from towers.files import write_atomic
from towers.runs import EXIT_DIVERGED, newest_last_checkpoint

with warnings.catch_warnings():  # sweeps' pydantic models use a pydantic-1 config key; harmless
    warnings.simplefilter("ignore", UserWarning)
    import sweeps

STATE_FILE = "sweep.json"
DONE = ("finished", "failed", "diverged", "stopped")  # a run in one of these is never launched again
MAX_ATTEMPTS = 3  # a run interrupted this often (by something other than this agent) is marked failed
POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 30  # after SIGTERM, a run gets this long to save and exit before SIGKILL


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
            size *= len(range(spec["min"], spec["max"] + 1)) if "q" not in spec else \
                math.ceil((spec["max"] - spec["min"]) / spec["q"])
    return size


# -- state ------------------------------------------------------------------------------------------
class Sweep:
    """The sweep's state file and the runs in it."""

    def __init__(self, sweep_file: Path, out: Path):
        self.out = out
        self.path = out / STATE_FILE
        self.config = load_sweep(sweep_file)
        if self.path.exists():
            self.state = json.loads(self.path.read_text())
            if self.state["sweep"] != self.config:
                raise SystemExit(f"{self.path} belongs to a different sweep config than {sweep_file}; "
                                 f"give another --out, or remove {out} to start this sweep afresh")
        else:
            out.mkdir(parents=True, exist_ok=True)
            self.state = {"sweep_file": str(sweep_file), "sweep": self.config, "name": out.name,
                          "created": _now(), "runs": []}
            self.save()

    @property
    def runs(self) -> list:
        return self.state["runs"]

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.state, indent=1))

    def new_run(self, params: dict) -> dict:
        run = {"name": f"run-{len(self.runs):03d}", "params": params, "status": "pending",
               "exit_code": None, "message": "", "log": None, "attempts": [],
               "history": [], "summary": {}, "bisection": None, "wandb_dir": None}
        self.runs.append(run)
        self.save()
        return run

    def sweep_runs(self) -> list:
        """The runs as the sweep engine sees them."""
        engine_state = {"finished": "finished", "stopped": "finished", "failed": "failed",
                        "diverged": "failed"}
        return [sweeps.SweepRun(name=r["name"], state=engine_state.get(r["status"], "running"),
                                config={k: {"value": v} for k, v in r["params"].items()},
                                history=r["history"], summary_metrics=r["summary"])
                for r in self.runs]

    def next_params(self) -> dict | None:
        return next_params(self.config, self.sweep_runs())


def next_params(config: dict, runs: list) -> dict | None:
    """The sweep engine's next parameter set (None: the grid is done), as plain Python values."""
    suggestion = sweeps.next_run(config, runs)
    if suggestion is None:
        return None
    # random/bayes draw numpy scalars; the server would send JSON numbers, so do as it does
    return json.loads(json.dumps({k: v["value"] for k, v in suggestion.config.items()},
                                 default=lambda x: x.item()))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_results(run_root: Path, since: float) -> tuple[dict | None, Path | None]:
    """The newest ``status.json`` under a run's folder written by the current attempt, and its folder."""
    candidates = [p for p in run_root.rglob("status.json") if p.stat().st_mtime >= since - 1]
    if not candidates:
        return None, None
    path = max(candidates, key=lambda p: p.stat().st_mtime)
    try:
        return json.loads(path.read_text()), path.parent
    except (OSError, json.JSONDecodeError):  # written atomically, so only a vanished file lands here
        return None, path.parent


def _alive(pid: int | None, run_root: Path) -> bool:
    """A leftover run process from a killed agent (checked by its command line naming the run folder)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return str(run_root) in cmdline


def _die_with_parent():
    # Linux: the run gets SIGTERM if the agent dies (even by SIGKILL), so no orphan keeps writing into
    # a run folder that the restarted agent resumes.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# -- running ----------------------------------------------------------------------------------------
class Agent:
    def __init__(self, sweep: Sweep, count: int | None, jobs: int):
        self.sweep = sweep
        self.jobs = jobs
        size = grid_size(sweep.config)
        cap = count or sweep.config.get("run_cap")
        if size is None and cap is None:
            raise SystemExit(f"a {sweep.config['method']} sweep has no end: give --count N (or run_cap in the file)")
        self.total = min(x for x in (size, cap) if x is not None)
        self.procs = {}  # run name -> Popen
        self.exhausted = False

    def run_root(self, run: dict) -> Path:
        return (self.sweep.out / "runs" / run["name"]).resolve()

    def launch(self, run: dict) -> None:
        root = self.run_root(run)
        root.mkdir(parents=True, exist_ok=True)
        ckpt = newest_last_checkpoint(root) if run["attempts"] else None
        params_file = root / "sweep-params.yaml"  # what wandb agent writes for wandb.init's config
        config_util.save_config_file_from_dict(str(params_file), {k: {"value": v} for k, v in run["params"].items()})
        command = render_command(self.sweep.config, run["params"], sys.executable, str(root / "args.json"))
        if "${args_json_file}" in (self.sweep.config.get("command") or []):
            (root / "args.json").write_text(json.dumps(run["params"]))
        command.append(f"--trainer.default_root_dir={root}")
        if ckpt is not None:
            command.append(f"--ckpt_path={ckpt}")
        env = dict(os.environ, WANDB_RUN_GROUP=self.sweep.state["name"], WANDB_TAGS=f"sweep,{self.sweep.state['name']}",
                   WANDB_SWEEP_PARAM_PATH=str(params_file), WANDB_DIR=str(root))
        if env.get("WANDB_MODE") != "disabled":
            env["WANDB_MODE"] = "offline"
        log = root / "output.log"
        run.update(status="running", log=str(log))
        attempt = {"started": time.time(), "command": command, "resumed_from": str(ckpt) if ckpt else None,
                   "pid": None, "exit_code": None}
        run["attempts"].append(attempt)
        self.sweep.save()  # recorded before it starts: a crash here leaves a run to resume, not a lost one
        with open(log, "a") as f:
            f.write(f"\n=== attempt {len(run['attempts'])} at {_now()}: {' '.join(command)}\n")
            f.flush()
            self.procs[run["name"]] = subprocess.Popen(
                command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=_die_with_parent if platform.system() == "Linux" else None)
        attempt["pid"] = self.procs[run["name"]].pid
        self.sweep.save()

    def refresh(self, run: dict) -> None:
        """Copy a run's reported progress (history, summary, bisection statistic) into the state."""
        attempt = run["attempts"][-1]
        status, folder = read_results(self.run_root(run), attempt["started"])
        if status is None:
            return
        run["history"], run["summary"] = status.get("history", []), status.get("summary", {})
        run["message"] = status.get("message", "")
        run["reported"] = status.get("status")
        bisection = folder / "bisection.json"
        if bisection.exists():  # written atomically by KernelBisectionCallback; keep its final statistic only
            last = json.loads(bisection.read_text()).get("last") or {}
            statistics = last.get("statistics") or {}
            run["bisection"] = {"eta2": statistics.get("eta2"), "p_value": statistics.get("p_value")}
        # a W&B run folder is .../wandb/offline-run-<time>-<id>/ and status.json sits in its files/
        is_wandb = folder.name == "files" and folder.parent.name.startswith("offline-run-")
        run["wandb_dir"] = attempt["wandb_dir"] = str(folder.parent) if is_wandb else None

    def finish(self, run: dict, exit_code: int) -> None:
        self.refresh(run)
        run["attempts"][-1].update(exit_code=exit_code, ended=time.time())
        run["exit_code"] = exit_code
        reported = run.get("reported")
        if run.get("stop_requested"):
            run["status"] = "stopped"
            run["message"] = "stopped early by hyperband"
        elif exit_code == EXIT_DIVERGED or reported == "diverged":
            run["status"] = "diverged"
        elif exit_code == 0 and reported in (None, "finished"):
            run["status"] = "finished"
        elif reported == "interrupted" and len(run["attempts"]) < MAX_ATTEMPTS:
            run["status"] = "interrupted"  # stopped from outside (SIGTERM, preemption): resumed
        else:
            run["status"] = "failed"
            if not run["message"]:
                run["message"] = f"exit status {exit_code}; see the log"
        self.sweep.save()

    def early_terminate(self) -> None:
        if "early_terminate" not in self.sweep.config:
            return
        for name in self.procs:
            self.refresh(self.by_name(name))
        for stop in sweeps.stop_runs(self.sweep.config, self.sweep.sweep_runs()):
            run = self.by_name(stop.name)
            if stop.name in self.procs and not run.get("stop_requested"):
                run["stop_requested"] = True
                self.procs[stop.name].terminate()  # Lightning saves and exits on SIGTERM
        self.sweep.save()

    def by_name(self, name: str) -> dict:
        return next(r for r in self.sweep.runs if r["name"] == name)

    def next_to_launch(self) -> dict | None:
        for run in self.sweep.runs:  # first the runs a previous agent (or a preemption) left unfinished
            if run["status"] not in DONE and run["name"] not in self.procs:
                return run
        if self.exhausted or len(self.sweep.runs) >= self.total:
            return None
        params = self.sweep.next_params()
        if params is None:
            self.exhausted = True
            return None
        return self.sweep.new_run(params)

    def adopt_leftovers(self) -> None:
        """Runs in flight when a previous agent was killed: stop any process still alive, then resume."""
        for run in self.sweep.runs:
            if run["status"] in DONE or not run["attempts"]:
                continue
            attempt = run["attempts"][-1]
            if _alive(attempt.get("pid"), self.run_root(run)):
                os.kill(attempt["pid"], signal.SIGTERM)
                deadline = time.time() + STOP_GRACE_SECONDS
                while _alive(attempt["pid"], self.run_root(run)) and time.time() < deadline:
                    time.sleep(0.2)
                if _alive(attempt["pid"], self.run_root(run)):
                    os.kill(attempt["pid"], signal.SIGKILL)
            if attempt.get("exit_code") is None:
                attempt.update(exit_code=None, ended=time.time(), note="agent stopped while this attempt ran")
            run["status"] = "interrupted"
        self.sweep.save()

    def run(self) -> None:
        self.adopt_leftovers()
        done = sum(r["status"] in DONE for r in self.sweep.runs)
        bar = tqdm(total=self.total, initial=done, unit="run", desc=self.sweep.state["name"], dynamic_ncols=True,
                   mininterval=1 if sys.stderr.isatty() else 60)
        shown = None
        try:
            while True:
                for name, proc in list(self.procs.items()):
                    if proc.poll() is not None:
                        del self.procs[name]
                        run = self.by_name(name)
                        self.finish(run, proc.returncode)
                        if run["status"] in DONE:
                            bar.update()
                            if run["status"] != "finished":
                                bar.write(f"{name} {run['status']}: {run['message']} (log: {run['log']})")
                self.early_terminate()
                while len(self.procs) < self.jobs and (run := self.next_to_launch()) is not None:
                    self.launch(run)
                if not self.procs:
                    break
                counts = {s: sum(r["status"] == s for r in self.sweep.runs) for s in ("running", *DONE)}
                if counts != shown:  # redraw on a change only: a log file gets a line per redraw
                    bar.set_postfix({k: v for k, v in counts.items() if v}, refresh=True)
                    shown = counts
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            bar.write("interrupted: stopping the runs in flight; start the same command again to go on")
            for proc in self.procs.values():
                proc.terminate()
            for name, proc in self.procs.items():
                try:
                    proc.wait(STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                run = self.by_name(name)
                self.finish(run, proc.returncode)
                if run["status"] not in ("finished", "diverged"):
                    run["status"] = "interrupted"
            self.sweep.save()
            raise
        finally:
            bar.close()


# -- the report -------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(sweep: Sweep) -> str:
    metric = sweep.config.get("metric", {}).get("name")
    # the swept parameters; constants (`value:`) are the same in every run
    params = [k for k, spec in sweep.config["parameters"].items() if "value" not in spec]
    header = ["run", *params, "status", metric or "metric", "eta2", "p_value", "exit"]
    rows = []
    for run in sweep.runs:
        value = run["summary"].get(metric) if metric else None
        bisection = run.get("bisection") or {}
        rows.append([run["name"], *(_fmt(run["params"].get(p)) for p in params), run["status"], _fmt(value),
                     _fmt(bisection.get("eta2")), _fmt(bisection.get("p_value")), _fmt(run["exit_code"])])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    for run in sweep.runs:
        if run["status"] in ("failed", "diverged"):
            lines.append(f"{run['name']} {run['status']}: {run['message']} (log: {run['log']})")
    return "\n".join(lines)


def sync_command(sweep: Sweep) -> str:
    folders = [r["wandb_dir"] for r in sweep.runs if r.get("wandb_dir")]
    if not folders:
        return "No W&B offline runs were written (WANDB_MODE=disabled, or the config has no WandbLogger)."
    return "Upload the runs to a W&B server with:\n  wandb sync " + " ".join(folders)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m towers.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_file", type=Path, help="a W&B sweep config, e.g. sweeps/demo.yaml")
    parser.add_argument("--count", type=int, help="runs in all (default: the whole grid, or run_cap)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (default 1)")
    parser.add_argument("--out", type=Path, help="output folder (default runs/sweeps/<file name>)")
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / "sweeps" / args.sweep_file.stem
    sweep = Sweep(args.sweep_file, out)
    agent = Agent(sweep, args.count, max(1, args.jobs))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: stop cleanly, like Ctrl-C
    try:
        agent.run()
    except KeyboardInterrupt:
        print(table(sweep))
        return 130
    print(table(sweep))
    print(sync_command(sweep))
    print(f"State: {sweep.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
