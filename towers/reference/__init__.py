"""The paper's Figure 3 as a reference that ships with the project: its 96 conv1 kernels, read once from the
figure with :mod:`towers.figure_reader`, kept as a small array with where it came from.

    from towers.reference import paper_kernels, paper_record, PROVENANCE
    paper_kernels()            # (2, 48, 3, 11, 11) float32, RGB; GPU 1 (top three rows) is tower 1
    paper_record()             # its record (towers.measure.measure): scores, verdict, ... and the provenance

    python -m towers.reference FIGURE.png     # rebuild the array from the figure (done once; see provenance())

The kernels are in the units the reader gives (the figure's pixel range, its grey offset removed): the
figure was drawn with one global scale, so the kernels' relative sizes (and with them the weak-kernel rule)
and their colour scores survive; their absolute size does not.
"""

import copy
import functools
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
KERNELS_FILE = HERE / "krizhevsky2012_figure3.npy"
PROVENANCE_FILE = HERE / "krizhevsky2012_figure3.json"
NAME = "krizhevsky2012_figure3"
PAPER = "paper"  # analysis/kernels.py --reference paper


def provenance() -> dict:
    return json.loads(PROVENANCE_FILE.read_text())


def paper_kernels() -> np.ndarray:
    return np.load(KERNELS_FILE, allow_pickle=False)


def paper_record(permutations: int = 9999, seed: int = 0) -> dict:
    """Figure 3 measured and judged like any run (:func:`towers.measure.measure`), with ``source`` and
    ``provenance`` (a fresh copy of the one measurement per process and settings)."""
    return copy.deepcopy(_paper_record(permutations, seed))


@functools.cache
def _paper_record(permutations: int, seed: int) -> dict:
    from towers.measure import measure

    about = provenance()
    record = measure(paper_kernels().astype(np.float64), permutations=permutations, seed=seed)
    record["source"] = (
        "Krizhevsky et al. 2012, Figure 3 (shipped with towers: towers/reference, read once from the figure)"
    )
    record["figure"] = about["reading"]
    record["provenance"] = about
    return record


def build(figure: Path) -> dict:
    """Read Figure 3 from ``figure`` with the default reader settings and write the array and its provenance."""
    from PIL import Image

    from towers.figure_reader import read_figure
    from towers.files import write_atomic

    read = read_figure(figure, towers=2)
    kernels = read.kernels.astype(np.float32)
    data = figure.read_bytes()
    about = {
        "paper": "Krizhevsky, Sutskever & Hinton, ImageNet Classification with Deep Convolutional Neural Networks, NIPS 2012",
        "figure": "Figure 3 (96 conv1 kernels of 11x11x3; the top 48 learned on GPU 1, the bottom 48 on GPU 2)",
        "claim": "§6.1: the kernels on GPU 1 are largely color-agnostic, those on GPU 2 largely color-specific",
        "picture": {"file": figure.name, "sha256": hashlib.sha256(data).hexdigest()},
        "read_with": "towers.figure_reader.read_figure(figure, towers=2), default settings",
        "reading": read.info(),
        "array": "float32 (towers, kernels per tower, 3, 11, 11), RGB, display offset removed, figure pixel units",
    }
    with Image.open(figure) as im:
        about["picture"]["pixels"] = [im.height, im.width]
    buffer = io.BytesIO()
    np.save(buffer, kernels, allow_pickle=False)
    write_atomic(KERNELS_FILE, buffer.getvalue())
    write_atomic(PROVENANCE_FILE, json.dumps(about, indent=1) + "\n")
    return about


def write_paper_record(folder: Path, permutations: int = 9999, seed: int = 0) -> Path:
    """Figure 3's record written as ``folder/krizhevsky2012_figure3.json`` (what ``analysis/compare.py``
    shows beside the runs, the form ``--reference`` reads); returns the path."""
    from towers.records import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{NAME}.json"
    write_json(path, paper_record(permutations, seed))
    return path


