"""The verdict: is one tower's first layer largely colour-agnostic and another's largely colour-specific?

Pure functions (torch, NumPy, scipy; no Lightning), so they work on any checkpoint, saved array or
kernel grid read from a published figure (``analysis/kernels.py``):

    v = verdict(model.conv1_kernels())            # (towers, kernels per tower, 3, h, w), RGB
    v.verdict, v.delta_f, v.colour_fraction, v.agnostic_tower, v.specific_tower
    v.summary()                                   # one line

The paper's claim (§6.1): "The kernels on GPU 1 are largely color-agnostic, while the kernels on GPU 2
are largely color-specific. This kind of specialization occurs during every run". The rule below is
fixed before any result and documented in the README ("The verdict"); its constants live here only.

1. Every kernel is *grey*, *colour* or *weak*. Weak: its norm (raw-RGB units) is below
   ``WEAK_FRACTION`` of its tower's median kernel norm. A kernel whose gradient vanished shrinks under
   weight decay with its direction frozen, so it keeps its random colour score (about 2/3) and would
   read as "colour"; its norm gives it away. Weak kernels are counted apart, never as grey or colour.
   The others are colour when their colour score (:func:`towers.color.color_specificity`, the
   chromatic energy fraction) is at least ``COLOUR_CUT``, grey below it.
2. Per tower: colour fraction = colour / (grey + colour) with its exact (Clopper-Pearson) interval;
   energy share = chromatic energy / energy over all its kernels.
3. The towers are split into an agnostic and a specific group: for two towers, the tower with the
   lower colour fraction and the one with the higher; for three or more, the bipartition of the towers
   whose pooled colour fractions differ most. Delta f = f(specific) - f(agnostic), with Newcombe's
   hybrid-score interval; its permutation p-value takes the maximum over bipartitions (and both
   orientations) again in every permutation of the kernels' tower labels, so picking the best
   bipartition and naming the sides is paid for. AUC: the chance that a non-weak kernel of the
   specific group scores above one of the agnostic group.
4. **Specialised** when all four hold:
   - Delta f >= ``MIN_DELTA_F``;
   - its permutation p < ``ALPHA`` (the towers differ more than random tower labels make them);
   - the agnostic group is *largely* grey: one-sided exact binomial test of grey fraction > 1/2, p < ``ALPHA``;
   - the specific group is *largely* colour: the same test of colour fraction > 1/2, p < ``ALPHA``.
   Otherwise not specialised, and no tower is named the agnostic or the specific one.

One tower is the control: its kernels are split into two random halves (seeded, the split kept in
the result; :func:`towers.color.control_halves`) and judged exactly like two towers.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from towers.color import CONTROL_GROUPS, color_energy, control_halves, raw_rgb_kernels

# --- the decision rule: written down before any result (README, "The verdict") --------------------
# A kernel is colour when its chromatic energy fraction is at least 1/3: half the level of an
# unstructured (random) kernel, 2/3. Grey kernels sit near 0, opponent-colour kernels near 1 and
# colour blobs at 2/3 and above (a saturated single-primary blob scores 2/3), so 1/3 lies in the
# valley between the two modes; equivalently, a colour kernel carries at least half as much chromatic
# as luminance energy, and a rank-one kernel g(p)·c is grey when its colour c lies within 35° of grey.
COLOUR_CUT = 1 / 3
# A kernel is weak when its norm is below a quarter of its tower's median norm: it then carries less
# than 1/16 of a typical kernel's energy. Freshly initialised kernels never are (363 i.i.d. weights:
# the norm's relative spread is about 4%); a dead kernel under weight decay 5e-4 with momentum 0.9 at
# learning rate 0.01 loses a factor e in about 20,000 steps, while trained kernels grow.
WEAK_FRACTION = 1 / 4
# "Largely" both ways, with a gap a grid shows: a tower where grey outnumbers colour two to one
# beside one where colour outnumbers grey two to one differs by 1/3 in colour fraction.
MIN_DELTA_F = 1 / 3
ALPHA = 0.05
SENSITIVITY_CUTS = (0.1, 0.2, 0.3, 1 / 3, 0.4, 0.5)
SPECIALISED, NOT_SPECIALISED = "specialised", "not specialised"
GREY, COLOUR, WEAK = "grey", "colour", "weak"


@dataclass(frozen=True)
class Verdict:
    """One run's answer and the numbers behind it. Per-tower lists follow ``towers`` (sorted labels;
    the one-tower control has the two halves ``"half A"``, ``"half B"``)."""

    verdict: str  # SPECIALISED or NOT_SPECIALISED
    delta_f: float  # colour fraction of the specific group minus that of the agnostic group
    delta_f_low: float  # Newcombe hybrid-score interval, ci_level
    delta_f_high: float
    p_delta_f: float  # permutation p of delta_f, maximum over bipartitions taken in every permutation
    auc: float  # P(score of a specific-group kernel > score of an agnostic-group kernel), non-weak kernels
    agnostic_tower: object  # the tower with the lowest colour fraction; None unless specialised
    specific_tower: object  # the tower with the highest colour fraction; None unless specialised
    agnostic_group: list  # towers on the agnostic side of the best bipartition (kept even when not specialised)
    specific_group: list
    grey_fraction_agnostic: float  # pooled over the agnostic group, non-weak kernels
    p_largely_agnostic: float  # one-sided exact binomial test: grey fraction > 1/2
    colour_fraction_specific: float
    p_largely_specific: float  # colour fraction > 1/2
    towers: list  # tower labels (or the control's halves)
    colour_fraction: list  # per tower: colour / (grey + colour); None for a tower of weak kernels only
    colour_fraction_low: list  # exact Clopper-Pearson interval, ci_level
    colour_fraction_high: list
    energy_share: list  # per tower: chromatic energy / energy, all its kernels
    grey_count: list  # per tower: kernels of each class
    colour_count: list
    weak_count: list
    kernel_class: list  # per kernel, in the input order: "grey", "colour" or "weak"
    sensitivity: list  # [{"cut", "delta_f", "p_delta_f", "verdict", "colour_fraction"}] over SENSITIVITY_CUTS
    control: bool  # one tower, judged on two random halves
    control_split: list | None  # the control's kernel indices in half A (None for real towers)
    rule: dict  # the constants the verdict was reached with
    permutations: int
    seed: int
    ci_level: float

    @property
    def specialised(self) -> bool:
        return self.verdict == SPECIALISED

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        """One line: the verdict, Delta f with its interval and p, the towers' colour fractions."""
        fractions = ", ".join(
            f"{t}: {_pct(f)} [{_pct(lo)}-{_pct(hi)}]"
            for t, f, lo, hi in zip(
                self.towers, self.colour_fraction, self.colour_fraction_low, self.colour_fraction_high
            )
        )
        named = f"; agnostic {self.agnostic_tower}, specific {self.specific_tower}" if self.specialised else ""
        what = "control (random halves of one tower)" if self.control else "towers"
        return (
            f"{self.verdict}: Δf = {self.delta_f:.2f} [{self.delta_f_low:.2f}, {self.delta_f_high:.2f}], "
            f"p {format_p(self.p_delta_f, self.permutations)}; colour fraction by {what}: {fractions}{named}"
        )


