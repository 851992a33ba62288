"""The table the sweep agent prints at the end, and the ``wandb sync`` command for its runs."""

from pathlib import Path

from towers import records, reference
from towers.measure import p_text
from towers.sweep_state import Sweep, condition


# -- the table -------------------------------------------------------------------------------------
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


def _bands(counts) -> str:
    return "/".join(str(c) for c in counts)


def frequency_text(b: dict) -> str:
    """Per tower its grey (g) and colour (c) kernels counted by dominant spatial frequency, low/mid/high:
    ``1: g 13/23/9 c 3/0/0 · 2: g 1/7/10 c 28/1/0`` (a description beside the verdict, not part of it)."""
    grey, colour = b.get("frequency_grey"), b.get("frequency_colour")
    if not grey or not colour:
        return ""
    towers = b.get("towers") or range(1, len(grey) + 1)
    return " · ".join(f"{t}: g {_bands(g)} c {_bands(c)}" for t, g, c in zip(towers, grey, colour))


def bands_legend(bands) -> str:
    """``low/mid/high = period over 8 px / 4-8 px / under 4 px`` from the band edges (cycles per pixel)."""
    periods = [f"{1 / e:g}" for e in bands[1:-1]]
    names = ["low", "mid", "high"] if len(bands) == 4 else [f"band {k}" for k in range(1, len(bands))]
    spans = [f"over {periods[0]} px", *(f"{b}-{a} px" for a, b in zip(periods, periods[1:])), f"under {periods[-1]} px"]
    return f"{'/'.join(names)} = period {' / '.join(spans)}"


def versus_paper_lines(sweep: Sweep) -> list[str]:
    """Per condition (the swept settings but the seed), its finished seeds beside the paper's Figure 3."""
    groups = {}
    for run in sweep.runs:
        b = run.get("bisection") or {}
        if run["status"] == "finished" and b.get("verdict") and b.get("version") == records.VERSION:
            groups.setdefault(condition(sweep.config, run["params"]), []).append(b)
    if not groups:
        return []
    paper = reference.paper_record()
    lines = [
        "Beside the paper's Figure 3 (towers.reference; a description, not a test): "
        f"its frequency {frequency_text(paper)}"
    ]
    lines += [
        f"  {name}: {reference.versus_paper_text(reference.versus_paper(g, paper))}" for name, g in groups.items()
    ]
    return lines


def table(sweep: Sweep) -> str:
    """The runs, one a line: the swept values, status, the sweep's metric, the verdict with delta f and its
    p, the towers' colour fractions with their intervals, eta2 with its p (p at the permutation floor as a bound,
    "≤ 1e-4"), per tower its kernels' dominant spatial frequency (:func:`frequency_text`) and the exit status;
    then what the frequency bands are, and each condition beside the paper's Figure 3
    (:func:`towers.reference.versus_paper`)."""
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
        "frequency",
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
                frequency_text(b),
                _fmt(run["exit_code"]),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    for run in sweep.runs:
        if run["status"] in ("failed", "diverged"):
            lines.append(f"{run['name']} {run['status']}: {run['message']} (log: {run['log']})")
    bands = next(
        (r["bisection"]["frequency_bands"] for r in sweep.runs if (r.get("bisection") or {}).get("frequency_bands")),
        None,
    )
    if bands:
        lines.append(
            "frequency: per tower its grey (g) and colour (c) kernels by the dominant spatial frequency of their "
            f"luminance part, {bands_legend(bands)} (a description beside the verdict, not part of it)"
        )
    lines += versus_paper_lines(sweep)
    return "\n".join(lines)


def sync_folders(run: dict) -> list[str]:
    """The W&B folders that upload one run: every attempt's when they all carry the run's one id
    (``wandb sync`` syncs the folders of one run id into that run, in order of start time), else,
    for attempts from before the agent gave them one id, the last attempt's only (no run twice)."""
    attempts = list(dict.fromkeys(a["wandb_dir"] for a in run["attempts"] if a.get("wandb_dir")))
    ident = run.get("wandb_id")
    if ident and attempts and all(Path(f).name.endswith(f"-{ident}") for f in attempts):
        return attempts
    return [run["wandb_dir"]] if run.get("wandb_dir") else []


def sync_command(sweep: Sweep) -> str:
    folders = [f for r in sweep.runs for f in sync_folders(r)]
    if not folders:
        return "No W&B offline runs were written (WANDB_MODE=disabled, or the config has no WandbLogger)."
    return "Upload the runs to a W&B server with:\n  wandb sync " + " ".join(folders)
