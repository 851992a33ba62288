"""Calibration of the verdict: how often it fires when nothing is there, and what it says at the edges.

Tables (towers.verdict's rule, its constants unchanged; every rate with its exact 95% interval):

    structure        the unstructured-kernel detector without initial kernels (the spatial spectrum):
                     fresh kernels read as structured (its false-structure rate, 1% by construction),
                     structured kernels (grey Gabors, colour gratings and blobs) and, with --figure, the 96
                     learned kernels of the paper's Figure 3 read as unstructured
    initialisation   conv1 as TowerAlexNet initialises it, 1, 2, 3 (per_tower) and 4 towers, judged without
                     initial kernels: called specialised; the eta2 test's level (p < 0.05)
    mixtures         exchangeable mixtures of STRUCTURED grey and colour kernels (each colour with
                     probability q, whatever its tower) for 2, 3 and 4 towers: the rule must reject these
                     (called specialised at most 5%, the test's level); how often both majorities appear
                     by chance, which is what the test is for
    boundary         one tower 50/50 (each kernel colour with probability 1/2), every other tower fully
                     colour: the rule describes the run, so it is called specialised exactly when the 50/50
                     tower came out with a grey majority (P(Bin(n, 1/2) > n/2)), with a margin of a kernel or two
    power            planted splits short of perfect (2 towers), and one as split as Figure 3 (6% / 62% colour)

    python benchmarks/calibration.py                 # 200 draws per row
    python benchmarks/calibration.py --draws 40      # quicker, wider intervals
"""

import argparse
import datetime
import math
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from benchmarks.bench_step import machine, save_results
from towers.color import effective_frequencies, white_noise_frequencies
from towers.model import TowerAlexNet
from towers.verdict import STRUCTURE_QUANTILE, verdict

INIT_ROWS = ((1, "split"), (2, "split"), (3, "per_tower"), (4, "split"))
PER_TOWER = {2: 48, 3: 32, 4: 24}  # the split policy's 96 kernels
POWER_ROWS = ((0.9, 0.9), (0.8, 0.75), (0.7, 0.65), (0.6, 0.6), (0.94, 0.62))  # the last: as split as Figure 3
TABLES = ("structure", "initialisation", "mixtures", "boundary", "power")


def rate(k: int, n: int) -> dict:
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    return {"k": int(k), "n": int(n), "fraction": k / n, "low": float(ci.low), "high": float(ci.high)}


def fmt(r: dict) -> str:
    return f"{r['k']}/{r['n']} = {100 * r['fraction']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def gabors(n: int, rng: np.random.Generator, size: int = 11) -> torch.Tensor:
    """(n, size, size) unit-norm luminance patterns: Gabors at random orientations, phases, frequencies
    (0.1 to 0.4 cycles/pixel) and envelope widths (2 to 4 pixels)."""
    theta, phase = rng.uniform(0, math.pi, n), rng.uniform(0, 2 * math.pi, n)
    freq, sigma = rng.uniform(0.1, 0.4, n), rng.uniform(2, 4, n)
    y, x = np.mgrid[:size, :size] - size // 2
    along = x[None] * np.cos(theta)[:, None, None] + y[None] * np.sin(theta)[:, None, None]
    envelope = np.exp(-(x**2 + y**2)[None] / (2 * sigma[:, None, None] ** 2))
    p = envelope * np.cos(2 * math.pi * freq[:, None, None] * along + phase[:, None, None])
    return torch.as_tensor(p / np.linalg.norm(p.reshape(n, -1), axis=1)[:, None, None])


