"""The paper's Figure 3 shipped as a reference: the array is what the reader reads from the figure, its
provenance names the picture, analysis/kernels.py --reference paper judges it, and analysis/compare.py
shows it beside the runs without being asked."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from analysis import compare
from analysis import kernels as analysis
from tests.test_compare import write_run
from towers import reference
from towers.figure_reader import read_figure

ROOT = Path(__file__).resolve().parents[1]
# the project's shared folder beside the checkout (../shared), or beside the folder of worktrees
FIGURE = next(
    (p for p in (d / "shared/reference/krizhevsky2012-figure3.png" for d in ROOT.parents[:2]) if p.is_file()),
    ROOT.parent / "shared/reference/krizhevsky2012-figure3.png",
)


def test_the_shipped_array_and_its_provenance():
    kernels, about = reference.paper_kernels(), reference.provenance()
    assert kernels.shape == (2, 48, 3, 11, 11) and kernels.dtype == np.float32
    assert about["reading"]["grid"] == [6, 16] and about["reading"]["order"] == "rows"
    assert "Figure 3" in about["figure"] and len(about["picture"]["sha256"]) == 64
    if not FIGURE.is_file():  # the figure itself is not in this repository
        pytest.skip(f"{FIGURE} is not here to read again")
    assert hashlib.sha256(FIGURE.read_bytes()).hexdigest() == about["picture"]["sha256"]
    again = read_figure(FIGURE, towers=2).kernels
    assert np.allclose(again, kernels, atol=1e-6)  # float32 keeps it to a millionth of the pixel range


def test_kernels_py_reference_paper(capsys, tmp_path):
    rec = analysis.main(["--reference", "paper", "--permutations", "999", "--json", str(tmp_path / "fig3.json")])
    printed = capsys.readouterr().out
    assert rec["num_towers"] == 2 and rec["kernels_per_tower"] == 48 and rec["verdict"] in printed
    assert "Figure 3" in printed and f"Δf = {rec['delta_f']:.2f}" in printed
    assert compare.read_reference(tmp_path / "fig3.json")["verdict"] == rec["verdict"]
    with pytest.raises(SystemExit, match="shipped references are: paper"):
        analysis.main(["--reference", "imagenet"])


def test_compare_shows_the_paper_beside_the_runs(tmp_path, capsys):
    write_run(tmp_path / "runs" / "a", 2, 1, seed=0)
    compare.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    printed = capsys.readouterr().out
    rec = reference.paper_record()
    assert f"published {reference.NAME}: {rec['verdict']}, Δf = {rec['delta_f']:.2f}" in printed
    page = (tmp_path / "report" / "report.html").read_text()
    assert f"published: {reference.NAME} (T=2)" in page
    compare.main([str(tmp_path / "runs"), "--out", str(tmp_path / "without"), "--no-paper"])
    assert reference.NAME not in (tmp_path / "without" / "report.html").read_text()
