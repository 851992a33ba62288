"""Seed-level simulation of the report's statistics across seeds (analysis/compare_stats.py).

    python benchmarks/seed_simulation.py                 # 2000 simulated studies a row (a few minutes, 1 core)
    python benchmarks/seed_simulation.py --draws 500     # quicker, coarser
    python benchmarks/seed_simulation.py --json out.json

What it checks, with the functions the report itself uses:

1. **Size of "towers against the one-tower control".** With no tower effect, every run (T towers, or
   the one-tower control split into T random groups) has K = 96 first-layer kernels, each weak or
   unstructured with probability 0.05 and otherwise colour with the run's own probability q (q drawn
   per run from Beta with mean 1/3 and concentration 20: runs differ, towers do not), grey else.
   Each run is judged by the verdict's rule on its group counts (:func:`sides`: a group more than half
   grey is agnostic, more than half colour specific; delta f between the sides), and a run without
   both sides counts 0 (:func:`analysis.compare_stats.seed_value`). The control gets exactly that
   rule on as many groups as the towers, so towers and control are draws of one distribution and the
   one-sided Mann-Whitney test (:func:`analysis.compare_stats.versus_control`) should reject in at
   most 5% of studies, for T = 2, 3, 4 at 5+5 and 10+10 seeds. The column "control as 2 groups"
   compares the same towers with the control judged on two halves whatever T, as the report did
   before: what giving the control another selection costs.
2. **Coverage of every interval the report prints across seeds**, at nominal 95%: the median delta f
   of a condition with its order-statistic interval (:func:`analysis.compare_stats.median_interval`;
   its exact level is printed with it: 93.75% at 5 seeds, 97.9% at 10), the two-sided
   Clopper-Pearson interval and the one-sided lower bound of the fraction of runs split, and the
   per-run Newcombe interval of delta f (the verdict's, over the runs that split, judged against the
   true difference of the two chosen sides). The targets are each quantity's population value,
   computed from 400,000 simulated runs. Columns marked "dropped" are statistics the report no longer
   prints, with the coverage that got them dropped (the percentile bootstrap of the median;
   DerSimonian-Laird's interval of the mean delta f).
3. **Power with a Figure-3-sized effect** (and a quarter of it): the agnostic tower's kernels colour
   with probability 0.04, the specific towers' 0.62 (Figure 3: tower 1 4% colour, tower 2 62%), each
   tower's probability jittered per run (logit + N(0, 0.5^2)); for T = 3, 4, one tower agnostic and
   the rest specific; the control is one tower of the same mean colour probability split into T
   random groups. "A quarter" moves both sides a quarter of the way from the middle (0.26, 0.40).

"Split" in the simulation stands in for the verdict (both sides present; the verdict's permutation
test is left out, so the real verdict says "specialised" less often): the Clopper-Pearson intervals are
exact for any per-run indicator, so which indicator it is does not change their coverage.
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
LARGELY, ALPHA, LEVEL = 1 / 2, 0.05, 0.95  # towers.verdict.LARGELY: more than half of a tower's kernels
OTHER = 0.05  # the share of weak and unstructured kernels (neither grey nor colour; in the denominator)
TRUTH_RUNS = 400_000


def sides(grey: np.ndarray, colour: np.ndarray, total: np.ndarray, prob: np.ndarray | None = None):
    """The verdict's rule on counts (the rule of towers.verdict.split_statistic): a group is on the
    agnostic side when more than half of all its kernels are grey, on the specific side when more than
    half are colour; delta f = pooled colour / (grey + colour) of the specific side less that of the
    agnostic side, NaN when a side is empty. Returns delta f, the counts of the chosen sides (colour,
    grey + colour; specific then agnostic) and, given the groups' true (grey, colour) probabilities
    (..., G, 2), the true difference of the chosen sides."""
    specific, agnostic = colour > LARGELY * total, grey > LARGELY * total
    cs, ns = (colour * specific).sum(-1), ((colour + grey) * specific).sum(-1)
    ca, na = (colour * agnostic).sum(-1), ((colour + grey) * agnostic).sum(-1)
    split = specific.any(-1) & agnostic.any(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(split, cs / ns - ca / na, np.nan)
        truth = None
        if prob is not None:
            pg, pc = prob[..., 0] * total, prob[..., 1] * total
            t_spec = (pc * specific).sum(-1) / ((pc + pg) * specific).sum(-1)
            t_agn = (pc * agnostic).sum(-1) / ((pc + pg) * agnostic).sum(-1)
            truth = np.where(split, t_spec - t_agn, np.nan)
    return delta, (cs, ns), (ca, na), truth


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
    pvals = np.stack([(1 - OTHER) * (1 - prob), (1 - OTHER) * prob, np.full_like(prob, OTHER)], -1)
    counts = rng.multinomial(m, pvals).astype(np.float64)  # (..., T, 3): grey, colour, other
    return counts[..., 0], counts[..., 1], np.full(prob.shape, float(m)), pvals[..., :2]


def judge(grey, colour, total, prob):
    """Per run: its seed value (delta f, 0 without a split), whether it splits (the stand-in verdict:
    the rule's two sides present, without its permutation test), the Newcombe interval and the chosen
    sides' true difference."""
    d, (cs, ns), (ca, na), truth = sides(grey, colour, total, prob)
    split = np.isfinite(d)
    with np.errstate(invalid="ignore", divide="ignore"):
        low, high = newcombe(ca, na, cs, ns)
    return np.where(split, d, 0.0), split, low, high, truth


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
def population(t: int, effect: float, control: bool, runs: int = TRUTH_RUNS) -> dict:
    """The population values the intervals aim at: median and mean delta f, the rate specialised."""
    runs = draw_runs(np.random.default_rng([t, round(1000 * effect), control]), (runs,), t, effect, control)
    d, spec, *_ = judge(*runs)
    return {"median": float(np.median(d)), "mean": float(d.mean()), "rate": float(spec.mean())}


def one_condition(rng, draws: int, seeds: int, t: int, effect: float, truth_runs: int = TRUTH_RUNS) -> dict:
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
        target = population(t, effect, control_side, truth_runs)
        sorted_d = np.sort(d, -1)
        k = spec.sum(-1)
        cp_low, cp_high, bound = clopper_pearson(k, seeds)
        boot_low, boot_high = bootstrap_median(d, rng)
        se = np.where(spec, (high - low) / (2 * stats.norm.ppf(0.5 + LEVEL / 2)), 0.05)  # no split: a nominal SE
        dl_low, dl_high = dersimonian_laird(d, se)
        row[side] = {
            "median_target": target["median"],
            "rate_target": target["rate"],
            "median_interval_level": level,
            "median_interval": covers(sorted_d[:, r - 1], sorted_d[:, s - 1], target["median"]),
            "clopper_pearson": covers(cp_low, cp_high, target["rate"]),
            "one_sided_bound": float(np.mean(bound <= target["rate"] + 1e-12)),
            "newcombe_per_run": covers(low[spec], high[spec], truth[spec]) if spec.any() else math.nan,
            "dropped_bootstrap_median": covers(boot_low, boot_high, target["median"]),
            "dropped_dersimonian_laird_mean": covers(dl_low, dl_high, target["mean"]),
        }
    return row


def mc_error(p: float, draws: int) -> float:
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / draws)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=2000, help="simulated studies per row (2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truth-runs", type=int, default=TRUTH_RUNS, help="runs for the population values")
    parser.add_argument("--json", type=Path, help="write the table here as JSON")
    args = parser.parse_args(argv)
    if args.draws < 100:
        parser.error("--draws must be at least 100")
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    rows = [
        one_condition(rng, args.draws, seeds, t, effect, args.truth_runs)
        for effect, t, seeds in itertools.product(EFFECTS.values(), (2, 3, 4), (5, 10))
    ]
    seconds = time.perf_counter() - start
    e = mc_error(ALPHA, args.draws)
    print(f"{args.draws} studies a row, K = {K} kernels a run; Monte-Carlo 95% error at 5%: ±{e:.3f}\n")
    print("towers against the one-tower control (one-sided Mann-Whitney, p < 0.05): fraction of studies rejecting")
    print(
        f"{'effect':>10} {'T':>2} {'seeds':>7} {'same selection':>15} {'control as 2 groups':>20} "
        f"{'split/seed':>10} {'all seeds split':>15}"
    )
    for row in rows:
        print(
            f"{row['effect']:>10} {row['num_towers']:>2} {row['seeds']:>3}+{row['seeds']:<3} "
            f"{row['rejects']:>15.3f} {row['rejects_old']:>20.3f} {row['specialised_per_seed']:>10.3f} "
            f"{row['all_specialised']:>15.3f}"
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
