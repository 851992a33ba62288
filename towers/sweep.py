"""Run a W&B sweep file without a W&B server, on one machine or as many agents sharing one folder.

    python -m towers.sweep sweeps/demo.yaml                    # the whole grid, one run at a time
    python -m towers.sweep sweeps/bisection.yaml --gpus 0,1,2,3          # one run per GPU at a time
    python -m towers.sweep sweeps/bisection.yaml --shard 3/10 --gpus 0   # agent 3 of 10 (a SLURM array)
    python -m towers.sweep sweeps/lr_batch.yaml --count 20 --jobs 2 --out runs/lr_batch

The runs are chosen by W&B's own open-source sweep engine (the ``sweeps`` package behind ``wandb
sweep``: grid, random, bayes, hyperband stopping) and each is launched as its own process with the
command the YAML names, rendered as ``wandb agent`` renders it (``${env} ${interpreter} ${program}
${args}``), in W&B offline mode, in the sweep file's W&B ``project``, grouped by the sweep and typed
by its condition (the swept values but the seed). Two LightningCLI arguments are appended:
``--trainer.default_root_dir=OUT/runs/NAME`` (each run owns a folder) and, for a run that was
interrupted, ``--ckpt_path=…/last.ckpt`` to resume it. ``--gpus`` gives each run one GPU of the list
(``CUDA_VISIBLE_DEVICES``), never two runs one GPU.

Everything the agents know lives in ``OUT/sweep.json`` (:mod:`towers.sweep_state`: locked,
atomic read-modify-writes, runs claimed by their agent's host, pid and heartbeat), so any number of
agents, processes or machines sharing the folder, can work on one sweep. A grid is written into the
state whole when the first agent starts; ``--shard i/N`` makes an agent take only the grid's runs k
with k mod N == i. A killed agent started again takes back its dead runs: finished runs are not
repeated; a run whose process had already ended (its ``status.json`` says so) is recorded from its
own files; a run that was in flight is resumed from its last checkpoint (or rerun if it wrote none);
each run is one entry, however many attempts it took. A run that fails is recorded with its exit
status and log and the sweep goes on; a run whose loss became NaN/inf (train.py exit status 3) is
recorded as "diverged". Before it starts the agent prints an estimate of the disk the runs'
checkpoints take (:mod:`towers.sweep_disk`); at the end, a table of the runs and the ``wandb sync``
command.
"""

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm
from wandb.sdk.lib import config_util

from towers import records
from towers.measure import p_text
from towers.records import EXIT_DIVERGED, newest_last_checkpoint
from towers.sweep_disk import _size, disk_estimate, train_checkpoint_bytes  # noqa: F401  (tests use them)
from towers.sweep_state import (  # noqa: F401
    HOST,
    Sweep,
    _now,
    condition,
    grid_size,
    load_sweep,
    next_params,
    owner_alive,
    process_start,
    read_bisection,
    read_results,
    render_command,
    sweeps,
)

DONE = ("finished", "failed", "diverged", "stopped")  # a run in one of these is never launched again
ENDED = ("finished", "diverged", "failed")  # how a run's status.json says its process ended
MAX_ATTEMPTS = 3  # a run interrupted this often (by something other than this agent) is marked failed
POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 30  # after SIGTERM, a run gets this long to save and exit before SIGKILL
HEARTBEAT_SECONDS = 10  # an agent refreshes the heartbeat of the runs it holds this often


# -- processes -------------------------------------------------------------------------------------
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


