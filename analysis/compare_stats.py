"""The statistics across seeds, per condition (towers.conditions: every setting but the seed): how
many seeds are specialised with the one-sided bound that "every run" needs, the median delta f with an
exact order-statistic interval, and the trained towers against the trained one-tower control judged
with exactly the towers' selection. Part of analysis/compare.py.

Delta f is chosen from the data (the sides of every run are picked from its own kernels), so it is
above 0 even when towers make no difference; what the report prints is therefore only what stays
valid for such a quantity, each checked by benchmarks/seed_simulation.py (BENCHMARKS.md):

- k of n seeds specialised, the one-sided Clopper-Pearson lower bound (exact for any per-run rate);
- the median delta f over seeds with the order-statistic interval, which covers the median of any
  distribution at its stated exact level (93.75% at 5 seeds, 97.9% at 10; none below 5 seeds);
- towers against control: the one-tower control's kernels split into as many random groups as the
  condition has towers and judged by the same rule, so both sides are the same statistic of the
  same chance; one-sided Mann-Whitney on the seeds' delta f (a run with no split counts as 0).

Dropped, because simulation shows they cannot be made valid here: DerSimonian-Laird's random-effects
interval and prediction interval (a normal model of a bounded, selected quantity with per-run SEs
that ignore the selection) and the percentile bootstrap of the median.
"""

import math

import numpy as np

from analysis.compare_read import Run
from towers import conditions as cond
from towers import reference
from towers.reference import seed_delta_f as seed_value  # a run without a split counts 0
from towers.verdict import format_p


def median_interval_ranks(n: int, level: float = 0.95) -> tuple[int, int, float]:
    """The order statistics (r, s), 1-based, whose interval [x_(r), x_(s)] covers the median of any
    distribution with probability at least ``level`` (exact, distribution-free: the count of seeds below
    the median is Binomial(n, 1/2)), the narrowest symmetric such pair, and its exact level
    1 - 2 P(Bin(n, 1/2) <= r - 1). Below ``level`` even [min, max] does not reach it: then (1, n) with
    its own level (93.75% at 5 seeds, 87.5% at 4), which the report prints beside the interval."""
    from scipy import stats

    r = 1
    while r + 1 <= n // 2 and 1 - 2 * stats.binom.cdf(r, n, 0.5) >= level:
        r += 1
    return r, n + 1 - r, float(1 - 2 * stats.binom.cdf(r - 1, n, 0.5))


MIN_MEDIAN_LEVEL = 0.93  # below this exact level (4 seeds or fewer: 87.5%) the report prints no interval


def median_interval(values, level: float = 0.95):
    """Median of ``values`` and its order-statistic interval with the interval's exact level
    (:func:`median_interval_ranks`): (median, low, high, level). Valid for any distribution of the
    seeds' values (ties included), so also for a delta f chosen from the data, whose distribution is
    bounded and lumpy. nan bounds when fewer seeds than give MIN_MEDIAN_LEVEL (5)."""
    x = np.sort(np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float))
    if x.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    r, s, achieved = median_interval_ranks(x.size, level)
    if achieved < MIN_MEDIAN_LEVEL:
        return float(np.median(x)), math.nan, math.nan, achieved
    return float(np.median(x)), float(x[r - 1]), float(x[s - 1]), achieved


