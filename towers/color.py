"""How colour-specific first-layer kernels are, and how strongly the towers split by it.

Pure functions on kernel tensors (torch or NumPy in, torch / Python numbers out), no Lightning,
so they work on any checkpoint or any saved ``(K, 3, h, w)`` array.

    energy = color_energy(model.conv1_kernels())        # per kernel: total, dc, ac in [0, 1]
    result = bisection(energy.total, tower_labels(2, 48))
    result.eta2, result.p_value, result.median, result.color_group

The score (the chromatic energy fraction) of a kernel w with RGB 3-vector w_p at pixel p and
luminance axis u = (1, 1, 1)/sqrt(3) is

    S = sum_p |w_p - (u . w_p) u|^2 / sum_p |w_p|^2

0 for a grey kernel (every w_p along u), 1 for a pure opponent-colour kernel (every w_p orthogonal
to u), 2/3 in expectation for i.i.d. Gaussian kernels (two of the three directions are chromatic),
which is why the score at initialisation must always be reported beside the trained one.
"""

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch

# Expected score of a kernel with i.i.d. Gaussian weights (what a fresh network has).
RANDOM_KERNEL_SCORE = 2 / 3


class ColorEnergy(NamedTuple):
    """Per-kernel colour scores, (K,) each; ``dc + ac == total``.

    ``dc``: the part of the chromatic energy in the kernel's mean colour (colour blobs);
    ``ac``: the part in its spatial variation (colour edges, opponent-colour gratings).
    """

    total: torch.Tensor
    dc: torch.Tensor
    ac: torch.Tensor


def as_kernels(kernels) -> torch.Tensor:
    """(K, 3, h, w) float64 CPU copy; (T, K/T, 3, h, w) is flattened tower after tower. The copy is in
    the standard memory format, so a score is bit-identical whether the weights were channels_last."""
    w = torch.as_tensor(np.asarray(kernels) if not isinstance(kernels, torch.Tensor) else kernels)
    w = w.detach().to("cpu", torch.float64, memory_format=torch.contiguous_format)
    if w.dim() == 5:
        w = w.flatten(0, 1)
    if w.dim() != 4 or w.shape[1] != 3:
        raise ValueError(
            f"expected kernels of shape (K, 3, h, w) or (towers, K/towers, 3, h, w) with the "
            f"colour channels on axis -3, got {tuple(w.shape)}"
        )
    return w


def raw_rgb_kernels(kernels, channel_std=None) -> torch.Tensor:
    """The kernels in raw-RGB input units, (K, 3, h, w) float64.

    If the network saw (x_c - mean_c) / std_c, a weight w_c acts on the raw pixel as w_c / std_c
    (the mean only shifts the bias). Without that division a channel that happened to be
    normalised by a small std would look more "coloured" than it is.
    """
    w = as_kernels(kernels)
    if channel_std is None:
        return w
    std = torch.as_tensor(np.asarray(channel_std, dtype=np.float64)).flatten()
    if std.shape != (3,) or not bool(torch.isfinite(std).all()) or bool((std <= 0).any()):
        raise ValueError(f"channel_std must be three positive finite numbers (R, G, B), got {std.tolist()}")
    return w / std.view(1, 3, 1, 1)


def unit_axis(axis=None) -> torch.Tensor:
    """The grey axis as a unit 3-vector: (1, 1, 1)/sqrt(3) by default, or e.g. the data's first RGB
    principal component (its sign does not matter)."""
    if axis is None:
        return torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    u = torch.as_tensor(np.asarray(axis, dtype=np.float64)).flatten()
    if u.shape != (3,) or not bool(torch.isfinite(u).all()) or float(u.norm()) == 0:
        raise ValueError(f"axis must be a non-zero finite RGB 3-vector, got {u.tolist()}")
    return u / u.norm()