def format_p(p: float, permutations: int | None = None) -> str:
    """``= 0.031``, or ``≤ 1e-4`` at the permutation floor 1/(B+1) (a p-value there is a bound, not a value)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "= n/a"
    if permutations and p <= 1 / (permutations + 1) * (1 + 1e-9):
        return f"≤ {10 ** math.ceil(math.log10(1 / (permutations + 1))):.0e}".replace("e-0", "e-")
    return f"= {p:.2g}"


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _plain(v):
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# --- the pieces ---------------------------------------------------------------------------------


def classify(scores, norms, towers, cut: float = COLOUR_CUT, weak_fraction: float = WEAK_FRACTION) -> np.ndarray:
    """Per kernel 0 grey, 1 colour, 2 weak (int array). Weak is judged against the median norm of the
    kernel's own tower (``towers``: one label per kernel)."""
    s, n, t = (
        np.asarray(x, dtype=np.float64).ravel() if i < 2 else np.asarray(x).ravel()
        for i, x in enumerate((scores, norms, towers))
    )
    names, index = np.unique(t, return_inverse=True)
    median = np.array([np.median(n[index == j]) for j in range(len(names))])  # per tower, a handful
    weak = n < weak_fraction * median[index]
    return np.where(weak, 2, (s >= cut).astype(np.int64))


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


def _bipartitions(g: int) -> np.ndarray:
    """(P, G) 0/1: every split of G groups into two non-empty sides, each once (G = 2: one)."""
    masks = np.arange(1, 2 ** (g - 1))
    return ((masks[:, None] >> np.arange(g)) & 1).astype(np.float64)


def _best_split(colour: np.ndarray, grey: np.ndarray, sides: np.ndarray):
    """Largest colour-fraction difference over bipartitions and orientations.

    colour, grey: (B, G) counts per group; sides: (P, G). Returns (B,) delta and (B,) index into
    2P (bipartition p with side 1 specific: p; with side 0 specific: P + p)."""
    c1, g1 = colour @ sides.T, grey @ sides.T  # (B, P) on side 1
    c0, g0 = colour.sum(1, keepdims=True) - c1, grey.sum(1, keepdims=True) - g1
    with np.errstate(invalid="ignore", divide="ignore"):
        f1, f0 = c1 / (c1 + g1), c0 / (c0 + g0)
    d = np.concatenate([f1 - f0, f0 - f1], 1)  # (B, 2P)
    d = np.where(np.isnan(d), -np.inf, d)
    best = d.argmax(1)
    return np.take_along_axis(d, best[:, None], 1)[:, 0], best