def clopper_pearson(k: int, n: int, level: float = 0.95):
    """Two-sided exact (Clopper-Pearson) interval of a proportion k/n."""
    from scipy import stats

    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def every_run_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided exact (Clopper-Pearson) lower confidence bound of the fraction of runs that specialise,
    from k of n seeds: what "in every run" can claim. n of n gives (1 - level) ** (1 / n): 5 of 5 ->
    0.549, 10 of 10 -> 0.741, 29 of 29 -> 0.902."""
    from scipy import stats

    if n == 0:
        return math.nan
    return float(stats.binomtest(k, n, alternative="greater").proportion_ci(level, method="exact").low)


def versus_control(trained, control) -> float:
    """One-sided p that the trained towers' delta f exceeds the trained one-tower control's, at the
    seed level: Mann-Whitney U (exact for small samples, no normality assumed), one value per seed.
    nan when either side has no seed. With n and m seeds the smallest p is 1 / C(n + m, n):
    2 against 2 seeds cannot go below 1/6, 3 against 3 reaches 0.05, 5 against 5 0.004."""
    from scipy import stats

    a = [x for x in trained if x is not None and math.isfinite(x)]
    b = [x for x in control if x is not None and math.isfinite(x)]
    if not a or not b:
        return math.nan
    return float(stats.mannwhitneyu(a, b, alternative="greater").pvalue)


def control_delta_f(run: Run, groups: int) -> float:
    """The one-tower control's delta f with its kernels split into ``groups`` random groups and judged by
    the verdict's own rule (the towers' selection, exactly): its record's own value when it was judged
    with that many groups, else from its kernels' classes (towers.color.control_partition,
    towers.verdict.split_statistic). nan when the record has no classes."""
    last = run.last
    if last is None or last.verdict is None:
        return math.nan
    if len(last.value("towers") or ()) == groups:
        return seed_value(last.value("delta_f"))
    classes = last.value("kernel_class")
    if not classes:
        return math.nan
    from towers.color import control_partition
    from towers.verdict import split_statistic

    codes = {"grey": 0, "colour": 1, "weak": 2, "unstructured": 3}
    labels = np.array([codes[c] for c in classes])
    seed = last.value("seed") or 0
    delta, _, _ = split_statistic(labels, control_partition(labels.size, groups, seed), groups)
    return seed_value(float(np.asarray(delta).ravel()[0]))


def conditions(runs: list[Run]) -> dict:
    """Judged runs (finished, with a verdict of this rule) grouped by condition: {key: [runs]}, stable order."""
    groups = {}
    for run in runs:
        if run.judged:
            groups.setdefault(cond.key(run.condition), []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: (str(kv[1][0].row["num_towers"]), kv[0])))


def condition_label(condition: dict, varying: list[str], towers: bool = True, sep: str = "; ") -> str:
    """``towers: 2; LR schedule: step``: the tower count and the settings that differ between conditions
    (settings a run's config does not record are counted, not listed: its id tells it apart)."""
    names = [n for n in varying if n != cond.TOWERS]
    shown = [cond.show(cond.TOWERS, condition.get(cond.TOWERS))] if towers else []
    shown += [cond.show(n, condition[n]) for n in names if n in condition]
    missing = sum(n not in condition for n in names)
    if missing:
        shown.append(f"{missing} setting{'s' * (missing > 1)} not recorded")
    return sep.join(shown)


def condition_labels(runs: list[Run], sep: str = "; ") -> dict:
    """{condition key: its label} for the judged runs' conditions (the settings that differ between them)."""
    first = {key: group[0].condition for key, group in conditions(runs).items()}
    varying = cond.differences(list(first.values()))
    return {key: condition_label(c, varying, sep=sep) for key, c in first.items()}


def summarize(
    runs: list[Run], alpha: float = 0.05, level: float = 0.95, seed: int = 0, paper: dict | None = None
) -> list[dict]:
    """Per condition: k of n seeds specialised with the one-sided Clopper-Pearson lower bound (and the
    two-sided interval), the median delta f with its order-statistic interval, the seed-level test against
    the one-tower control judged with as many groups as the condition has towers, omega^2's median with
    the same interval, the onset, and as a calibration check the verdict and eta^2's p at initialisation;
    with ``paper`` (Figure 3's record or its read_reference row) the seeds beside it
    (towers.reference.versus_paper, a description). (``seed`` is kept for the command line; nothing here is random.)"""
    groups = conditions(runs)
    first = {key: group[0].condition for key, group in groups.items()}
    varying = cond.differences(list(first.values()))
    out = []
    for key, group in groups.items():
        condition = first[key]
        n = len(group)
        k = sum(r.row["verdict"] == "specialised" for r in group)
        towers = condition.get(cond.TOWERS)
        values = [seed_value(r.row["delta_f"]) for r in group]
        med, lo, hi, med_level = median_interval(values, level)
        om, om_lo, om_hi, _ = median_interval([r.row["omega2"] for r in group], level)
        control = cond.is_control(condition)
        controls = (
            []
            if control or not isinstance(towers, int)
            else [
                r
                for ck, cg in groups.items()
                if cond.same_setup(first[ck], cond.control_of(condition)) and cond.is_control(first[ck])
                for r in cg
            ]
        )
        control_values = [v for v in (control_delta_f(r, towers) for r in controls) if math.isfinite(v)]
        onsets = [r.row["onset_step"] for r in group if r.row["onset_step"] is not None]
        init_judged = [r for r in group if r.row["verdict_init"] is not None]
        init_p = [r.row["p_eta2_init"] for r in group if r.row["p_eta2_init"] is not None]
        cp_lo, cp_hi = clopper_pearson(k, n, level)
        cmed, clo, chi, _ = median_interval(control_values, level)
        out.append(
            {
                "key": key,
                "condition": condition,
                "id": group[0].row["condition"],
                "num_towers": towers,
                "label": condition_label(condition, varying),
                "colour_label": condition_label(condition, varying, towers=False),
                "control": control,
                "seeds": n,
                "specialised": k,
                "bound": every_run_bound(k, n, level),
                "cp_low": cp_lo,
                "cp_high": cp_hi,
                "delta_f_median": med,
                "delta_f_low": lo,
                "delta_f_high": hi,
                "median_level": med_level,
                "control_seeds": len(control_values) if not control else None,
                "control_median": cmed,
                "control_low": clo,
                "control_high": chi,
                "control_p": versus_control(values, control_values) if control_values else math.nan,
                "omega2_median": om,
                "omega2_low": om_lo,
                "omega2_high": om_hi,
                "eta2_median": float(
                    np.median([r.row["eta2"] for r in group if r.row["eta2"] is not None] or [math.nan])
                ),
                "onset_median": float(np.median(onsets)) if onsets else None,
                "onsets": len(onsets),
                "init_specialised": sum(r.row["verdict_init"] == "specialised" for r in init_judged),
                "init_judged": len(init_judged),
                "init_significant": sum(p < alpha for p in init_p),
                "init_p": len(init_p),
                "sensitivity": sensitivity(group),
                "runs": [r.name for r in group],
                "versus_paper": None
                if paper is None
                else reference.versus_paper(
                    [{k: r.last.value(k) for k in reference.SIDE_FIELDS} for r in group], paper
                ),
            }
        )
    return out


def sensitivity(group: list[Run]) -> list[dict]:
    """How the condition's count depends on the colour cut: per cut of the records' sensitivity table
    (towers.verdict.SENSITIVITY_CUTS), the seeds specialised at that cut and their median delta f."""
    by_cut = {}
    for run in group:
        for row in run.last.value("sensitivity") or ():
            by_cut.setdefault(row["cut"], []).append(row)
    return [
        {
            "cut": cut,
            "seeds": len(rows),
            "specialised": sum(row["verdict"] == "specialised" for row in rows),
            "delta_f_median": float(np.median([r["delta_f"] for r in rows if r["delta_f"] is not None] or [math.nan])),
        }
        for cut, rows in sorted(by_cut.items())
    ]


def _num(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _interval(med, lo, hi, level) -> str:
    if not math.isfinite(med):
        return "n/a"
    if not math.isfinite(lo):
        return f"{med:.2f} (no interval below 5 seeds)"
    return f"{med:.2f} [{lo:.2f}, {hi:.2f}] ({level:.1%} order-statistic interval)"


def condition_line(s: dict, level: float = 0.95) -> str:
    """The report's one line per condition: "towers: 2: 3 of 5 seeds specialised (one-sided 95% lower
    bound 0.19); median Δf 0.41 [0.30, 0.55] (93.8% ...); one-tower control as 2 random groups (5 seeds):
    median Δf 0.10 [...]; towers vs control p = 0.004 (one-sided Mann-Whitney on the seeds' Δf)"."""
    pct = f"{level:.0%}"
    line = (
        f"{s['label']} [{s['id']}]{' (one-tower control)' if s['control'] else ''}: {s['specialised']} of "
        f"{s['seeds']} seeds specialised (one-sided {pct} lower bound {_num(s['bound'])}); "
        f"median Δf {_interval(s['delta_f_median'], s['delta_f_low'], s['delta_f_high'], s['median_level'])}"
    )
    if not s["control"]:
        if s["control_seeds"]:
            line += (
                f"; one-tower control as {s['num_towers']} random groups ({s['control_seeds']} seeds): median Δf "
                f"{_num(s['control_median'])}; towers vs control p {format_p(s['control_p'])} "
                f"(one-sided Mann-Whitney on the seeds' Δf, a run without a split counted lowest)"
            )
        else:
            line += "; no one-tower control with the same settings"
    if s.get("versus_paper"):
        line += f"; beside the paper's Figure 3: {reference.versus_paper_text(s['versus_paper'])}"
    if s["onsets"]:
        line += f"; appears at step {s['onset_median']:g} (median over {s['onsets']} specialised seeds)"
    return line


def fixed_delta_f(record, agnostic_group, specific_group) -> float:
    """Delta f of one measurement with the groups fixed to the final record's (one labelling for the
    whole run, the verdict's at the end): pooled colour fraction of ``specific_group`` minus that of
    ``agnostic_group``, from the record's per-tower counts. nan when a side has no non-weak kernel."""
    towers, colour, grey = record.value("towers"), record.value("colour_count"), record.value("grey_count")
    if not towers or colour is None or grey is None or not agnostic_group or not specific_group:
        return math.nan

    def fraction(group):
        idx = [towers.index(t) for t in group if t in towers]
        c, n = sum(colour[i] for i in idx), sum(colour[i] + grey[i] for i in idx)
        return c / n if n else math.nan

    return fraction(specific_group) - fraction(agnostic_group)
