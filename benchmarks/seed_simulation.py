"""Seed-level simulation of the report's statistics across seeds (analysis/compare_stats.py).

    python benchmarks/seed_simulation.py                 # 4000 simulated studies a row (a few minutes, 1 core)
    python benchmarks/seed_simulation.py --draws 500     # quicker, coarser
    python benchmarks/seed_simulation.py --json out.json

What it checks, with the functions the report itself uses:

1. **Size of "towers against the one-tower control".** With no tower effect, every run (T towers, or
   the one-tower control split into T random groups) has K = 96 first-layer kernels, each colour with
   the run's own probability q (q drawn per run from Beta with mean 1/3 and concentration 20: runs
   differ, towers do not) and grey otherwise. Each run's delta f is the verdict's: the largest
   difference of pooled colour fractions over every bipartition of its T groups and both orientations
   (:func:`best_delta_f`). The control gets exactly that selection, so towers and control are draws
   of one distribution and the one-sided Mann-Whitney test (:func:`analysis.compare_stats.versus_control`)
   should reject in at most 5% of studies, for T = 2, 3, 4 at 5+5 and 10+10 seeds. (The old report
   compared the towers' best of 2^(T-1) - 1 bipartitions with one random halving of the control:
   that row, "old: control halved", shows what it cost.)
2. **Coverage of every interval the report prints across seeds**, at nominal 95%: the median delta f
   of a condition with its order-statistic interval (:func:`analysis.compare_stats.median_interval`;
   its exact level is printed with it: 93.75% at 5 seeds, 97.9% at 10), the two-sided
   Clopper-Pearson interval and the one-sided lower bound of the fraction of runs specialised, and
   the per-run Newcombe interval of delta f (the verdict's, judged against the true difference of the
   two chosen sides). The targets are each quantity's population value, computed from 400,000
   simulated runs. Rows marked "dropped" are statistics the report no longer prints, with the
   coverage that got them dropped (the bootstrap median interval; DerSimonian-Laird's interval of the
   mean delta f).
3. **Power with a Figure-3-sized effect** (and a quarter of it): the agnostic side's kernels colour with probability 0.04,
   the specific side's 0.62 (Figure 3: tower 1 4% colour, tower 2 62%), each tower's probability
   jittered per run (logit + N(0, 0.5^2)); for T = 3, 4, one tower agnostic and the rest specific;
   the control is one tower of the same mean colour probability split into T random groups.

"Specialised" in the simulation is a stand-in for the verdict (delta f >= 1/3 and both sides largely
grey / colour by one-sided binomial tests at 0.05; no permutation test): the Clopper-Pearson
intervals are exact for any per-run indicator, so what the indicator is does not change their
coverage. Weak and unstructured kernels are left out (they only shrink the counts).
Everything is vectorised over studies (NumPy, scipy); the table is printed and written as JSON.
"""

import argparse
import functools
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import special, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.compare_stats import median_interval_ranks  # noqa: E402

K = 96  # the paper's first layer (48 per tower at T = 2; 32 at 3, 24 at 4)
NULL_MEAN, NULL_CONCENTRATION = 1 / 3, 20.0  # q ~ Beta(20/3, 40/3): runs' colour shares 1/3 +- 0.10
FIG3_AGNOSTIC, FIG3_SPECIFIC, FIG3_JITTER = 0.04, 0.62, 0.5
EFFECTS = {"none": 0.0, "Fig. 3 / 4": 0.25, "Figure 3": 1.0}  # share of Figure 3's gap, around its mean
MIN_DELTA_F, ALPHA, LEVEL = 1 / 3, 0.05, 0.95
TRUTH_RUNS = 400_000


def bipartitions(g: int) -> np.ndarray:
    """(P, G) 0/1: every split of G groups into two non-empty sides, each once."""
    masks = np.arange(1, 2 ** (g - 1))
    return ((masks[:, None] >> np.arange(g)) & 1).astype(np.float64)


def best_delta_f(colour: np.ndarray, size: np.ndarray, prob: np.ndarray | None = None):
    """The verdict's delta f over groups: (..., G) colour counts and group sizes -> the largest pooled
    colour-fraction difference over bipartitions and orientations, with the counts of the chosen sides
    (colour and size, specific then agnostic) and, given the groups' true probabilities, the true
    difference of the chosen sides."""
    sides = bipartitions(colour.shape[-1])
    c1, n1 = colour @ sides.T, size @ sides.T
    c0, n0 = colour.sum(-1, keepdims=True) - c1, size.sum(-1, keepdims=True) - n1
    d = np.concatenate([c1 / n1 - c0 / n0, c0 / n0 - c1 / n1], -1)
    best = d.argmax(-1)[..., None]
    spec = [np.take_along_axis(np.concatenate(a, -1), best, -1)[..., 0] for a in ((c1, c0), (n1, n0))]
    agn = [np.take_along_axis(np.concatenate(a, -1), best, -1)[..., 0] for a in ((c0, c1), (n0, n1))]
    truth = None
    if prob is not None:
        e1 = (prob * size) @ sides.T
        e0 = (prob * size).sum(-1, keepdims=True) - e1
        t = np.concatenate([e1 / n1 - e0 / n0, e0 / n0 - e1 / n1], -1)
        truth = np.take_along_axis(t, best, -1)[..., 0]
    return np.take_along_axis(d, best, -1)[..., 0], spec, agn, truth