def structured(colour: np.ndarray, rng: np.random.Generator, noise: float = 0.05) -> torch.Tensor:
    """(K, 3, 11, 11) learned-looking kernels: grey Gabors, or (where ``colour``) a Gabor or a blob in a
    random chromatic direction (half each), plus i.i.d. noise of ``noise`` times the kernel's rms."""
    k = len(colour)
    pattern = gabors(k, rng)
    blob = rng.random(k) < 0.5
    y, x = np.mgrid[:11, :11] - 5
    width = rng.uniform(1.5, 3, k)[:, None, None]
    pattern[blob] = torch.as_tensor(np.exp(-(x**2 + y**2)[None] / (2 * width**2)))[blob]
    direction = rng.normal(size=(k, 3))
    direction -= direction.mean(1, keepdims=True)  # orthogonal to grey
    direction = np.where(colour[:, None], direction, 1.0)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    w = pattern[:, None] * torch.as_tensor(direction)[:, :, None, None]
    w = w / w.flatten(1).norm(dim=1).view(k, 1, 1, 1)
    return w + noise / math.sqrt(363) * torch.as_tensor(rng.normal(size=w.shape))


def judge(kernels, seed: int, permutations: int, margin: bool = False):
    return verdict(kernels, permutations=permutations, seed=seed, sensitivity=False, margin=margin, bootstrap=0)