def gpu_slots(ids: str, visible: str | None) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` of each run slot for ``--gpus IDS``.

    IDS number the devices as this agent's CUDA numbers them: with no ``CUDA_VISIBLE_DEVICES`` the
    machine's ids; under one (as SLURM sets it for a job's GPUs) the positions in that list, so
    ``--gpus 0`` in a job given GPU 3 runs on GPU 3. Raises ValueError for a wrong list.
    """
    wanted = [x.strip() for x in ids.split(",")]
    if "" in wanted or len(set(wanted)) != len(wanted):
        raise ValueError(f"--gpus {ids}: give distinct device ids separated by commas, e.g. 0,1,2,3")
    if visible is None:
        return wanted
    devices = [d for d in visible.split(",") if d.strip()]
    bad = [w for w in wanted if not w.isdigit() or int(w) >= len(devices)]
    if bad:
        raise ValueError(
            f"--gpus {ids}: this agent sees {len(devices)} device(s) (CUDA_VISIBLE_DEVICES="
            f"{visible!r}), numbered 0..{len(devices) - 1}; {','.join(bad)} is not one of them"
        )
    return [devices[int(w)].strip() for w in wanted]


# -- running ----------------------------------------------------------------------------------------
class Agent:
    def __init__(
        self,
        sweep: Sweep,
        count: int | None,
        jobs: int = 1,
        gpus: list[str] | None = None,
        shard: tuple[int, int] | None = None,
    ):
        self.sweep = sweep
        size = grid_size(sweep.config)
        cap = count or sweep.config.get("run_cap")
        if size is None and cap is None:
            raise SystemExit(f"a {sweep.config['method']} sweep has no end: give --count N (or run_cap in the file)")
        self.total = min(x for x in (size, cap) if x is not None)
        self.slots = list(gpus) if gpus else [None] * jobs  # one run per slot; a slot is a GPU id or None
        self.shard = shard
        self.procs = {}  # run name -> (Popen, slot)
        self.exhausted = False
        self.me = {
            "host": HOST,
            "pid": os.getpid(),
            "start": process_start(os.getpid()),
            "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        }
        self.beaten = 0.0
        with sweep.locked() as state:
            if shard is not None:
                if size is None:
                    raise UsageError(
                        "--shard splits a grid; for a random or bayes sweep start the agents "
                        "without --shard on the same --out: they share the run count"
                    )
                if state.setdefault("shards", shard[1]) != shard[1]:
                    raise UsageError(
                        f"--shard {shard[0]}/{shard[1]}: {sweep.path} is split into --shard "
                        f"i/{state['shards']}; give that N (or no --shard: such an agent takes "
                        f"any run that is left)"
                    )
            if size is not None:  # the whole grid, so every shard sees the same numbered runs
                while len(sweep.runs) < self.total and (params := sweep.next_params()) is not None:
                    sweep.new_run(params)

    def run_root(self, name: str) -> Path:
        return (self.sweep.out / "runs" / name).resolve()

    def owner(self) -> dict:
        return dict(self.me, heartbeat=time.time())

    def is_me(self, owner: dict | None) -> bool:
        return bool(owner) and (owner["host"], owner["pid"], owner["start"]) == (HOST, self.me["pid"], self.me["start"])

    def mine(self, index: int) -> bool:
        """Whether this agent may take the sweep's index-th run."""
        return self.shard is None or index % self.shard[1] == self.shard[0]

    def held_by_others(self, now: float) -> list:
        return [
            r
            for k, r in enumerate(self.sweep.runs)
            if self.mine(k)
            and r["status"] not in DONE
            and owner_alive(r.get("owner"), now)
            and not self.is_me(r.get("owner"))
        ]

    def claim(self) -> tuple[str, dict | None] | None:
        """Claim the next run this agent may take: (its name, its attempt a dead agent left open) or None."""
        with self.sweep.locked():
            now = time.time()
            for k, run in enumerate(self.sweep.runs):
                owner = run.get("owner")
                if (
                    run["status"] in DONE
                    or run["name"] in self.procs
                    or not self.mine(k)
                    or (owner_alive(owner, now) and not self.is_me(owner))
                ):
                    continue
                run["owner"] = self.owner()
                last = run["attempts"][-1] if run["attempts"] else None
                return run["name"], (last if last and "ended" not in last else None)
            if self.exhausted or len(self.sweep.runs) >= self.total:
                return None
            params = self.sweep.next_params()  # random/bayes: a new run, seen by every agent's engine
            if params is None:
                self.exhausted = True
                return None
            run = self.sweep.new_run(params)
            run["owner"] = self.owner()
            return run["name"], None

    def adopt(self, name: str, attempt: dict) -> bool:
        """A run whose last attempt a dead agent left open: stop what is left of it, then record it from
        its own files if its process had ended (True), or mark it interrupted to be resumed (False)."""
        root = self.run_root(name)
        if attempt.get("host", HOST) == HOST and _alive(attempt.get("pid"), root):
            os.kill(attempt["pid"], signal.SIGTERM)
            deadline = time.time() + STOP_GRACE_SECONDS
            while _alive(attempt["pid"], root) and time.time() < deadline:
                time.sleep(0.2)
            if _alive(attempt["pid"], root):
                os.kill(attempt["pid"], signal.SIGKILL)
        with self.sweep.locked():
            run = self.sweep.run(name)
            attempt = run["attempts"][-1]
            self.refresh(run)
            reported = run.get("reported")
            attempt["ended"] = time.time()
            if reported in ENDED and (reported != "finished" or self.has_results(run)):
                attempt["note"] = (
                    f"the agent was stopped after this attempt ended but before it recorded "
                    f"the end; recorded from {run['status_file']}"
                )
                run.update(status=reported, owner=None)
                if reported == "failed" and not run["message"]:
                    run["message"] = "failed (its status.json says so)"
                return True
            attempt["note"] = "agent stopped while this attempt ran" + (
                f"; its status.json said {reported} without {self.metric()}, so it is run again" if reported else ""
            )
            run["status"] = "interrupted"
            return False

    def launch(self, name: str, slot: str | None) -> None:
        with self.sweep.locked():
            run = self.sweep.run(name)
            root = self.run_root(name)
            root.mkdir(parents=True, exist_ok=True)
            ckpt = newest_last_checkpoint(root) if run["attempts"] else None
            params_file = root / "sweep-params.yaml"  # what wandb agent writes for wandb.init's config
            config_util.save_config_file_from_dict(
                str(params_file), {k: {"value": v} for k, v in run["params"].items()}
            )
            command = render_command(self.sweep.config, run["params"], sys.executable, str(root / "args.json"))
            if "${args_json_file}" in (self.sweep.config.get("command") or []):
                (root / "args.json").write_text(json.dumps(run["params"]))
            command.append(f"--trainer.default_root_dir={root}")
            if ckpt is not None:
                command.append(f"--ckpt_path={ckpt}")
            log = root / "output.log"
            run.update(status="running", log=str(log), owner=self.owner())
            attempt = {
                "started": time.time(),
                "command": command,
                "resumed_from": str(ckpt) if ckpt else None,
                "host": HOST,
                "agent": self.me["pid"],
                "gpu": slot,
                "pid": None,
                "exit_code": None,
            }
            run["attempts"].append(attempt)  # saved before it starts: a crash here leaves a run to resume
            env = self.run_env(run, slot)
        with open(log, "a") as f:
            f.write(f"\n=== attempt {len(run['attempts'])} at {_now()}: {' '.join(command)}\n")
            f.flush()
            proc = subprocess.Popen(
                command,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent if platform.system() == "Linux" else None,
            )
        self.procs[name] = (proc, slot)
        with self.sweep.locked():
            self.sweep.run(name)["attempts"][-1]["pid"] = proc.pid

    def run_env(self, run: dict, slot: str | None) -> dict:
        """The environment of a run: W&B offline, the sweep's project, group and tags, and its GPU."""
        root = self.run_root(run["name"])
        env = dict(
            os.environ,
            WANDB_RUN_GROUP=self.sweep.state["name"],
            WANDB_JOB_TYPE=condition(self.sweep.config, run["params"]),
            WANDB_TAGS=f"sweep,{self.sweep.state['name']}",
            WANDB_SWEEP_PARAM_PATH=str(root / "sweep-params.yaml"),
            WANDB_DIR=str(root),
        )
        for key, var in (("project", "WANDB_PROJECT"), ("entity", "WANDB_ENTITY")):
            if self.sweep.config.get(key):  # as `wandb agent ENTITY/PROJECT/ID` sets them for its runs
                env[var] = self.sweep.config[key]
        if env.get("WANDB_MODE") != "disabled":
            env["WANDB_MODE"] = "offline"
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        return env

    def metric(self) -> str | None:
        return self.sweep.config.get("metric", {}).get("name")

    def has_results(self, run: dict) -> bool:
        return self.metric() is None or self.metric() in run["summary"]

    def refresh(self, run: dict) -> None:
        """Copy a run's reported progress (history, summary, bisection statistic) into the state."""
        attempt = run["attempts"][-1]
        root = self.run_root(run["name"])
        status, folder = read_results(root, attempt["started"])
        if status is None:
            return
        run["history"], run["summary"] = status.get("history", []), status.get("summary", {})
        if run["history"]:  # a run resumed at its end validates no more: its last values are the history's
            run["summary"] = {**run["history"][-1], **run["summary"]}
        run["message"] = status.get("message", "")
        run["reported"] = status.get("status")
        run["status_file"] = str(folder / records.STATUS_FILE)
        run["bisection"] = read_bisection(folder, root)
        # a W&B run folder is .../wandb/offline-run-<time>-<id>/ and status.json sits in its files/
        is_wandb = folder.name == records.WANDB_FILES_DIR and folder.parent.name.startswith(
            records.WANDB_OFFLINE_PREFIX
        )
        run["wandb_dir"] = attempt["wandb_dir"] = str(folder.parent) if is_wandb else None

    def finish(self, name: str, exit_code: int) -> dict:
        with self.sweep.locked():
            run = self.sweep.run(name)
            self.refresh(run)
            run["attempts"][-1].update(exit_code=exit_code, ended=time.time())
            run["exit_code"], run["owner"] = exit_code, None
            reported = run.get("reported")
            if run.get("stop_requested"):
                run["status"] = "stopped"
                run["message"] = "stopped early by hyperband"
            elif exit_code == EXIT_DIVERGED or reported == "diverged":
                run["status"] = "diverged"
            elif exit_code == 0 and reported in (None, "finished") and self.has_results(run):
                run["status"] = "finished"
            elif reported == "interrupted" and len(run["attempts"]) < MAX_ATTEMPTS:
                run["status"] = "interrupted"  # stopped from outside (SIGTERM, preemption): resumed
            else:
                run["status"] = "failed"
                if exit_code == 0:
                    run["message"] = f"exit status 0 but no {self.metric()} in its status.json"
                elif not run["message"]:
                    run["message"] = f"exit status {exit_code}; see the log"
            return run

    def early_terminate(self) -> None:
        if "early_terminate" not in self.sweep.config:
            return
        with self.sweep.locked():
            for name in self.procs:
                self.refresh(self.sweep.run(name))
            for stop in sweeps.stop_runs(self.sweep.config, self.sweep.sweep_runs()):
                run = self.sweep.run(stop.name)
                if stop.name in self.procs and not run.get("stop_requested"):
                    run["stop_requested"] = True
                    self.procs[stop.name][0].terminate()  # Lightning saves and exits on SIGTERM

    def fill_slots(self, bar) -> None:
        while free := [s for s in self.slots if s not in [slot for _, slot in self.procs.values()]]:
            claimed = self.claim()
            if claimed is None:
                return
            name, open_attempt = claimed
            if open_attempt is not None and self.adopt(name, open_attempt):
                bar.write(f"{name}: {self.sweep.run(name)['attempts'][-1]['note']}")
                continue
            self.launch(name, free[0])

    def reap(self, bar) -> None:
        for name, (proc, _) in list(self.procs.items()):
            if proc.poll() is not None:
                run = self.finish(name, proc.returncode)
                del self.procs[name]
                if run["status"] in DONE and run["status"] != "finished":
                    bar.write(f"{name} {run['status']}: {run['message']} (log: {run['log']})")

    def heartbeat(self) -> None:
        if self.procs and time.time() - self.beaten >= HEARTBEAT_SECONDS:
            with self.sweep.locked():
                for name in self.procs:
                    self.sweep.run(name)["owner"] = self.owner()
            self.beaten = time.time()

    def idle(self) -> None:
        """Wait POLL_SECONDS, or less when one of our runs ends first (short runs start each other fast)."""
        deadline = time.time() + POLL_SECONDS
        while time.time() < deadline and all(proc.poll() is None for proc, _ in self.procs.values()):
            time.sleep(0.05)

    def run(self) -> None:
        bar = tqdm(
            total=self.total,
            unit="run",
            desc=self.sweep.state["name"],
            dynamic_ncols=True,
            mininterval=1 if sys.stderr.isatty() else 60,
        )
        shown = None
        try:
            while True:
                self.reap(bar)
                self.early_terminate()
                self.fill_slots(bar)
                self.heartbeat()
                with self.sweep.locked():  # what the bar shows, and whether another agent holds our runs
                    waiting = self.held_by_others(time.time())
                    counts = {s: sum(r["status"] == s for r in self.sweep.runs) for s in ("running", *DONE)}
                if not self.procs and not waiting:
                    break
                if counts != shown:  # redraw on a change only: a log file gets a line per redraw
                    bar.n = sum(counts[s] for s in DONE)
                    bar.set_postfix({k: v for k, v in counts.items() if v}, refresh=True)
                    shown = counts
                self.idle()
        except KeyboardInterrupt:
            bar.write("interrupted: stopping the runs in flight; start the same command again to go on")
            for proc, _ in self.procs.values():
                proc.terminate()
            for name, (proc, _) in self.procs.items():
                try:
                    proc.wait(STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                with self.sweep.locked():
                    run = self.finish(name, proc.returncode)
                    if run["status"] not in ("finished", "diverged"):
                        run["status"] = "interrupted"
            raise
        finally:
            bar.close()


class UsageError(Exception):
    """A wrong command line: one line and exit status 2."""


# -- the report -------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fractions(b: dict) -> str:
    """The towers' colour fractions with their 95% intervals: ``1: 0% [0-7] 2: 100% [93-100]``."""
    if not b.get("colour_fraction"):
        return ""
    rows = zip(b.get("towers") or [], b["colour_fraction"], b["colour_fraction_low"], b["colour_fraction_high"])
    return " ".join(
        f"{t}: n/a" if f is None else f"{t}: {100 * f:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]" for t, f, lo, hi in rows
    )


def table(sweep: Sweep) -> str:
    """The runs, one a line: the swept values, status, the sweep's metric, the verdict with delta f and its
    p, the towers' colour fractions with their intervals, eta2 with its p (p at the permutation floor as a bound, "≤ 1e-4"), and the exit status."""
    metric = sweep.config.get("metric", {}).get("name")
    # the swept parameters; constants (`value:`) are the same in every run
    params = [k for k, spec in sweep.config["parameters"].items() if "value" not in spec]
    header = [
        "run",
        *params,
        "status",
        metric or "metric",
        "verdict",
        "delta_f",
        "p_delta_f",
        "colour_fraction",
        "eta2",
        "p_eta2",
        "exit",
    ]
    rows = []
    for run in sweep.runs:
        value = run["summary"].get(metric) if metric else None
        b = run.get("bisection") or {}  # read from the run's bisection.json (read_bisection)
        rows.append(
            [
                run["name"],
                *(_fmt(run["params"].get(p)) for p in params),
                run["status"],
                _fmt(value),
                b.get("verdict") or "",
                _fmt(b.get("delta_f")),
                p_text(b.get("p_delta_f"), b.get("permutations")),
                _fractions(b),
                _fmt(b.get("eta2")),
                p_text(b.get("p_eta2"), b.get("permutations")),
                _fmt(run["exit_code"]),
            ]
        )
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
    parser.add_argument("--jobs", type=int, help="runs at the same time (default 1, or one per --gpus id)")
    parser.add_argument(
        "--gpus",
        help="CUDA device ids, e.g. 0,1,2,3: one run per id at a time, with "
        "CUDA_VISIBLE_DEVICES set to it (positions in this agent's own "
        "CUDA_VISIBLE_DEVICES when that is set)",
    )
    parser.add_argument(
        "--shard",
        help="I/N: this agent takes the grid's runs k with k mod N == I "
        "(N agents on one --out, e.g. a SLURM job array)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default runs/sweeps/<file name>)")
    args = parser.parse_args(argv)
    gpus = shard = None
    try:
        if args.gpus is not None:
            gpus = gpu_slots(args.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if args.jobs not in (None, len(gpus)):
                raise ValueError(
                    f"--jobs {args.jobs} with --gpus {args.gpus}: --gpus runs one run per id "
                    f"at a time; leave out --jobs"
                )
        if args.shard is not None:
            match = re.fullmatch(r"(\d+)/(\d+)", args.shard)
            if not match or not int(match[1]) < int(match[2]):
                raise ValueError(
                    f"--shard {args.shard}: give I/N with 0 <= I < N, e.g. "
                    f"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-(N-1)"
                )
            shard = int(match[1]), int(match[2])
    except ValueError as err:
        parser.error(str(err))
    out = args.out or Path("runs") / "sweeps" / args.sweep_file.stem
    sweep = Sweep(args.sweep_file, out)
    try:
        agent = Agent(sweep, args.count, max(1, args.jobs or 1), gpus, shard)
    except UsageError as err:
        parser.error(str(err))
    print(disk_estimate(sweep, agent.total), flush=True)
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
