"""Train, validate, test or predict with the N-tower AlexNet.

    python train.py fit --config configs/demo.yaml
    python train.py fit --config configs/paper.yaml --data.root /data/PetImages
    python train.py fit --config configs/paper.yaml --print_config

Exit status: 0 done, 2 a user error (a bad option, a missing or read-only folder, an impossible
model, a damaged checkpoint, a checkpoint of another run: one line, no traceback), 3
(towers.runs.EXIT_DIVERGED) the training loss or the weights became NaN or infinite, 128 + the signal
for a run stopped by SIGTERM (143) or SIGUSR1 (138) after saving a checkpoint to resume from, 1 any
other failure (a full disk: one line naming the file). ``TOWERS_DEBUG=1`` shows the traceback of any
of them. Under DDP every rank runs this same command line, so values given on it
(sweep parameters included) reach every rank; only global rank zero creates the W&B run.
"""

import errno
import os
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

import towers.parallel  # noqa: F401  registers `--trainer.strategy tower_parallel` with Lightning
from towers.allocator import keep_freed_memory
from towers.callbacks import KernelBisectionCallback
from towers.data import CatsDogsDataModule
from towers.errors import BadOption, Diverged, Interrupted, MissingData, UserError
from towers.measure import summary_line
from towers.model import PAPER_WIDTHS, tower_widths
from towers.module import TowerClassifier
from towers.records import TEST_ACC
from towers.resume import HPC_CHECKPOINTS, find_own_checkpoint, read_checkpoint, settings_differences, slurm_job
from towers.runs import (
    CHECKPOINT_KEY,
    EXIT_DIVERGED,
    AtomicCheckpointIO,
    RunStatus,
    SaveRunConfig,
    checkpoint_problem,
    damaged_checkpoint,
    run_folder,
    wandb_run_id,
)

# --ckpt_path values Lightning resolves itself (and URLs): not files to check here
LIGHTNING_CKPT_NAMES = ("best", "hpc", "registry")


def _wandb_reachable() -> bool:
    """True when W&B has credentials and its server answers; otherwise the run logs offline."""
    import wandb

    if not wandb.login(prompt=False, verify=False):  # looks for a key (env, ~/.netrc, settings); no network
        return False
    url = urlparse(wandb.setup().settings.base_url)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def default_precision(accelerator) -> str:
    """``trainer.precision`` when the config leaves it unset (null), by the device the run will use.

    A CUDA GPU with native bfloat16 (Ampere, Hopper and newer): ``bf16-mixed``: the tensor cores run
    the convolutions and matrix products in bf16 while the weights, the SGD update and the loss stay
    fp32; bf16 has fp32's exponent range, so no loss scaling. Anything else (the CPU, older GPUs, MPS):
    ``32-true``: bf16 on the CPU is slower than fp32 and the LRN's compiled CPU loops are fp32/fp64
    (towers/lrn.py); fp16 on older GPUs would need loss scaling, a change of numerics we do not make
    silently. Every run records the precision it used (config.yaml, status.json, W&B config).
    """
    import torch

    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if name in ("auto", "gpu", "cuda", "cudaaccelerator") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "32-true"
    return "32-true"


