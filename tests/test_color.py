"""towers.color on constructed kernels whose answers are known, and the eta2 statistics that
towers.verdict.verdict computes from its scores (one engine, one permutation loop)."""

import itertools
import math

import numpy as np
import pytest
import torch

from towers.color import (
    RANDOM_KERNEL_SCORE,
    color_energy,
    color_specificity,
    control_halves,
    control_partition,
    dominant_frequency,
    movement,
    tower_labels,
)
from towers.verdict import verdict

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


def eta2_of(kernels, labels, permutations=B, seed=0, **kwargs):
    """The engine's eta2 numbers, nothing else asked of it."""
    return verdict(kernels, labels, permutations=permutations, seed=seed, sensitivity=False, margin=False, **kwargs)


def drifting(rng, effect=0.0, k=96):
    """Random kernels whose chromatic part is scaled per kernel by exp(drift): scores vary smoothly."""
    base = torch.as_tensor(rng.normal(size=(k, 3, 11, 11)))
    grey_part = base.mean(1, keepdim=True).expand_as(base)
    scale = torch.as_tensor(np.broadcast_to(np.exp(effect), k).copy()).view(k, 1, 1, 1)
    return grey_part + scale * (base - grey_part)


def test_grey_tower_and_colour_tower_split_completely():
    kernels = grey_and_colour()
    scores, labels = color_specificity(kernels), tower_labels(2, 48)
    result = eta2_of(kernels, labels)
    assert result.eta2 > 0.99
    assert math.isclose(result.eta2, eta2_reference(scores.numpy(), labels.numpy()), rel_tol=1e-12)
    assert result.p_eta2 == 1 / (B + 1) and result.p_eta2_split == result.p_eta2
    assert result.color_side == [2] and not result.control
    assert result.towers == [1, 2] and result.sizes == [48, 48]
    assert result.median[0] < 0.05 < 0.95 < result.median[1]
    for lo, med, hi in zip(result.median_low, result.median, result.median_high):
        assert lo <= med <= hi
    assert result.eta2_null == pytest.approx(1 / 95) and result.omega2 < result.eta2
    d = result.statistics()
    assert d["eta2"] == result.eta2 and d["groups"] == [1, 2] and d["color_group"] == 2


def test_mixed_labels_give_a_large_p():
    alternating = torch.arange(96) % 2 + 1  # each tower half grey, half coloured
    result = eta2_of(grey_and_colour(), alternating)
    assert result.eta2 < 0.02
    assert result.p_eta2 > 0.2


def test_renumbering_towers_and_reordering_kernels_changes_nothing():
    rng = np.random.default_rng(3)
    labels = tower_labels(2, 48)
    kernels = drifting(rng, 0.03 * (labels.numpy() == 2))  # a weak effect: p far from its floor
    base = eta2_of(kernels, labels)
    assert 0.001 < base.p_eta2 < 0.5
    order = torch.as_tensor(rng.permutation(96))
    renamed = eta2_of(kernels[order], (3 - labels)[order] * 10)  # tower 1 -> 20, tower 2 -> 10
    assert (renamed.eta2, renamed.p_eta2) == pytest.approx((base.eta2, base.p_eta2), rel=1e-12)
    assert renamed.towers == [10, 20] and renamed.median == base.median[::-1]

    labels4 = tower_labels(4, 24)
    four = drifting(rng, 0.05 * (labels4.numpy() == 3))
    base4 = eta2_of(four, labels4)
    mapping = torch.tensor([0, 4, 1, 3, 2])  # tower t -> mapping[t]
    renamed4 = eta2_of(four[order], mapping[labels4][order])
    assert (renamed4.eta2, renamed4.p_eta2, renamed4.eta2_split, renamed4.p_eta2_split) == pytest.approx(
        (base4.eta2, base4.p_eta2, base4.eta2_split, base4.p_eta2_split), rel=1e-12
    )
    assert renamed4.color_side == sorted(int(mapping[t]) for t in base4.color_side)


def test_seed_fixes_the_p_value():
    kernels, labels = drifting(np.random.default_rng(4)), tower_labels(2, 48)
    assert eta2_of(kernels, labels, 999, seed=5).p_eta2 == eta2_of(kernels, labels, 999, seed=5).p_eta2
    assert len({eta2_of(kernels, labels, 999, seed=s).p_eta2 for s in range(3)}) > 1


