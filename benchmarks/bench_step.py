"""Training-step throughput and peak memory of TowerAlexNet against the usual implementations.

One training step is forward + cross-entropy + backward + SGD step (momentum 0.9, weight decay 5e-4)
on a batch already in memory. All models are timed in the same process, round-robin: every round
runs one timed step of each model in turn, so a load spike from another process hits all of them
alike, and each model's ratio to torchvision's alexnet is the median over rounds of
(alexnet's step time / the model's step time) in the same round.

    python benchmarks/bench_step.py                      # CPU fp32, batch 32 and 128 (CUDA: bf16, 128 and 256)
    python benchmarks/bench_step.py --batch-sizes 32     # only batch 32
    python benchmarks/bench_step.py --quick              # tiny models, seconds: checks that it runs
    python benchmarks/bench_step.py --default-malloc     # under glibc's malloc defaults (see below)

Models (1000 classes, as torchvision's alexnet):
    towers-1/2/4        this project's TowerAlexNet (grouped convolutions, towers.lrn's LRN), 227 px
    towers-2 nn.LRN     the same 2-tower network with torch.nn.LocalResponseNorm applied to each
                        tower's channel block (a reshape to (batch * towers, channels per tower, H, W))
    towers-2 no LRN     the 2-tower network with both LRN layers replaced by identity
    naive-2             one Python branch per tower joined by torch.cat, nn.LocalResponseNorm per
                        tower: how the demul/AlexNet TensorFlow replication built the network
    torchvision alexnet torchvision.models.alexnet (the "one weird trick" variant, 64/192/384/256/256
                        kernels, no LRN, no towers), 224 px, its documented input
    ... channels_last   (CPU) the same model with weights and input in NHWC memory format: what
                        towers.TowerClassifier trains with on the CPU; alexnet's row shows what the
                        format alone buys. On CUDA the modes cover the format instead.
    ... compiled        (CPU) the same model through torch.compile (inductor), as TowerClassifier's
                        model.compile runs it, the LRN then in tensor operations (towers.lrn); the
                        compilation happens in the warm-up steps, untimed. On CUDA the modes cover it.

`× alexnet` is the median over rounds of alexnet's step time / the model's in the same round, with a
95% percentile-bootstrap interval of that median over the rounds. The LRN's share of a step, two ways
(CPU): `timed` is the time inside the LRN layers, forward and backward (hooks, LRNTimer), over the
step; `removed` is 1 - step(towers-2 no LRN) / step(model) in the same round, which also counts what
the LRN costs the layers around it (its fresh tensors, caches) but is the difference of two noisy
step times. Both are medians over rounds with the same interval.

On the CPU the process first keeps freed memory for reuse (towers.allocator.keep_freed_memory), as
train.py does for a CPU run: every model in the process runs under the same malloc, and the JSON says
which (machine.keep_freed_memory). --default-malloc measures under glibc's defaults instead, where a
37 MB activation costs towers-2 a page-fault storm that alexnet's 25 MB ones escape (BENCHMARKS.md).

Peak memory is the memory one training step adds above the resting state (parameters, momentum
buffers, the input batch): on CUDA torch.cuda.max_memory_allocated() minus memory_allocated() before
the step; on the CPU the peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the
resident size before the step, after malloc_trim(0) has handed freed heap memory back. The CPU figure
counts pages the process touched, including allocator slack; it is None where /proc or glibc is missing.
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from towers.allocator import keep_freed_memory
from towers.files import write_atomic
from towers.lrn import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE
from towers.model import TowerAlexNet, conv_output_size, tower_widths

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINE = "torchvision alexnet"


class TowerwiseTorchLRN(nn.Module):
    """torch.nn.LocalResponseNorm inside each tower: the channel blocks become batch entries."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups
        self.lrn = nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return self.lrn(x.reshape(b * self.groups, c // self.groups, h, w)).reshape(b, c, h, w)


class NaiveTowerAlexNet(nn.Module):
    """The same network as TowerAlexNet (split widths), written with one Python branch per tower.

    Each tower runs conv1-pool2 on its own; every tower's conv3 reads the concatenation of all towers;
    conv4-pool5 again per tower; the towers are concatenated for the fully-connected layers. This is
    how the demul/AlexNet replication (TensorFlow 1) built the two towers. Reference for the benchmark
    only: the package's model runs the towers as grouped convolutions.
    """

    def __init__(
        self,
        num_towers: int = 2,
        num_classes: int = 1000,
        width_multiplier: float = 1.0,
        image_size: int = 227,
        dropout: float = 0.5,
    ):
        super().__init__()
        w, T = tower_widths(num_towers, "split", width_multiplier), num_towers

        def lrn():
            return nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)

        self.lower = nn.ModuleList(
            nn.Sequential(
                OrderedDict(
                    [
                        ("conv1", nn.Conv2d(3, w["conv1"], 11, stride=4)),
                        ("relu1", nn.ReLU(inplace=True)),
                        ("norm1", lrn()),
                        ("pool1", nn.MaxPool2d(3, stride=2)),
                        ("conv2", nn.Conv2d(w["conv1"], w["conv2"], 5, padding=2)),
                        ("relu2", nn.ReLU(inplace=True)),
                        ("norm2", lrn()),
                        ("pool2", nn.MaxPool2d(3, stride=2)),
                    ]
                )
            )
            for _ in range(T)
        )
        self.upper = nn.ModuleList(
            nn.Sequential(
                OrderedDict(
                    [
                        ("conv3", nn.Conv2d(T * w["conv2"], w["conv3"], 3, padding=1)),
                        ("relu3", nn.ReLU(inplace=True)),
                        ("conv4", nn.Conv2d(w["conv3"], w["conv4"], 3, padding=1)),
                        ("relu4", nn.ReLU(inplace=True)),
                        ("conv5", nn.Conv2d(w["conv4"], w["conv5"], 3, padding=1)),
                        ("relu5", nn.ReLU(inplace=True)),
                        ("pool5", nn.MaxPool2d(3, stride=2)),
                    ]
                )
            )
            for _ in range(T)
        )
        side = conv_output_size(image_size)
        self.classifier = nn.Sequential(
            nn.Linear(T * w["conv5"] * side * side, T * w["fc6"]),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(T * w["fc6"], T * w["fc7"]),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(T * w["fc7"], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lower = torch.cat([tower(x) for tower in self.lower], 1)
        upper = torch.cat([tower(lower) for tower in self.upper], 1)
        return self.classifier(torch.flatten(upper, 1))

    @torch.no_grad()
    def load_from(self, model: TowerAlexNet) -> "NaiveTowerAlexNet":
        """Copy a TowerAlexNet's weights, tower k taking the k-th block of every convolution."""
        layers = model.named_layers()
        for k, (lower, upper) in enumerate(zip(self.lower, self.upper)):
            for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
                mine = getattr(lower if name in ("conv1", "conv2") else upper, name)
                n = mine.out_channels
                mine.weight.copy_(layers[name].weight[k * n : (k + 1) * n])
                mine.bias.copy_(layers[name].bias[k * n : (k + 1) * n])
        for mine, theirs in zip(
            [m for m in self.classifier if isinstance(m, nn.Linear)], [layers["fc6"], layers["fc7"], layers["fc8"]]
        ):
            mine.load_state_dict(theirs.state_dict())
        return self


def build_models(quick: bool) -> dict[str, tuple[nn.Module, int]]:
    """name -> (model, image side). --quick: width 1/4 and 67 px (torchvision's alexnet keeps its width).
    Names with CHANNELS_LAST run in that memory format, names ending in COMPILED through torch.compile
    (see Runner)."""
    width, side = (0.25, 67) if quick else (1.0, 227)

    def towers(num_towers, lrn="towers"):
        model = TowerAlexNet(num_towers, num_classes=1000, width_multiplier=width, image_size=side)
        if lrn != "towers":
            for name in ("norm1", "norm2"):
                setattr(model.features, name, TowerwiseTorchLRN(num_towers) if lrn == "nn" else nn.Identity())
        return model

    alexnet_side = 224 if not quick else side
    return {
        BASELINE: (torchvision.models.alexnet(num_classes=1000), alexnet_side),
        BASELINE + CHANNELS_LAST: (torchvision.models.alexnet(num_classes=1000), alexnet_side),
        BASELINE + CHANNELS_LAST + COMPILED: (torchvision.models.alexnet(num_classes=1000), alexnet_side),
        "towers-1": (towers(1), side),
        "towers-2": (towers(2), side),
        "towers-2" + CHANNELS_LAST: (towers(2), side),
        "towers-2" + CHANNELS_LAST + COMPILED: (towers(2), side),
        "towers-4": (towers(4), side),
        "towers-2 nn.LRN": (towers(2, "nn"), side),
        "towers-2 no LRN": (towers(2, "none"), side),
        "towers-2 no LRN" + CHANNELS_LAST: (towers(2, "none"), side),
        "naive-2": (NaiveTowerAlexNet(2, 1000, width, side), side),
    }


CHANNELS_LAST, COMPILED = " channels_last", " compiled"
MODEL_NAMES = [
    BASELINE,
    BASELINE + CHANNELS_LAST,
    BASELINE + CHANNELS_LAST + COMPILED,
    "towers-1",
    "towers-2",
    "towers-2" + CHANNELS_LAST,
    "towers-2" + CHANNELS_LAST + COMPILED,
    "towers-4",
    "towers-2 nn.LRN",
    "towers-2 no LRN",
    "towers-2 no LRN" + CHANNELS_LAST,
    "naive-2",
]

# what the LRN share of a model is measured against
NO_LRN = {
    "towers-2": "towers-2 no LRN",
    "towers-2 nn.LRN": "towers-2 no LRN",
    "towers-2" + CHANNELS_LAST: "towers-2 no LRN" + CHANNELS_LAST,
}


def rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_cpu_peak() -> int | None:
    """Hand freed heap memory back, reset the peak RSS; return the RSS now (None if unsupported)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return rss_bytes("VmRSS")


class Runner:
    """A model with its optimizer, batch and step function on one device, in one mode."""

    def __init__(self, model, side, batch_size, device, bf16, compile_, channels_last):
        self.device, self.bf16 = device, bf16
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=memory_format).train()
        # fused, as towers.TowerClassifier trains, and the same for every model: one pass per parameter
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=device.type in ("cpu", "cuda")
        )
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch_size, 3, side, side, generator=generator).to(device, memory_format=memory_format)
        self.y = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
        self.forward = torch.compile(self.model) if compile_ else self.model

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.forward(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def timed(self, steps: int) -> float:
        """Seconds per step over `steps` steps (one device sync at the end, none between steps)."""
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return (time.perf_counter() - start) / steps

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_memory(self) -> int | None:
        """Bytes one step adds above the resting state (see the module docstring)."""
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.step()
            self.sync()
            return torch.cuda.max_memory_allocated(self.device) - before
        before = reset_cpu_peak()
        if before is None:
            return None
        self.step()
        peak = rss_bytes("VmHWM")
        return None if peak is None else peak - before


class LRNTimer:
    """Wall time a CPU step spends inside a TowerAlexNet's LRN layers, forward and backward, from hooks:
    forward between each layer's pre- and post-hook, backward from when autograd reaches the layer's
    output (a hook on it) to when it reaches the layer's input (a hook there). Not on CUDA, whose
    kernels run asynchronously."""

    def __init__(self, layers):
        self.seconds, self._start = 0.0, 0.0
        for layer in layers:
            layer.register_forward_pre_hook(self._begin)
            layer.register_forward_hook(self._end_forward)

    def _begin(self, *_) -> None:
        self._start = time.perf_counter()

    def _end(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start

    def _end_forward(self, module, inputs, output) -> None:
        self._end()
        if output.requires_grad:
            output.register_hook(self._begin)
            inputs[0].register_hook(self._end)


def lrn_layers(model: nn.Module) -> list[nn.Module]:
    """norm1 and norm2 of a TowerAlexNet (either LRN), none of any other model."""
    features = getattr(model, "features", None)
    return [
        layer
        for name in ("norm1", "norm2")
        if not isinstance(layer := getattr(features, name, nn.Identity()), nn.Identity)
    ]


def modes(device: torch.device) -> list[dict]:
    if device.type == "cuda":
        return [
            dict(
                name=f"cuda bf16{' compile' if c else ''}{' channels_last' if cl else ''}",
                bf16=True,
                compile_=c,
                channels_last=cl,
            )
            for c in (False, True)
            for cl in (False, True)
        ]
    return [dict(name="cpu fp32", bf16=False, compile_=False, channels_last=False)]


def measure(
    batch_size: int,
    device: torch.device,
    mode: dict,
    quick: bool,
    warmup: int,
    rounds: int,
    steps_per_round: int,
    only: list[str] | None,
) -> list[dict]:
    from tqdm.auto import tqdm

    built = build_models(quick)
    names = [
        n
        for n in built
        if (only is None or n in only or n == BASELINE)
        and not ((CHANNELS_LAST in n or n.endswith(COMPILED)) and device.type == "cuda")
    ]  # CUDA's modes cover the format and compilation
    mode_args = {k: v for k, v in mode.items() if k != "name"}
    runners = {}
    for name in names:
        model, side = built.pop(name)
        args = {
            **mode_args,
            "channels_last": mode_args["channels_last"] or CHANNELS_LAST in name,
            "compile_": mode_args["compile_"] or name.endswith(COMPILED),
        }
        runners[name] = Runner(model, side, batch_size, device, **args)
    del built
    desc = f"{mode['name']} batch {batch_size}"
    for runner in tqdm(runners.values(), desc=f"{desc} warm-up", leave=False):
        for _ in range(warmup):
            runner.step()
        runner.sync()
    layers = {name: lrn_layers(runner.model) for name, runner in runners.items()}
    timers = {  # not inside a compiled model: its hooks would be traced into the graph
        name: LRNTimer(layers[name])
        for name, runner in runners.items()
        if device.type == "cpu" and layers[name] and runner.forward is runner.model
    }
    times = {name: [] for name in runners}
    lrn_times = {name: [] for name in timers}
    for _ in tqdm(range(rounds), desc=f"{desc} rounds", leave=False):
        for name, runner in runners.items():
            if name in timers:
                timers[name].seconds = 0.0
            times[name].append(runner.timed(steps_per_round))
            if name in timers:
                lrn_times[name].append(timers[name].seconds / steps_per_round)
    rows = []
    for name, runner in runners.items():
        t = times[name]
        row = dict(
            model=name,
            mode=mode["name"],
            batch_size=batch_size,
            image_size=runner.x.shape[-1],
            parameters=sum(p.numel() for p in runner.model.parameters()),
            images_per_s=batch_size / statistics.median(t),
            step_ms=1000 * statistics.median(t),
            step_ms_min=1000 * min(t),
            step_ms_max=1000 * max(t),
            ratio_to_alexnet=statistics.median(b / m for b, m in zip(times[BASELINE], t)),
            ratio_ci95=median_ci95([b / m for b, m in zip(times[BASELINE], t)]),
            lrn_ms=None,
            lrn_share_timed=None,
            lrn_share_timed_ci95=None,
            lrn_share_removed=None,
            lrn_share_removed_ci95=None,
            peak_memory_mb=None,
        )
        if name in lrn_times:  # the LRN layers' own time in each step, over the step
            shares = [lrn / m for lrn, m in zip(lrn_times[name], t)]
            row.update(
                lrn_ms=1000 * statistics.median(lrn_times[name]),
                lrn_share_timed=statistics.median(shares),
                lrn_share_timed_ci95=median_ci95(shares),
            )
        if NO_LRN.get(name) in times:  # what removing the LRN layers saves, in the same rounds
            shares = [1 - n / m for n, m in zip(times[NO_LRN[name]], t)]
            row.update(lrn_share_removed=statistics.median(shares), lrn_share_removed_ci95=median_ci95(shares))
        rows.append(row)
    for row in rows:  # after the timing, so the peak-memory resets do not perturb it
        peak = runners[row["model"]].peak_memory()
        row["peak_memory_mb"] = None if peak is None else peak / 2**20
    return rows


def median_ci95(per_round: list[float]) -> list[float] | None:
    """Interval of the median of per-round values (a ratio, an LRN share): the exact, distribution-free
    order-statistic interval of :func:`analysis.compare_stats.median_interval` (95%, or at 5 rounds [min,
    max] at 93.75%); None under 5 rounds (too few to say) and for the baseline's own ratios, all 1."""
    if len(per_round) < 5 or min(per_round) == max(per_round):
        return None
    from analysis.compare_stats import median_interval  # the project's one interval of a median

    _, low, high, _ = median_interval(per_round)
    return [low, high]


def add_malloc_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is; by default freed memory is kept for reuse, as train.py "
        "does on the CPU (towers/allocator.py), for every model in the process alike",
    )


def malloc_as_train_py(args: argparse.Namespace, device: torch.device) -> bool:
    """Keep freed memory for reuse, as train.py does for a run on the CPU, unless --default-malloc;
    whether it is kept (for the JSON)."""
    return device.type == "cpu" and not args.default_malloc and keep_freed_memory()


def machine() -> dict:
    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor(),
        cpu_count=os.cpu_count(),
        mkldnn=torch.backends.mkldnn.is_available(),
    )
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # the allocator decides what a fresh activation costs on the CPU (page faults; BENCHMARKS.md)
    info["allocator_env"] = {
        k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k in ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")
    }
    try:
        info["transparent_hugepage"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()  # other processes on the machine perturb timings
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    def interval(ci, spec=".2f"):
        return "" if not ci else f" ({ci[0]:{spec}}–{ci[1]:{spec}})"

    lines = [
        "| mode | batch | model | px | images/s | × alexnet (95% CI) | step ms (min–max) | peak MB | LRN ms "
        "| LRN share: timed (95% CI) | LRN share: removed (95% CI) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['batch_size']} | {r['model']} | {r['image_size']} | "
            f"{r['images_per_s']:.1f} | {r['ratio_to_alexnet']:.2f}{interval(r.get('ratio_ci95'))} | "
            f"{r['step_ms']:.0f} ({r['step_ms_min']:.0f}–{r['step_ms_max']:.0f}) | "
            f"{fmt(r['peak_memory_mb'], '.0f')} | {fmt(r.get('lrn_ms'), '.0f')} | "
            f"{fmt(r.get('lrn_share_timed'), '.1%')}{interval(r.get('lrn_share_timed_ci95'), '.1%')} | "
            f"{fmt(r.get('lrn_share_removed'), '.1%')}{interval(r.get('lrn_share_removed_ci95'), '.1%')} |"
        )
    return "\n".join(lines)


def save_results(name: str, out: Path | None, argv, started, info: dict, **results) -> dict:
    """Write what was measured, on which machine and by which command, as JSON (atomically)."""
    payload = dict(
        benchmark=name,
        started=started.isoformat(),
        command=[f"benchmarks/{name}.py", *(argv if argv is not None else sys.argv[1:])],
        machine=info,
        **results,
    )
    out = out or RESULTS_DIR / f"{name}-{started:%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(payload, indent=2))
    print(f"\nwritten to {out}")
    return payload


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 32 128 on CPU, 128 256 on CUDA")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models (width 1/4, 67 px), batch 4, 2 rounds")
    parser.add_argument("--warmup", type=int, help="untimed steps per model (default 2; quick 1)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 7; quick 2)")
    parser.add_argument("--steps-per-round", type=int, help="steps per model per round (default 1 on CPU, 10 on CUDA)")
    parser.add_argument("--models", nargs="+", help="only these (torchvision alexnet is always run)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, all cores)")
    add_malloc_argument(parser)
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_step-<time>.json)")
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = args.batch_sizes or ([4] if args.quick else [128, 256] if device.type == "cuda" else [32, 128])
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    rounds = args.rounds or (2 if args.quick else 7)
    steps = args.steps_per_round or (10 if device.type == "cuda" else 1)
    if args.models:
        unknown = set(args.models) - set(MODEL_NAMES)
        if unknown:
            parser.error(f"unknown models {sorted(unknown)}; choose from {MODEL_NAMES}")

    started, info = datetime.datetime.now(datetime.timezone.utc), machine()
    info["keep_freed_memory"] = malloc_as_train_py(args, device)
    rows = []
    for mode in modes(device):
        for batch_size in batch_sizes:
            rows += measure(batch_size, device, mode, args.quick, warmup, rounds, steps, args.models)
            print(table([r for r in rows if r["mode"] == mode["name"] and r["batch_size"] == batch_size]), flush=True)
    print(f"\n{table(rows)}")
    return save_results(
        "bench_step", args.out, argv, started, info, warmup=warmup, rounds=rounds, steps_per_round=steps, results=rows
    )


if __name__ == "__main__":
    main()
