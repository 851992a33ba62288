"""towers.verdict on constructed kernels whose answers are known, and its calibration at initialisation."""

import numpy as np
import pytest
import torch

from tests.fixtures.kernels import colour, gabor, noisy, towers_of
from towers.verdict import (
    COLOUR_CUT,
    MIN_DELTA_F,
    NOT_SPECIALISED,
    SENSITIVITY_CUTS,
    SPECIALISED,
    WEAK_FRACTION,
    classify,
    format_p,
    newcombe_interval,
    onset_step,
    verdict,
)

B = 1999


def grey_and_colour_towers():
    return towers_of(noisy(gabor(48, 0)), noisy(colour(48, 1)))


def test_a_grey_tower_beside_a_colour_tower_is_specialised_and_named():
    v = verdict(grey_and_colour_towers(), permutations=B)
    assert v.verdict == SPECIALISED and v.specialised
    assert (v.agnostic_tower, v.specific_tower) == (1, 2)
    assert v.colour_fraction == [0.0, 1.0] and v.delta_f == 1.0
    assert v.colour_fraction_low[1] > 0.9 and v.colour_fraction_high[0] < 0.1  # exact 95% intervals
    assert v.delta_f_low > 0.85 and v.p_delta_f == pytest.approx(1 / (B + 1)) and v.auc == 1.0
    assert v.energy_share[0] < 0.01 and v.energy_share[1] > 0.9
    assert v.grey_count == [48, 0] and v.colour_count == [0, 48] and v.weak_count == [0, 0]
    assert "specialised: Δf = 1.00" in v.summary() and "p ≤ 1e-3" in v.summary()
    # renumbering the GPUs changes only the names
    swapped = verdict(grey_and_colour_towers().flip(0), permutations=B)
    assert (swapped.agnostic_tower, swapped.specific_tower) == (2, 1) and swapped.delta_f == v.delta_f


def test_towers_each_half_grey_half_colour_are_not_specialised_and_name_no_tower():
    g, c = noisy(gabor(48, 0)), noisy(colour(48, 1))
    v = verdict(towers_of(torch.cat([g[:24], c[:24]]), torch.cat([g[24:], c[24:]])), permutations=B)
    assert v.verdict == NOT_SPECIALISED
    assert v.agnostic_tower is None and v.specific_tower is None
    assert v.colour_fraction == [0.5, 0.5] and v.delta_f == 0 and v.p_delta_f > 0.5
    assert "agnostic" not in v.summary()


def test_largely_means_more_than_half_both_ways():
    """A tower 100% colour beside one 40% colour differs by 0.6, but the second is not largely grey
    by a test: 29 of 48 grey has one-sided p = 0.09."""
    g, c = noisy(gabor(48, 0)), noisy(colour(96, 1))
    v = verdict(towers_of(torch.cat([g[:29], c[:19]]), c[48:]), permutations=B)
    assert v.delta_f == pytest.approx(1 - 19 / 48) and v.delta_f >= MIN_DELTA_F
    assert v.p_largely_agnostic > 0.05 and v.verdict == NOT_SPECIALISED


def test_weak_kernels_are_counted_apart_never_as_grey_or_colour():
    kernels = grey_and_colour_towers().clone()
    # kernels that stopped learning: random directions (score ~2/3, "colour") but a tenth of the norm
    kernels[0, :10] = 0.1 * torch.randn(10, 3, 11, 11, generator=torch.Generator().manual_seed(0)) / 19
    v = verdict(kernels, permutations=B)
    assert v.weak_count == [10, 0] and v.grey_count == [38, 0] and v.colour_fraction[0] == 0.0
    assert v.kernel_class[:10] == ["weak"] * 10 and v.verdict == SPECIALISED
    # without the weak rule they would have read as colour kernels in the grey tower
    assert classify(np.full(3, 0.66), [0.1, 1, 1], [1, 1, 1]).tolist() == [2, 1, 1]
    assert WEAK_FRACTION == 0.25 and COLOUR_CUT == pytest.approx(1 / 3)


