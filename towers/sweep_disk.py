"""What the checkpoints of an offline sweep's runs will take on disk, printed before it starts.

For ``train.py`` each condition's command is parsed by train.py's own CLI (nothing is built), the
model is made on PyTorch's ``meta`` device to count its parameters, and the ModelCheckpoint
callbacks of its config say how many files a run keeps. For another program the checkpoints the
sweep's runs have written so far are measured.
"""

import json
import shutil
from pathlib import Path

from towers.sweep_program import parse_train_config
from towers.sweep_state import SEED_KEYS, Sweep, render_command


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def train_checkpoint_bytes(config: dict, params: dict) -> tuple[int, int, int, int]:
    """(bytes, checkpoint files, parameters, bytes per parameter) that one train.py run of the sweep keeps on disk.

    Each checkpoint holds the fp32 weights and SGD's momentum buffer (the master weights stay fp32
    under bf16-mixed): 8 bytes per parameter, 4 without momentum. The files are those its
    ModelCheckpoint callbacks keep: ``save_top_k`` each (every epoch for -1), one more for
    ``save_last: true`` (a ``link`` costs nothing); Lightning's default checkpoint when there is none.
    """
    import torch

    command = render_command(config, params)
    at = command.index(config["program"])
    module, cfg = parse_train_config(Path(config["program"]), command[at + 1 :])
    model_args = {k: v for k, v in vars(cfg["model"]).items() if not k.startswith("_")}
    with torch.device("meta"):  # sizes only: no memory, no initialisation
        model = module.TowerClassifier(**model_args)
    n = sum(p.numel() for p in model.parameters())
    trainer = cfg["trainer"]
    checkpoints = [
        cb.init_args
        for cb in trainer.get("callbacks") or []
        if str(getattr(cb, "class_path", "")).endswith("ModelCheckpoint")
    ]
    files = (
        0
        if trainer.get("enable_checkpointing") is False
        else 1
        if not checkpoints
        else sum(
            (max(trainer.get("max_epochs") or 1, 1) if c.save_top_k == -1 else c.save_top_k) + (c.save_last is True)
            for c in checkpoints
        )
    )
    per_parameter = 4 + (4 if model_args.get("momentum", 0.9) else 0)
    return n * per_parameter * files, files, n, per_parameter


def measured_checkpoint_bytes(out: Path) -> tuple[int, str] | None:
    """The largest checkpoint total of the sweep's runs so far (links not counted), and whose."""
    sizes = [
        (sum(p.stat().st_size for p in root.rglob("*.ckpt") if p.is_file() and not p.is_symlink()), root.name)
        for root in (out / "runs").glob("*")
        if root.is_dir()
    ]
    sizes = [s for s in sizes if s[0] > 0]
    return max(sizes) if sizes else None


def disk_estimate(sweep: Sweep, total: int) -> str:
    """One line: the checkpoints the sweep's ``total`` runs will keep, and the space free where they go."""
    params = [r["params"] for r in sweep.runs][:total]
    if len(params) < total:  # random/bayes: the runs to come are estimated from one more drawn run
        drawn = sweep.next_params()
        params += [drawn] * (total - len(params)) if drawn else []
    free = f"{_size(shutil.disk_usage(sweep.out).free)} free under {sweep.out}"
    if Path(sweep.config["program"]).name == "train.py" and Path(sweep.config["program"]).exists():

        def condition(p):  # the seed changes no size: one parse per condition
            return json.dumps({k: v for k, v in p.items() if k not in SEED_KEYS}, sort_keys=True)

        cache = {}
        try:
            for p in params:
                if condition(p) not in cache:
                    cache[condition(p)] = train_checkpoint_bytes(sweep.config, p)
        except (Exception, SystemExit) as err:  # noqa: BLE001  an estimate only: the runs report a bad config
            return f"Disk: no estimate, the runs' config did not parse ({type(err).__name__}: {err}); {free}"
        sizes = [cache[condition(p)] for p in params]
        need = sum(s[0] for s in sizes)

        def span(values, fmt):
            return fmt(min(values)) if min(values) == max(values) else f"{fmt(min(values))}-{fmt(max(values))}"

        per_run = (
            f"{span([s[1] for s in sizes], str)} checkpoint files x {span([s[2] for s in sizes], lambda x: f'{x / 1e6:.1f}M')}"
            f" parameters x {span([s[3] for s in sizes], str)} bytes: fp32 weights and SGD momentum"
        )
    else:
        measured = measured_checkpoint_bytes(sweep.out)
        if measured is None:
            return f"Disk: no estimate until a run of {sweep.config['program']} has written its checkpoints; {free}"
        need = measured[0] * len(params)
        per_run = f"up to {_size(measured[0])}, as {measured[1]}'s checkpoints"
    line = f"Disk: about {_size(need)} of checkpoints for {len(params)} runs (per run {per_run}); {free}"
    if need > shutil.disk_usage(sweep.out).free:
        line += "\nWARNING: the checkpoints will not fit in the free space"
    return line
