"""Calibration of the verdict and the eta2 test: how often do they fire when nothing is there?

Three tables (towers.verdict's rule, its constants unchanged):

    initialisation   conv1 as TowerAlexNet initialises it (reset_parameters, seeded), for 1, 2, 3 (per_tower)
                     and 4 towers: the fraction of seeds called specialised (the rule's false-positive
                     rate; must stay <= 5%), the fraction with the delta-f permutation p < 0.05, and the
                     fraction with the eta2 permutation p < 0.05 (5% if the test is exact), each with its
                     exact 95% interval
    mixtures         the hardest null for the rule: every kernel grey or colour with probability q,
                     whatever its tower (what trained kernels with no tower effect look like), 2 and 4 towers
    power            a planted split short of perfect: the agnostic tower's kernels grey with probability
                     p_grey, the specific tower's colour with probability p_colour; how often the rule finds it

    python benchmarks/calibration.py                 # 200 seeds per row (about 10 minutes on 2 cores)
    python benchmarks/calibration.py --seeds 40      # quicker, wider intervals
"""

import argparse
import datetime
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from benchmarks.bench_step import machine, save_results
from towers.color import bisection, color_specificity, tower_labels
from towers.model import TowerAlexNet
from towers.verdict import verdict

INIT_ROWS = ((1, "split"), (2, "split"), (3, "per_tower"), (4, "split"))


def rate(k: int, n: int) -> dict:
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    return {"k": k, "n": n, "fraction": k / n, "low": float(ci.low), "high": float(ci.high)}


def fmt(r: dict) -> str:
    return f"{r['k']:>3}/{r['n']:<3} {100 * r['fraction']:5.1f}% [{100 * r['low']:4.1f}, {100 * r['high']:4.1f}]"


def at_initialisation(num_towers: int, width_policy: str, seeds: int, permutations: int) -> dict:
    model = TowerAlexNet(num_towers=num_towers, width_policy=width_policy, image_size=67)  # fc sizes do not touch conv1
    called = delta_sig = eta_sig = 0
    for seed in tqdm(range(seeds), desc=f"init, {num_towers} towers ({width_policy})", leave=False):
        torch.manual_seed(seed)
        model.reset_parameters()  # the paper's N(0, 0.01^2), conv1 drawn first
        kernels = model.conv1_kernels().detach()
        v = verdict(kernels, permutations=permutations, seed=seed, sensitivity=False)
        b = bisection(color_specificity(kernels), tower_labels(*kernels.shape[:2]), permutations, seed, bootstrap=10)
        called += v.specialised
        delta_sig += v.p_delta_f < 0.05
        eta_sig += b.p_value < 0.05
    return {
        "num_towers": num_towers,
        "width_policy": width_policy,
        "kernels": int(kernels.shape[0] * kernels.shape[1]),
        "specialised": rate(called, seeds),
        "p_delta_f_below_0.05": rate(delta_sig, seeds),
        "eta2_p_below_0.05": rate(eta_sig, seeds),
    }


def grey_or_colour(p_colour: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """(K, 3, 11, 11): kernel k pure colour (every pixel orthogonal to grey) with probability p_colour[k], else grey."""
    k = len(p_colour)
    base = torch.as_tensor(rng.normal(size=(k, 3, 11, 11)))
    grey = base.mean(1, keepdim=True).expand(k, 3, 11, 11)
    colour = base - grey
    pick = torch.as_tensor(rng.random(k) < p_colour).view(k, 1, 1, 1)
    return torch.where(pick, colour, grey)


def simulated(p_colour_by_tower: list[float], seeds: int, permutations: int, n: int = 48) -> tuple[dict, dict]:
    """How often the rule calls specialised, and how often the delta-f permutation p < 0.05."""
    t = len(p_colour_by_tower)
    probability = np.repeat(p_colour_by_tower, n if t <= 2 else 96 // t)
    called = significant = 0
    for seed in range(seeds):
        kernels = grey_or_colour(probability, np.random.default_rng(seed))
        v = verdict(kernels.view(t, -1, 3, 11, 11), permutations=permutations, seed=seed, sensitivity=False)
        called += v.specialised
        significant += v.p_delta_f < 0.05
    return rate(called, seeds), rate(significant, seeds)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="seeds per row (default 200)")
    parser.add_argument("--permutations", type=int, default=1999, help="per test (default 1999)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/calibration-<time>.json)")
    args = parser.parse_args(argv)
    started = datetime.datetime.now()
    torch.set_num_threads(1)

    print(f"At initialisation, {args.seeds} seeds per row, {args.permutations} permutations per test")
    print(f"{'towers':<18}{'kernels':>8}  {'called specialised':<28}{'delta-f p < 0.05':<28}{'eta2 p < 0.05':<28}")
    init = []
    for t, policy in INIT_ROWS:
        row = at_initialisation(t, policy, args.seeds, args.permutations)
        init.append(row)
        print(
            f"{t} ({policy}){'':<{16 - len(str(t)) - len(policy) - 3}}{row['kernels']:>8}  "
            f"{fmt(row['specialised']):<28}{fmt(row['p_delta_f_below_0.05']):<28}{fmt(row['eta2_p_below_0.05']):<28}"
        )

    print("\nExchangeable mixtures (no tower effect): called specialised; delta-f p < 0.05")
    mixtures = []
    for t in (2, 4):
        for q in (0.25, 0.5, 0.75):
            r, sig = simulated([q] * t, args.seeds, args.permutations)
            mixtures.append({"num_towers": t, "p_colour": q, "specialised": r, "p_delta_f_below_0.05": sig})
            print(f"  {t} towers, every kernel colour with probability {q:.2f}: {fmt(r)}; {fmt(sig)}")

    print("\nPlanted splits, 2 towers of 48: called specialised")
    power = []
    for p_grey, p_colour in ((0.9, 0.9), (0.8, 0.75), (0.75, 0.7), (0.7, 0.65), (0.6, 0.6)):
        r, _ = simulated([1 - p_grey, p_colour], args.seeds, args.permutations)
        power.append({"p_grey_agnostic": p_grey, "p_colour_specific": p_colour, "specialised": r})
        print(f"  agnostic tower {100 * p_grey:.0f}% grey, specific tower {100 * p_colour:.0f}% colour: {fmt(r)}")

    return save_results(
        "calibration",
        args.out,
        argv,
        started,
        machine(),
        seeds=args.seeds,
        permutations=args.permutations,
        initialisation=init,
        mixtures=mixtures,
        power=power,
    )


if __name__ == "__main__":
    main()
