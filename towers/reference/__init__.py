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