# ----------------------------------------------------------------------------- runs beside Figure 3
# What a run's record must carry to be set beside Figure 3 (towers.records.SUMMARY_FIELDS has them).
SIDE_FIELDS = ("delta_f", "grey_fraction_agnostic", "colour_fraction_specific")


def seed_delta_f(delta_f) -> float:
    """A run's delta f as a seed counts it: a run with no largely grey or no largely colour side (no split,
    delta f None or nan) is 0, below every split. The one convention of the report's and the sweep's medians."""
    return 0.0 if delta_f is None or not math.isfinite(delta_f) else float(delta_f)


def sides(record: dict) -> tuple[float, float, float] | None:
    """(delta f, colour fraction of the agnostic side, of the specific side) of a record's fields (a
    :meth:`towers.records.Record.summary` or a ``measure`` record); None when the run has no split (a side
    empty: no delta f). Fractions are colour / (grey + colour) kernels pooled over the side."""
    delta, grey, colour = (record.get(k) for k in SIDE_FIELDS)
    if any(x is None or not math.isfinite(x) for x in (delta, grey, colour)):
        return None
    return float(delta), 1.0 - float(grey), float(colour)


def versus_paper(results: list[dict], paper: dict | None = None) -> dict:
    """How one condition's seeds compare with the paper's Figure 3 (a description, not a test): ``results``
    per seed the record's fields (:data:`SIDE_FIELDS`); ``paper`` Figure 3's record (default
    :func:`paper_record`, the one owner of its numbers). Returns the seeds, those with a split (both a
    largely grey and a largely colour side, as Figure 3 has), those at least as split as Figure 3 (a split
    with delta f >= Figure 3's), the median delta f over all seeds (no split counted 0), the median colour
    fraction of each side over the seeds with a split, and Figure 3's own delta f and side fractions."""
    paper_sides = sides(paper if paper is not None else paper_record())
    found = [sides(r) for r in results]
    split = [s for s in found if s is not None]
    median = lambda xs: float(np.median(xs)) if len(xs) else math.nan  # noqa: E731
    return {
        "seeds": len(results),
        "split": len(split),
        "as_split": sum(paper_sides is not None and s[0] >= paper_sides[0] for s in split),
        "delta_f_median": median([seed_delta_f(r.get("delta_f")) for r in results]),
        "agnostic_colour_median": median([s[1] for s in split]),
        "specific_colour_median": median([s[2] for s in split]),
        "paper_delta_f": paper_sides[0] if paper_sides else math.nan,
        "paper_agnostic_colour": paper_sides[1] if paper_sides else math.nan,
        "paper_specific_colour": paper_sides[2] if paper_sides else math.nan,
    }


def versus_paper_text(v: dict) -> str:
    """One line: ``5 seeds: median Δf 0.41 (Figure 3: 0.55); colour agnostic | specific side 10% | 50%
    (Figure 3: 6% | 62%; median over the 4 seeds with a split); 2 of 5 at least as split as Figure 3``."""
    pct = lambda x: "n/a" if not math.isfinite(x) else f"{100 * x:.0f}%"  # noqa: E731
    num = lambda x: "n/a" if not math.isfinite(x) else f"{x:.2f}"  # noqa: E731
    return (
        f"{v['seeds']} seeds: median Δf {num(v['delta_f_median'])} (Figure 3: {num(v['paper_delta_f'])}; a seed "
        f"without a split counted 0); colour fraction agnostic | specific side "
        f"{pct(v['agnostic_colour_median'])} | {pct(v['specific_colour_median'])} (Figure 3: "
        f"{pct(v['paper_agnostic_colour'])} | {pct(v['paper_specific_colour'])}; median over the {v['split']} "
        f"seeds with a split); {v['as_split']} of {v['seeds']} at least as split as Figure 3 (a split with "
        f"Δf ≥ {num(v['paper_delta_f'])})"
    )
