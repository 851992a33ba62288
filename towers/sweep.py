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
interrupted, ``--ckpt_path=…/last.ckpt`` to resume it; every attempt of a run gets the run's one
W&B run id (``WANDB_RUN_ID``). ``--jobs N`` runs N at once on the devices the agent sees (the CPU
on a machine without GPUs); ``--gpus`` gives each run one GPU of the list (``CUDA_VISIBLE_DEVICES``),
never two runs one GPU.

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

Before anything is launched the sweep file is checked: against W&B's schema, and for ``train.py``
every listed value through train.py's own parser (:mod:`towers.sweep_program`); ``--gpus`` against
the GPUs the agent sees. A mistake there, a damaged ``OUT/sweep.json`` (:mod:`towers.sweep_state`)
or an output folder of another sweep is one line on stderr and exit status 2, no traceback
(``TOWERS_DEBUG=1`` shows it). The runs themselves: :mod:`towers.sweep_agent`; the table:
:mod:`towers.sweep_report`.
"""

import argparse
import errno
import os
import re
import signal
import sys
from pathlib import Path

from towers.errors import UserError
from towers.files import shown_path
from towers.records import newest_last_checkpoint  # noqa: F401  (tests use it)
from towers.sweep_agent import Agent, UsageError, gpu_slots, visible_gpu_count  # noqa: F401
from towers.sweep_disk import _size, disk_estimate, train_checkpoint_bytes  # noqa: F401  (tests use them)
from towers.sweep_program import check_program
from towers.sweep_report import sync_command, table
from towers.sweep_state import (  # noqa: F401  (the sweep's names, for tests and callers)
    Sweep,
    condition,
    grid_size,
    load_sweep,
    next_params,
    render_command,
    sweeps,
)

PROG = "python -m towers.sweep"
USER_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("sweep_file", type=Path, help="a W&B sweep config, e.g. sweeps/demo.yaml")
    parser.add_argument("--count", type=_at_least_one, help="runs in all (default: the whole grid, or run_cap)")
    parser.add_argument(
        "--jobs",
        type=_at_least_one,
        help="runs at the same time (default 1, or one per --gpus id); without --gpus they share the devices "
        "the agent sees (the CPU on a machine without GPUs)",
    )
    parser.add_argument(
        "--gpus",
        help="CUDA device ids, e.g. 0,1,2,3: one run per id at a time, with "
        "CUDA_VISIBLE_DEVICES set to it (positions in this agent's own "
        "CUDA_VISIBLE_DEVICES when that is set); checked against the GPUs the agent sees",
    )
    parser.add_argument(
        "--shard",
        help="I/N: this agent takes the grid's runs k with k mod N == I "
        "(N agents on one --out, e.g. a SLURM job array)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default runs/sweeps/<file name>)")
    return parser


def main(argv=None) -> int:
    """The agent's command line: 0 when every run it may take is done (failed runs included: see the
    table), 130 when interrupted, 2 for a user's mistake (one line on stderr; argparse's usage too
    for a wrong option), 1 for a failed write (a full disk: one line naming the file)."""
    parser = _parser()
    args = parser.parse_args(argv)
    gpus = shard = None
    try:
        if args.gpus is not None:
            gpus = gpu_slots(args.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"), visible_gpu_count())
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
    try:
        return run(args, gpus, shard)
    except KeyboardInterrupt:  # Ctrl-C before the runs started (while the sweep file is checked)
        print(f"{PROG}: interrupted before any run was launched", file=sys.stderr)
        return 130
    except UsageError as err:
        parser.error(str(err))
    except (UserError, OSError) as err:
        if os.environ.get("TOWERS_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(err, UserError):
            status, line = 2, str(err)
        elif err.filename is None:  # not a file operation: a bug, keep its traceback
            raise
        elif err.errno in USER_ERRNOS:  # a folder it may not write, a file where a folder must be, ...
            status, line = 2, f"{err.strerror}: {shown_path(err.filename)} (give --out a folder the agent may write to)"
        else:  # a full disk, an I/O error: one line, as train.py says it, exit 1
            status, line = 1, f"{err.strerror}: {shown_path(err.filename)}; the agent stopped"
        print(f"{PROG}: error: {line}", file=sys.stderr)
        return status


def run(args, gpus, shard) -> int:
    config = load_sweep(args.sweep_file)
    check_program(config, args.sweep_file)  # before the output folder exists: nothing launched, nothing written
    out = args.out or Path("runs") / "sweeps" / args.sweep_file.stem
    sweep = Sweep(args.sweep_file, out, config)
    agent = Agent(sweep, args.count, args.jobs or 1, gpus, shard)
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
