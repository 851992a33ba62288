"""The offline sweep agent: claims the sweep's runs in its state (:mod:`towers.sweep_state`) and runs
each as its own process, up to ``--jobs`` (or one per ``--gpus`` id) at once.

Each run is the sweep file's command as ``wandb agent`` renders it, with
``--trainer.default_root_dir=OUT/runs/NAME`` (each run owns a folder) and, for a run that was
interrupted, ``--ckpt_path=…/last.ckpt``; in W&B offline mode, in the sweep's ``project``, grouped by
the sweep, typed by its condition, and with one W&B run id per grid point (``WANDB_RUN_ID``, kept in
the state, as ``wandb agent`` sets the id the server gives the run), so a resumed run continues its
W&B run. A killed agent started again takes back its dead runs: a run whose process had ended is
recorded from its own files; one that was in flight is resumed from its last checkpoint.
"""

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm
from wandb.sdk.lib import config_util
from wandb.sdk.lib.runid import generate_id

from towers import records
from towers.errors import UserError
from towers.records import EXIT_DIVERGED, newest_last_checkpoint
from towers.sweep_state import (
    HOST,
    Sweep,
    _now,
    condition,
    grid_size,
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


class UsageError(UserError):
    """A wrong command line: one line and exit status 2."""


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


def visible_gpu_count() -> int:
    """The CUDA devices this agent can see (``CUDA_VISIBLE_DEVICES`` applied), as PyTorch counts them:
    the devices its runs can be given. 0 without a GPU or a driver. Imports torch (only for ``--gpus``)."""
    import torch

    return torch.cuda.device_count()


def gpu_slots(ids: str, visible: str | None, count: int) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` of each run slot for ``--gpus IDS``, checked against the ``count``
    devices this agent sees.

    IDS number the devices as this agent's CUDA numbers them: with no ``CUDA_VISIBLE_DEVICES`` the
    machine's ids; under one (as SLURM sets it for a job's GPUs) the positions in that list, so
    ``--gpus 0`` in a job given GPU 3 runs on GPU 3. Raises ValueError for a wrong list or an id
    that is not one of the devices (a run given it would train on the CPU without a word).
    """
    wanted = [x.strip() for x in ids.split(",")]
    if "" in wanted or len(set(wanted)) != len(wanted):
        raise ValueError(f"--gpus {ids}: give distinct device ids separated by commas, e.g. 0,1,2,3")
    bad = [w for w in wanted if not w.isdigit() or int(w) >= count]
    if bad:
        seen = "no GPU" if count == 0 else f"{count} GPU{'s' * (count > 1)}, numbered 0..{count - 1}"
        under = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"
        raise ValueError(
            f"--gpus {ids}: this agent sees {seen}{under}; {','.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not among them (nvidia-smi lists the machine's GPUs)"
        )
    if visible is None:
        return wanted
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    return [devices[int(w)] for w in wanted]


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
            raise UsageError(f"a {sweep.config['method']} sweep has no end: give --count N (or run_cap in the file)")
        self.total = min(x for x in (size, cap) if x is not None)
        self.gpus = list(gpus) if gpus else [None] * jobs  # one run per slot: its GPU id, or None (any device)
        self.shard = shard
        self.procs = {}  # run name -> (Popen, slot number)
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

    def launch(self, name: str, slot: int) -> None:
        with self.sweep.locked():
            run = self.sweep.run(name)
            run.setdefault("wandb_id", generate_id())  # a state written before the runs had one
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
                "gpu": self.gpus[slot],
                "pid": None,
                "exit_code": None,
            }
            run["attempts"].append(attempt)  # saved before it starts: a crash here leaves a run to resume
            env = self.run_env(run, self.gpus[slot])
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

    def run_env(self, run: dict, gpu: str | None) -> dict:
        """The environment of a run: W&B offline, its W&B run id, the sweep's project, group and tags, and its GPU.

        The id is the grid point's, the same for every attempt (``WANDB_RESUME=allow``), so a resumed
        run continues its W&B run rather than open a second one (wandb.init, and Lightning's
        WandbLogger without an ``id``, take it from ``WANDB_RUN_ID``, as they do under ``wandb agent``).
        """
        root = self.run_root(run["name"])
        env = dict(
            os.environ,
            WANDB_RUN_GROUP=self.sweep.state["name"],
            WANDB_JOB_TYPE=condition(self.sweep.config, run["params"]),
            WANDB_TAGS=f"sweep,{self.sweep.state['name']}",
            WANDB_SWEEP_PARAM_PATH=str(root / "sweep-params.yaml"),
            WANDB_DIR=str(root),
            WANDB_RESUME="allow",
        )
        if run.get("wandb_id"):
            env["WANDB_RUN_ID"] = run["wandb_id"]
        for key, var in (("project", "WANDB_PROJECT"), ("entity", "WANDB_ENTITY")):
            if self.sweep.config.get(key):  # as `wandb agent ENTITY/PROJECT/ID` sets them for its runs
                env[var] = self.sweep.config[key]
        if env.get("WANDB_MODE") != "disabled":
            env["WANDB_MODE"] = "offline"
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
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
            elif reported in ("interrupted", "requeued") and len(run["attempts"]) < MAX_ATTEMPTS:
                run["status"] = "interrupted"  # stopped from outside (SIGTERM, SIGUSR1, preemption): resumed
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
        while free := [k for k in range(len(self.gpus)) if k not in [slot for _, slot in self.procs.values()]]:
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
        except UserError:  # the state file was damaged under us: stop the runs, write nothing into it
            for proc, _ in self.procs.values():
                proc.terminate()
            for proc, _ in self.procs.values():
                try:
                    proc.wait(STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
        finally:
            bar.close()
