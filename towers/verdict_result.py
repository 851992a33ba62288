"""The verdict's result: :class:`Verdict` (one run's answer and every number behind it), its one-line
summary and the one way every p-value is printed (:func:`format_p`). The rule that fills it, and its
constants, are :mod:`towers.verdict`'s; this module only holds and prints what it found."""

import math
from dataclasses import asdict, dataclass

import numpy as np

SPECIALISED, NOT_SPECIALISED = "specialised", "not specialised"


@dataclass(frozen=True)
class Verdict:
    """One run's answer and the numbers behind it. Per-tower lists follow ``towers`` (sorted labels;
    the one-tower control has its random groups); per-kernel lists follow the input order."""

    verdict: str  # SPECIALISED or NOT_SPECIALISED
    reason: str  # what decided it
    margin: int | None  # kernels that would have to change class to flip the verdict (None: not computed)
    margin_reason: str  # which criterion that many changes would break (or, not specialised, meet)
    delta_f: float  # pooled colour fraction of the specific side minus the agnostic side (NaN: a side empty)
    delta_f_low: float  # Newcombe hybrid-score interval, ci_level
    delta_f_high: float
    p_delta_f: float  # permutation p of delta_f, the sides chosen again in every permutation
    auc: float  # P(score of a specific-side kernel > score of an agnostic-side one), grey and colour kernels
    agnostic_tower: object  # the tower with the largest grey share; None unless specialised
    specific_tower: object  # the tower with the largest colour share; None unless specialised
    agnostic_group: list  # towers largely grey (kept even when not specialised)
    specific_group: list  # towers largely colour
    neither_group: list  # towers that are neither
    grey_fraction_agnostic: float  # pooled over the agnostic side, grey / (grey + colour)
    colour_fraction_specific: float
    towers: list  # tower labels (or the control's groups)
    sizes: list  # kernels per tower
    colour_fraction: list  # per tower: colour / (grey + colour); None for a tower without either
    colour_fraction_low: list  # exact Clopper-Pearson interval, ci_level
    colour_fraction_high: list
    grey_share: list  # per tower: grey / all its kernels (the "largely" quantity)
    colour_share: list  # per tower: colour / all its kernels
    energy_share: list  # per tower: chromatic energy / energy, all its kernels
    grey_count: list
    colour_count: list
    weak_count: list
    unstructured_count: list
    kernel_class: list  # per kernel: "grey", "colour", "weak" or "unstructured"
    structure_method: str  # "movement" (initial kernels given) or "spectrum"
    movement: list | None  # per kernel ||W - W0|| / ||W0|| (with initial kernels)
    effective_frequencies: list  # per kernel 1 / sum p^2 of its normalised spatial power spectrum
    dominant_frequency: list  # per kernel, cycles/pixel, peak of its luminance part's power spectrum
    frequency_bands: list  # towers.verdict.FREQUENCY_BANDS
    frequency_grey: list  # per tower, grey kernels per band
    frequency_colour: list  # per tower, colour kernels per band
    frequency_median: list  # per tower, median dominant frequency of its grey and colour kernels
    eta2: float  # SS_between / SS_total of the scores by tower
    eta2_null: float  # its expectation under random labels, (G - 1) / (K - 1)
    omega2: float  # eta2 less its chance bias
    p_eta2: float  # permutation p of eta2 (same permutations as delta f)
    eta2_split: float  # the best two-sided eta2 over bipartitions of the towers (= eta2 for two)
    p_eta2_split: float  # with the maximum taken again in every permutation
    color_side: list  # the high-score side of that bipartition
    mean: list  # per tower mean score
    median: list  # per tower median score
    median_low: list  # percentile bootstrap interval of the median, over kernels
    median_high: list
    sensitivity: list  # [{"cut", "delta_f", "p_delta_f", "verdict", "colour_fraction"}] per sensitivity cut
    control: bool  # one tower, judged on random groups
    control_split: list | None  # two control groups: the kernel indices of half A
    control_assignment: list | None  # the control's group (0..G-1) of every kernel
    bipartition: str  # how the sides were found
    rule: dict  # the constants the verdict was reached with
    permutations: int
    seed: int
    ci_level: float
    bootstrap: int

    @property
    def specialised(self) -> bool:
        return self.verdict == SPECIALISED

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        """One line: the verdict and what decided it, Delta f with its interval and p, the margin, the
        towers' colour fractions."""
        fractions = ", ".join(
            f"{t}: {_pct(f)} [{_pct(lo)}-{_pct(hi)}]"
            for t, f, lo, hi in zip(
                self.towers, self.colour_fraction, self.colour_fraction_low, self.colour_fraction_high
            )
        )
        apart = sum(self.weak_count or ()) + sum(self.unstructured_count or ())
        what = f"control ({len(self.towers)} random groups of one tower)" if self.control else "towers"
        delta = (
            f"Δf = {self.delta_f:.2f} [{self.delta_f_low:.2f}, {self.delta_f_high:.2f}], "
            f"p {format_p(self.p_delta_f, self.permutations)}; "
            if _finite(self.delta_f)
            else ""
        )
        margin = "" if self.margin is None else f"margin {self.margin} kernel{'s' * (self.margin != 1)}; "
        reason = f": {self.reason}" if self.reason else ""
        return f"{self.verdict}{reason}; {delta}{margin}colour fraction by {what}: {fractions}" + (
            f" ({apart} weak or unstructured kernel{'s' * (apart != 1)} counted apart)" if apart else ""
        )

    def statistics(self) -> dict:
        """The record's ``statistics`` entry (:class:`towers.color.Bisection`'s keys), from this result."""
        best = max(range(len(self.towers)), key=lambda j: (self.median[j], self.mean[j], j))
        return _plain(
            {
                "groups": self.towers,
                "sizes": self.sizes,
                "mean": self.mean,
                "median": self.median,
                "ci_low": self.median_low,
                "ci_high": self.median_high,
                "color_group": self.towers[best],
                "eta2": self.eta2,
                "eta2_null": self.eta2_null,
                "p_value": self.p_eta2,
                "eta2_split": self.eta2_split,
                "p_value_split": self.p_eta2_split,
                "color_side": self.color_side,
                "control": self.control,
                "permutations": self.permutations,
                "bootstrap": self.bootstrap,
                "ci_level": self.ci_level,
                "seed": self.seed,
                "omega2": self.omega2,
                "control_split": self.control_split,
            }
        )


def format_p(p, permutations: int | None = None, bare: bool = False) -> str:
    """Every p-value printed one way: ``= 0.031``, or ``≤ 1e-4`` at the permutation floor 1/(B+1) (a
    p-value there is a bound, not a value); ``= n/a`` for none. ``bare``: without the ``= `` (tables;
    "" for none)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "" if bare else "= n/a"
    if permutations and p <= 1 / (permutations + 1) * (1 + 1e-9):
        return f"≤ {10 ** math.ceil(math.log10(1 / (permutations + 1))):.0e}".replace("e-0", "e-")
    text = f"{p:.2g}"
    return text if bare else f"= {text}"


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _plain(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