def structure_errors(draws: int, figure: Path | None) -> dict:
    threshold = white_noise_frequencies(11, 11, STRUCTURE_QUANTILE)
    fresh = 0.01 * torch.randn(96 * draws, 3, 11, 11, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    grey, colour = structured(np.zeros(96 * draws, bool), rng), structured(np.ones(96 * draws, bool), rng)
    out = {
        "threshold": threshold,
        "fresh_read_structured": rate(int((effective_frequencies(fresh) < threshold).sum()), len(fresh)),
        "grey_gabors_read_unstructured": rate(int((effective_frequencies(grey) >= threshold).sum()), len(grey)),
        "colour_kernels_read_unstructured": rate(int((effective_frequencies(colour) >= threshold).sum()), len(colour)),
    }
    if figure is not None:
        from towers.figure_reader import read_figure

        kernels = torch.as_tensor(read_figure(figure, 2, grid=(6, 16)).kernels).flatten(0, 1)
        out["figure3_read_unstructured"] = rate(int((effective_frequencies(kernels) >= threshold).sum()), len(kernels))
    return out


def at_initialisation(num_towers: int, width_policy: str, draws: int, permutations: int) -> dict:
    """conv1 drawn as TowerAlexNet initialises it, N(0, init_std^2) in its (towers, n, 3, 11, 11) shape."""
    model = TowerAlexNet(num_towers=num_towers, width_policy=width_policy, image_size=67)
    shape, std = model.conv1_kernels().shape, model.init_std
    called = eta_sig = unstructured = total = 0
    for seed in tqdm(range(draws), desc=f"init, {num_towers} towers", leave=False):
        kernels = std * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        v = judge(kernels, seed, permutations)
        called += v.specialised
        eta_sig += v.p_eta2 < 0.05
        unstructured += sum(v.unstructured_count)
        total += sum(v.sizes)
    return {
        "num_towers": num_towers,
        "width_policy": width_policy,
        "kernels": int(kernels.shape[0] * kernels.shape[1]),
        "specialised": rate(called, draws),
        "eta2_p_below_0.05": rate(eta_sig, draws),
        "unstructured": rate(unstructured, total),
    }


def simulated(p_colour_by_tower, draws: int, permutations: int, margin: bool = False, start: int = 0) -> dict:
    """Structured kernels, each colour with its tower's probability: the verdict's rates over draws."""
    t = len(p_colour_by_tower)
    n = PER_TOWER[t]
    probability = np.repeat(p_colour_by_tower, n)
    called = both = significant = 0
    margins = []
    for seed in range(start, start + draws):
        rng = np.random.default_rng(seed)
        kernels = structured(rng.random(len(probability)) < probability, rng).view(t, n, 3, 11, 11)
        v = judge(kernels, seed, permutations, margin)
        called += v.specialised
        both += bool(v.agnostic_group and v.specific_group)
        significant += bool(v.p_delta_f < 0.05) if v.p_delta_f is not None and not math.isnan(v.p_delta_f) else 0
        if margin and v.specialised:
            margins.append(v.margin)
    out = {
        "p_colour": list(map(float, p_colour_by_tower)),
        "kernels_per_tower": n,
        "specialised": rate(called, draws),
        "both_majorities": rate(both, draws),
        "p_delta_f_below_0.05": rate(significant, draws),
    }
    if margin:
        out["margin_when_specialised"] = np.percentile(margins, [0, 50, 100]).tolist() if margins else None
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=200, help="draws (seeds) per row (default 200)")
    parser.add_argument("--permutations", type=int, default=999, help="per test (default 999)")
    parser.add_argument("--figure", type=Path, help="the paper's Figure 3 (krizhevsky2012-figure3.png), 6x16 grid")
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES, help="which tables (default: all)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/calibration-<time>.json)")
    args = parser.parse_args(argv)
    started = datetime.datetime.now()
    torch.set_num_threads(1)
    d, b = args.draws, args.permutations

    s, init, mixtures, boundary, power = None, [], [], [], []
    if "structure" in args.tables:
        s = structure_errors(d, args.figure)
        print(f"Unstructured kernels without initial kernels (spectrum, threshold {s['threshold']:.1f} frequencies):")
        for key in [k for k in s if k != "threshold"]:
            print(f"  {key.replace('_', ' ')}: {fmt(s[key])}")

    if "initialisation" in args.tables:
        print(f"\nAt initialisation, {d} seeds per row, no initial kernels given (the spectrum judges)")
    for t, policy in INIT_ROWS if "initialisation" in args.tables else ():
        row = at_initialisation(t, policy, d, b)
        init.append(row)
        print(
            f"  {t} ({policy}), {row['kernels']} kernels: specialised {fmt(row['specialised'])}; "
            f"unstructured {fmt(row['unstructured'])}; eta2 p < 0.05 {fmt(row['eta2_p_below_0.05'])}"
        )

    if "mixtures" in args.tables:
        print("\nExchangeable mixtures of structured kernels (no tower effect; the rule must reject)")
    for t in (2, 3, 4) if "mixtures" in args.tables else ():
        for q in (0.3, 0.5, 0.7):
            r = simulated([q] * t, d, b)
            mixtures.append({"num_towers": t, **r})
            print(
                f"  {t} towers, q = {q}: specialised {fmt(r['specialised'])}; both majorities "
                f"{fmt(r['both_majorities'])}; Δf p < 0.05 {fmt(r['p_delta_f_below_0.05'])}"
            )

    if "boundary" in args.tables:
        print("\nBoundary: one tower 50/50, the others fully colour (the rule describes the run)")
    for t in (2, 3, 4) if "boundary" in args.tables else ():
        r = simulated([0.5] + [1.0] * (t - 1), d, b, margin=True)
        n = PER_TOWER[t]
        expected = float(stats.binom.sf(n // 2, n, 0.5))  # P(more than half grey)
        boundary.append({"num_towers": t, "grey_majority_probability": expected, **r})
        print(
            f"  {t} towers: specialised {fmt(r['specialised'])} (P(grey majority) = {expected:.3f}); "
            f"margin when specialised (min, median, max) {r['margin_when_specialised']}"
        )

    if "power" in args.tables:
        print("\nPlanted splits, 2 towers of 48")
    for p_grey, p_colour in POWER_ROWS if "power" in args.tables else ():
        r = simulated([1 - p_grey, p_colour], d, b, margin=True)
        power.append({"p_grey_agnostic": p_grey, "p_colour_specific": p_colour, **r})
        print(
            f"  agnostic {100 * p_grey:.0f}% grey, specific {100 * p_colour:.0f}% colour: "
            f"{fmt(r['specialised'])}; margin (min, median, max) {r['margin_when_specialised']}"
        )

    return save_results(
        "calibration",
        args.out,
        argv,
        started,
        machine(),
        draws=d,
        permutations=b,
        structure=s,
        initialisation=init,
        mixtures=mixtures,
        boundary=boundary,
        power=power,
    )


if __name__ == "__main__":
    main()
