"""Compare the verdict across runs: one table, its figures, an HTML report and a CSV.

    python analysis/compare.py runs/sweeps/demo --out reports/demo          # local run folders
    python analysis/compare.py --wandb ENTITY/PROJECT [--sweep ID] --out reports/demo
    python analysis/compare.py runs/sweeps/demo --out reports/demo --reference fig3.json --format pdf

Local folders may hold any mix of a sweep's output folder (``sweep.json`` and ``runs/NAME/``, see
``towers/sweep.py``), offline W&B runs (``wandb/offline-run-*/files/``) and Lightning log dirs
(``lightning_logs/version_N/``): a run is a folder with the ``bisection.json`` or ``status.json``
that ``towers.callbacks.KernelBisectionCallback`` and ``towers.runs.RunStatus`` write into the folder
the run owns (``towers.runs.run_dir``), plus every run a ``sweep.json`` lists (a run that failed
before it wrote anything is still a row). From W&B the same files are downloaded from each run,
so both sources give the same table. The paper's Figure 3 (shipped with towers, ``towers.reference``;
its record is written as ``OUT/krizhevsky2012_figure3.json``) is shown beside the runs unless
``--no-paper``; ``--reference OUT.json`` adds other published figures' records, from
``python analysis/kernels.py FIGURE.png --towers 2 --json OUT.json``.

One row per run: its settings (seed, tower count, width policy, precision, data, batch size, learning
rate, epochs), accuracy, the verdict with delta f, its interval and p, the agnostic and specific tower
(named only when specialised), the onset step, eta^2 with p and omega^2, and per tower its colour
fraction with an exact interval and its grey and colour kernels by dominant spatial frequency (a
description beside the verdict). Each condition is set beside the paper's Figure 3
(``towers.reference.versus_paper``: its median delta f and sides' colour fractions beside Figure 3's, and
how many seeds are at least as split). Written to ``OUT``:

    table.csv                  the table
    report.html                one self-contained file: the commit, the lines per condition, the
                               figures embedded, the table sortable, every run's config
    delta_f_by_towers.FMT      delta f per seed, median, random-effects prediction interval, published figures
    specialised.FMT            k of n seeds specialised per condition, one-sided lower bound
    omega2_by_towers.FMT       omega^2 per seed by tower count, at initialisation as calibration
    tower_fractions.FMT        per run, each tower's colour fraction with its interval
    kernels_montage.FMT        the final kernel grids of chosen runs, towers (control: halves) labelled
    delta_f_over_steps.FMT     delta f over training with each run's final groups, the onset marked

(FMT: ``--format png|pdf|svg``; the HTML embeds PNG.) The code: ``compare_read.py`` (file formats, the
table), ``compare_stats.py`` (across seeds), ``compare_figures.py``, ``compare_html.py``.
"""

import argparse
import sys
from pathlib import Path

from analysis.compare_figures import (
    FORMATS,
    choose_montage,
    fig_delta_f,
    fig_montage,
    fig_omega2,
    fig_over_steps,
    fig_specialised,
    fig_tower_fractions,
    render,
)
from analysis.compare_html import git_commit, report_html
from analysis.compare_read import Run, collect_local, collect_wandb, read_reference, table_csv
from analysis.compare_stats import condition_line, summarize
from towers import reference
from towers.files import write_atomic
from towers.reference import write_paper_record


def paper_reference(references: list[dict]) -> dict | None:
    """The paper's Figure 3 among the references (shown unless --no-paper): what each condition is set beside."""
    return next((ref for ref in references if ref["name"] == reference.NAME), None)