def _permutation_p(cls: np.ndarray, group: np.ndarray, g: int, observed: float, perms: np.ndarray) -> float:
    """p of the best-split delta f under random relabelling of kernels (group sizes kept); ``perms``
    (B, K): one random arrangement of the kernels per row."""
    onehot = np.eye(g)[group]  # (K, G)
    is_colour, is_grey = (cls == 1).astype(np.float64), (cls == 0).astype(np.float64)
    sides = _bipartitions(g)
    hits, chunk = 0, max(1, 2**21 // max(cls.size, 1))  # bounds the (chunk, K) temporaries
    for start in range(0, len(perms), chunk):
        rows = perms[start : start + chunk]
        d, _ = _best_split(is_colour[rows] @ onehot, is_grey[rows] @ onehot, sides)
        hits += int((d >= observed - 1e-12).sum())
    return (1 + hits) / (len(perms) + 1)


def _judge(cls, scores, group, names, perms, ci_level, alpha, min_delta_f):
    """The group-level numbers and the verdict for one classification (one cut)."""
    from scipy import stats

    g = len(names)
    onehot = np.eye(g)[group]
    colour = (cls == 1).astype(np.float64) @ onehot
    grey = (cls == 0).astype(np.float64) @ onehot
    sides = _bipartitions(g)
    delta, best = _best_split(colour[None], grey[None], sides)
    delta, best = float(delta[0]), int(best[0])
    if not math.isfinite(delta):  # fewer than two groups with a non-weak kernel: no split to judge
        return None
    side = sides[best % len(sides)].astype(bool)
    specific_side = side if best < len(sides) else ~side
    p_delta = _permutation_p(cls, group, g, delta, perms)
    spec_members, agn_members = specific_side[group], ~specific_side[group]
    kc, ks = int(colour[specific_side].sum()), int((colour + grey)[specific_side].sum())
    kg, ka = int(grey[~specific_side].sum()), int((colour + grey)[~specific_side].sum())
    p_agn = stats.binomtest(kg, ka, 0.5, alternative="greater").pvalue
    p_spec = stats.binomtest(kc, ks, 0.5, alternative="greater").pvalue
    lo, hi = newcombe_interval(ka - kg, ka, kc, ks, ci_level)
    x_spec = scores[spec_members & (cls != 2)]
    x_agn = scores[agn_members & (cls != 2)]
    auc = float(stats.mannwhitneyu(x_spec, x_agn).statistic / (x_spec.size * x_agn.size))
    ok = delta >= min_delta_f - 1e-12 and p_delta < alpha and p_agn < alpha and p_spec < alpha
    return {
        "delta_f": delta,
        "delta_f_low": lo,
        "delta_f_high": hi,
        "p_delta_f": p_delta,
        "auc": auc,
        "specific_side": specific_side,
        "grey_fraction_agnostic": kg / ka,
        "p_largely_agnostic": float(p_agn),
        "colour_fraction_specific": kc / ks,
        "p_largely_specific": float(p_spec),
        "verdict": SPECIALISED if ok else NOT_SPECIALISED,
    }


def verdict(
    kernels,
    towers=None,
    channel_std=None,
    axis=None,
    permutations: int = 9999,
    seed: int = 0,
    ci_level: float = 0.95,
    cut: float = COLOUR_CUT,
    weak_fraction: float = WEAK_FRACTION,
    min_delta_f: float = MIN_DELTA_F,
    alpha: float = ALPHA,
    sensitivity: bool = True,
) -> Verdict:
    """Judge first-layer kernels against the paper's claim (the rule in this module's docstring).

    Args:
        kernels: (T, n, 3, h, w) tower after tower, or (K, 3, h, w) with ``towers`` given.
        towers: (K,) tower label of every kernel; None for the (T, n, ...) shape. One label: the control.
        channel_std, axis: as :func:`towers.color.color_energy` (scores and norms in raw-RGB units).
        permutations, seed: the permutation test of delta f (at least 999); the control's halves use the seed too.
        cut, weak_fraction, min_delta_f, alpha: the rule's constants; keep the defaults for a verdict
            that compares with other runs (they are recorded in ``rule``).
        sensitivity: also judge at every cut in SENSITIVITY_CUTS (same permutations).
    """
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
    sq = raw.square().sum((1, 2, 3))
    norms = sq.sqrt().numpy()
    if not np.isfinite(scores).all():
        raise ValueError(f"kernels {np.flatnonzero(~np.isfinite(scores))[:10].tolist()} are all zero")

    names, index = np.unique(labels, return_inverse=True)
    names = [n.item() if isinstance(n, np.generic) else n for n in names]
    cls = classify(scores, norms, labels, cut, weak_fraction)  # weak against the real tower, even for the control
    control, control_split = len(names) == 1, None
    if control:
        half_a = control_halves(labels.size, seed)
        control_split = np.flatnonzero(half_a).tolist()
        names, index = list(CONTROL_GROUPS), np.where(half_a, 0, 1)
    if labels.size < 2 * len(names) or len(names) < 2:
        raise ValueError(f"need at least two kernels per group, got {labels.size} kernels in {len(names)} groups")

    # One set of random arrangements for the verdict and every cut of the sensitivity table.
    perms = np.random.default_rng([seed, 3]).random((permutations, labels.size)).argsort(1).astype(np.int32)
    judged = _judge(cls, scores, index, names, perms, ci_level, alpha, min_delta_f)
    g = len(names)
    onehot = np.eye(g)[index]
    colour = (cls == 1).astype(np.float64) @ onehot
    grey = (cls == 0).astype(np.float64) @ onehot
    weak = (cls == 2).astype(np.float64) @ onehot
    fractions, lows, highs = zip(*(_fraction(int(c), int(n), ci_level) for c, n in zip(colour, colour + grey)))
    chroma = (energy.total * sq).numpy()  # chromatic energy per kernel
    energy_share = ((chroma @ onehot) / np.maximum(sq.numpy() @ onehot, np.finfo(float).tiny)).tolist()

    nan = math.nan
    if judged is None:
        judged = {
            "delta_f": nan,
            "delta_f_low": nan,
            "delta_f_high": nan,
            "p_delta_f": nan,
            "auc": nan,
            "specific_side": np.zeros(g, bool),
            "grey_fraction_agnostic": nan,
            "p_largely_agnostic": nan,
            "colour_fraction_specific": nan,
            "p_largely_specific": nan,
            "verdict": NOT_SPECIALISED,
        }
    side = judged["specific_side"]
    specialised = judged["verdict"] == SPECIALISED
    f = np.array([nan if x is None else x for x in fractions])
    agnostic = names[int(np.nanargmin(np.where(~side, f, np.inf)))] if specialised else None
    specific = names[int(np.nanargmax(np.where(side, f, -np.inf)))] if specialised else None

    rows = []
    if sensitivity:
        for c in SENSITIVITY_CUTS:
            cls_c = classify(scores, norms, labels, c, weak_fraction)
            j = _judge(cls_c, scores, index, names, perms, ci_level, alpha, min_delta_f)
            col_c = (cls_c == 1).astype(float) @ onehot
            n_c = (cls_c != 2).astype(float) @ onehot
            rows.append(
                {
                    "cut": round(c, 4),
                    "delta_f": nan if j is None else j["delta_f"],
                    "p_delta_f": nan if j is None else j["p_delta_f"],
                    "verdict": NOT_SPECIALISED if j is None else j["verdict"],
                    "colour_fraction": [None if n == 0 else float(a / n) for a, n in zip(col_c, n_c)],
                }
            )

    return Verdict(
        verdict=judged["verdict"],
        delta_f=judged["delta_f"],
        delta_f_low=judged["delta_f_low"],
        delta_f_high=judged["delta_f_high"],
        p_delta_f=judged["p_delta_f"],
        auc=judged["auc"],
        agnostic_tower=agnostic,
        specific_tower=specific,
        agnostic_group=[n for n, s in zip(names, side) if not s],
        specific_group=[n for n, s in zip(names, side) if s],
        grey_fraction_agnostic=judged["grey_fraction_agnostic"],
        p_largely_agnostic=judged["p_largely_agnostic"],
        colour_fraction_specific=judged["colour_fraction_specific"],
        p_largely_specific=judged["p_largely_specific"],
        towers=names,
        colour_fraction=list(fractions),
        colour_fraction_low=list(lows),
        colour_fraction_high=list(highs),
        energy_share=energy_share,
        grey_count=grey.astype(int).tolist(),
        colour_count=colour.astype(int).tolist(),
        weak_count=weak.astype(int).tolist(),
        kernel_class=[(GREY, COLOUR, WEAK)[c] for c in cls],
        sensitivity=rows,
        control=control,
        control_split=control_split,
        rule={"colour_cut": cut, "weak_fraction": weak_fraction, "min_delta_f": min_delta_f, "alpha": alpha},
        permutations=permutations,
        seed=seed,
        ci_level=ci_level,
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
