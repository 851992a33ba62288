"""The verdict: is one tower's first layer largely colour-agnostic and another's largely colour-specific?

Pure functions (torch, NumPy, scipy; no Lightning), so they work on any checkpoint, saved array or
kernel grid read from a published figure (``analysis/kernels.py``). One function, one permutation loop,
answers the verdict and the eta2 statistics:

    v = verdict(model.conv1_kernels(), initial=kernels_at_init)   # (towers, n, 3, h, w), RGB
    v.verdict, v.reason, v.margin, v.delta_f, v.colour_fraction, v.eta2, v.p_eta2
    v.summary()                                                     # one line

The paper's claim (§6.1): "The kernels on GPU 1 are largely color-agnostic, while the kernels on GPU 2
are largely color-specific. This kind of specialization occurs during every run". The rule, derived
from those words and written down before it met a real network, is the README's "The verdict"; its
constants live here only:

1. Every kernel is *weak* (norm below WEAK_FRACTION of the median norm over all towers), *unstructured*
   (moved less than MOVEMENT_MIN times its initial norm; without initial kernels: a spatial power
   spectrum as flat as white noise's, STRUCTURE_QUANTILE), else *colour* (score >= COLOUR_CUT) or *grey*.
2. A tower is largely agnostic when more than LARGELY of all its kernels are grey, largely specific when
   more than LARGELY are colour (weak and unstructured kernels count for neither).
3. Sides by each tower's majority; Delta f = pooled colour fraction (colour / (grey + colour)) of the
   specific side minus the agnostic side; its permutation p re-chooses the sides in every relabelling.
4. Specialised: both sides non-empty and p < ALPHA. The margin: kernels that would have to change class.

One tower is the control: its kernels are split into ``control_groups`` seeded random groups and judged
exactly like that many towers.
"""

import contextlib
import functools
import math

import numpy as np
import torch

from towers.color import (
    color_energy,
    control_group_names,
    control_partition,
    dominant_frequency,
    effective_frequencies,
    movement,
    raw_rgb_kernels,
    white_noise_frequencies,
)
from towers.verdict_result import NOT_SPECIALISED, SPECIALISED, Verdict, _finite, _pct, _plain, format_p  # noqa: F401

# --- the decision rule: written down before any result (README, "The verdict") --------------------
# A kernel is colour when its chromatic energy fraction is at least 1/3: half the level of an
# unstructured (random) kernel, 2/3, in the valley between grey kernels (near 0) and colour ones
# (blobs 2/3 and above, opponent gratings near 1).
COLOUR_CUT = 1 / 3
# Weak: norm below a quarter of the median norm over ALL kernels (under 1/16 of a typical kernel's
# energy); the median over all towers, so no tower can drag its own reference down.
WEAK_FRACTION = 1 / 4
# Unstructured, with initial kernels: ||W - W0|| < ||W0||. A grey learned part beside orthogonal
# leftover noise of equal energy scores (2/3) / 2 = 1/3, the colour cut: below that a grey kernel can
# read as colour from its noise alone.
MOVEMENT_MIN = 1.0
# Unstructured, without: the effective number of spatial frequencies at or above the 1% quantile of
# i.i.d. Gaussian kernels of the same size (a fresh tower of 48 then has half a kernel read as structured).
STRUCTURE_QUANTILE = 0.01
# "Largely": for the most part, more than half of the tower's kernels; a count over the whole tower.
LARGELY = 1 / 2
# The one test, where chance can explain what is seen: the towers differ more than random labels make them.
ALPHA = 0.05
SENSITIVITY_CUTS = (0.1, 0.2, 0.3, 1 / 3, 0.4, 0.5)
# Dominant-frequency bands, cycles/pixel: low (period over 8 px), mid (4 to 8 px), high (under 4 px).
FREQUENCY_BANDS = (0.0, 1 / 8, 1 / 4, 1.0)
GREY, COLOUR, WEAK, UNSTRUCTURED = "grey", "colour", "weak", "unstructured"
CLASSES = (GREY, COLOUR, WEAK, UNSTRUCTURED)  # codes 0, 1, 2, 3


