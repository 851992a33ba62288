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
    return f"{line}\n{time_estimate(sweep, params)}"


# --- time: images per epoch x epochs / images per second ------------------------------------------------

# One GPU's training rate for the estimate (REFERENCES.md, "ImageNet"): the one published real-data AlexNet
# rate, and issue 25's target for this project on an H100; benchmarks/gpu_check.py measures your GPU's.
GPU_IMAGES_PER_S = (
    (3861, "AlexNet on one V100 with real ImageNet, tensorflow/benchmarks#359"),
    (15000, "this project's one-GPU target, issue 25, not yet measured"),
)
IMAGENET_TRAIN_IMAGES, IMAGENET_CLASSES = 1_281_167, 1000  # ILSVRC-2012's training set


def training_images(data) -> int | None:
    """Images one epoch trains on, from the data options alone (the validation images carved out of the
    training pool are not trained on); None where only the data can say (``rest`` of a folder of images)."""
    data = data.get("init_args", data)
    train, val = data.get("train_size"), data.get("val_size")
    if data.get("source") == "imagenet":  # its size is known: the official validation set is the test set
        classes, per_class = data.get("classes"), data.get("images_per_class")
        if classes is not None and not isinstance(classes, int):
            return None  # a file of class ids
        classes = classes or IMAGENET_CLASSES
        # 732 to 1,300 images a class: a cap above 732 leaves some classes short, so the count is an upper bound
        pool = classes * per_class if per_class else round(IMAGENET_TRAIN_IMAGES * classes / IMAGENET_CLASSES)
    elif isinstance(train, int) and not isinstance(val, float):
        pool = train
    else:
        return None
    pool = pool if train == "rest" else round(train * pool) if isinstance(train, float) else min(train, pool)
    return pool - (round(val * pool) if isinstance(val, float) else val)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def time_estimate(sweep: Sweep, params: list[dict]) -> str:
    """One line: the training images of the sweep's runs (epochs x images per epoch) and the hours they take
    on one GPU at each rate of GPU_IMAGES_PER_S; train.py runs only."""
    if Path(sweep.config["program"]).name != "train.py" or not Path(sweep.config["program"]).exists():
        return f"Time: no estimate for {sweep.config['program']}"
    per_condition = {}
    try:
        for p in params:
            key = json.dumps({k: v for k, v in p.items() if k not in SEED_KEYS}, sort_keys=True)
            if key not in per_condition:
                command = render_command(sweep.config, p)
                at = command.index(sweep.config["program"])
                _, cfg = parse_train_config(Path(sweep.config["program"]), command[at + 1 :])
                epochs, images = cfg["trainer"].get("max_epochs"), training_images(cfg["data"])
                per_condition[key] = epochs * images if epochs and epochs > 0 and images is not None else None
            if per_condition[key] is None:
                return "Time: no estimate (the images per epoch are known only from the data, or no max_epochs)"
    except (Exception, SystemExit) as err:  # noqa: BLE001  an estimate only: the runs report a bad config
        return f"Time: no estimate, the runs' config did not parse ({type(err).__name__}: {err})"
    images = sum(
        per_condition[json.dumps({k: v for k, v in p.items() if k not in SEED_KEYS}, sort_keys=True)] for p in params
    )
    rates = "; ".join(f"{_hours(images / rate)} at {rate:,} images/s ({source})" for rate, source in GPU_IMAGES_PER_S)
    return (
        f"Time: {images / 1e6:,.1f} M training images for {len(params)} runs (epochs x images per epoch; validation, "
        f"test and measurements come on top), one run at a time on one GPU: {rates}"
    )
