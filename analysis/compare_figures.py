"""The report's figures, each a matplotlib Figure (no pyplot state), saved as PNG, PDF or SVG.

Fit for a paper: every text at least MIN_FONT pt at the saved size, legends outside the axes (they
cover no data), intervals drawn as thick bars with caps. Part of analysis/compare.py.
"""

import io
import math
import textwrap

import numpy as np

from analysis.compare_read import Run
from analysis.compare_stats import condition_labels, conditions, fixed_delta_f, seed_value
from towers import conditions as cond
from towers.records import KERNELS_NPY, KERNELS_PNG
from towers.verdict import format_p

MIN_FONT = 8  # pt, at the saved size
FONT = 9
FORMATS = ("png", "pdf", "svg")
DPI = 150  # of the PNG files (the HTML shows them at their saved size: compare_html._css_width)
INTERVAL = {"lw": 1.6, "capsize": 3, "capthick": 1.6}  # thick enough to see at a column's width


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def render(fig, fmt: str = "png") -> bytes:
    """The figure's file in ``fmt`` (png at 150 dpi; pdf and svg without a creation date, so the same
    runs give the same bytes)."""
    buf = io.BytesIO()
    metadata = {"Software": None} if fmt == "png" else {"Date": None} if fmt == "svg" else {"CreationDate": None}
    fig.savefig(buf, format=fmt, bbox_inches="tight", dpi=DPI, metadata=metadata)
    return buf.getvalue()


def _style(ax, title: str = ""):
    ax.tick_params(labelsize=FONT)
    ax.xaxis.label.set_size(FONT)
    ax.yaxis.label.set_size(FONT)
    if title:
        ax.set_title(title, fontsize=FONT)


