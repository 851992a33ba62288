"""One measurement of first-layer kernels: their colour scores and the verdict with its eta2 statistics
(one engine, :func:`towers.verdict.verdict`), as the record that ``bisection.json`` holds
(:mod:`towers.records`), and the one line that says its answer. Pure functions (torch, NumPy, scipy; no Lightning): the callback measures with them during
training, ``analysis/kernels.py`` any checkpoint, array or picture afterwards.
"""

import math

import torch

from towers.color import color_energy, tower_labels, unit_axis
from towers.verdict import Verdict, format_p, verdict


def floats(x) -> list:
    """A tensor's values as a JSON list: float64, NaN and inf as None."""
    return [v if math.isfinite(v) else None for v in torch.as_tensor(x, dtype=torch.float64).tolist()]


def measure(
    kernels,
    channel_std=None,
    axis=None,
    permutations: int = 9999,
    bootstrap: int = 2000,
    seed: int = 0,
    initial=None,
) -> dict:
    """Score kernels (T, n, 3, h, w) and judge them: the measurement part of a record (what the callback
    and ``analysis/kernels.py`` both compute). Beside the scores the record holds every field of
    :class:`towers.verdict.Verdict` at its top level (``verdict``, ``reason``, ``margin``, ``delta_f``,
    ``eta2``, ``p_eta2`` and the rest; all None when the weights are not finite) and ``statistics``, the
    same run's eta2 numbers under :class:`towers.color.Bisection`'s keys. ``initial``: the kernels at
    initialisation (same shape), so that unstructured kernels are judged by how far they moved."""
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
        v = verdict(kernels, None, channel_std, axis, initial, permutations, seed, bootstrap=bootstrap)
    except ValueError as e:
        record.update(dict.fromkeys(Verdict.__dataclass_fields__), statistics=None, error=str(e))
        return record
    record.update(v.to_dict(), statistics=v.statistics())
    return record


def summary_line(record: dict) -> str:
    """One line that says a record's answer: the verdict and what decided it, delta f, the margin, the
    towers' colour fractions with their intervals, and eta2 with its p (as the end of a fit prints it)."""
    if record.get("verdict") is None:
        return f"no verdict: {record.get('error') or 'not measured'}"
    line = Verdict(**{k: record.get(k) for k in Verdict.__dataclass_fields__}).summary()
    if record.get("eta2") is not None:
        line += (
            f"; η² = {record['eta2']:.3f} (chance {record['eta2_null']:.3f}), "
            f"p {format_p(record['p_eta2'], record['permutations'])}"
        )
    return line


def p_text(p, permutations) -> str:
    """A p-value as tables print it (:func:`towers.verdict.format_p` without its "= ")."""
    return format_p(p, permutations, bare=True)