class TowersCLI(LightningCLI):
    """LightningCLI plus: run status and divergence stop in every config, W&B run names, offline fallback."""

    def add_arguments_to_parser(self, parser):
        # Always present, configurable as --run_status.check_every_n_steps=...
        parser.add_lightning_class_args(RunStatus, "run_status")
        # The crop size is stated once, as data.image_size; the model's fc6 input follows from it.
        parser.link_arguments("data.image_size", "model.image_size")
        # Likewise the number of classes: the data module states it (and checks the data has that many), fc8 follows.
        parser.link_arguments("data.num_classes", "model.num_classes")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="after fit, test the final weights on the held-out test split",
        )
        parser.add_argument(
            "--resume_settings",
            type=str,
            choices=["command_line", "checkpoint"],
            default="command_line",
            help="fit --ckpt_path with a checkpoint whose seed or model settings differ from the command "
            "line's: command_line refuses it, naming the differences; checkpoint continues it with its own",
        )
        parser.add_argument(
            "--keep_freed_memory",
            type=bool,
            default=True,
            help="on the CPU, glibc's malloc keeps freed memory for reuse instead of page-faulting "
            "every large tensor in afresh (towers/allocator.py)",
        )

    def parse_arguments(self, parser, args):
        # `train.py --config X fit` is accepted by the top-level parser and then ignored (even by
        # --print_config): the options of a subcommand come after its name.
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, (list, tuple)):
            at = next((i for i, a in enumerate(argv) if a in self.subcommands()), None)
            if at is not None and any(a == "--config" or str(a).startswith("--config=") for a in argv[:at]):
                print(
                    f"train.py: --config must come after the subcommand, e.g. `python train.py {argv[at]} "
                    f"--config configs/paper.yaml ...`; given before `{argv[at]}` it would be ignored",
                    file=sys.stderr,
                )
                raise SystemExit(2)
        super().parse_arguments(parser, args)
        self.resumed_from = None  # the checkpoint this run continues (fit) or evaluates, once chosen
        subcommand = self.config.get("subcommand")
        seed = (self.config[subcommand] if subcommand else self.config).get("seed_everything")
        if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:
            raise BadOption(f"seed_everything={seed} is out of range; a seed is an integer from 0 to {2**32 - 1}")
        if subcommand:
            self.choose_checkpoint(subcommand)

    # -- which checkpoint: this run's own, never another's -------------------------------------------
    def choose_checkpoint(self, subcommand: str) -> None:
        """Resolves ``--ckpt_path`` in the parsed config before any class is built (or any checkpoint read).

        ``last``: the newest checkpoint under ``default_root_dir`` of the run with this seed and these
        model settings (:func:`towers.resume.find_own_checkpoint`), never another run's. A path: refused
        when damaged, and for ``fit`` when its seed or model settings differ from the command line's
        (unless ``--resume_settings checkpoint``). No ``--ckpt_path`` under SLURM: the newest checkpoint
        this run's SLURM job wrote (a requeued job), as Lightning's own SLURM resume would, but only this
        run's. The chosen path replaces the option, so config.yaml records what was resumed.
        """
        config = self.config[subcommand]
        given = config.get("ckpt_path")
        root = Path(config.trainer.get("default_root_dir") or os.getcwd())
        seed, model = config.get("seed_everything"), config.model.as_dict()
        if isinstance(seed, bool):
            seed = None if seed is False else True
        if given == "last" or (given is None and subcommand == "fit" and SLURMEnvironment.detect()):
            if seed is True:
                raise BadOption(
                    "--ckpt_path last finds this run's checkpoint by its seed and model settings; "
                    "seed_everything is true (a random seed), so give the run's seed: --seed_everything N"
                )
            job = None if given == "last" else slurm_job()
            found, passed = find_own_checkpoint(root, seed, model, job)
            others = f" ({len(passed)} checkpoint(s) of other runs or damaged passed over)" if passed else ""
            label = f"--ckpt_path {given}" if given else f"SLURM job {slurm_job()} (no --ckpt_path)"
            for path, why in passed[:5]:
                rank_zero_info(f"{label}: passed over {path}: {why}")
            if len(passed) > 5:
                rank_zero_info(f"{label}: passed over {len(passed) - 5} more checkpoint(s) of other runs")
            if found is not None:
                rank_zero_info(f"Resuming from {found}, this run's newest checkpoint under {root.resolve()}{others}")
                config.ckpt_path = str(found)
                self.resumed_from = found
            elif given == "last" and subcommand != "fit":
                raise MissingData(
                    f"--ckpt_path last: no readable checkpoint of this run (seed {seed} and these model "
                    f"settings) under {root.resolve()}{others}; give --trainer.default_root_dir of the run, "
                    f"or the checkpoint's path"
                )
            elif given == "last":
                rank_zero_info(
                    f"--ckpt_path last: no checkpoint of this run under {root.resolve()}{others}, "
                    f"so training starts from the beginning"
                )
                config.ckpt_path = None
            else:  # a fresh fit under SLURM: Lightning would resume any hpc_ckpt_* in the root
                foreign = sorted(root.glob(HPC_CHECKPOINTS))
                if foreign:
                    raise BadOption(
                        f"{foreign[-1]} is in trainer.default_root_dir, and under SLURM Lightning resumes "
                        f"it when no --ckpt_path is given, but it is not this run's checkpoint; move it into "
                        f"its run's folder, or give this run another --trainer.default_root_dir"
                    )
            return
        if not given or given in LIGHTNING_CKPT_NAMES or "://" in str(given):
            return
        path = Path(given)
        if not path.is_file():
            what = "a folder, not a checkpoint file" if path.is_dir() else "no such checkpoint file"
            raise MissingData(f"--ckpt_path {given}: {what}")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise damaged_checkpoint(path, problem)
        checkpoint = read_checkpoint(path) or {}
        identity = checkpoint.get(CHECKPOINT_KEY) or {}
        self.resumed_from = path
        if seed is True and identity.get("seed") is not None:  # no seed asked for (a random one): the checkpoint's
            seed = identity["seed"]
            self.config = self.parser.parse_object({subcommand: {"seed_everything": seed}}, self.config)
        differences = settings_differences(checkpoint, seed, model)
        if not differences:
            return
        if subcommand == "fit" and config.get("resume_settings") != "checkpoint":
            raise BadOption(
                f"--ckpt_path {path} is a checkpoint of another run: {'; '.join(differences)}; give the "
                f"checkpoint's settings on the command line, or --resume_settings checkpoint to continue "
                f"it with its own"
            )
        # Deferring to the checkpoint (as Lightning's own --ckpt_path does for the model): its seed too.
        rank_zero_info(
            f"--ckpt_path {path}: the checkpoint's settings replace the command line's: {'; '.join(differences)}"
        )
        hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
        update = {"model": {k: v for k, v in hparams.items() if k in model}}
        if "seed" in identity:
            update["seed_everything"] = identity["seed"]
        self.config = self.parser.parse_object({subcommand: update}, self.config)

    def before_instantiate_classes(self):
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("precision") is None:  # configs/*.yaml leave it to the device; see default_precision
            config.trainer.precision = default_precision(config.trainer.accelerator)
        lr = config.get("model.lr")
        if lr is not None and lr < 0:
            raise BadOption(f"model.lr={lr} is negative; a learning rate must be >= 0")
        loggers = config.trainer.logger
        loggers = loggers if isinstance(loggers, list) else [loggers]
        wandb_loggers = [
            lg.init_args for lg in loggers if hasattr(lg, "class_path") and lg.class_path.endswith("WandbLogger")
        ]
        for init in wandb_loggers:
            if init.get("name") is None:
                init.name = run_name(config)
            # A resumed fit continues the W&B run that wrote its checkpoint: one run, one W&B run.
            resumed_id = wandb_run_id(self.resumed_from) if self.subcommand == "fit" and self.resumed_from else None
            if resumed_id and not (init.get("id") or init.get("version") or os.environ.get("WANDB_RUN_ID")):
                init.id = resumed_id
            # Keep the W&B folder (and the checkpoints Lightning puts beside it) under the run's
            # default_root_dir, like the CSV and TensorBoard loggers, rather than in the current folder.
            if str(init.get("save_dir")) == "." and init.get("dir") is None and config.trainer.default_root_dir:
                init.save_dir = config.trainer.default_root_dir
        if wandb_loggers and not os.environ.get("WANDB_MODE") and not _wandb_reachable():
            # Set before Lightning starts any DDP worker, so they inherit it and skip this check.
            os.environ["WANDB_MODE"] = "offline"
            # wandb.login (in the check) fixed wandb's global settings while WANDB_MODE was unset;
            # dropping them makes wandb.init read the variable again instead of asking for a key.
            import wandb

            wandb.teardown()
            rank_zero_info(
                "W&B: no API key or no connection to the server, so this run logs offline "
                "(the folder is printed below); upload it later with `wandb sync <that folder>`."
            )

    def instantiate_classes(self):
        # A ValueError from a constructor is a value given in the config or on the command line that
        # cannot work (num_towers=0, image_size > resize_size, ...): a user error, told in one line.
        try:
            super().instantiate_classes()
        except ValueError as error:
            if isinstance(error, UserError):
                raise
            raise BadOption(str(error)) from error
        # Every checkpoint records the run's seed (with its model settings, its identity: towers.resume).
        run_status = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("run_status")
        if isinstance(run_status, RunStatus):
            seed = (self.config[self.subcommand] if self.subcommand else self.config).get("seed_everything")
            run_status.seed = None if isinstance(seed, bool) else seed

    def instantiate_trainer(self, **kwargs):
        # Every run writes its checkpoints through AtomicCheckpointIO (complete or not at all), unless
        # the config names its own checkpoint I/O (as a plugin, or in a strategy object).
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer", {})
        plugins = kwargs.get("plugins", config.get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        strategy = kwargs.get("strategy", config.get("strategy"))
        own_io = isinstance(strategy, Strategy) and type(strategy.checkpoint_io) is not TorchCheckpointIO
        if not any(isinstance(p, CheckpointIO) for p in plugins) and not own_io:
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _before_run(self):
        if self.config[self.subcommand].get("keep_freed_memory") and self.trainer.strategy.root_device.type == "cpu":
            keep_freed_memory()

    before_validate = before_test = before_predict = _before_run

    def before_fit(self):
        self._before_run()
        if not self.trainer.is_global_zero:
            return
        config = self.config["fit"]
        if not config.get("config"):
            epochs = self.trainer.max_epochs
            length = (
                f"for {epochs} epochs{' (Lightning default)' if epochs == 1000 else ''}"
                if epochs and epochs > 0
                else f"for {self.trainer.max_steps} steps"
            )
            rank_zero_warn(
                f"train.py fit without --config: this trains TowerClassifier's defaults (the paper's "
                f"full-size network) {length} with no kernel measurement, no W&B logger and no "
                f"checkpoint of the best epoch; give --config configs/paper.yaml (or configs/demo.yaml)"
            )
        elif not any(isinstance(cb, KernelBisectionCallback) for cb in self.trainer.callbacks):
            rank_zero_warn(
                "this config has no towers.KernelBisectionCallback: the run trains but measures no "
                "colour split of the conv1 kernels (configs/paper.yaml shows how to add it)"
            )
        hp = self.model.hparams
        widths = tower_widths(hp.num_towers, hp.get("width_policy", "split"), hp.get("width_multiplier", 1.0))
        totals = "/".join(str(hp.num_towers * widths[name]) for name in PAPER_WIDTHS)
        rank_zero_info(
            f"Model: {hp.num_towers} towers, width_policy {hp.get('width_policy', 'split')}, per tower "
            f"{'/'.join(str(w) for w in widths.values())} (conv1-conv5, fc6, fc7; totals {totals}), "
            f"{sum(p.numel() for p in self.model.parameters()):,} parameters; "
            f"precision {self.trainer.precision}"
        )
        batch = getattr(self.datamodule, "hparams", {}).get("batch_size") if self.datamodule else None
        if batch is not None and self.trainer.world_size != 1:
            rank_zero_info(
                f"Global batch: {self.trainer.world_size} processes x data.batch_size {batch} = "
                f"{self.trainer.world_size * batch} images per step, not the config's {batch}; "
                f"learning rate {hp.lr} (model.lr, not scaled with the batch; README, Multi-GPU)"
            )

    def after_fit(self):
        # Every run ends with its accuracy on the held-out test images, logged beside the kernel
        # statistics of the same final weights (skipped for a diverged run, or with --test_after_fit false).
        diverged = exit_status(self) == EXIT_DIVERGED
        if self.config["fit"].get("test_after_fit") and not diverged:
            self.trainer.test(self.model, datamodule=self.datamodule)
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer), flush=True)