def test_permutation_null_matches_its_expectation_and_p_is_calibrated():
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 2, 3], 32)
    # eta2 of random labellings has mean (T - 1) / (K - 1)
    null = [eta2_reference(rng.random(96), labels) for _ in range(400)]
    assert np.mean(null) == pytest.approx(2 / 95, rel=0.15)
    # under the null the p-value is uniform: about 10% of data sets fall at or below 0.1
    p = np.array([eta2_of(drifting(rng), labels, 999, seed=i, bootstrap=0).p_eta2 for i in range(40)])
    assert 0.02 <= (p <= 0.1).mean() <= 0.25


def test_one_tower_control_splits_the_kernels_into_random_recorded_groups():
    kernels = grey_and_colour()  # grey first half, coloured second half
    control = eta2_of(kernels, torch.ones(96, dtype=torch.long), seed=3)
    assert control.control and control.towers == ["half A", "half B"]
    half_a = control_halves(96, 3)
    assert control.control_split == np.flatnonzero(half_a).tolist() and half_a.sum() == 48
    # the recorded split is the one tested: the same as two "towers" made of those halves
    as_two = eta2_of(kernels, torch.as_tensor(np.where(half_a, 1, 2)), seed=3)
    assert control.eta2 == pytest.approx(as_two.eta2, abs=1e-12)
    # a random split does not follow the kernel index: the contiguous grey/colour blocks do not separate
    assert control.p_eta2 > 0.01 and eta2_of(kernels, tower_labels(2, 48)).p_eta2 < 0.001
    assert not np.array_equal(control_halves(96, 3), control_halves(96, 4))  # seeded
    assert eta2_of(kernels[:95], torch.ones(95), 999).sizes == [47, 48]
    three = control_partition(97, 3, 0)
    assert (
        np.bincount(three).tolist() == [32, 32, 33] and (control_partition(96, 2, 3) == 0).tolist() == half_a.tolist()
    )


def test_correlated_neighbours_do_not_fool_the_random_control():
    """Kernels whose scores drift along the kernel index (as neighbours sharing LRN windows may) make
    a contiguous-halves control anticonservative; random halves keep it near its level."""
    rng = np.random.default_rng(0)
    random_halves, contiguous = [], []
    for i in range(25):
        kernels = drifting(rng, np.cumsum(rng.normal(size=96)) * 0.1)  # strongly lag-correlated scores
        random_halves.append(eta2_of(kernels, np.ones(96), 999, seed=i, bootstrap=0).p_eta2)
        contiguous.append(eta2_of(kernels, tower_labels(2, 48), 999, seed=i, bootstrap=0).p_eta2)
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
    result = eta2_of(kernels, tower_labels(4, 24))
    assert result.color_side == [2, 4]
    assert result.eta2_split > 0.99 and result.p_eta2_split == 1 / (B + 1)
    assert result.eta2_null == pytest.approx(3 / 95)

    random_kernels, labels5 = drifting(np.random.default_rng(1), k=120), tower_labels(5, 24)
    r = eta2_of(random_kernels, labels5, 999)
    reference = best_split_reference(color_specificity(random_kernels).numpy(), labels5.numpy())
    assert r.eta2_split == pytest.approx(reference, rel=1e-10)
    assert r.eta2_split <= r.eta2 + 1e-12  # merging towers can only lose explained variance
    assert r.p_eta2_split > 0.01


def test_bad_input_is_refused_with_a_message():
    kernels = drifting(np.random.default_rng(2))
    with pytest.raises(ValueError, match="at least 999"):
        eta2_of(kernels, tower_labels(2, 48), 100)
    with pytest.raises(ValueError, match="96 kernels but 95"):
        eta2_of(kernels, tower_labels(2, 48)[:95])
    with pytest.raises(ValueError, match="not finite"):
        eta2_of(torch.where(torch.arange(96).view(96, 1, 1, 1) == 3, float("nan"), kernels), tower_labels(2, 48))
    with pytest.raises(ValueError, match=r"kernels \[3\] are all zero"):
        eta2_of(torch.where(torch.arange(96).view(96, 1, 1, 1) == 3, 0.0, kernels), tower_labels(2, 48))


def test_movement_and_dominant_frequency():
    w0 = torch.randn(4, 3, 11, 11, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(movement(w0 * 3, w0), torch.full((4,), 2.0, dtype=torch.float64))
    x = torch.arange(11.0)
    stripes = torch.cos(2 * math.pi * 0.25 * x).expand(11, 11)  # a vertical grating, 4 px period
    flat = torch.ones(11, 11)
    kernels = torch.stack([stripes, flat]).unsqueeze(1).expand(2, 3, 11, 11)
    f = dominant_frequency(kernels)
    assert f[1] == 0 and abs(f[0] - 0.25) < 1 / 11  # the nearest frequency of an 11-point transform


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