def _legend(ax, **kw):
    """Legend to the right of the axes, never over the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles,
            labels,
            loc="upper left",
            bbox_to_anchor=(1.02, 1),
            borderaxespad=0,
            fontsize=FONT,
            frameon=False,
            **kw,
        )


def _empty(text: str):
    fig = figure(6, 1.5)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=FONT + 1)
    return fig


def _jitter(n: int, width: float = 0.18) -> np.ndarray:
    return ((np.arange(n) * 0.618034) % 1 - 0.5) * 2 * width  # deterministic, evenly spread


def _positions(summary: list[dict]):
    """x of every condition: grouped by tower count, side by side within a count; tick labels."""
    towers = sorted({s["num_towers"] for s in summary}, key=lambda t: (t is None, str(t)))
    per_t = {t: [s for s in summary if s["num_towers"] == t] for t in towers}
    width = 0.8 / max(len(v) for v in per_t.values())
    xs = {}
    for xi, t in enumerate(towers):
        for j, s in enumerate(per_t[t]):
            xs[s["label"]] = xi + (j - (len(per_t[t]) - 1) / 2) * width
    ticks = [f"{t} tower{'s' if t != 1 else ''}" + ("\n(random halves)" if t == 1 else "") for t in towers]
    return xs, width, ticks


def _colours(runs: list[Run], summary: list[dict]):
    """One colour per condition less its tower count (so a learning rate keeps its colour across T)."""
    rest = sorted({s["colour_label"] for s in summary})
    return {s["label"]: (f"C{rest.index(s['colour_label']) % 10}", s["colour_label"]) for s in summary}


YLIM = (-0.1, 1.05)  # delta f of a split is above 0 (a run without one counts 0)
# No per-run interval of delta f is drawn: the sides are chosen from the run's own kernels, and where no
# real split exists the verdict's Newcombe interval of the chosen sides covers in 50-80% of the runs that
# split (benchmarks/seed_simulation.py, BENCHMARKS.md).


def fig_delta_f(runs: list[Run], summary: list[dict], references: list[dict]):
    """Delta f per seed against tower count (filled: specialised; a run without both sides: 0); the
    median over seeds with its order-statistic interval; published figures as lines."""
    if not summary and not references:
        return _empty("no finished run with a verdict")
    fig = figure(8, 4.5)
    ax = fig.add_subplot()
    groups = conditions(runs)
    xs, width, ticks = _positions(summary) if summary else ({}, 0.8, [])
    colours = _colours(runs, summary)
    done = set()

    def once(label):
        if label in done or not label:
            return None
        done.add(label)
        return label

    for s in summary:
        x, (colour, other) = xs[s["label"]], colours[s["label"]]
        group = groups[s["key"]]
        d = np.array([seed_value(r.row["delta_f"]) for r in group], float)
        spec = np.array([r.row["verdict"] == "specialised" for r in group])
        px = x - width * 0.1 + _jitter(len(d), width * 0.22)
        ax.scatter(px[spec], d[spec], s=26, color=colour, zorder=3)
        ax.scatter(px[~spec], d[~spec], s=26, facecolors="white", edgecolors=colour, zorder=3)
        if other:
            ax.scatter([], [], s=26, color=colour, label=once(other))
        if math.isfinite(s["delta_f_low"]):
            ax.errorbar(
                x + width * 0.22,
                s["delta_f_median"],
                [[s["delta_f_median"] - s["delta_f_low"]], [s["delta_f_high"] - s["delta_f_median"]]],
                fmt="s",
                color="k",
                ms=5,
                zorder=4,
                label=once("median, order-statistic interval (≥ 93.75%)"),
                **INTERVAL,
            )
        ax.annotate(
            f"{s['specialised']} of {s['seeds']}", (x, YLIM[0] + 0.03), ha="center", va="bottom", fontsize=MIN_FONT
        )
    ax.scatter([], [], s=26, color="k", label="seed, specialised")
    ax.scatter([], [], s=26, facecolors="white", edgecolors="k", label="seed, not specialised")
    ax.axhline(0, color="0.7", lw=0.8)
    for i, ref in enumerate(r for r in references if r["delta_f"] is not None):
        ax.axhline(
            ref["delta_f"],
            color=f"C{(i + 4) % 10}",
            ls=":",
            lw=1.8,
            label=f"{ref['name']}: Δf {ref['delta_f']:.2f}, {ref['verdict']}",
        )
    if ticks:
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_xlim(-0.6, len(ticks) - 0.4)
    ax.set_ylim(*YLIM)
    ax.set_ylabel("Δf = colour fraction, specific − agnostic tower")
    _style(ax, "Δf per seed (k of n at the bottom: seeds specialised)")
    _legend(ax)
    return fig


def fig_specialised(summary: list[dict], level: float = 0.95):
    """Fraction of seeds specialised per condition with its one-sided lower bound ("every run")."""
    if not summary:
        return _empty("no finished run with a verdict")
    fig = figure(max(5, 1.2 * len(summary) + 2), 4)
    ax = fig.add_subplot()
    x = np.arange(len(summary))
    frac = np.array([s["specialised"] / s["seeds"] for s in summary])
    bound = np.array([s["bound"] for s in summary])
    ax.errorbar(
        x,
        frac,
        [frac - bound, np.zeros_like(frac)],
        fmt="o",
        color="k",
        ms=6,
        label=f"k of n, with the one-sided {level:.0%} lower bound",
        **INTERVAL,
    )
    for xi, s in zip(x, summary):
        ax.annotate(
            f"{s['specialised']} of {s['seeds']}\n≥ {s['bound']:.2f}",
            (xi, s["bound"]),
            textcoords="offset points",
            xytext=(0, -26),
            ha="center",
            fontsize=MIN_FONT,
        )
    ax.set_xticks(
        x,
        [s["label"].replace("; ", "\n") + ("\n(control)" if s["control"] else "") for s in summary],
        fontsize=MIN_FONT,
    )
    ax.set_ylim(-0.3, 1.08)
    ax.set_xlim(-0.6, len(summary) - 0.4)
    ax.axhline(1, color="0.8", lw=0.8)
    ax.set_ylabel("fraction of seeds specialised")
    _style(ax, "Seeds called specialised by the verdict")
    _legend(ax)
    return fig


def fig_omega2(runs: list[Run], summary: list[dict]):
    """omega^2 (eta^2 less its chance bias, comparable across tower counts) per seed against tower
    count, median with its order-statistic interval; at initialisation (grey crosses) as a calibration check."""
    if not summary:
        return _empty("no finished run with a verdict")
    fig = figure(8, 4)
    ax = fig.add_subplot()
    groups = conditions(runs)
    xs, width, ticks = _positions(summary)
    colours = _colours(runs, summary)
    done = set()
    for s in summary:
        x, (colour, other) = xs[s["label"]], colours[s["label"]]
        group = groups[s["key"]]
        om = np.array([np.nan if r.row["omega2"] is None else r.row["omega2"] for r in group], float)
        init = np.array([r.row["omega2_init"] for r in group if r.row["omega2_init"] is not None], float)
        ax.scatter(
            x + _jitter(len(om), width * 0.2),
            om,
            s=24,
            color=colour,
            zorder=3,
            label=None if (other or "trained") in done else (other or "trained"),
        )
        done.add(other or "trained")
        ax.scatter(
            x + width * 0.3 + _jitter(len(init), 0.02),
            init,
            marker="x",
            s=20,
            color="0.5",
            zorder=2,
            label=None if "init" in done else "at initialisation (calibration)",
        )
        done.add("init")
        if math.isfinite(s["omega2_low"]):
            ax.errorbar(
                x - width * 0.3,
                s["omega2_median"],
                [[s["omega2_median"] - s["omega2_low"]], [s["omega2_high"] - s["omega2_median"]]],
                fmt="s",
                color="k",
                ms=5,
                label=None if "med" in done else "median, order-statistic interval (≥ 93.75%)",
                **INTERVAL,
            )
            done.add("med")
    ax.axhline(0, color="r", ls="--", lw=1, label="no effect (ω² = 0)")
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_ylabel("ω² of the colour scores by tower")
    _style(ax, "Effect by tower count: ω² (η² less its chance level)")
    _legend(ax)
    return fig


def fig_tower_fractions(runs: list[Run]):
    """Per run, each tower's colour fraction with its exact 95% interval, towers ranked from the least
    to the most coloured; one panel per condition (the one-tower control: its two random halves)."""
    groups, names = conditions(runs), condition_labels(runs)
    panels = [(k, g) for k, g in groups.items() if any(r.last.value("colour_fraction") for r in g)]
    if not panels:
        return _empty("no finished run with colour fractions")
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = figure(max(5, 4 * cols + 1.5), 3.8 * rows)
    most = max(len(r.last.value("colour_fraction") or ()) for _, g in panels for r in g)
    for i, (key, group) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, run in enumerate(group):
            f, lo, hi = (
                [np.nan if v is None else v for v in run.last.value(part) or ()]
                for part in ("colour_fraction", "colour_fraction_low", "colour_fraction_high")
            )
            order = np.argsort(f)
            for rank, t in enumerate(order):
                off = (rank - (len(order) - 1) / 2) * 0.6 / max(len(order), 1)
                ax.errorbar(
                    j + off,
                    f[t],
                    [[f[t] - lo[t]], [hi[t] - f[t]]],
                    fmt="o",
                    ms=4,
                    color=f"C{rank}",
                    **INTERVAL,
                    label=None
                    if i or j
                    else f"rank {rank + 1} of {most}"
                    if most > 2
                    else ("less coloured", "more coloured")[rank],
                )
        ax.axhline(0.5, color="0.6", ls=":", lw=1)
        ax.set_xticks(range(len(group)), [f"seed {r.row['seed']}" for r in group], fontsize=MIN_FONT)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlim(-0.6, len(group) - 0.4)
        control = cond.is_control(group[0].condition)
        _style(ax, textwrap.fill(names[key] + (" (random groups)" if control else ""), 44))
        if i % cols == 0:
            ax.set_ylabel("colour fraction of a tower")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper left",
        bbox_to_anchor=(1.0, 0.95),
        fontsize=FONT,
        frameon=False,
        title="towers, ranked",
        title_fontsize=FONT,
    )
    fig.subplots_adjust(hspace=0.5, wspace=0.3)
    return fig


def choose_montage(runs: list[Run], names: list[str] | None, limit: int = 6) -> list[Run]:
    """The runs named, or else the first seed of every condition (then more seeds) up to ``limit``."""
    if names:
        by_name = {r.name: r for r in runs}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SystemExit(f"--montage: no run named {', '.join(missing)}; runs: {', '.join(by_name)}")
        return [by_name[n] for n in names]
    has_grid = [r for r in runs if r.kernels_npy is not None or r.kernels_png is not None]
    groups = [[r for r in g if r in has_grid] for g in conditions(runs).values()] or [has_grid]
    chosen, depth = [], 0
    while len(chosen) < limit and any(len(g) > depth for g in groups):
        chosen += [g[depth] for g in groups if len(g) > depth]
        depth += 1
    return sorted(chosen[:limit], key=lambda r: (str(r.row["num_towers"]), str(r.row["seed"]), r.name))


def montage_grid(run: Run):
    """(image, [(label, y_top, y_bottom)]) of one run's kernels: redrawn from kernels.npy as the callback
    draws them, one block per tower, and for the one-tower control one block per random half (where its
    verdict splits); from kernels.png when there is no kernels.npy (no tower labels then)."""
    import torch

    from towers.figures import kernel_grid

    if run.kernels_npy is None:
        from PIL import Image

        return np.asarray(Image.open(run.kernels_png).convert("RGB")), []
    k = torch.as_tensor(np.load(run.kernels_npy))
    names = [str(t) for t in range(1, k.shape[0] + 1)]
    split = run.last.value("control_split")
    if k.shape[0] == 1 and split and 2 * len(split) == k.shape[1]:
        flat = k[0]
        half_a = torch.zeros(flat.shape[0], dtype=torch.bool)
        half_a[split] = True
        k, names = torch.stack([flat[half_a], flat[~half_a]]), ["half A", "half B"]
    columns, zoom, pad, gap = 16, 4, 2, 12  # kernel_grid's layout: labels go where its blocks are
    image = kernel_grid(k, columns=columns, zoom=zoom, pad=pad, gap=gap, labels=False)  # the axes label the towers
    t, n, _, h, _ = k.shape
    block = math.ceil(n / min(columns, n)) * (h * zoom + pad)
    groups = {}  # tower (or half) -> its side, named only for a specialised run
    if run.row["verdict"] == "specialised":
        groups = {
            **{str(t): "agnostic" for t in run.last.value("agnostic_group") or []},
            **{str(t): "specific" for t in run.last.value("specific_group") or []},
        }
    labels = []
    for i, name in enumerate(names):
        top = pad + i * (block + gap)
        role = groups.get(name)
        label = (name if name.startswith("half") else f"tower {name}") + (f"\n{role}" if role else "")
        labels.append((label, top, top + block))
    return image, labels


def fig_montage(chosen: list[Run]):
    """The final kernel grids of the chosen runs, each block labelled with its tower (or half)."""
    if not chosen:
        return _empty(f"no run has {KERNELS_PNG} or {KERNELS_NPY}")
    grids = [montage_grid(r) if (r.kernels_npy or r.kernels_png) else (None, []) for r in chosen]
    aspect = max([g.shape[1] / g.shape[0] for g, _ in grids if g is not None] or [1.0])
    cols = min(len(chosen), 3 if aspect < 1.5 else 2)
    width = 14 / cols
    rows = math.ceil(len(chosen) / cols)
    fig = figure(width * cols, (width / aspect + 1.0) * rows)
    for i, (run, (image, labels)) in enumerate(zip(chosen, grids)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        r = run.row
        verdict = (
            ""
            if r["verdict"] is None
            else r["verdict"]  # no delta f when a side is empty (towers.verdict)
            if r["delta_f"] is None
            else (
                f"{r['verdict']}, Δf = {'n/a' if r['delta_f'] is None else format(r['delta_f'], '.2f')}, "
                f"p {format_p(r['p_delta_f'], r['permutations'])}"
            )
        )
        ax.set_title(f"{run.name}: T={r['num_towers']}, seed {r['seed']}, step {r['step']}\n{verdict}", fontsize=FONT)
        if image is None:
            ax.text(0.5, 0.5, "no kernel grid", ha="center", va="center", transform=ax.transAxes, fontsize=FONT)
            continue
        ax.imshow(image, interpolation="nearest")
        for label, top, bottom in labels:
            ax.text(-4, (top + bottom) / 2, label, ha="right", va="center", fontsize=FONT)
    fig.subplots_adjust(wspace=0.35)
    return fig


def fig_over_steps(runs: list[Run]):
    """Delta f over training, one line per run, each with its final verdict's groups fixed for the whole
    run (so a line is one labelling, not the best one at every step); its onset marked."""
    with_history = [r for r in runs if r.judged and any(h.value("colour_count") for h in r.history)]
    if not with_history:
        return _empty("no run has a bisection history with the verdict")
    fig = figure(8, 4)
    ax = fig.add_subplot()
    names = condition_labels(runs)
    keys = sorted({cond.key(r.condition) for r in with_history}, key=str)
    labelled = set()
    for run in with_history:
        agn, spec = run.last.value("agnostic_group"), run.last.value("specific_group")
        h = [x for x in run.history if x.value("colour_count") and x.step is not None]
        steps = [x.step for x in h]
        d = [fixed_delta_f(x, agn, spec) for x in h]
        key = cond.key(run.condition)
        colour = f"C{keys.index(key) % 10}"
        label = None if key in labelled else names.get(key)
        labelled.add(key)
        ax.plot(steps, d, color=colour, lw=1.2, marker=".", ms=4, label=label)
        onset = run.row["onset_step"]
        if onset is not None:
            ax.plot(
                [onset],
                [d[steps.index(onset)]],
                marker="v",
                ms=8,
                color=colour,
                ls="none",
                label=None if "onset" in labelled else "onset: specialised from here on",
            )
            labelled.add("onset")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("Δf with the final groups")
    ax.set_ylim(-1.05, 1.05)
    _style(ax, "Δf over training (groups fixed to each run's final verdict)")
    _legend(ax)
    return fig