# --- the rule on counts, vectorised over permutations --------------------------------------------


def classify(scores, norms, unstructured=None, cut: float = COLOUR_CUT, weak_fraction: float = WEAK_FRACTION):
    """Per kernel 0 grey, 1 colour, 2 weak, 3 unstructured (int array). Weak is judged against the
    median norm over all kernels given; weak before unstructured."""
    s, n = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(norms, dtype=np.float64).ravel()
    u = np.zeros(s.size, bool) if unstructured is None else np.asarray(unstructured, bool).ravel()
    weak = n < weak_fraction * np.median(n)
    return np.where(weak, 2, np.where(u, 3, (s >= cut).astype(np.int64)))


def _sides(grey: np.ndarray, colour: np.ndarray, total: np.ndarray):
    """The rule on counts (..., G): (delta f (...), specific (..., G), agnostic (..., G)); delta is NaN
    where a side is empty."""
    specific, agnostic = colour > LARGELY * total, grey > LARGELY * total
    cs, gs = (colour * specific).sum(-1), (grey * specific).sum(-1)
    ca, ga = (colour * agnostic).sum(-1), (grey * agnostic).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = cs / (cs + gs) - ca / (ca + ga)
    return np.where(specific.any(-1) & agnostic.any(-1), delta, np.nan), specific, agnostic


def split_statistic(classes, groups, num_groups: int):
    """The rule on class vectors: ``classes`` (B, K) or (K,) codes (0 grey, 1 colour, 2 weak,
    3 unstructured), ``groups`` (K,) 0..G-1. Returns delta f (B,) (NaN where a side is empty) and the
    specific and agnostic sides (B, G) bool. For simulations of many runs."""
    c = np.atleast_2d(np.asarray(classes))
    onehot = np.eye(num_groups)[np.asarray(groups)]
    total = onehot.sum(0)
    return _sides((c == 0) @ onehot, (c == 1) @ onehot, total)


