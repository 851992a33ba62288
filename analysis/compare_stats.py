"""The statistics across seeds: per condition, how many seeds are specialised (with the one-sided bound
that "every run" needs), the median delta f, a random-effects estimate with a prediction interval for
a new run, and the trained towers against the trained one-tower control. Part of analysis/compare.py.

A *condition* is every CONDITION column but the seed (tower count, width policy, precision, data,
batch size, learning rate, epochs): runs that differ in any of them are never pooled. Its seeds are
its finished runs with a verdict.
"""

import math
import warnings

import numpy as np

from analysis.compare_read import CONDITION, Run

Z95 = 1.959963984540054  # the normal quantile of a 95% interval: the Newcombe interval's width is 2 Z SE


def median_interval(values, level: float = 0.95, resamples: int = 9999, seed: int = 0):
    """Median of ``values`` and its percentile-bootstrap interval (scipy.stats.bootstrap) over them;
    (median, nan, nan) for fewer than two values."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    med = float(np.median(x))
    if x.size < 2:
        return med, math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-equal values: a degenerate (but correct) interval
        ci = stats.bootstrap(
            (x,), np.median, confidence_level=level, n_resamples=resamples, method="percentile", random_state=seed
        ).confidence_interval
    return med, float(ci.low), float(ci.high)


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


def se_from_interval(low, high, z: float = Z95) -> float:
    """A run's standard error of delta f from its (Newcombe, 95%) interval: width / (2 z)."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return math.nan
    return (high - low) / (2 * z)


def dersimonian_laird(estimates, standard_errors, level: float = 0.95) -> dict:
    """Random-effects estimate (DerSimonian & Laird 1986) of a quantity measured once per run.

    Per run i: estimate y_i with variance v_i = SE_i^2, weight w_i = 1 / v_i. Cochran's
    Q = sum w_i (y_i - ybar_w)^2; between-run variance tau^2 = max(0, (Q - (k - 1)) / (sum w - sum w^2 / sum w));
    the estimate mu = sum w*_i y_i / sum w*_i with w*_i = 1 / (v_i + tau^2), SE(mu) = (sum w*)^(-1/2);
    its confidence interval mu +- z SE(mu); the prediction interval for a new run (Higgins, Thompson &
    Spiegelhalter 2009) mu +- t_{k-2} sqrt(tau^2 + SE(mu)^2), which needs k >= 3 runs. Runs with a
    missing or zero SE are left out."""
    from scipy import stats

    y, se = np.asarray(estimates, float), np.asarray(standard_errors, float)
    keep = np.isfinite(y) & np.isfinite(se) & (se > 0)
    y, v = y[keep], se[keep] ** 2
    k = int(y.size)
    nan = math.nan
    out = {
        "k": k,
        "estimate": nan,
        "se": nan,
        "tau2": nan,
        "q": nan,
        "ci_low": nan,
        "ci_high": nan,
        "pi_low": nan,
        "pi_high": nan,
    }
    if k == 0:
        return out
    w = 1 / v
    ybar = float((w * y).sum() / w.sum())
    q = float((w * (y - ybar) ** 2).sum())
    c = float(w.sum() - (w**2).sum() / w.sum())
    tau2 = max(0.0, (q - (k - 1)) / c) if k > 1 and c > 0 else 0.0
    ws = 1 / (v + tau2)
    mu = float((ws * y).sum() / ws.sum())
    se_mu = float(math.sqrt(1 / ws.sum()))
    z = stats.norm.ppf(0.5 + level / 2)
    out.update(estimate=mu, se=se_mu, tau2=tau2, q=q, ci_low=mu - z * se_mu, ci_high=mu + z * se_mu)
    if k >= 3:
        half = stats.t.ppf(0.5 + level / 2, k - 2) * math.sqrt(tau2 + se_mu**2)
        out.update(pi_low=mu - half, pi_high=mu + half)
    return out


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


def condition_key(run: Run) -> tuple:
    return tuple(run.row[c] for c in CONDITION)


def is_control(key: tuple) -> bool:
    """Whether a condition is the one-tower control (its kernels judged on two random halves)."""
    return key[CONDITION.index("num_towers")] == 1


def control_key(key: tuple) -> tuple:
    """The one-tower control of a condition: the same hyperparameters with num_towers = 1 (and no
    colour-blind tower: the positive control is compared with the same one-tower control)."""
    return tuple(1 if c == "num_towers" else None if c == "color_blind" else v for c, v in zip(CONDITION, key))


def conditions(runs: list[Run]) -> dict:
    """Judged runs (finished, with a verdict) grouped by every CONDITION column: {key: [runs]}, stable order."""
    groups = {}
    for run in runs:
        if run.judged:
            groups.setdefault(condition_key(run), []).append(run)
    return dict(
        sorted(
            groups.items(),
            key=lambda kv: tuple((v is None, str(v) if not isinstance(v, (int, float)) else v) for v in kv[0]),
        )
    )


SHORT_NAMES = {
    "num_towers": "T",
    "width_policy": "width",
    "color_blind": "blind",
    "precision": "precision",
    "data": "data",
    "data_root": "root",
    "batch_size": "batch",
    "lr": "lr",
    "max_epochs": "epochs",
}


