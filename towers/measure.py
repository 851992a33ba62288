"""One measurement of first-layer kernels: their colour scores, the bisection statistic and the
verdict, as the record that ``bisection.json`` holds (:mod:`towers.records`), and the one line that says
its answer. Pure functions (torch, NumPy, scipy; no Lightning): the callback measures with them during
training, ``analysis/kernels.py`` any checkpoint, array or picture afterwards.
"""

import math

import torch

from towers.color import bisection, color_energy, tower_labels, unit_axis
from towers.verdict import Verdict, format_p, verdict


def floats(x) -> list:
    """A tensor's values as a JSON list: float64, NaN and inf as None."""
    return [v if math.isfinite(v) else None for v in torch.as_tensor(x, dtype=torch.float64).tolist()]


def measure(
    kernels, channel_std=None, axis=None, permutations: int = 9999, bootstrap: int = 2000, seed: int = 0
) -> dict:
    """Score kernels (T, n, 3, h, w), test the tower split and judge it: the measurement part of a record
    (what the callback and ``analysis/kernels.py`` both compute). Beside the scores and ``statistics``
    (eta2, its permutation p, the medians; :class:`towers.color.Bisection`) the record holds every field of
    :class:`towers.verdict.Verdict` at its top level: ``verdict``, ``delta_f``, ``colour_fraction``,
    ``agnostic_tower``, ``specific_tower`` and the rest (all None when the weights are not finite)."""
    kernels = torch.as_tensor(kernels)
    t, n = kernels.shape[:2]
    towers = tower_labels(t, n)
    record = {
        "num_towers": t,
        "kernels_per_tower": n,
        "kernel_size": list(kernels.shape[3:]),
        "channel_std": None if channel_std is None else floats(torch.as_tensor(channel_std).flatten()),
        "axis": floats(unit_axis(axis)),
        "tower": towers.tolist(),
        "error": None,
    }
    if not bool(torch.isfinite(kernels).all()):
        record["error"] = "conv1 weights are not finite (NaN or inf): training diverged?"
        record.update(
            score=None,
            score_dc=None,
            score_ac=None,
            tower_median=None,
            tower_median_dc=None,
            tower_median_ac=None,
            statistics=None,
        )
        record.update(dict.fromkeys(Verdict.__dataclass_fields__))
        return record
    energy = color_energy(kernels, channel_std, axis)
    per_tower = torch.stack(list(energy)).view(3, t, n).nanquantile(0.5, dim=2)  # (total/dc/ac, T)
    record.update(
        score=floats(energy.total),
        score_dc=floats(energy.dc),
        score_ac=floats(energy.ac),
        tower_median=floats(per_tower[0]),
        tower_median_dc=floats(per_tower[1]),
        tower_median_ac=floats(per_tower[2]),
    )
    try:
        record["statistics"] = bisection(energy.total, towers, permutations, seed, bootstrap).to_dict()
    except ValueError as e:
        record["statistics"], record["error"] = None, str(e)
    try:
        record.update(verdict(kernels, None, channel_std, axis, permutations, seed).to_dict())
    except ValueError as e:
        record.update(dict.fromkeys(Verdict.__dataclass_fields__))
        record["error"] = record["error"] or str(e)
    return record


def summary_line(record: dict) -> str:
    """One line that says a record's answer: the verdict with delta f, the towers' colour fractions
    with their intervals, and eta2 with its p (as the end of a fit prints it)."""
    if record.get("verdict") is None:
        return f"no verdict: {record.get('error') or 'not measured'}"
    line = Verdict(**{k: record[k] for k in Verdict.__dataclass_fields__}).summary()
    stats = record.get("statistics")
    if stats:
        line += f"; η² = {stats['eta2']:.3f} (chance {stats['eta2_null']:.3f}), p {format_p(stats['p_value'], stats['permutations'])}"
    return line


def p_text(p, permutations) -> str:
    """A p-value as tables print it: "0.031", or "≤ 1e-4" at the permutation floor; "" for none."""
    return "" if p is None else format_p(p, permutations).removeprefix("= ")