@functools.lru_cache(maxsize=1)
def _arrangements(seed: int, permutations: int, k: int) -> tuple:
    """The permutations, in chunks that bound memory: (b, K) int32, one random arrangement per row, with
    its inverse.
    The same (seed, permutations, K) give the same arrangements, so every test shares them: drawn once
    (the sort is most of a test's cost) and kept, read-only, for the margin's tests (one entry: at most permutations x K x 8 bytes stay)."""
    rng = np.random.default_rng([seed, 3])
    chunk = max(1, min(permutations, 2**21 // max(k, 1)))
    chunks = []
    for start in range(0, permutations, chunk):
        rows = rng.random((min(chunk, permutations - start), k)).argsort(1).astype(np.int32)
        inverse = np.empty_like(rows)  # inverse[b, rows[b, i]] = i: where each kernel lands
        np.put_along_axis(inverse, rows, np.arange(k, dtype=np.int32)[None], 1)
        rows.flags.writeable = inverse.flags.writeable = False
        chunks.append((rows, inverse))
    return tuple(chunks)


@contextlib.contextmanager
def _one_thread():
    """Run torch on one thread: the kernel tensors here are tiny (96 x 363), so splitting an op over
    threads costs more than it saves (tens of ms per op when the other cores are busy). The results do
    not depend on the thread count (tests/test_verdict.py pins them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _best_cut(sums: np.ndarray, sizes: np.ndarray):
    """Largest two-sided SS_between over bipartitions of the groups, for centred group sums (B, G).
    Exact without trying all 2^(G-1) bipartitions: in one dimension the best two-cluster split of the
    group means (weighted by size) is a cut of them in sorted order, so G - 1 cuts suffice. Returns
    (B,) SS, the (B, G) order and the (B,) cut index (side = order[cut + 1:] is the high side)."""
    k = sizes.sum()
    order = np.argsort(sums / sizes, axis=-1, kind="stable")
    s = np.take_along_axis(sums, order, -1).cumsum(-1)[..., :-1]
    n = sizes[order].cumsum(-1)[..., :-1]
    ss = np.square(s) * (k / (n * (k - n)))
    cut = ss.argmax(-1)
    return np.take_along_axis(ss, cut[..., None], -1)[..., 0], order, cut


def _medians(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Medians along the last axis of (..., G, n_max) arrays whose group g holds sizes[g] values
    followed by padding (the mean of the two middle values for an even count)."""
    padded = np.where(np.arange(values.shape[-1]) < sizes[:, None], values, np.inf)
    ordered = np.sort(padded, axis=-1)
    lower = np.take_along_axis(ordered, np.broadcast_to(((sizes - 1) // 2)[:, None], ordered.shape[:-1] + (1,)), -1)
    upper = np.take_along_axis(ordered, np.broadcast_to((sizes // 2)[:, None], ordered.shape[:-1] + (1,)), -1)
    return ((lower + upper) / 2)[..., 0]


def _median_intervals(scores, index, g, bootstrap, seed, ci_level):
    """Per group mean, median and percentile-bootstrap interval of the median (all groups at once)."""
    counts = np.bincount(index, minlength=g)
    by_group = np.argsort(index, kind="stable")
    table = np.zeros((g, counts.max()))
    table[index[by_group], np.arange(index.size) - (np.cumsum(counts) - counts)[index[by_group]]] = scores[by_group]
    means = np.bincount(index, scores, g) / counts
    medians = _medians(table, counts)
    if bootstrap <= 0:
        return means, medians, np.full(g, np.nan), np.full(g, np.nan)
    draws = (np.random.default_rng([seed, 1]).random((bootstrap, g, counts.max())) * counts[:, None]).astype(np.int64)
    boot = _medians(np.take_along_axis(np.broadcast_to(table, draws.shape), draws, -1), counts)
    tail = (1 - ci_level) / 2
    lo, hi = np.quantile(boot, [tail, 1 - tail], axis=0)
    return means, medians, lo, hi


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid-score interval for p2 - p1 (method 10 of Newcombe 1998), from scipy's Wilson
    intervals of each proportion. (nan, nan) when a group is empty."""
    from scipy import stats

    if n1 == 0 or n2 == 0:
        return math.nan, math.nan
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = stats.binomtest(k1, n1).proportion_ci(level, method="wilson")
    l2, u2 = stats.binomtest(k2, n2).proportion_ci(level, method="wilson")
    d = p2 - p1
    return d - math.hypot(p2 - l2, u1 - p1), d + math.hypot(u2 - p2, p1 - l1)


def _fraction(k: int, n: int, level: float) -> tuple:
    """k / n with its exact (Clopper-Pearson) interval; (None, None, None) for n = 0."""
    from scipy import stats

    if n == 0:
        return None, None, None
    ci = stats.binomtest(k, n).proportion_ci(level, method="exact")
    return k / n, float(ci.low), float(ci.high)


class _Test:
    """The permutation loop: every statistic of one set of arrangements, computed together."""

    def __init__(self, index: np.ndarray, g: int, seed: int, permutations: int):
        self.onehot, self.g, self.seed, self.permutations = np.eye(g)[index], g, seed, permutations
        self.index = np.asarray(index, dtype=np.int64)
        self.total = self.onehot.sum(0)

    def counts(self, cls: np.ndarray):
        return (cls == 0) @ self.onehot, (cls == 1) @ self.onehot

    def run(self, class_vectors: list, x: np.ndarray | None = None):
        """p of delta f for every class vector (and of eta2 and its best split for centred scores x)."""
        observed = np.array([_sides(*self.counts(c), self.total)[0] for c in class_vectors], dtype=np.float64)
        hits = np.zeros(len(class_vectors))
        eta_hits = np.zeros(2)
        if x is not None:
            sums = x @ self.onehot
            eta_obs = np.array([(np.square(sums) / self.total).sum(), _best_cut(sums[None], self.total)[0][0]])
        # Every class vector (the rule's cut and the sensitivity cuts) from one product per chunk: kernel
        # rows[b, i] takes the group of position i, and the grey and colour counts of every vector are the
        # (b, G, K) one-hot of those groups times the (K, 2m) indicators. The counts are small integers,
        # exact in float32; _sides sees them as float64, as it did in the per-vector loop.
        live = np.flatnonzero(np.isfinite(observed))
        m = live.size
        codes = np.asarray(class_vectors)[live]  # (m, K)
        masks = np.concatenate([codes == 0, codes == 1]).T.astype(np.float32)  # (K, 2m): grey, then colour
        groups = np.arange(self.g)[None, :, None]
        for rows, inverse in _arrangements(self.seed, self.permutations, len(self.onehot)):
            if m:
                moved = self.index[inverse]  # (b, K): the group every kernel is moved to
                counts = ((moved[:, None, :] == groups).astype(np.float32) @ masks).astype(np.float64)
                counts = counts.transpose(2, 0, 1)  # (2m, b, G)
                d = _sides(counts[:m], counts[m:], self.total)[0]  # (m, b)
                hits[live] += np.sum(d >= observed[live, None] - 1e-12, axis=1)
            if x is not None:
                sums = x[rows] @ self.onehot
                eta = (np.square(sums) / self.total).sum(1)
                split = _best_cut(sums, self.total)[0]
                eta_hits += [np.sum(eta >= eta_obs[0] * (1 - 1e-12)), np.sum(split >= eta_obs[1] * (1 - 1e-12))]
        p = [(1 + h) / (self.permutations + 1) if np.isfinite(o) else math.nan for h, o in zip(hits, observed)]
        return p, (1 + eta_hits) / (self.permutations + 1)


def _classes_from_counts(grey, colour, total) -> tuple[np.ndarray, np.ndarray]:
    """A class vector (and its groups) with these counts per group; the rest "weak" (only counts matter
    to the test)."""
    cls = np.concatenate(
        [np.repeat([0, 1, 2], [int(a), int(b), int(n - a - b)]) for a, b, n in zip(grey, colour, total)]
    )
    return cls, np.repeat(np.arange(len(total)), total.astype(int))


def _p_of_counts(grey, colour, total, seed, permutations) -> float:
    cls, index = _classes_from_counts(grey, colour, total)
    return _Test(index, len(total), seed, permutations).run([cls])[0][0]


def _margin(grey, colour, total, specialised, names, seed, permutations, alpha, label):
    """How many kernels would have to change class to flip the verdict, and which criterion.

    Specialised: the majorities exactly (a side is emptied when every tower on it loses its majority),
    the test along the path that narrows delta f most, one kernel at a time (binary search of p on it).
    Not specialised: an upper bound, the most colour tower made largely colour and the most grey other
    tower largely grey, then delta f widened until p < alpha."""
    grey, colour, total = grey.astype(float), colour.astype(float), total.astype(float)
    half = np.floor(total * LARGELY)
    _, spec, agn = _sides(grey, colour, total)
    path = []  # count tables after 1, 2, ... changes
    if specialised:
        need_spec = int((colour - half)[spec].sum())
        need_agn = int((grey - half)[agn].sum())
        majority = min(need_spec, need_agn)
        which = (
            f"{', '.join(label(n) for n, s in zip(names, spec) if s)} would no longer be largely colour-specific"
            if need_spec <= need_agn
            else f"{', '.join(label(n) for n, a in zip(names, agn) if a)} would no longer be largely colour-agnostic"
        )
        g, c = grey.copy(), colour.copy()
        sign = np.where(spec, -1.0, np.where(agn, 1.0, 0.0))  # colour -> grey on the specific side, back on the other
        for _ in range(majority - 1):  # all single changes at once, (G, G) candidate tables
            movable = (spec & (c > 0)) | (agn & (g > 0))
            g2 = g[None] - np.diag(sign)
            c2 = c[None] + np.diag(sign)
            d = np.where(movable, np.nan_to_num(_sides(g2, c2, total[None])[0], nan=-np.inf), np.inf)
            t = int(np.argmin(d))
            g, c = g2[t], c2[t]
            path.append((g, c))
        found = _search(path, lambda gc: _p_of_counts(*gc, total, seed, permutations) >= alpha)
        if found is None:
            return majority, which
        return found + 1, f"the towers would differ no more than random labels make them (p ≥ {alpha:g})"
    if len(total) < 2:
        return None, ""
    s = int(np.argmax(colour / total))
    a = int(np.argmax(np.where(np.arange(len(total)) == s, -np.inf, grey / total)))
    g, c = grey.copy(), colour.copy()
    steps = 0
    while c[s] <= half[s]:  # grey -> colour first (it widens delta f too), then weak/unstructured -> colour
        g[s] -= 1 if g[s] > 0 else 0
        c[s] += 1
        steps += 1
        path.append((g.copy(), c.copy()))
    while g[a] <= half[a]:
        c[a] -= 1 if c[a] > 0 else 0
        g[a] += 1
        steps += 1
        path.append((g.copy(), c.copy()))
    start = len(path)
    while g[s] > 0 or c[a] > 0:  # then widen delta f until the test is met
        if g[s] > 0:
            g[s], c[s] = g[s] - 1, c[s] + 1
        else:
            c[a], g[a] = c[a] - 1, g[a] + 1
        path.append((g.copy(), c.copy()))
    offset = max(start - 1, 0)  # the first state with both majorities (or the first change, if they hold)
    found = _search(path[offset:], lambda gc: _p_of_counts(*gc, total, seed, permutations) < alpha)
    if found is None:
        return None, "no change of the two nearest towers would make it specialised"
    return offset + found + 1, (
        f"at most: {label(names[s])} made largely colour-specific and {label(names[a])} largely "
        f"colour-agnostic, with p < {alpha:g}"
    )


def _search(path: list, flips) -> int | None:
    """The first index of ``path`` where ``flips`` holds (assumed monotone along the path); None if none."""
    if not path or not flips(path[-1]):
        return None
    lo, hi = 0, len(path) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if flips(path[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _reason(names, label, grey_share, colour_share, spec, agn, p, permutations, alpha) -> str:
    """What decided the verdict, in words."""
    if spec.any() and agn.any() and p < alpha:
        a = ", ".join(f"{label(n)} ({_pct(x)} grey)" for n, x, s in zip(names, grey_share, agn) if s)
        c = ", ".join(f"{label(n)} ({_pct(x)} colour)" for n, x, s in zip(names, colour_share, spec) if s)
        return f"largely colour-agnostic: {a}; largely colour-specific: {c}"
    why = []
    if not spec.any():
        j = int(np.argmax(colour_share))
        why.append(f"no tower is largely colour-specific (most: {label(names[j])}, {_pct(colour_share[j])} colour)")
    if not agn.any():
        j = int(np.argmax(grey_share))
        why.append(f"no tower is largely colour-agnostic (most: {label(names[j])}, {_pct(grey_share[j])} grey)")
    if not why:
        why.append(f"the towers differ no more than random tower labels make them (p {format_p(p, permutations)})")
    return "; ".join(why)


@_one_thread()  # torch on one thread for these tiny tensors; the caller's count restored after
def verdict(
    kernels,
    towers=None,
    channel_std=None,
    axis=None,
    initial=None,
    permutations: int = 9999,
    seed: int = 0,
    ci_level: float = 0.95,
    bootstrap: int = 2000,
    control_groups: int = 2,
    sensitivity: bool = True,
    margin: bool = True,
    cut: float = COLOUR_CUT,
    weak_fraction: float = WEAK_FRACTION,
    alpha: float = ALPHA,
) -> Verdict:
    """Judge first-layer kernels against the paper's claim (the rule in this module's docstring), with
    eta2 and its tests from the same permutations.

    Args:
        kernels: (T, n, 3, h, w) tower after tower, or (K, 3, h, w) with ``towers`` given.
        towers: (K,) tower label of every kernel; None for the (T, n, ...) shape. One label: the control.
        channel_std, axis: as :func:`towers.color.color_energy` (scores and norms in raw-RGB units).
        initial: the kernels at initialisation, same shape: unstructured = moved less than MOVEMENT_MIN
            times its initial norm. None: judged from the spatial power spectrum.
        permutations, seed: the permutation tests (at least 999); the control's groups and the
            bootstrap use the seed too.
        ci_level, bootstrap: intervals of Delta f, the colour fractions and the medians.
        control_groups: one tower only: into how many random groups its kernels are split.
        sensitivity: also judge at every cut in SENSITIVITY_CUTS (same permutations).
        margin: compute the margin (a few more permutation tests).
        cut, weak_fraction, alpha: the rule's constants; keep the defaults for a verdict that compares
            with other runs (they are recorded in ``rule``).
    """
    from scipy import stats

    w = torch.as_tensor(np.asarray(kernels) if not isinstance(kernels, torch.Tensor) else kernels)
    if towers is None:
        if w.dim() != 5:
            raise ValueError(
                f"kernels of shape {tuple(w.shape)} need tower labels; give (towers, n, 3, h, w) or towers="
            )
        towers = np.arange(1, w.shape[0] + 1).repeat(w.shape[1])
    if permutations < 999:
        raise ValueError(f"use at least 999 permutations (p-value floor 0.001), got {permutations}")
    raw = raw_rgb_kernels(w, channel_std)
    if not bool(torch.isfinite(raw).all()):
        raise ValueError("kernel weights are not finite (NaN or inf): training diverged?")
    labels = np.asarray(towers.cpu() if isinstance(towers, torch.Tensor) else towers).ravel()
    if labels.size != raw.shape[0]:
        raise ValueError(f"{raw.shape[0]} kernels but {labels.size} tower labels")
    energy = color_energy(raw, None, axis)
    scores = energy.total.numpy()
    if not np.isfinite(scores).all():
        raise ValueError(f"kernels {np.flatnonzero(~np.isfinite(scores))[:10].tolist()} are all zero")
    sq = raw.square().sum((1, 2, 3)).numpy()
    spread = effective_frequencies(raw).numpy()
    if initial is not None:
        raw0 = raw_rgb_kernels(initial, channel_std)
        if not bool(torch.isfinite(raw0).all()):
            raise ValueError("initial kernel weights are not finite (NaN or inf)")
        moved = movement(raw, raw0).numpy()
        unstructured, method = moved < MOVEMENT_MIN, "movement"
    else:
        moved = None
        unstructured = spread >= white_noise_frequencies(*raw.shape[2:], STRUCTURE_QUANTILE)
        method = "spectrum"
    cls = classify(scores, np.sqrt(sq), unstructured, cut, weak_fraction)

    names, index = np.unique(labels, return_inverse=True)
    names = [n.item() if isinstance(n, np.generic) else n for n in names]
    control, control_split, assignment = len(names) == 1, None, None
    if control:
        assignment = control_partition(labels.size, control_groups, seed)
        names, index = control_group_names(control_groups), assignment
        control_split = np.flatnonzero(assignment == 0).tolist() if control_groups == 2 else None
    g = len(names)
    if labels.size < 2 * g or g < 2:
        raise ValueError(f"need at least two kernels per group, got {labels.size} kernels in {g} groups")

    def label(n):
        return str(n) if control else f"tower {n}"

    # One permutation loop: delta f at the rule's cut and at every sensitivity cut, eta2 and its split.
    cuts = SENSITIVITY_CUTS if sensitivity else ()
    vectors = [cls] + [classify(scores, np.sqrt(sq), unstructured, c, weak_fraction) for c in cuts]
    # The permutations act on a canonical order (groups by size and sorted scores, kernels by score), so
    # neither the towers' names nor the kernels' order changes a p-value, and eta2's p depends on the
    # scores alone.
    keys = [(int((index == j).sum()), tuple(np.sort(scores[index == j]))) for j in range(g)]
    rank = np.empty(g, dtype=np.int64)
    rank[sorted(range(g), key=keys.__getitem__)] = np.arange(g)
    canon = np.lexsort((rank[index], scores))
    x = scores - scores.mean()
    ss_total = float(np.square(x).sum())
    p_values, (p_eta2, p_split) = _Test(rank[index][canon], g, seed, permutations).run(
        [v[canon] for v in vectors], x[canon] if ss_total > 0 else None
    )
    test = _Test(index, g, seed, permutations)  # counts in the towers' own order
    total = test.total
    grey, colour = test.counts(cls)
    delta, spec, agn = (a[0] if np.ndim(a) > 1 else a for a in _sides(grey, colour, total))
    delta = float(delta[()] if np.ndim(delta) else delta)
    p_delta = p_values[0]
    specialised = bool(spec.any() and agn.any() and p_delta < alpha)

    grey_share, colour_share = grey / total, colour / total
    kc, ks = int(colour[spec].sum()), int((colour + grey)[spec].sum())
    kg, ka = int(grey[agn].sum()), int((colour + grey)[agn].sum())
    lo, hi = newcombe_interval(ka - kg, ka, kc, ks, ci_level) if math.isfinite(delta) else (math.nan, math.nan)
    judged = cls < 2
    x_spec, x_agn = scores[spec[index] & judged], scores[agn[index] & judged]
    auc = (
        float(stats.mannwhitneyu(x_spec, x_agn).statistic / (x_spec.size * x_agn.size))
        if x_spec.size and x_agn.size
        else math.nan
    )
    fractions, lows, highs = zip(*(_fraction(int(c), int(n), ci_level) for c, n in zip(colour, colour + grey)))
    onehot = test.onehot
    energy_share = ((scores * sq) @ onehot / np.maximum(sq @ onehot, np.finfo(float).tiny)).tolist()
    weak = (cls == 2) @ onehot
    unstructured_count = (cls == 3) @ onehot

    # eta2 beside the verdict (same permutations)
    if ss_total > 0:
        sums = x @ onehot
        eta2 = float((np.square(sums) / total).sum() / ss_total)
        split_ss, order, cut_at = _best_cut(sums[None], total)
        eta2_split = float(split_ss[0] / ss_total)
        color_side = [names[j] for j in sorted(order[0, cut_at[0] + 1 :])]
        ms_within = (ss_total - eta2 * ss_total) / max(labels.size - g, 1)
        omega2 = (eta2 * ss_total - (g - 1) * ms_within) / (ss_total + ms_within)
    else:
        eta2 = eta2_split = omega2 = p_eta2 = p_split = math.nan
        color_side = []
    means, medians, med_lo, med_hi = _median_intervals(scores, index, g, bootstrap, seed, ci_level)

    # dominant spatial frequency, per tower and band (a description, not part of the rule)
    freq = dominant_frequency(raw, axis).numpy()
    band = np.clip(np.searchsorted(FREQUENCY_BANDS, freq, side="right") - 1, 0, len(FREQUENCY_BANDS) - 2)
    band_onehot = np.eye(len(FREQUENCY_BANDS) - 1)[band]
    freq_grey = (onehot * (cls == 0)[:, None]).T @ band_onehot
    freq_colour = (onehot * (cls == 1)[:, None]).T @ band_onehot
    freq_median = [
        float(np.median(freq[(index == j) & judged])) if ((index == j) & judged).any() else None for j in range(g)
    ]

    rows = []
    for c, v, p in zip(cuts, vectors[1:], p_values[1:]):
        gc, cc = test.counts(v)
        d, sp, ag = _sides(gc, cc, total)
        rows.append(
            {
                "cut": round(c, 4),
                "delta_f": float(d),
                "p_delta_f": p,
                "verdict": SPECIALISED if sp.any() and ag.any() and p < alpha else NOT_SPECIALISED,
                "colour_fraction": [None if a + b == 0 else float(b / (a + b)) for a, b in zip(gc, cc)],
            }
        )

    how_many, why = (
        _margin(grey, colour, total, specialised, names, seed, permutations, alpha, label) if margin else (None, "")
    )
    return Verdict(
        verdict=SPECIALISED if specialised else NOT_SPECIALISED,
        reason=_reason(names, label, grey_share, colour_share, spec, agn, p_delta, permutations, alpha),
        margin=how_many,
        margin_reason=why,
        delta_f=delta,
        delta_f_low=lo,
        delta_f_high=hi,
        p_delta_f=p_delta,
        auc=auc,
        agnostic_tower=names[int(np.argmax(grey_share))] if specialised else None,
        specific_tower=names[int(np.argmax(colour_share))] if specialised else None,
        agnostic_group=[n for n, s in zip(names, agn) if s],
        specific_group=[n for n, s in zip(names, spec) if s],
        neither_group=[n for n, s, a in zip(names, spec, agn) if not (s or a)],
        grey_fraction_agnostic=kg / ka if ka else math.nan,
        colour_fraction_specific=kc / ks if ks else math.nan,
        towers=names,
        sizes=total.astype(int).tolist(),
        colour_fraction=list(fractions),
        colour_fraction_low=list(lows),
        colour_fraction_high=list(highs),
        grey_share=grey_share.tolist(),
        colour_share=colour_share.tolist(),
        energy_share=energy_share,
        grey_count=grey.astype(int).tolist(),
        colour_count=colour.astype(int).tolist(),
        weak_count=weak.astype(int).tolist(),
        unstructured_count=unstructured_count.astype(int).tolist(),
        kernel_class=[CLASSES[c] for c in cls],
        structure_method=method,
        movement=None if moved is None else moved.tolist(),
        effective_frequencies=spread.tolist(),
        dominant_frequency=freq.tolist(),
        frequency_bands=list(FREQUENCY_BANDS),
        frequency_grey=freq_grey.astype(int).tolist(),
        frequency_colour=freq_colour.astype(int).tolist(),
        frequency_median=freq_median,
        eta2=eta2,
        eta2_null=(g - 1) / (labels.size - 1),
        omega2=omega2,
        p_eta2=float(p_eta2),
        eta2_split=eta2_split,
        p_eta2_split=float(p_split) if g > 2 else float(p_eta2),
        color_side=color_side,
        mean=means.tolist(),
        median=medians.tolist(),
        median_low=med_lo.tolist(),
        median_high=med_hi.tolist(),
        sensitivity=rows,
        control=control,
        control_split=control_split,
        control_assignment=None if assignment is None else assignment.tolist(),
        bipartition="majority: each tower on the side its own majority puts it (no search)",
        rule={
            "colour_cut": cut,
            "weak_fraction": weak_fraction,
            "largely": LARGELY,
            "alpha": alpha,
            "movement_min": MOVEMENT_MIN,
            "structure_quantile": STRUCTURE_QUANTILE,
        },
        permutations=permutations,
        seed=seed,
        ci_level=ci_level,
        bootstrap=bootstrap,
    )


def onset_step(history: list[dict]) -> int | None:
    """When the split appears: the first measured step from which every later measurement, the last
    included, is specialised with the same agnostic and specific groups as the last one (one
    relabelling for the whole run, fixed by the end). None when the last measurement is not
    specialised. ``history``: records with ``step``, ``verdict``, ``agnostic_group``, ``specific_group``."""
    records = [r for r in history if r.get("verdict") is not None]
    if not records or records[-1]["verdict"] != SPECIALISED:
        return None
    final = (records[-1].get("agnostic_group"), records[-1].get("specific_group"))
    onset = records[-1]["step"]
    for r in reversed(records):
        if r["verdict"] != SPECIALISED or (r.get("agnostic_group"), r.get("specific_group")) != final:
            break
        onset = r["step"]
    return onset