def write_report(
    runs: list[Run],
    out: Path,
    alpha: float = 0.05,
    montage: list[str] | None = None,
    source: str = "",
    seed: int = 0,
    references: list[dict] | None = None,
    fmt: str = "png",
    level: float = 0.95,
) -> dict:
    """Write table.csv, the figures (as ``fmt``) and report.html into ``out``; returns {name: path}."""
    if fmt not in FORMATS:
        raise SystemExit(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    references = references or []
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, alpha, level, seed=seed, paper=paper_reference(references))
    chosen = choose_montage(runs, montage)
    figures = {
        "Δf against tower count": (
            "One point per seed (filled: specialised; a run without both sides counts 0; no per-run interval: the "
            "sides are chosen from the run's own kernels, and the interval of the chosen sides does not cover when "
            "no real split exists, BENCHMARKS.md); black square: median over seeds with its order-statistic "
            "interval (exact level in the lines above; none below 5 seeds); dotted: published figures.",
            fig_delta_f(runs, summary, references),
            "delta_f_by_towers",
        ),
        "Seeds specialised": (
            "Per condition: k of n seeds called specialised and the one-sided 95% Clopper–Pearson lower bound of "
            "the fraction of runs that specialise: all of 5 seeds bound it by 0.55, of 10 by 0.74, of 29 by 0.90.",
            fig_specialised(summary, level),
            "specialised",
        ),
        "Effect by tower count (ω²)": (
            "ω² = η² less its chance level, comparable across tower counts; grey crosses: at initialisation, a "
            "calibration check (near 0), not a control. The control is the trained one-tower network.",
            fig_omega2(runs, summary),
            "omega2_by_towers",
        ),
        "Tower colour fractions": (
            "Per run, each tower's colour fraction (colour / (grey + colour) kernels) with its exact 95% interval, "
            "towers ranked from the least coloured; the one-tower control: its random halves A and B.",
            fig_tower_fractions(runs),
            "tower_fractions",
        ),
        "Final kernel grids": (
            "The last measured kernels of " + (", ".join(r.name for r in chosen) or "no run") + ", one block per "
            "tower (the one-tower control: per random half, where its verdict splits), each kernel stretched to "
            "its own range.",
            fig_montage(chosen),
            "kernels_montage",
        ),
        "Δf over training": (
            "When does the split appear? Each run's Δf at every measurement with the groups of its final verdict; "
            "▼: the onset (towers.verdict.onset_step: specialised with the same groups from there to the end).",
            fig_over_steps(runs),
            "delta_f_over_steps",
        ),
    }
    paths, embedded = {}, {}
    for title, (note, fig, stem) in figures.items():
        png = render(fig, "png")
        embedded[title] = (note, png)
        name = f"{stem}.{fmt}"
        write_atomic(out / name, png if fmt == "png" else render(fig, fmt))
        paths[name] = out / name
    write_atomic(out / "table.csv", table_csv(runs).encode())
    paths["table.csv"] = out / "table.csv"
    page = report_html(runs, summary, embedded, references, source, git_commit(), level)
    write_atomic(out / "report.html", page.encode())
    paths["report.html"] = out / "report.html"
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python analysis/compare.py", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, help="run folders, sweep output folders, log dirs")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs of a W&B project instead")
    parser.add_argument("--sweep", metavar="ID", help="with --wandb: only the runs of this sweep")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.html, table.csv, figures")
    parser.add_argument(
        "--reference",
        nargs="+",
        action="extend",
        type=Path,
        default=[],
        metavar="OUT.json",
        help="published figures' records (analysis/kernels.py FIGURE.png --json OUT.json)",
    )
    parser.add_argument(
        "--no-paper", action="store_true", help="leave out the paper's Figure 3 (shown beside the runs by default)"
    )
    parser.add_argument("--format", choices=FORMATS, default="png", help="file format of the figures (png)")
    parser.add_argument("--alpha", type=float, default=0.05, help="level of eta^2's p at initialisation (calibration)")
    parser.add_argument("--montage", nargs="+", metavar="RUN", help="runs whose kernel grids to show")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # kept for old command lines
    args = parser.parse_args(argv)
    if bool(args.folders) == bool(args.wandb):
        parser.error("give run folders or --wandb ENTITY/PROJECT (one of the two)")
    if args.sweep and not args.wandb:
        parser.error("--sweep needs --wandb")
    try:
        references = [read_reference(p) for p in args.reference]
    except SystemExit as err:  # a user's mistake: one line, status 2
        parser.error(str(err))
    if not args.no_paper:  # the paper's Figure 3 (shipped, towers.reference) beside the runs, first
        references.insert(0, read_reference(write_paper_record(args.out)))
    if args.wandb:
        if args.wandb.count("/") != 1:
            parser.error(f"--wandb wants ENTITY/PROJECT, got {args.wandb!r}")
        runs = collect_wandb(args.wandb, args.sweep, cache=args.out / "wandb-files")
        source = f"W&B {args.wandb}" + (f" sweep {args.sweep}" if args.sweep else "")
    else:
        runs = collect_local(args.folders)
        source = ", ".join(map(str, args.folders))
    paths = write_report(runs, args.out, args.alpha, args.montage, source, args.seed, references, args.format)
    counts = {}
    for r in runs:
        counts[r.row["status"] or "unknown"] = counts.get(r.row["status"] or "unknown", 0) + 1
    print(f"{len(runs)} runs ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    for s in summarize(runs, args.alpha, seed=args.seed, paper=paper_reference(references)):
        print("  " + condition_line(s))
    for ref in references:
        print(
            f"  published {ref['name']}: {ref['verdict']}, Δf = "
            + ("n/a" if ref["delta_f"] is None else f"{ref['delta_f']:.2f}")
        )
    print(f"report: {paths['report.html']}\ntable:  {paths['table.csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