@pytest.mark.parametrize("num_towers,colour_towers", [(3, [2]), (4, [2, 4]), (4, [1, 2, 3])])
def test_a_planted_bipartition_of_three_or_four_towers_is_found(num_towers, colour_towers):
    blocks = [noisy(colour(24, t) if t in colour_towers else gabor(24, t), seed=t) for t in range(1, num_towers + 1)]
    v = verdict(towers_of(*blocks), permutations=B)
    assert v.verdict == SPECIALISED and v.specific_group == colour_towers
    assert v.agnostic_group == [t for t in range(1, num_towers + 1) if t not in colour_towers]
    assert v.specific_tower in colour_towers and v.agnostic_tower not in colour_towers
    mixed = [noisy(torch.cat([gabor(12, t), colour(12, t)]), seed=t) for t in range(1, num_towers + 1)]
    assert verdict(towers_of(*mixed), permutations=B).verdict == NOT_SPECIALISED


def test_the_one_tower_control_judges_random_recorded_halves():
    one = grey_and_colour_towers().flatten(0, 1)[None]  # grey kernels first, colour last: a contiguous trap
    v = verdict(one, permutations=B, seed=5)
    assert v.control and v.towers == ["half A", "half B"] and len(v.control_split) == 48
    assert v.verdict == NOT_SPECIALISED and abs(v.delta_f) < MIN_DELTA_F


def test_sensitivity_table_over_cuts():
    v = verdict(grey_and_colour_towers(), permutations=B)
    assert [row["cut"] for row in v.sensitivity] == [round(c, 4) for c in SENSITIVITY_CUTS]
    assert all(row["verdict"] == SPECIALISED for row in v.sensitivity)


def test_at_initialisation_no_run_is_specialised_and_the_test_keeps_its_level():
    """A fast version of benchmarks/calibration.py: N(0, 0.01^2) kernels, the paper's initialisation."""
    called, significant = [], []
    for seed in range(40):
        w = 0.01 * torch.randn(2, 48, 3, 11, 11, generator=torch.Generator().manual_seed(seed))
        v = verdict(w, permutations=999, seed=seed, sensitivity=False)
        called.append(v.specialised)
        significant.append(v.p_delta_f < 0.05)
    assert sum(called) == 0  # every random kernel scores about 2/3: colour, so no tower is largely grey
    assert np.mean(significant) <= 0.15


def test_exchangeable_mixtures_are_rarely_called_specialised():
    """The hardest null for the rule: every kernel grey or colour with probability 1/2, whatever its tower."""
    rng = np.random.default_rng(0)
    g, c = noisy(gabor(96, 0)), noisy(colour(96, 1))
    called = 0
    for seed in range(30):
        pick = torch.as_tensor(rng.random(96) < 0.5)
        kernels = torch.where(pick.view(96, 1, 1, 1), g, c).view(2, 48, 3, 11, 11)
        called += verdict(kernels, permutations=999, seed=seed, sensitivity=False).specialised
    assert called <= 2


def test_newcombe_interval_and_p_formatting():
    lo, hi = newcombe_interval(10, 48, 40, 48)
    assert lo < 40 / 48 - 10 / 48 < hi and -1 <= lo and hi <= 1
    assert format_p(1 / 10000, 9999) == "≤ 1e-4" and format_p(0.0312, 9999) == "= 0.031"


def test_onset_uses_the_final_labelling_and_never_the_smallest_p():
    s, n = SPECIALISED, NOT_SPECIALISED
    history = [
        {"step": 0, "verdict": n},
        {"step": 10, "verdict": s, "agnostic_group": [2], "specific_group": [1]},
        {"step": 20, "verdict": s, "agnostic_group": [1], "specific_group": [2]},
        {"step": 30, "verdict": s, "agnostic_group": [1], "specific_group": [2]},
    ]
    assert onset_step(history) == 20  # step 10 had the towers the other way round
    assert onset_step(history[:1]) is None
    assert onset_step(history + [{"step": 40, "verdict": n}]) is None


def test_verdict_is_pure():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, towers.verdict\nassert not [m for m in sys.modules if m.startswith('lightning')]\n"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