def color_energy(kernels, channel_std=None, axis=None) -> ColorEnergy:
    """Chromatic energy fraction of each kernel and its DC / AC split.

    Args:
        kernels: (K, 3, h, w) or (T, K/T, 3, h, w), RGB on the colour axis.
        channel_std: per-channel std the inputs were divided by (R, G, B), or None for raw inputs.
        axis: the grey axis u; None for (1, 1, 1)/sqrt(3).

    Returns:
        ColorEnergy of (K,) float64 tensors in [0, 1]; NaN for a kernel whose weights are all zero.
    """
    w = raw_rgb_kernels(kernels, channel_std).flatten(2)  # (K, 3, pixels)
    u = unit_axis(axis).view(1, 3, 1)
    chroma = w - u * (u * w).sum(1, keepdim=True)  # the part of every w_p orthogonal to u
    energy = w.square().sum((1, 2))
    mean = chroma.mean(2, keepdim=True)
    # sum_p |c_p|^2 = pixels * |mean c|^2 + sum_p |c_p - mean c|^2: the cross term sums to zero.
    dc = chroma.shape[2] * mean.square().sum((1, 2))
    ac = (chroma - mean).square().sum((1, 2))
    total = chroma.square().sum((1, 2))
    nan = torch.tensor(float("nan"), dtype=torch.float64)

    def fraction(x):
        return torch.where(energy > 0, x / energy.clamp_min(torch.finfo(torch.float64).tiny), nan)

    return ColorEnergy(fraction(total), fraction(dc), fraction(ac))


def color_specificity(kernels, channel_std=None, axis=None) -> torch.Tensor:
    """One score per kernel in [0, 1]: 0 grey, 1 pure opponent colour, ~2/3 random. See :func:`color_energy`."""
    return color_energy(kernels, channel_std, axis).total


def tower_labels(num_towers: int, kernels_per_tower: int, first: int = 1) -> torch.Tensor:
    """Tower number of every kernel of ``conv1_kernels().flatten(0, 1)``: [1]*n + [2]*n + ..."""
    return torch.arange(first, first + num_towers).repeat_interleave(kernels_per_tower)


CONTROL_GROUPS = ("half A", "half B")


