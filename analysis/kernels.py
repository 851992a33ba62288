"""Colour scores per tower, the bisection statistic, the verdict and the Figure-3 grid of first-layer kernels.

    python analysis/kernels.py runs/.../checkpoints/last.ckpt            # a Lightning checkpoint
    python analysis/kernels.py runs/*/*/checkpoints/last.ckpt            # several: a table each, then one line each
    python analysis/kernels.py conv1.npy --towers 2 --bgr                # (96, 3, 11, 11), e.g. Caffe's
    python analysis/kernels.py runs/.../bisection.json [--record init]   # what the callback saved
    python analysis/kernels.py figure3.png --towers 2 [--grid 8x12] [--json OUT]   # a picture of a kernel grid

Prints the per-tower table, the statistic and the verdict line of every input, then (for several) one
summary line per input, and writes <stem>_kernels.png, <stem>_scores.png and <stem>_bisection.json into
--out (default: the input's folder); --json OUT writes the one input's record to OUT as well. For a
checkpoint written with KernelBisectionCallback the settings it used (input channel std, grey axis,
permutations, seed) come from the checkpoint, so the numbers are the callback's. A picture (PNG, JPEG, ...)
is read by :mod:`towers.figure_reader` (cells, resampling, the display's grey offset; its docstring says
how); the record then has a ``figure`` entry that says how it was read.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from towers import records
from towers.color import RANDOM_KERNEL_SCORE, Bisection, color_specificity
from towers.figure_reader import IMAGE_SUFFIXES, OFFSET_MODES, FigureError, parse_grid, read_figure
from towers.figures import kernel_grid, score_plot, write_png
from towers.measure import measure, summary_line
from towers.records import write_json
from towers.verdict import format_p

CONV1 = "model.features.conv1.weight"


def _split_towers(weights: torch.Tensor, towers: int | None, source: str) -> torch.Tensor:
    """(K, 3, h, w) -> (towers, K / towers, 3, h, w); (T, n, 3, h, w) passes."""
    if weights.dim() == 5 and weights.shape[2] == 3:
        if towers is not None and towers != weights.shape[0]:
            raise SystemExit(f"{source}: holds {weights.shape[0]} towers, but --towers {towers} was given")
        return weights
    if weights.dim() != 4 or weights.shape[1] != 3:
        raise SystemExit(
            f"{source}: expected first-layer weights (K, 3, h, w) or (towers, K/towers, 3, h, w), "
            f"got shape {tuple(weights.shape)} (TensorFlow's (h, w, 3, K) needs a transpose)"
        )
    if towers is None:
        raise SystemExit(
            f"{source}: a bare weight tensor does not say how many towers it had; give --towers "
            f"(1 for a one-tower network; 2 for the paper's, kernels 0..K/2-1 being the first tower)"
        )
    if towers < 1 or weights.shape[0] % towers:
        raise SystemExit(f"{source}: {weights.shape[0]} kernels cannot be split into {towers} equal towers")
    return weights.view(towers, weights.shape[0] // towers, *weights.shape[1:])


def load(path: Path, towers: int | None = None, record: str = "last", figure: dict | None = None) -> dict:
    """Kernels (T, n, 3, h, w) and the settings they were measured with, from any supported file.

    Returns a dict with ``kernels`` (or None when a bisection.json has no matching kernels file),
    ``record`` (the saved measurement, bisection.json only), ``init`` (the initialisation record if
    the file has one), ``settings`` (channel_std, axis, permutations, bootstrap, seed; None = default),
    ``figure`` (how a picture was read, pictures only) and ``source`` (a line that says what was read).
    ``figure``: keyword arguments of :func:`towers.figure_reader.read_figure` (grid, size, offset, chroma).
    """
    if not path.exists():
        raise SystemExit(f"{path}: no such file")
    settings = {"channel_std": None, "axis": None, "permutations": None, "bootstrap": None, "seed": None}
    out = {"kernels": None, "record": None, "init": None, "settings": settings, "figure": None}

    if path.suffix.lower() in IMAGE_SUFFIXES:
        if towers is None:
            raise SystemExit(
                f"{path}: a picture does not say how many towers its rows hold; give --towers "
                f"(2 for the paper's Figure 3: GPU 1's kernels on top)"
            )
        try:
            read = read_figure(path, towers, **(figure or {}))
        except FigureError as e:
            raise SystemExit(f"{path}: {e}") from None
        info = read.info()
        for note in read.notes:
            print(f"note: {note}", file=sys.stderr)
        out.update(
            kernels=torch.from_numpy(read.kernels),
            figure=info,
            source=f"{path} (picture: {info['grid'][0]}x{info['grid'][1]} cells of "
            f"{info['cell_px'][0]:g}x{info['cell_px'][1]:g} px, {read.blank} blank; display offset "
            f"removed {'per kernel' if read.offset == 'kernel' else 'globally'})",
        )
        return out

    if path.suffix == ".json":
        try:
            data = records.load_bisection(path)
        except ValueError:
            raise SystemExit(f"{path}: not a {records.BISECTION_FILE} written by KernelBisectionCallback") from None
        rec = data.get(record)
        if rec is None:
            raise SystemExit(f"{path}: has no {record!r} record")
        if rec.get("score") is None:
            raise SystemExit(f"{path}: the {record!r} record has no scores: {rec.get('error')}")
        stats = rec["statistics"] or {}
        settings.update(
            channel_std=rec["channel_std"],
            axis=rec["axis"],
            permutations=stats.get("permutations"),
            bootstrap=stats.get("bootstrap"),
            seed=stats.get("seed"),
        )
        out.update(
            record=rec,
            init=data.get("init") if record != "init" else None,
            source=f"{path} ({record} record: {rec['stage']}, step {rec['step']}, epoch {rec['epoch']})",
        )
        kernels_file = path.parent / rec.get("kernels_file", "")
        if rec.get("kernels_file") and kernels_file.is_file():
            kernels = torch.from_numpy(np.load(kernels_file))
            scores = color_specificity(kernels, rec["channel_std"], rec["axis"]).numpy()
            if np.allclose(scores, np.asarray(rec["score"], dtype=float), rtol=0, atol=1e-12):
                out["kernels"] = kernels
            else:
                print(
                    f"warning: {kernels_file.name} does not hold the kernels of this record (written at "
                    f"another step?); no grid",
                    file=sys.stderr,
                )
        else:
            print(f"warning: no kernels file {rec.get('kernels_file')!r} beside {path.name}; no grid", file=sys.stderr)
        return out

    if path.suffix == ".npy":
        weights = torch.from_numpy(np.load(path, allow_pickle=False))
        out.update(kernels=_split_towers(weights, towers, str(path)), source=f"{path} (weight array)")
        return out

    # weights_only: checkpoints and .pt files are read as tensors and plain values, never arbitrary pickles.
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: cannot be read as a PyTorch file ({type(e).__name__}: {str(e)[:300]})") from None
    if isinstance(obj, torch.Tensor):
        out.update(kernels=_split_towers(obj, towers, str(path)), source=f"{path} (weight tensor)")
        return out
    if not isinstance(obj, dict) or CONV1 not in obj.get("state_dict", {}):
        keys = list(obj.get("state_dict", obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise SystemExit(
            f"{path}: neither a weight tensor nor a TowerClassifier checkpoint with {CONV1!r} "
            f"(found {keys}); export conv1's weights as a (K, 3, h, w) array instead"
        )
    num_towers = obj.get("hyper_parameters", {}).get("num_towers")
    if num_towers is None and towers is None:
        raise SystemExit(f"{path}: the checkpoint has no hyper_parameters.num_towers; give --towers")
    if towers is not None and num_towers is not None and towers != num_towers:
        raise SystemExit(f"{path}: the checkpoint was trained with {num_towers} towers, not --towers {towers}")
    out["kernels"] = _split_towers(obj["state_dict"][CONV1], num_towers or towers, str(path))
    state = obj.get("callbacks", {}).get("KernelBisectionCallback")
    if state:
        settings.update({k: state.get(k) for k in settings})
        out["init"] = state.get("init")
    else:
        print(
            "warning: the checkpoint has no KernelBisectionCallback state, so the input channel std is unknown; "
            "scores assume the network saw raw (mean-subtracted) RGB. Pass --channel-std if it did not.",
            file=sys.stderr,
        )
    out["source"] = f"{path} (checkpoint, epoch {obj.get('epoch')}, step {obj.get('global_step')})"
    return out


def table(rec: dict) -> str:
    stats = Bisection(**rec["statistics"])
    lines = [f"{'tower':>6} {'kernels':>7} {'median':>7} {f'{stats.ci_level:.0%} CI':>16} {'DC':>6} {'AC':>6}"]
    for k, (med, dc, ac) in enumerate(zip(rec["tower_median"], rec["tower_median_dc"], rec["tower_median_ac"]), 1):
        if stats.control:
            ci = "(see halves)"
        else:
            j = stats.groups.index(k)
            ci = f"[{stats.ci_low[j]:.3f}, {stats.ci_high[j]:.3f}]"
        lines.append(f"{k:>6} {rec['kernels_per_tower']:>7} {med:>7.3f} {ci:>16} {dc:>6.3f} {ac:>6.3f}")
    if stats.control:
        for name, med, lo, hi, n in zip(stats.groups, stats.median, stats.ci_low, stats.ci_high, stats.sizes):
            lines.append(f"{name:>14} {n:>3} {med:>7.3f} {f'[{lo:.3f}, {hi:.3f}]':>16}")
    lines.append(stats.summary())
    return "\n".join(lines)


def analyse(path: Path, args, stem: str) -> dict:
    """One input: load, measure (or take the saved record), print its table and verdict, write its files."""
    figure = {"grid": args.grid, "size": args.kernel_size, "offset": args.offset, "chroma": args.jpeg_chroma}
    loaded = load(path, args.towers, args.record, figure)
    settings = loaded["settings"]
    for name in settings:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    defaults = {"permutations": 9999, "bootstrap": 2000, "seed": 0}
    settings = {k: defaults.get(k) if v is None else v for k, v in settings.items()}
    kernels = loaded["kernels"]
    if kernels is not None and args.bgr:
        kernels = kernels.flip(2)

    if kernels is not None and (loaded["record"] is None or args.channel_std or args.axis or args.bgr):
        rec = measure(
            kernels,
            settings["channel_std"],
            settings["axis"],
            settings["permutations"],
            settings["bootstrap"],
            settings["seed"],
        )
    else:  # no kernels to judge again: the saved record as it was measured
        rec = dict(loaded["record"])
    if rec["error"]:
        raise SystemExit(f"{path}: {rec['error']}")
    rec["source"] = loaded["source"]
    if loaded["figure"] is not None:
        rec["figure"] = loaded["figure"]

    print(loaded["source"])
    print(
        f"{rec['num_towers']} tower(s) x {rec['kernels_per_tower']} kernels of {rec['kernel_size'][0]}x"
        f"{rec['kernel_size'][1]}; channels {'BGR->RGB' if args.bgr else 'RGB'}; "
        + (
            f"weights divided by input std {settings['channel_std']}"
            if settings["channel_std"]
            else "inputs taken as raw RGB (no std)"
        )
        + f"; grey axis {np.round(rec['axis'], 4).tolist()}"
    )
    print(table(rec))
    init = loaded["init"]
    if init and init.get("statistics"):
        print(
            f"at initialisation (step {init['step']}): eta2 = {init['statistics']['eta2']:.3f}, "
            f"p {format_p(init['statistics']['p_value'], init['statistics']['permutations'])}, tower medians "
            + ", ".join(f"{m:.3f}" for m in init["tower_median"])
        )
    else:
        print(f"(no initialisation record here: i.i.d. Gaussian kernels score {RANDOM_KERNEL_SCORE:.3f} on average)")
    print(summary_line(rec))

    out = args.out or path.parent
    out.mkdir(parents=True, exist_ok=True)
    stats = Bisection(**rec["statistics"])
    write_png(
        out / f"{stem}_scores.png",
        score_plot(
            rec["score"], rec["tower"], stats, init["score"] if init and init.get("score") else None, f"{path.name}"
        ),
    )
    if kernels is not None:
        order = torch.tensor(rec["score"]).view(kernels.shape[:2]).argsort(1) if args.sort else None
        write_png(out / f"{stem}_kernels.png", kernel_grid(kernels, args.global_scale, order))
    write_json(out / f"{stem}_bisection.json", rec)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, rec)
    print(
        f"wrote {out / stem}_{{{'kernels,' if kernels is not None else ''}scores}}.png and {stem}_bisection.json"
        + (f", and {args.json}" if args.json else "")
    )
    return rec


def _stems(paths: list[Path], record: str, shared_out: bool) -> list[str]:
    """The names of the files written per input; inputs with one name (runs' last.ckpt) written into one
    --out folder get their parent folders' names in front until the names differ."""
    suffix = ["_init" if record == "init" and p.suffix == ".json" else "" for p in paths]
    for depth in range(max(len(p.parts) for p in paths)):
        stems = [
            "_".join(p.parent.parts[len(p.parent.parts) - depth :] + (p.stem,)) + s if depth else p.stem + s
            for p, s in zip(paths, suffix)
        ]
        if not shared_out or len(set(stems)) == len(stems):
            return stems
    raise SystemExit("the same input is given twice")


def main(argv=None) -> dict | list[dict]:
    """Returns the record of the one input, or the list of records of several (one that could not be
    measured: ``{"source", "error", "verdict": None}``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "paths",
        type=Path,
        nargs="+",
        metavar="path",
        help="checkpoint (.ckpt/.pt), weight array (.pt/.npy), bisection.json or a picture of a "
        "kernel grid (.png/.jpg/...); several at once",
    )
    parser.add_argument("--out", type=Path, help="folder for the grid, plot and JSON (default: beside each input)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the (one) input's record to OUT")
    parser.add_argument("--towers", type=int, help="tower count of a bare (K, 3, h, w) array or of a picture")
    parser.add_argument(
        "--bgr", action="store_true", help="the weights' colour channels are in BGR order (Caffe, OpenCV)"
    )
    parser.add_argument("--record", choices=["last", "init"], default="last", help="which record of a bisection.json")
    parser.add_argument(
        "--channel-std",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="per-channel std the inputs were divided by (default: from the checkpoint, else none)",
    )
    parser.add_argument(
        "--axis",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="grey axis in RGB (default: from the checkpoint, else (1,1,1)/sqrt(3))",
    )
    parser.add_argument("--permutations", type=int)
    parser.add_argument("--bootstrap", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--global-scale", action="store_true", help="one colour scale for all kernels in the grid")
    parser.add_argument("--sort", action="store_true", help="order each tower's kernels by score in the grid")
    picture = parser.add_argument_group("pictures of kernel grids (towers.figure_reader)")
    picture.add_argument(
        "--grid", metavar="ROWSxCOLS", help="the grid's rows and columns (default: found from the separating lines)"
    )
    picture.add_argument("--kernel-size", type=int, default=11, help="pixels of a kernel's side (default 11)")
    picture.add_argument(
        "--offset",
        choices=OFFSET_MODES,
        default="auto",
        help="the display's grey offset to remove: per kernel, one global, or as the picture shows "
        "(auto: per kernel when every kernel is stretched to the full range)",
    )
    picture.add_argument(
        "--jpeg-chroma",
        metavar="HxV",
        help="the chroma subsampling of the JPEG the picture once was, e.g. 2x2 (4:2:0) for a figure "
        "taken from a PDF as PNG; 1x1 for none (default: a JPEG file's own, else 1x1)",
    )
    args = parser.parse_args(argv)
    if args.json and len(args.paths) > 1:
        parser.error("--json writes one input's record; with several inputs use --out")
    try:
        args.grid = args.grid and parse_grid(args.grid)
        args.jpeg_chroma = args.jpeg_chroma and parse_grid(args.jpeg_chroma)
    except FigureError as e:
        parser.error(str(e))

    if len(args.paths) == 1:
        return analyse(args.paths[0], args, _stems(args.paths, args.record, args.out is not None)[0])
    records = []
    for path, stem in zip(args.paths, _stems(args.paths, args.record, args.out is not None)):
        print(f"\n== {path}")
        try:
            records.append(analyse(path, args, stem))
        except SystemExit as e:  # one bad input (a diverged run, a wrong file) does not hide the others
            if not isinstance(e.code, str):
                raise
            print(e.code, file=sys.stderr)
            records.append({"source": str(path), "error": e.code, "verdict": None})
    print("\nsummary")
    width = max(len(str(p)) for p in args.paths)
    for path, rec in zip(args.paths, records):
        print(f"{path!s:<{width}}  {summary_line(rec)}")
    return records


if __name__ == "__main__":
    try:
        result = main()
    except SystemExit as e:  # a user's mistake: its one line, exit status 2
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
    if isinstance(result, list) and any(r.get("error") for r in result):
        sys.exit(2)