def fit_summary(trainer) -> str:
    """The block that ends every fit: how it ended, test accuracy, the verdict line, the run's folder."""
    status = next((cb.status for cb in trainer.callbacks if isinstance(cb, RunStatus)), None)
    accuracy = trainer.callback_metrics.get(TEST_ACC)
    bisection = next((cb for cb in trainer.callbacks if isinstance(cb, KernelBisectionCallback)), None)
    record = (bisection.last_record if bisection is not None else None) or {}
    if bisection is None:
        verdict = "not measured (the config has no KernelBisectionCallback)"
    else:
        verdict = f"{summary_line(record)} (step {record.get('step')})" if record else "not measured"
    change = record.get("kernel_change")  # how far conv1 moved: a verdict on kernels that never moved says little
    header = f"{'=' * 24} towers: end of fit ({status or 'done'}) {'=' * 24}"
    return "\n".join(
        [
            header,
            f"test accuracy: {float(accuracy):.4f}" if accuracy is not None else "test accuracy: not tested",
            f"verdict:       {verdict}",
            *(
                [
                    "conv1 moved:   ||W - W0|| / ||W0|| = "
                    + ", ".join("n/a" if c is None else f"{c:.2f}" for c in change)
                    + " (per tower)"
                ]
                if change
                else []
            ),
            f"run folder:    {run_folder(trainer).resolve()}",
            "=" * len(header),
        ]
    )