def draw_runs(rng, shape, t: int, effect: float, control: bool):
    """Colour counts (*shape, T) of simulated runs, their group sizes and true colour probabilities.
    ``effect``: the share of Figure 3's gap between the sides (0: none; 1: 0.04 beside 0.62)."""
    m = K // t
    centre, half_gap = (FIG3_AGNOSTIC + FIG3_SPECIFIC) / 2, effect * (FIG3_SPECIFIC - FIG3_AGNOSTIC) / 2
    agnostic, specific = centre - half_gap, centre + half_gap
    if effect and not control:
        base = np.where(np.arange(t) == 0, agnostic, specific)  # tower 1 agnostic, the rest specific
        logit = special.logit(base) + FIG3_JITTER * rng.standard_normal((*shape, t))
        prob = special.expit(logit)
    else:
        mean = (agnostic + (t - 1) * specific) / t if effect else NULL_MEAN
        q = rng.beta(mean * NULL_CONCENTRATION, (1 - mean) * NULL_CONCENTRATION, shape)
        prob = np.repeat(q[..., None], t, -1)  # one tower split into T random groups: i.i.d. kernels
    colour = rng.binomial(m, prob).astype(np.float64)
    return colour, np.full(colour.shape, float(m)), prob


def judge(colour, size, prob):
    """delta f, the stand-in verdict, the Newcombe interval and the chosen sides' true difference."""
    d, (cs, ns), (ca, na), truth = best_delta_f(colour, size, prob)
    p_spec = stats.binom.sf(cs - 1, ns, 0.5)  # colour fraction > 1/2
    p_agn = stats.binom.sf(na - ca - 1, na, 0.5)  # grey fraction > 1/2
    specialised = (d >= MIN_DELTA_F - 1e-12) & (p_spec < ALPHA) & (p_agn < ALPHA)
    low, high = newcombe(ca, na, cs, ns)
    return d, specialised, low, high, truth


def wilson(k, n, z):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def newcombe(k1, n1, k2, n2, level=LEVEL):
    """Newcombe's hybrid-score interval of p2 - p1 (the verdict's, towers.verdict.newcombe_interval)."""
    z = stats.norm.ppf(0.5 + level / 2)
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    p1, p2 = k1 / n1, k2 / n2
    return p2 - p1 - np.hypot(p2 - l2, u1 - p1), p2 - p1 + np.hypot(u2 - p2, p1 - l1)


def mann_whitney_p(a, b):
    """One-sided Mann-Whitney p per study (the report's versus_control, vectorised over rows)."""
    return stats.mannwhitneyu(a, b, alternative="greater", axis=-1).pvalue


def clopper_pearson(k, n, level=LEVEL):
    a = 1 - level
    low = np.where(k > 0, stats.beta.ppf(a / 2, k, n - k + 1), 0.0)
    high = np.where(k < n, stats.beta.ppf(1 - a / 2, k + 1, n - k), 1.0)
    bound = np.where(k > 0, stats.beta.ppf(a, k, n - k + 1), 0.0)  # one-sided lower bound
    return low, high, bound


def bootstrap_median(x, rng, resamples=999, level=LEVEL):
    """Percentile bootstrap of the median per row (what the report printed before; dropped)."""
    d, n = x.shape
    idx = rng.integers(0, n, (d, resamples, n))
    meds = np.median(np.take_along_axis(x[:, None, :].repeat(resamples, 1), idx, -1), -1)
    return np.quantile(meds, (1 - level) / 2, -1), np.quantile(meds, 0.5 + level / 2, -1)


def dersimonian_laird(y, se, level=LEVEL):
    """DerSimonian-Laird interval of the mean per row (what the report printed before; dropped)."""
    v = np.maximum(se, 1e-9) ** 2
    w = 1 / v
    ybar = (w * y).sum(-1) / w.sum(-1)
    q = (w * (y - ybar[:, None]) ** 2).sum(-1)
    c = w.sum(-1) - (w**2).sum(-1) / w.sum(-1)
    tau2 = np.maximum(0, (q - (y.shape[-1] - 1)) / c)
    ws = 1 / (v + tau2[:, None])
    mu = (ws * y).sum(-1) / ws.sum(-1)
    half = stats.norm.ppf(0.5 + level / 2) / np.sqrt(ws.sum(-1))
    return mu - half, mu + half


def covers(low, high, truth) -> float:
    return float(np.mean((low <= truth + 1e-12) & (truth - 1e-12 <= high)))