def condition_label(key: tuple, varying: list[str], short: bool = False, sep: str = ", ", towers: bool = True) -> str:
    """``T=2, lr=0.01``: the tower count and the CONDITION columns that differ between runs."""
    parts = [
        f"{SHORT_NAMES[c] if short else c}={v:g}" if isinstance(v, float) else f"{SHORT_NAMES[c] if short else c}={v}"
        for c, v in zip(CONDITION, key)
        if c in varying or (c == "num_towers" and towers)
    ]
    return sep.join(parts)


def varying_columns(runs: list[Run]) -> list[str]:
    return [c for c in CONDITION if len({r.row[c] for r in runs}) > 1]


def summarize(runs: list[Run], alpha: float = 0.05, level: float = 0.95, seed: int = 0) -> list[dict]:
    """Per condition: k of n seeds specialised with the one-sided Clopper-Pearson lower bound (and the
    two-sided interval), the median delta f with its bootstrap interval, the DerSimonian-Laird estimate
    with its prediction interval, the seed-level test against the one-tower control, omega^2 (eta^2 less
    its chance bias) and, as a calibration check, the verdict and eta^2's p at initialisation."""
    groups = conditions(runs)
    varying = varying_columns(runs)
    delta = {key: [r.row["delta_f"] for r in group] for key, group in groups.items()}
    out = []
    for key, group in groups.items():
        n = len(group)
        k = sum(r.row["verdict"] == "specialised" for r in group)
        med, lo, hi = median_interval(delta[key], level, seed=seed)
        om, om_lo, om_hi = median_interval([r.row["omega2"] for r in group], level, seed=seed)
        re = dersimonian_laird(
            delta[key], [se_from_interval(r.row["delta_f_low"], r.row["delta_f_high"]) for r in group], level
        )
        control = is_control(key)
        ctrl = None if control else control_key(key)
        onsets = [r.row["onset_step"] for r in group if r.row["onset_step"] is not None]
        init_judged = [r for r in group if r.row["verdict_init"] is not None]
        init_p = [r.row["p_value_init"] for r in group if r.row["p_value_init"] is not None]
        cp_lo, cp_hi = clopper_pearson(k, n, level)
        out.append(
            {
                "condition": dict(zip(CONDITION, key)),
                "label": condition_label(key, varying, short=True),
                "control": control,
                "seeds": n,
                "specialised": k,
                "bound": every_run_bound(k, n, level),
                "cp_low": cp_lo,
                "cp_high": cp_hi,
                "delta_f_median": med,
                "delta_f_low": lo,
                "delta_f_high": hi,
                "re": re,
                "control_seeds": len(delta.get(ctrl, [])) if ctrl else None,
                "control_p": versus_control(delta[key], delta[ctrl]) if ctrl in delta else math.nan,
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
            }
        )
    return out


def sensitivity(group: list[Run]) -> list[dict]:
    """How the condition's count depends on the colour cut: per cut of the records' sensitivity table
    (towers.verdict.SENSITIVITY_CUTS), the seeds specialised at that cut and their median delta f."""
    by_cut = {}
    for run in group:
        for row in run.last.get("sensitivity") or ():
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


def condition_line(s: dict, level: float = 0.95) -> str:
    """The report's one line per condition: "T=2: 3 of 5 seeds specialised (one-sided 95% lower bound
    0.19); median Δf 0.41 [0.30, 0.52]; random effects 0.40 (prediction for a new run [..]); vs
    one-tower control p = 0.004"."""
    pct = f"{level:.0%}"
    line = (
        f"{s['label']}{' (one-tower control, random halves)' if s['control'] else ''}: {s['specialised']} of "
        f"{s['seeds']} seeds specialised (one-sided {pct} lower bound {_num(s['bound'])}); "
        f"median Δf {_num(s['delta_f_median'])} [{_num(s['delta_f_low'])}, {_num(s['delta_f_high'])}]"
    )
    re = s["re"]
    if re["k"] >= 3:
        line += (
            f"; random effects {_num(re['estimate'])} [{_num(re['ci_low'])}, {_num(re['ci_high'])}], "
            f"a new run {pct} in [{_num(re['pi_low'])}, {_num(re['pi_high'])}]"
        )
    if not s["control"]:
        if s["control_seeds"]:
            line += (
                f"; vs one-tower control ({s['control_seeds']} seeds) p = {_num(s['control_p'], '.2g')} "
                f"(one-sided Mann-Whitney on the seeds' Δf)"
            )
        else:
            line += "; no one-tower control with the same settings"
    if s["onsets"]:
        line += f"; appears at step {s['onset_median']:g} (median over {s['onsets']} specialised seeds)"
    return line


def fixed_delta_f(record: dict, agnostic_group, specific_group) -> float:
    """Delta f of one measurement with the groups fixed to the final record's (one labelling for the
    whole run, the verdict's at the end): pooled colour fraction of ``specific_group`` minus that of
    ``agnostic_group``, from the record's per-tower counts. nan when a side has no non-weak kernel."""
    towers, colour, grey = record.get("towers"), record.get("colour_count"), record.get("grey_count")
    if not towers or colour is None or grey is None or not agnostic_group or not specific_group:
        return math.nan

    def fraction(group):
        idx = [towers.index(t) for t in group if t in towers]
        c, n = sum(colour[i] for i in idx), sum(colour[i] + grey[i] for i in idx)
        return c / n if n else math.nan

    return fraction(specific_group) - fraction(agnostic_group)