def run_name(config) -> str | None:
    """A W&B run name from the config, e.g. ``t2-s0-lr0.01-b128``; parts the config lacks are left out."""
    values = {
        "t": config.get("model.num_towers"),
        "s": config.get("seed_everything"),
        "lr": config.get("model.lr"),
        "b": config.get("data.batch_size") or config.get("data.init_args.batch_size"),
    }
    name = [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in values.items() if v is not None]
    return "-".join(name) or None


def main(args=None, run=True):
    return TowersCLI(TowerClassifier, CatsDogsDataModule, args=args, run=run, save_config_callback=SaveRunConfig)


def exit_status(cli) -> int:
    diverged = any(isinstance(cb, RunStatus) and cb.status == "diverged" for cb in cli.trainer.callbacks)
    return EXIT_DIVERGED if diverged else 0


def command_line(args=None) -> int:
    """train.py's command line: :func:`main`, with its errors told in one line and an exit status.

    User errors (towers.errors.UserError, a folder it may not write to) exit 2, a diverged run 3,
    a run stopped by SIGTERM or SIGUSR1 128 + the signal (143, 138; it saved a checkpoint to resume
    from), a failed write (a full disk, an I/O error) 1, each with one line on stderr instead of a traceback;
    ``TOWERS_DEBUG=1`` raises them as they are. Anything else is a bug and keeps its traceback.
    """
    try:
        return exit_status(main(args))
    except (SIGTERMException, Interrupted) as error:  # SIGTERMException is a SystemExit: code 0 unless caught
        status = 128 + (signal.SIGTERM if isinstance(error, SIGTERMException) else error.signum)
        line = getattr(error, "towers_message", None) or f"stopped by signal {status - 128}"
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=status)
        print(f"train.py: interrupted: {line}", file=sys.stderr)
        return status
    except (UserError, MisconfigurationException, Diverged, OSError) as error:
        if os.environ.get("TOWERS_DEBUG", "") not in ("", "0"):
            raise
        status, line = _error_line(error)
        if status is None:
            raise
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=status)  # its closing lines before ours, so ours is the last
        print(f"train.py: error: {line}", file=sys.stderr)
        return status


def _error_line(error: BaseException) -> tuple[int | None, str]:
    """(exit status, one line) for an error train.py reports without a traceback; (None, "") to re-raise."""
    if isinstance(error, Diverged):
        return EXIT_DIVERGED, f"the run diverged: {error}"
    if isinstance(error, (UserError, MisconfigurationException)):  # Lightning's word for a bad trainer setting
        return 2, str(error)
    if isinstance(error, OSError) and error.filename is not None:  # a file operation, not a socket
        what = f"{error.strerror or error}: {error.filename}"
        if isinstance(error, PermissionError) or error.errno == errno.EROFS:
            return 2, f"{what} (this run may not write there; give a folder it may write to)"
        return 1, f"{what}; the run stopped" + (" (disk full)" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    return None, ""


if __name__ == "__main__":
    sys.exit(command_line())
