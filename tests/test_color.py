"""towers.color on constructed kernels whose answers are known."""

import itertools
import math

import numpy as np
import pytest
import torch

from towers.color import RANDOM_KERNEL_SCORE, bisection, color_energy, color_specificity, control_halves, tower_labels

B = 9999


def grey(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 11, 11, generator=g).expand(n, 3, 11, 11).clone()


def opponent(n, seed=1):
    """Every pixel's RGB vector orthogonal to (1, 1, 1): red-green and blue-yellow patterns."""
    g = torch.Generator().manual_seed(seed)
    red_green, blue_yellow = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([-0.5, -0.5, 1.0])
    a, b = torch.randn(2, n, 1, 11, 11, generator=g)
    return a * red_green.view(1, 3, 1, 1) + b * blue_yellow.view(1, 3, 1, 1)


def grey_and_colour(seed=0):
    """48 grey kernels (tower 1) then 48 coloured ones (tower 2), each slightly perturbed so scores differ."""
    g = torch.Generator().manual_seed(seed)
    kernels = torch.cat([grey(48, seed), opponent(48, seed + 1)])
    return kernels + 0.05 * torch.randn(kernels.shape, generator=g)


def test_grey_kernels_score_zero_and_opponent_kernels_one():
    assert torch.allclose(color_specificity(grey(20)), torch.zeros(20, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(color_specificity(opponent(20)), torch.ones(20, dtype=torch.float64), atol=1e-12)


def test_random_gaussian_kernels_score_two_thirds():
    scores = color_specificity(torch.randn(2000, 3, 11, 11, generator=torch.Generator().manual_seed(0)))
    assert abs(scores.mean().item() - RANDOM_KERNEL_SCORE) < 0.005
    assert scores.min() > 0.4 and scores.max() < 0.9  # 363 weights per kernel: the ratio concentrates


def test_dc_and_ac_parts_add_up_and_separate_blobs_from_edges():
    kernels = torch.randn(50, 3, 11, 11, generator=torch.Generator().manual_seed(0))
    e = color_energy(kernels)
    assert torch.allclose(e.dc + e.ac, e.total, atol=1e-12)
    assert (e.dc >= 0).all() and (e.ac >= 0).all()
    # a uniform red blob: all colour energy in the mean; a zero-mean red/green grating: none in it
    blob = torch.zeros(1, 3, 11, 11)
    blob[:, 0] = 1
    grating = torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1) * torch.sign(torch.arange(11.0) - 5).view(1, 1, 1, 11)
    e_blob, e_grating = color_energy(blob), color_energy(grating)
    assert math.isclose(e_blob.dc.item(), 2 / 3, abs_tol=1e-12) and math.isclose(e_blob.ac.item(), 0, abs_tol=1e-12)
    assert math.isclose(e_grating.dc.item(), 0, abs_tol=1e-12) and math.isclose(e_grating.ac.item(), 1, abs_tol=1e-12)


def test_scores_are_taken_in_raw_rgb_units():
    # the network saw x_c / std_c; a kernel w_c = g * std_c is grey for the raw image
    std = torch.tensor([0.2, 0.5, 1.0])
    seen_by_network = grey(10) * std.view(1, 3, 1, 1)
    assert torch.allclose(
        color_specificity(seen_by_network, channel_std=std), torch.zeros(10, dtype=torch.float64), atol=1e-12
    )
    assert (color_specificity(seen_by_network) > 0.1).all()
    with pytest.raises(ValueError, match="positive"):
        color_specificity(seen_by_network, channel_std=[1.0, 0.0, 1.0])


def test_grey_axis_can_be_the_datas_first_principal_component():
    axis = torch.tensor([0.62, 0.58, 0.53])
    along_axis = torch.randn(10, 1, 11, 11) * axis.view(1, 3, 1, 1)
    assert torch.allclose(color_specificity(along_axis, axis=axis), torch.zeros(10, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(
        color_specificity(along_axis, axis=-3 * axis), torch.zeros(10, dtype=torch.float64), atol=1e-12
    )  # sign and length of the axis do not matter
    assert (color_specificity(along_axis) > 1e-3).all()


def test_tower_shaped_input_is_flattened_tower_after_tower():
    kernels = torch.randn(4, 12, 3, 11, 11)
    assert torch.equal(color_specificity(kernels), color_specificity(kernels.flatten(0, 1)))
    assert torch.equal(color_specificity(kernels.numpy()), color_specificity(kernels))
    assert torch.isnan(color_specificity(torch.zeros(1, 3, 11, 11))).all()  # no energy: no score
    with pytest.raises(ValueError, match="colour channels"):
        color_specificity(torch.randn(5, 4, 11, 11))


def eta2_reference(scores, labels):
    """Textbook one-way ANOVA effect size, written with loops as an independent check."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels)
    grand = scores.mean()
    between = sum((labels == t).sum() * (scores[labels == t].mean() - grand) ** 2 for t in np.unique(labels))
    return between / ((scores - grand) ** 2).sum()


def test_grey_tower_and_colour_tower_split_completely():
    scores = color_specificity(grey_and_colour())
    result = bisection(scores, tower_labels(2, 48), permutations=B)
    assert result.eta2 > 0.99
    assert math.isclose(result.eta2, eta2_reference(scores, tower_labels(2, 48)), rel_tol=1e-12)
    assert result.p_value == result.p_floor == 1 / (B + 1)
    assert result.color_group == 2 and result.color_side == [2] and not result.control
    assert result.groups == [1, 2] and result.sizes == [48, 48]
    assert result.median[0] < 0.05 < 0.95 < result.median[1]
    for lo, med, hi in zip(result.ci_low, result.median, result.ci_high):
        assert lo <= med <= hi
    assert result.eta2_null == pytest.approx(1 / 95)
    d = result.to_dict()
    assert d["eta2"] == result.eta2 and d["groups"] == [1, 2]


def test_mixed_labels_give_a_large_p():
    scores = color_specificity(grey_and_colour())
    alternating = torch.arange(96) % 2 + 1  # each tower half grey, half coloured
    result = bisection(scores, alternating, permutations=B)
    assert result.eta2 < 0.02
    assert result.p_value > 0.2


def test_renumbering_towers_and_reordering_kernels_changes_nothing():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(96, generator=g) + 0.08 * (torch.arange(96) >= 48)  # a weak effect: p far from its floor
    labels = tower_labels(2, 48)
    base = bisection(scores, labels, permutations=B)
    assert 0.001 < base.p_value < 0.5
    order = torch.randperm(96, generator=g)
    renamed = bisection(scores[order], (3 - labels)[order] * 10, permutations=B)  # tower 1 -> 20, tower 2 -> 10
    assert (renamed.eta2, renamed.p_value) == (base.eta2, base.p_value)
    assert renamed.groups == [10, 20] and renamed.color_group == 10
    assert renamed.median == base.median[::-1] and renamed.ci_low == base.ci_low[::-1]

    four = torch.rand(96, generator=g) + 0.15 * (tower_labels(4, 24) == 3)
    base4 = bisection(four, tower_labels(4, 24), permutations=B)
    mapping = torch.tensor([0, 4, 1, 3, 2])  # tower t -> mapping[t]
    renamed4 = bisection(four[order], mapping[tower_labels(4, 24)][order], permutations=B)
    assert (renamed4.eta2, renamed4.p_value, renamed4.eta2_split, renamed4.p_value_split) == (
        base4.eta2,
        base4.p_value,
        base4.eta2_split,
        base4.p_value_split,
    )
    assert renamed4.color_side == [int(mapping[t]) for t in base4.color_side]


def test_seed_fixes_the_p_value():
    scores = torch.rand(96, generator=torch.Generator().manual_seed(4))
    labels = tower_labels(2, 48)
    assert bisection(scores, labels, seed=5).p_value == bisection(scores, labels, seed=5).p_value
    assert len({bisection(scores, labels, seed=s).p_value for s in range(3)}) > 1


def test_permutation_null_matches_its_expectation_and_p_is_calibrated():
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 2, 3], 32)
    # eta2 of random labellings has mean (T - 1) / (K - 1)
    null = [eta2_reference(rng.random(96), labels) for _ in range(400)]
    assert np.mean(null) == pytest.approx(2 / 95, rel=0.15)
    # under the null the p-value is uniform: about 10% of data sets fall at or below 0.1
    p = np.array([bisection(rng.random(96), labels, permutations=999, seed=i).p_value for i in range(120)])
    assert 0.03 <= (p <= 0.1).mean() <= 0.2


def test_one_tower_control_splits_the_kernels_into_random_recorded_halves():
    scores = color_specificity(grey_and_colour())  # grey first half, coloured second half
    control = bisection(scores, torch.ones(96, dtype=torch.long), permutations=B, seed=3)
    assert control.control and control.groups == ["half A", "half B"]
    half_a = control_halves(96, 3)
    assert control.control_split == np.flatnonzero(half_a).tolist() and half_a.sum() == 48
    # the recorded split is the one tested: the same as two "towers" made of those halves
    as_two = bisection(scores, torch.as_tensor(np.where(half_a, 1, 2)), permutations=B, seed=3)
    assert control.eta2 == pytest.approx(as_two.eta2, abs=1e-12)
    # a random split does not follow the kernel index: the contiguous grey/colour blocks do not separate
    assert control.p_value > 0.01 and bisection(scores, tower_labels(2, 48), permutations=B).p_value < 0.001
    assert not np.array_equal(control_halves(96, 3), control_halves(96, 4))  # seeded
    odd = bisection(scores[:95], torch.ones(95), permutations=999)
    assert odd.sizes == [47, 48]


def test_correlated_neighbours_do_not_fool_the_random_control():
    """Kernels whose scores drift along the kernel index (as neighbours sharing LRN windows may) make
    a contiguous-halves control anticonservative; random halves keep it near its level."""
    rng = np.random.default_rng(0)
    random_halves, contiguous = [], []
    for i in range(60):
        drift = np.cumsum(rng.normal(size=96)) * 0.3 + rng.normal(size=96)  # strongly lag-correlated
        random_halves.append(bisection(drift, np.ones(96), permutations=999, seed=i, bootstrap=10).p_value)
        contiguous.append(bisection(drift, tower_labels(2, 48), permutations=999, seed=i, bootstrap=10).p_value)
    assert np.mean(np.array(random_halves) < 0.05) <= 0.15
    assert np.mean(np.array(contiguous) < 0.05) >= 0.3  # what the old control would have said


def best_split_reference(scores, labels):
    names = sorted(set(labels.tolist()))
    best = 0.0
    for r in range(1, len(names)):
        for side in itertools.combinations(names, r):
            best = max(best, eta2_reference(scores, np.isin(labels, side)))
    return best


def test_more_than_two_towers_also_get_the_best_bipartition():
    # towers 2 and 4 coloured, 1 and 3 grey: the best split is {2, 4} vs {1, 3}
    kernels = torch.cat([grey(24, 0), opponent(24, 1), grey(24, 2), opponent(24, 3)])
    kernels = kernels + 0.05 * torch.randn(kernels.shape, generator=torch.Generator().manual_seed(0))
    scores, labels = color_specificity(kernels), tower_labels(4, 24)
    result = bisection(scores, labels, permutations=B)
    assert result.color_side == [2, 4]
    assert result.eta2_split > 0.99 and result.p_value_split == result.p_floor
    assert result.eta2_null == pytest.approx(3 / 95)

    random_scores = torch.rand(120, generator=torch.Generator().manual_seed(1))
    labels5 = tower_labels(5, 24)
    r = bisection(random_scores, labels5, permutations=999)
    assert r.eta2_split == pytest.approx(best_split_reference(random_scores.numpy(), labels5.numpy()), rel=1e-10)
    assert r.eta2_split <= r.eta2 + 1e-12  # merging towers can only lose explained variance
    assert r.p_value_split > 0.01


def test_bad_input_is_refused_with_a_message():
    scores = torch.rand(96)
    with pytest.raises(ValueError, match="at least 999"):
        bisection(scores, tower_labels(2, 48), permutations=100)
    with pytest.raises(ValueError, match="96 scores but 95"):
        bisection(scores, tower_labels(2, 48)[:95])
    with pytest.raises(ValueError, match=r"kernels \[3\]"):
        bisection(torch.where(torch.arange(96) == 3, float("nan"), scores), tower_labels(2, 48))
    with pytest.raises(ValueError, match="all scores are equal"):
        bisection(torch.zeros(96), tower_labels(2, 48))


def test_the_colour_score_imports_without_lightning():
    """towers.color is pure (torch and numpy): scoring a checkpoint must not need Lightning, and the
    package's lazy exports still resolve."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, towers.color, towers.files\n"
        "assert not [m for m in sys.modules if m.startswith('lightning')], 'Lightning was imported'\n"
        "import towers\n"
        "assert towers.TowerAlexNet.__name__ == 'TowerAlexNet'\n"
        "try:\n    towers.NoSuchThing\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
