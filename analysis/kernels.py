"""Colour scores per tower, the bisection statistic, the verdict and the Figure-3 grid of first-layer kernels.

    python analysis/kernels.py runs/.../checkpoints/last.ckpt            # a Lightning checkpoint
    python analysis/kernels.py runs/*/*/checkpoints/last.ckpt            # several: a table each, then one line each
    python analysis/kernels.py bvlc_alexnet.caffemodel                   # Caffe: towers from conv2's group, BGR
    python analysis/kernels.py bvlc_alexnet.onnx                         # ONNX: towers from the next Conv's group
    python analysis/kernels.py alexnet-owt-7be5be79.pth                  # a state dict (torchvision's: one tower)
    python analysis/kernels.py model.ckpt-100.index [--variables A,B]    # TensorFlow 1 (demul/AlexNet's names)
    python analysis/kernels.py conv1.npy --towers 2 [--channels bgr]     # (96, 3, 11, 11)
    python analysis/kernels.py runs/.../bisection.json [--record init]   # what the callback saved
    python analysis/kernels.py figure3.png --towers 2 [--grid 8x12] [--order rows|kernels] [--json OUT]
    python analysis/kernels.py --reference paper                         # the paper's Figure 3, shipped

Prints the per-tower table, the statistic and the verdict line of every input, then (for several) one
summary line per input, and writes <stem>_kernels.png, <stem>_scores.png and <stem>_bisection.json into
--out (default: the input's folder); --json OUT writes the one input's record to OUT as well. For a
checkpoint written with KernelBisectionCallback the settings it used (input channel std, grey axis,
permutations, seed) come from the checkpoint, so the numbers are the callback's. Weight files are read by
:mod:`towers.weights` (its table says what each format gives), pictures (PNG, JPEG, ...) by
:mod:`towers.figure_reader` (its docstring says how); the record then has a ``figure`` entry that says how
the picture was read. A user's mistake (a wrong path, a damaged or unsupported file, a missing optional
reader) is one line on stderr and exit status 2.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from towers import records
from towers.color import RANDOM_KERNEL_SCORE, Bisection, color_specificity
from towers.errors import UserError
from towers.figure_reader import IMAGE_SUFFIXES, OFFSET_MODES, ORDERS, FigureError, parse_grid, read_figure
from towers.figures import framed_kernels, kernel_grid, score_plot, write_png
from towers.measure import measure, summary_line
from towers.records import write_json
from towers.verdict import format_p
from towers.weights import CHANNELS, read_weights, weight_kind


def load(
    path: Path,
    towers: int | None = None,
    record: str = "last",
    figure: dict | None = None,
    channels: str | None = None,
    variables=None,
) -> dict:
    """Kernels (T, n, 3, h, w) and the settings they were measured with, from any supported file.

    Returns a dict with ``kernels`` (or None when a bisection.json has no matching kernels file),
    ``record`` (the saved measurement, bisection.json only), ``init`` (the initialisation record if
    the file has one), ``settings`` (channel_std, axis, permutations, bootstrap, seed; None = default),
    ``figure`` (how a picture was read, pictures only) and ``source`` (a line that says what was read).
    ``figure``: keyword arguments of :func:`towers.figure_reader.read_figure` (grid, size, offset, chroma,
    order). ``channels``, ``variables``: as :func:`towers.weights.read_weights`.
    """
    settings = {"channel_std": None, "axis": None, "permutations": None, "bootstrap": None, "seed": None}
    out = {"kernels": None, "initial": None, "record": None, "init": None, "settings": settings, "figure": None}
    if not path.exists() and weight_kind(path) != "tf":
        raise SystemExit(f"{path}: no such file")

    if path.suffix.lower() in IMAGE_SUFFIXES:
        if towers is None:
            raise SystemExit(
                f"{path}: a picture does not say how many towers its kernels belong to; give --towers "
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
            f"{info['cell_px'][0]:g}x{info['cell_px'][1]:g} px, {read.blank} blank, towers by {read.order}; display "
            f"offset removed {'per kernel' if read.offset == 'kernel' else 'globally'})",
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
        initial_file = path.parent / records.kernels_file(init=True)
        if initial_file.is_file():
            out["initial"] = torch.from_numpy(np.load(initial_file))
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

    if weight_kind(path) is None:
        raise SystemExit(
            f"{path}: not a file kind this reads (checkpoints and weight files: .ckpt .pt .pth .bin .npy "
            f".caffemodel .onnx .index; pictures: {' '.join(IMAGE_SUFFIXES)}; bisection.json)"
        )
    try:
        conv1 = read_weights(path, towers, channels, variables)
    except UserError as e:  # a damaged file, a missing optional reader: one line, exit 2
        raise SystemExit(str(e)) from None
    out.update(kernels=torch.from_numpy(conv1.kernels), source=conv1.describe())
    state = conv1.checkpoint.get("callback")
    if state:
        settings.update({k: state.get(k) for k in settings})
        out["init"] = state.get("init")
        out["initial"] = state.get("initial_kernels")
    elif conv1.checkpoint:
        print(
            "warning: the checkpoint has no KernelBisectionCallback state, so the input channel std is unknown; "
            "scores assume the network saw raw (mean-subtracted) RGB. Pass --channel-std if it did not.",
            file=sys.stderr,
        )
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


def initial_kernels(loaded: dict, kernels: torch.Tensor) -> torch.Tensor | None:
    """The kernels at initialisation where the file kept them (a checkpoint's callback state, the run
    folder's kernels_init.npy), so untrained kernels are judged by how far they moved; else None, and the
    verdict judges them by their spatial spectrum (pictures, weight files)."""
    initial = loaded["initial"]
    if initial is None or tuple(initial.shape) != tuple(kernels.shape):
        return None
    return initial.to(kernels.dtype)


def analyse(path: Path, args, stem: str) -> dict:
    """One input: load, measure (or take the saved record), print its table and verdict, write its files."""
    figure = {
        "grid": args.grid,
        "size": args.kernel_size,
        "offset": args.offset,
        "chroma": args.jpeg_chroma,
        "order": args.order,
    }
    loaded = load(path, args.towers, args.record, figure, args.channels, args.variables)
    settings = loaded["settings"]
    for name in settings:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    defaults = {"permutations": 9999, "bootstrap": 2000, "seed": 0}
    settings = {k: defaults.get(k) if v is None else v for k, v in settings.items()}
    kernels = loaded["kernels"]
    if kernels is not None and args.channels == "bgr" and loaded["figure"] is not None:
        kernels = kernels.flip(2)  # a picture drawn from BGR weights (weight files are flipped by their reader)

    if kernels is not None and (loaded["record"] is None or args.channel_std or args.axis or args.channels):
        rec = measure(
            kernels,
            settings["channel_std"],
            settings["axis"],
            settings["permutations"],
            settings["bootstrap"],
            settings["seed"],
            initial=initial_kernels(loaded, kernels),
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
        f"{rec['kernel_size'][1]}; "
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
        write_png(out / f"{stem}_kernels.png", grid_picture(kernels, rec, args))
    write_json(out / f"{stem}_bisection.json", rec)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, rec)
    print(
        f"wrote {out / stem}_{{{'kernels,' if kernels is not None else ''}scores}}.png and {stem}_bisection.json"
        + (f", and {args.json}" if args.json else "")
    )
    return rec


def analyse_reference(args) -> dict:
    """``--reference paper``: the shipped Figure 3, measured and judged like any input."""
    from towers import reference

    if args.reference != reference.PAPER:
        raise SystemExit(f"--reference {args.reference}: the shipped references are: {reference.PAPER}")
    rec = reference.paper_record(args.permutations or 9999, args.seed or 0)
    about = rec["provenance"]
    print(f"{about['paper']}, {about['figure']}")
    print(
        f"read once from {about['picture']['file']} (sha256 {about['picture']['sha256'][:12]}...) by {about['read_with']}"
    )
    print(table(rec))
    print(summary_line(rec))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        kernels = torch.from_numpy(reference.paper_kernels().astype(np.float64))
        write_png(args.out / f"{reference.NAME}_kernels.png", grid_picture(kernels, rec, args))
        write_json(args.out / f"{reference.NAME}_bisection.json", rec)
        print(f"wrote {args.out / reference.NAME}_{{kernels.png,bisection.json}}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, rec)
        print(f"wrote {args.json}")
    return rec


def grid_picture(kernels, rec: dict, args) -> np.ndarray:
    """The kernel grid as the callback draws it: one global scale (``--per-kernel-scale`` to stretch each
    kernel), the kernels the verdict does not judge (weak, unstructured) framed."""
    shape = kernels.shape[:2]
    order = torch.tensor(rec["score"]).view(shape).argsort(1) if args.sort else None
    return kernel_grid(kernels, not args.per_kernel_scale, order, weak=framed_kernels(rec.get("kernel_class"), shape))


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
        nargs="*",
        metavar="path",
        help="checkpoint (.ckpt/.pt), weight file (.caffemodel/.onnx/.pth/.index/.npy), bisection.json or a "
        "picture of a kernel grid (.png/.jpg/...); several at once",
    )
    parser.add_argument("--out", type=Path, help="folder for the grid, plot and JSON (default: beside each input)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the (one) input's record to OUT")
    parser.add_argument(
        "--towers",
        type=int,
        help="tower count of a bare (K, 3, h, w) array or of a picture; checked against a file that says it",
    )
    parser.add_argument(
        "--channels",
        choices=CHANNELS,
        help="the file's colour channel order (default: the format's own: BGR for Caffe, ONNX and TensorFlow "
        "checkpoints, RGB otherwise)",
    )
    parser.add_argument("--bgr", dest="channels", action="store_const", const="bgr", help="same as --channels bgr")
    parser.add_argument(
        "--variables",
        type=lambda text: [v for v in text.split(",") if v],
        metavar="NAME,NAME",
        help="TensorFlow checkpoints: conv1's variables, one per tower (default: conv1_gpu1,conv1_gpu2)",
    )
    parser.add_argument(
        "--reference",
        metavar="NAME",
        help="a reference shipped with towers instead of a file: 'paper' (Figure 3, read once from the figure)",
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
    parser.add_argument(
        "--per-kernel-scale",
        action="store_true",
        help="stretch each kernel to its own range in the grid (default: one scale for all, as the callback)",
    )
    parser.add_argument("--sort", action="store_true", help="order each tower's kernels by score in the grid")
    picture = parser.add_argument_group("pictures of kernel grids (towers.figure_reader)")
    picture.add_argument(
        "--grid", metavar="ROWSxCOLS", help="the grid's rows and columns (default: found from the separating lines)"
    )
    picture.add_argument(
        "--order",
        choices=ORDERS,
        help="how the cells go to the towers: rows (each tower a block of rows, the paper's) or kernels (in "
        "reading order, Caffe's vis_square); default: the only one possible (stated)",
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
    if bool(args.paths) == bool(args.reference):
        parser.error("give files to read, or --reference paper (one of the two)")
    if args.reference:
        return analyse_reference(args)
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
        except (SystemExit, UserError) as e:  # one bad input (a diverged run, a wrong file) does not hide the others
            message = str(e) if isinstance(e, UserError) else e.code
            if not isinstance(message, str):
                raise
            print(message, file=sys.stderr)
            records.append({"source": str(path), "error": message, "verdict": None})
    print("\nsummary")
    width = max(len(str(p)) for p in args.paths)
    for path, rec in zip(args.paths, records):
        print(f"{path!s:<{width}}  {summary_line(rec)}")
    return records


def cli(argv=None) -> None:
    """The command: a user's mistake (SystemExit with a message, a towers UserError) is its one line on
    stderr and exit status 2; several inputs of which one failed exit 2 after the others."""
    try:
        result = main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
    except UserError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    if isinstance(result, list) and any(r.get("error") for r in result):
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    cli()