def control_halves(num_kernels: int, seed: int = 0) -> np.ndarray:
    """The one-tower control's split: (K,) bool, True for the kernels of half A (K // 2 of them, drawn at
    random with ``seed``). Random rather than the first and second half of the kernel index: kernels
    next to each other share LRN windows and may be correlated, and a contiguous split of correlated
    kernels would make the control anticonservative."""
    rng = np.random.default_rng([seed, 2])
    half_a = np.zeros(num_kernels, dtype=bool)
    half_a[rng.permutation(num_kernels)[: num_kernels // 2]] = True
    return half_a


@dataclass(frozen=True)
class Bisection:
    """How much of the score variance the towers explain, with its permutation test.

    Per-group lists are in the order of ``groups`` (the sorted tower labels; for the one-tower
    control the two random halves ``"half A"``, ``"half B"`` of :func:`control_halves`).
    """

    groups: list  # tower labels, sorted
    sizes: list  # kernels per group
    mean: list  # mean score per group
    median: list  # median score per group
    ci_low: list  # bootstrap percentile interval of the median, over kernels
    ci_high: list
    color_group: object  # the group with the highest median score (descriptive; the verdict names towers)
    eta2: float  # SS_between / SS_total of the scores with the groups as factor
    eta2_null: float  # its expectation under random labels: (G - 1) / (K - 1)
    p_value: float  # (1 + #{eta2_perm >= eta2}) / (permutations + 1)
    eta2_split: float  # largest two-group eta2 over all bipartitions of the groups (= eta2 for two)
    p_value_split: float  # the same test with the maximum taken again in every permutation
    color_side: list  # groups on the high-score side of that best bipartition
    control: bool  # True: one tower, split into two random halves as a control (control_split)
    permutations: int
    bootstrap: int
    ci_level: float
    seed: int
    omega2: float = math.nan  # (SS_between - (G - 1) MS_within) / (SS_total + MS_within): eta2 less its chance bias
    control_split: list | None = None  # the control's kernel indices in half A

    @property
    def p_floor(self) -> float:
        """The smallest p-value the test can give."""
        return 1 / (self.permutations + 1)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        side = (
            ""
            if len(self.groups) == 2
            else (
                f"; best bipartition {self.color_side} vs rest: eta2 = {self.eta2_split:.3f}, "
                f"p = {self.p_value_split:.2g}"
            )
        )
        kind = "one-tower control (two random halves of the kernels)" if self.control else "towers"
        return (
            f"{kind}: eta2 = {self.eta2:.3f} (chance {self.eta2_null:.3f}), p = {self.p_value:.2g} "
            f"({self.permutations} permutations, floor {self.p_floor:.2g}){side}"
        )


def _split_ss(sums: np.ndarray, sizes: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """SS_between of every bipartition (..., P) from centred group sums (..., G), ``sides`` (P, G):
    two groups with sums s and -s give s^2 / n_a + s^2 / (k - n_a)."""
    k, n_a = sizes.sum(), sides @ sizes
    return np.square(sums @ sides.T) * (k / (n_a * (k - n_a)))


def _eta2(x: np.ndarray, onehot: np.ndarray, sizes: np.ndarray, sides: np.ndarray, ss_total: float):
    """eta2 and the best two-group eta2 of every row of x (B, K): centred scores, one arrangement per
    row, groups fixed by ``onehot`` (K, G), bipartitions by ``sides`` (P, G)."""
    sums = x @ onehot  # (B, G) group sums; x is centred, so the grand sum is 0
    eta2 = (np.square(sums) / sizes).sum(1) / ss_total
    if len(sides) == 0:
        return eta2, eta2
    return eta2, _split_ss(sums, sizes, sides).max(1) / ss_total


def _medians(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Medians along the last axis of (..., G, n_max) arrays whose group g holds sizes[g] values
    followed by padding (the mean of the two middle values for an even count)."""
    padded = np.where(np.arange(values.shape[-1]) < sizes[:, None], values, np.inf)
    ordered = np.sort(padded, axis=-1)
    lower = np.take_along_axis(ordered, np.broadcast_to(((sizes - 1) // 2)[:, None], ordered.shape[:-1] + (1,)), -1)
    upper = np.take_along_axis(ordered, np.broadcast_to((sizes // 2)[:, None], ordered.shape[:-1] + (1,)), -1)
    return ((lower + upper) / 2)[..., 0]


def bisection(
    scores, towers, permutations: int = 9999, seed: int = 0, bootstrap: int = 2000, ci_level: float = 0.95
) -> Bisection:
    """eta^2 of the scores by tower, a permutation p-value, and per-tower medians with bootstrap intervals.

    Args:
        scores: (K,) one score per kernel (e.g. :func:`color_specificity`).
        towers: (K,) integer tower label of every kernel (e.g. :func:`tower_labels`). A single
            label is the one-tower control: the statistic is then computed for a random split of the
            kernels into two halves (:func:`control_halves` with ``seed``; kept as ``control_split``).
        permutations: B, how many random relabellings (tower sizes kept) form the null; at least 999.
        seed: seeds the permutations and the bootstrap; same inputs and seed give the same numbers.
        bootstrap, ci_level: resamples (over kernels, within a tower) for the interval of the median.

    Nothing depends on the names of the towers or on the order of the kernels: the data are put in
    a canonical order first (towers by their sorted scores, kernels by score), so renumbering the
    towers gives exactly the same numbers.
    """
    s = (
        scores.detach().cpu().double().numpy()
        if isinstance(scores, torch.Tensor)
        else np.asarray(scores, dtype=np.float64)
    ).ravel()
    labels = (towers.cpu().numpy() if isinstance(towers, torch.Tensor) else np.asarray(towers)).ravel()
    k = s.size
    if labels.size != k:
        raise ValueError(f"{k} scores but {labels.size} tower labels")
    if permutations < 999:
        raise ValueError(f"use at least 999 permutations (p-value floor 0.001), got {permutations}")
    bad = np.flatnonzero(~np.isfinite(s)).tolist()
    if bad:
        raise ValueError(
            f"scores of kernels {bad[:10]}{'...' if len(bad) > 10 else ''} are not finite (all-zero or NaN weights)"
        )

    names, index = np.unique(labels, return_inverse=True)
    names = [n.item() if isinstance(n, np.generic) else n for n in names]
    control = len(names) == 1
    control_split = None
    if control:
        half_a = control_halves(k, seed)
        control_split = np.flatnonzero(half_a).tolist()
        names, index = list(CONTROL_GROUPS), np.where(half_a, 0, 1)
    g = len(names)
    if k < 2 or np.bincount(index, minlength=g).min() < 1:
        raise ValueError(f"need at least two kernels and one per group, got {k} kernels")

    # Canonical order: groups ranked by (size, sorted scores), kernels by (score, group rank).
    keys = [(int((index == j).sum()), tuple(np.sort(s[index == j]))) for j in range(g)]
    rank = np.empty(g, dtype=np.int64)
    rank[sorted(range(g), key=keys.__getitem__)] = np.arange(g)
    order = np.lexsort((rank[index], s))
    values, group = s[order], rank[index][order]  # canonical kernels and their canonical groups
    canon_names = [names[j] for j in np.argsort(rank)]
    sizes = np.bincount(group, minlength=g).astype(np.float64)

    x = values - values.mean()
    ss_total = float(np.square(x).sum())
    if ss_total <= 0:
        raise ValueError("all scores are equal: eta2 is undefined")
    onehot = np.eye(g)[group]  # (K, G)
    # Bipartitions {A, rest} of the groups, each once: A is a non-empty subset without the last group.
    masks = np.arange(1, 2 ** (g - 1)) if g > 2 else np.zeros(0, dtype=np.int64)
    sides = ((masks[:, None] >> np.arange(g)) & 1).astype(np.float64)  # (P, G)
    eta2_obs, split_obs = (float(v[0]) for v in _eta2(x[None], onehot, sizes, sides, ss_total))
    ss_between = eta2_obs * ss_total
    ms_within = (ss_total - ss_between) / max(k - g, 1)

    # All permutations at once (in chunks that bound memory for many towers): row b of x[perm] is
    # one random relabelling with the tower sizes kept.
    rng = np.random.default_rng(seed)
    tol = 1e-12  # the identity permutation must count as ">=" despite rounding in another summation order
    hits = hits_split = 0
    chunk = max(1, min(permutations, 2**22 // max(k, len(sides))))
    for start in range(0, permutations, chunk):
        perm = rng.random((min(chunk, permutations - start), k)).argsort(1)
        eta2_perm, split_perm = _eta2(x[perm], onehot, sizes, sides, ss_total)
        hits += int((eta2_perm >= eta2_obs - tol).sum())
        hits_split += int((split_perm >= split_obs - tol).sum())
    p_value = (1 + hits) / (permutations + 1)
    p_split = (1 + hits_split) / (permutations + 1)
    if g == 2:  # one bipartition: the same statistic
        split_obs, p_split = eta2_obs, p_value

    # Per group: mean, median, and a percentile bootstrap of the median over its kernels, all groups
    # at once in a (G, largest group) array.
    n_max, counts = int(sizes.max()), sizes.astype(np.int64)
    by_group = np.argsort(group, kind="stable")
    table = np.zeros((g, n_max))
    table[group[by_group], np.arange(k) - (np.cumsum(counts) - counts)[group[by_group]]] = values[by_group]
    means = (onehot.T @ values) / sizes
    medians = _medians(table, counts)
    draws = (np.random.default_rng([seed, 1]).random((bootstrap, g, n_max)) * sizes[:, None]).astype(np.int64)
    boot = _medians(np.take_along_axis(np.broadcast_to(table, draws.shape), draws, -1), counts)
    alpha = (1 - ci_level) / 2
    ci = np.quantile(boot, [alpha, 1 - alpha], axis=0)  # (2, G)

    best = max(range(g), key=lambda j: (medians[j], means[j], j))
    if g > 2:  # which bipartition gave eta2_split, and its side with the higher mean score
        sums = x @ onehot
        side_a = sides[int(np.argmax(_split_ss(sums, sizes, sides)))].astype(bool)
        high = side_a if sums[side_a].sum() > 0 else ~side_a
        color_side = [n for n in names if high[canon_names.index(n)]]
    else:
        color_side = [canon_names[best]]

    back = [canon_names.index(n) for n in names]  # report in the sorted order of the labels
    return Bisection(
        groups=names,
        sizes=[int(counts[j]) for j in back],
        mean=[float(means[j]) for j in back],
        median=[float(medians[j]) for j in back],
        ci_low=[float(ci[0, j]) for j in back],
        ci_high=[float(ci[1, j]) for j in back],
        color_group=canon_names[best],
        eta2=eta2_obs,
        eta2_null=(g - 1) / (k - 1),
        p_value=p_value,
        eta2_split=split_obs,
        p_value_split=p_split,
        color_side=color_side,
        control=control,
        permutations=permutations,
        bootstrap=bootstrap,
        ci_level=ci_level,
        seed=seed,
        omega2=(ss_between - (g - 1) * ms_within) / (ss_total + ms_within),
        control_split=control_split,
    )