@functools.cache
def population(t: int, effect: float, control: bool) -> dict:
    """The population values the intervals aim at: median and mean delta f, the rate specialised."""
    colour, size, prob = draw_runs(np.random.default_rng([t, round(1000 * effect), control]), (TRUTH_RUNS,), t, effect, control)
    d, spec, *_ = judge(colour, size, prob)
    return {"median": float(np.median(d)), "mean": float(d.mean()), "rate": float(spec.mean())}


def one_condition(rng, draws: int, seeds: int, t: int, effect: float) -> dict:
    """Simulate `draws` studies of `seeds` seeds of T towers and as many of the one-tower control."""
    towers = judge(*draw_runs(rng, (draws, seeds), t, effect, control=False))
    control = judge(*draw_runs(rng, (draws, seeds), t, effect, control=True))
    p = mann_whitney_p(towers[0], control[0])
    # the old comparison: the control judged on one random halving, whatever T
    halved = judge(*draw_runs(rng, (draws, seeds), 2, effect, control=True))
    p_old = mann_whitney_p(towers[0], halved[0])
    row = {
        "num_towers": t,
        "seeds": seeds,
        "effect": next(name for name, e in EFFECTS.items() if e == effect),
        "rejects": float(np.mean(p < ALPHA)),
        "rejects_old": float(np.mean(p_old < ALPHA)),
        "specialised_per_seed": float(towers[1].mean()),  # the stand-in verdict's rate, towers
        "all_specialised": float(towers[1].all(-1).mean()),  # every seed of the study specialised
    }
    r, s, level = median_interval_ranks(seeds, LEVEL)
    for side, (d, spec, low, high, truth), control_side in (("towers", towers, False), ("control", control, True)):
        target = population(t, effect, control_side)
        sorted_d = np.sort(d, -1)
        k = spec.sum(-1)
        cp_low, cp_high, bound = clopper_pearson(k, seeds)
        boot_low, boot_high = bootstrap_median(d, rng)
        se = (high - low) / (2 * stats.norm.ppf(0.5 + LEVEL / 2))
        dl_low, dl_high = dersimonian_laird(d, se)
        row[side] = {
            "median_target": target["median"],
            "rate_target": target["rate"],
            "median_interval_level": level,
            "median_interval": covers(sorted_d[:, r - 1], sorted_d[:, s - 1], target["median"]),
            "clopper_pearson": covers(cp_low, cp_high, target["rate"]),
            "one_sided_bound": float(np.mean(bound <= target["rate"] + 1e-12)),
            "newcombe_per_run": covers(low, high, truth),
            "dropped_bootstrap_median": covers(boot_low, boot_high, target["median"]),
            "dropped_dersimonian_laird_mean": covers(dl_low, dl_high, target["mean"]),
        }
    return row


def mc_error(p: float, draws: int) -> float:
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / draws)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=4000, help="simulated studies per row (4000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the table here as JSON")
    args = parser.parse_args(argv)
    if args.draws < 100:
        parser.error("--draws must be at least 100")
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    rows = [
        one_condition(rng, args.draws, seeds, t, effect)
        for effect, t, seeds in itertools.product(EFFECTS.values(), (2, 3, 4), (5, 10))
    ]
    seconds = time.perf_counter() - start
    e = mc_error(ALPHA, args.draws)
    print(f"{args.draws} studies a row, K = {K} kernels a run; Monte-Carlo 95% error at 5%: ±{e:.3f}\n")
    print("towers against the one-tower control (one-sided Mann-Whitney, p < 0.05): fraction of studies rejecting")
    print(
        f"{'effect':>10} {'T':>2} {'seeds':>7} {'same selection':>15} {'old: control halved':>20} "
        f"{'specialised/seed':>16} {'all seeds':>9}"
    )
    for row in rows:
        print(
            f"{row['effect']:>10} {row['num_towers']:>2} {row['seeds']:>3}+{row['seeds']:<3} "
            f"{row['rejects']:>15.3f} {row['rejects_old']:>20.3f} {row['specialised_per_seed']:>16.3f} "
            f"{row['all_specialised']:>9.3f}"
        )
    print("\ncoverage at nominal 95% (median interval: its exact level in brackets)")
    print(
        f"{'effect':>10} {'T':>2} {'seeds':>5} {'side':>8} {'median [level]':>16} {'CP 2-sided':>10} "
        f"{'CP bound':>9} {'Newcombe/run':>12} {'dropped: boot':>13} {'dropped: DL':>11}"
    )
    for row in rows:
        for side in ("towers", "control"):
            c = row[side]
            print(
                f"{row['effect']:>10} {row['num_towers']:>2} {row['seeds']:>5} {side:>8} "
                f"{c['median_interval']:>7.3f} [{c['median_interval_level']:.3f}] {c['clopper_pearson']:>10.3f} "
                f"{c['one_sided_bound']:>9.3f} {c['newcombe_per_run']:>12.3f} "
                f"{c['dropped_bootstrap_median']:>13.3f} {c['dropped_dersimonian_laird_mean']:>11.3f}"
            )
    print(f"\n{seconds:.0f} s on {platform.processor() or platform.machine()}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"draws": args.draws, "seed": args.seed, "kernels": K, "seconds": seconds, "rows": rows}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
