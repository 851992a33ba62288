"""towers.figure_reader and analysis/kernels.py on pictures: known kernels drawn in every layout people publish
(the paper's, also on a page with text; Caffe's vis_square; cuda-convnet's shownet; matplotlib subplots; a run's
kernels.png), saved as PNG and JPEG quality 75, give back their scores, ranking, verdict and tower order; a
shrinking figure is read within 0.05 or refused; errors name what to try next."""

import functools
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from analysis import kernels as analysis
from tests import figure_layouts as layouts
from tests.fixtures.kernels import colour, gabor, noisy, towers_of, unit
from towers.color import color_specificity
from towers.figure_reader import FigureError, match_chroma_resolution, parse_grid, read_figure
from towers.figures import kernel_grid
from towers.verdict import NOT_SPECIALISED, SPECIALISED, verdict

B = 999


def spread_towers(mixed: bool = False) -> torch.Tensor:
    """A grey tower and a colour tower whose scores spread (so a reading must keep their order, not only
    the two modes). Grey: Gabors tinted by 0 to 50% of a random chromatic direction (scores 0 to 0.2);
    colour: opponent gratings desaturated by 0 to 100% grey (scores 1 to 0.5) and the fixture's colour
    blobs (0.92); 5% i.i.d. noise on all. ``mixed``: each tower half of each."""
    g = torch.Generator().manual_seed(7)
    chroma = torch.randn(48, 3, generator=g)
    chroma = chroma - chroma.mean(1, keepdim=True)
    chroma = chroma / chroma.norm(dim=1, keepdim=True)  # unit, orthogonal to grey
    grey_axis = torch.ones(3) / 3**0.5
    tint = grey_axis + torch.linspace(0, 0.5, 48)[:, None] * chroma
    grey_tower = unit(gabor(48, 0)[:, :1] * tint[:, :, None, None])
    desaturated = chroma[:24] + torch.linspace(0, 1, 24)[:, None] * grey_axis
    gratings = unit(gabor(24, 5)[:, :1] * desaturated[:, :, None, None])
    colour_tower = torch.cat([gratings, colour(48, 1)[24:]])
    grey_tower, colour_tower = noisy(grey_tower, seed=3), noisy(colour_tower, seed=4)
    if mixed:
        return towers_of(
            torch.cat([grey_tower[::2], colour_tower[::2]]), torch.cat([grey_tower[1::2], colour_tower[1::2]])
        )
    return towers_of(grey_tower, colour_tower)


def paper_figure(
    kernels: torch.Tensor, columns: int = 12, zoom: int = 5, line: int = 2, line_level: int = 20, scale: float = 1.0
) -> bytes:
    """Figure 3 as a publication would show it: one global min/max for all kernels (one grey offset),
    kernels enlarged, dark separating lines, tower after tower with no extra gap, the whole picture
    optionally resized (bicubic), saved as JPEG at quality 75 (4:2:0 chroma, Pillow's default)."""
    k = kernels.flatten(0, 1).numpy()
    k = np.round(255 * (k - k.min()) / (k.max() - k.min())).astype(np.uint8)
    rows = len(k) // columns
    cell = 11 * zoom
    cells = k.repeat(zoom, 2).repeat(zoom, 3).transpose(0, 2, 3, 1).reshape(rows, columns, cell, cell, 3)
    canvas = np.full((rows, columns, cell + line, cell + line, 3), line_level, np.uint8)
    canvas[:, :, line:, line:] = cells  # a line above and left of every cell ...
    picture = canvas.transpose(0, 2, 1, 3, 4).reshape(rows * (cell + line), columns * (cell + line), 3)
    picture = np.pad(picture, ((0, line), (0, line), (0, 0)), constant_values=line_level)  # ... and a frame
    image = Image.fromarray(picture)
    if scale != 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


# JPEG quality 75 quantises chroma coarsely: fine colour detail (a Gabor's tint) loses over 0.05 of its
# score at kernel pixels under 5.5 picture pixels (always downward; see
# test_without_matching_the_chroma_resolution_jpeg_loses_colour), so the reader refuses such JPEGs.


def assert_read_back(kernels, read, max_error=0.05):
    own, back = color_specificity(kernels).numpy(), color_specificity(read.kernels).numpy()
    assert read.kernels.shape == tuple(kernels.shape)
    assert np.abs(back - own).max() < max_error
    assert spearmanr(back, own).statistic >= 0.95
    expected = verdict(kernels, permutations=B, sensitivity=False)
    got = verdict(read.kernels, permutations=B, sensitivity=False)
    assert got.verdict == expected.verdict
    assert (got.agnostic_tower, got.specific_tower) == (expected.agnostic_tower, expected.specific_tower)
    assert got.kernel_class == expected.kernel_class
    return got


def test_a_runs_own_kernels_png_reads_back(tmp_path):
    kernels = spread_towers()
    path = tmp_path / "kernels.png"
    # the callback's picture: per-kernel stretch, white padding, a gap between the towers' blocks
    Image.fromarray(kernel_grid(kernels)).save(path)
    read = read_figure(path, towers=2)
    info = read.info()
    assert info["grid"] == [6, 16] and info["row_blocks"] == [3, 3] and info["cell_px"] == [44, 44]
    assert read.offset == "kernel" and info["chroma_subsampling"] == [1, 1]
    assert assert_read_back(kernels, read).verdict == SPECIALISED
    # globally scaled, the kernels' own grey means survive: closer still
    Image.fromarray(kernel_grid(kernels, global_scale=True)).save(path)
    read = read_figure(path, towers=2)
    assert read.offset == "global"
    assert_read_back(kernels, read, max_error=0.02)


def test_a_towers_last_row_of_blank_cells_is_dropped(tmp_path):
    kernels = spread_towers()[:, :40]  # 40 kernels in rows of 16: 8 blank cells close each tower's block
    read = read_figure(kernel_grid(kernels) / 255, towers=2)
    assert read.blank == 16 and read.kernels.shape == (2, 40, 3, 11, 11)
    assert np.abs(color_specificity(read.kernels) - color_specificity(kernels)).max() < 0.05


def test_a_paper_style_jpeg_figure_reads_back(tmp_path):
    """Kernel pixels of 8 picture pixels read back within 0.05; at 6, JPEG's coarse chroma may cost more
    (0.051 on these kernels in kernel_grid's layout), so a JPEG of that size is refused."""
    kernels = spread_towers()
    path = tmp_path / "figure3.jpg"
    path.write_bytes(paper_figure(kernels, zoom=6))
    with pytest.raises(FigureError, match="smaller than the 77 px"):
        read_figure(path, towers=2)
    path.write_bytes(paper_figure(kernels, zoom=8))
    read = read_figure(path, towers=2)
    assert read.info()["grid"] == [8, 12] and read.offset == "global" and read.chroma == (2, 2)
    got = assert_read_back(kernels, read)
    assert got.verdict == SPECIALISED and got.weak_count == [0, 0]
    # JPEG's chroma noise leaves the grey kernels grey: their scores stay far under the colour cut
    assert color_specificity(read.kernels[0]).max() < 0.25


def test_weak_kernels_in_a_globally_scaled_figure_read_back_weak():
    kernels = spread_towers().clone()
    kernels[0, ::12] *= 0.1  # four faint kernels in each tower: weak (under a quarter of the median norm)
    kernels[1, 5::12] *= 0.1
    picture = np.asarray(Image.open(io.BytesIO(paper_figure(kernels, zoom=8))).convert("RGB")) / 255
    read = read_figure(picture, towers=2, chroma=(2, 2))
    expected = verdict(kernels, permutations=B, sensitivity=False)
    got = verdict(read.kernels, permutations=B, sensitivity=False)
    assert expected.weak_count == got.weak_count == [4, 4] and got.kernel_class == expected.kernel_class
    assert got.verdict == expected.verdict == SPECIALISED


def test_without_matching_the_chroma_resolution_jpeg_loses_colour():
    kernels = spread_towers()
    # kernel pixels of 3 picture pixels: 4:2:0 chroma loses much of the fine colour detail; matching
    # the luma to it takes back most of that loss (what is left: the chroma quantisation of quality 75)
    picture = np.asarray(Image.open(io.BytesIO(paper_figure(kernels, zoom=3))).convert("RGB")) / 255
    own = color_specificity(kernels).numpy()
    plain = color_specificity(read_figure(picture, towers=2, chroma=(1, 1)).kernels).numpy() - own
    matched = read_figure(picture, towers=2, chroma=(2, 2), refuse_small=False).kernels
    matched = color_specificity(matched).numpy() - own
    assert plain.min() < -0.25 and matched.min() > plain.min() / 4 and matched.max() < 0.05
    # matching leaves a picture without chroma detail as it was
    grey = np.repeat(np.linspace(0, 1, 20 * 30).reshape(20, 30, 1), 3, 2)
    assert np.allclose(match_chroma_resolution(grey, (2, 2))[2:-2, 2:-2], grey[2:-2, 2:-2], atol=1e-12)


def test_a_resized_figure_and_a_given_grid_read_back():
    kernels = spread_towers()
    picture = paper_figure(kernels, columns=16, zoom=10, scale=0.87)
    picture = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB")) / 255
    read = read_figure(picture, towers=2, chroma=(2, 2))  # lines blurred to under 2 px
    assert read.info()["grid"] == [6, 16]
    assert_read_back(kernels, read)
    given = read_figure(picture, towers=2, chroma=(2, 2), grid=(6, 16))
    assert given.rows == read.rows and given.cols == read.cols
    assert read_figure(picture, towers=4).order == "kernels"  # 6 rows: only 24 kernels in reading order each
    with pytest.raises(FigureError, match="go to 5 towers equally neither"):
        read_figure(picture, towers=5)


def test_a_mixed_construction_reads_back_not_specialised():
    kernels = spread_towers(mixed=True)
    picture = np.asarray(Image.open(io.BytesIO(paper_figure(kernels, zoom=8))).convert("RGB")) / 255
    got = assert_read_back(kernels, read_figure(picture, towers=2, chroma=(2, 2)), 0.05)
    assert got.verdict == NOT_SPECIALISED and got.agnostic_tower is None


def test_parse_grid_and_pictures_without_lines():
    assert parse_grid("8x12") == (8, 12) and parse_grid("6X16") == (6, 16)
    with pytest.raises(FigureError, match="expected two counts"):
        parse_grid("96")
    kernels = spread_towers()
    abutting = kernel_grid(kernels, pad=0, gap=0, labels=False) / 255  # no lines at all: only a given grid can cut it
    with pytest.raises(FigureError, match="--grid"):
        read_figure(abutting, towers=2)
    read = read_figure(abutting, towers=2, grid=(6, 16))
    assert np.abs(color_specificity(read.kernels) - color_specificity(kernels)).max() < 0.05


def test_analysis_script_reads_figures_and_several_inputs(tmp_path, capsys):
    kernels = spread_towers()
    Image.fromarray(kernel_grid(kernels)).save(tmp_path / "kernels.png")
    (tmp_path / "figure3.jpg").write_bytes(paper_figure(kernels, zoom=8))
    np.save(tmp_path / "conv1.npy", kernels.flatten(0, 1).numpy())
    with pytest.raises(SystemExit, match="--towers"):
        analysis.main([str(tmp_path / "figure3.jpg")])
    out = tmp_path / "figure3.json"
    rec = analysis.main(
        [
            str(tmp_path / "figure3.jpg"),
            "--towers",
            "2",
            "--permutations",
            str(B),
            "--bootstrap",
            "200",
            "--json",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["verdict"] == rec["verdict"] == SPECIALISED and saved["delta_f"] == rec["delta_f"]
    assert saved["figure"]["grid"] == [8, 12] and saved["figure"]["offset"] == "global"
    assert {"statistics", "colour_fraction", "agnostic_tower", "specific_tower", "score"} <= set(saved)

    # several inputs of every kind; one that cannot be read does not stop the others
    (tmp_path / "notes.png").write_bytes(b"not a picture")
    inputs = [tmp_path / name for name in ("kernels.png", "notes.png", "figure3.jpg", "conv1.npy")]
    records = analysis.main(
        [str(p) for p in inputs]
        + ["--towers", "2", "--permutations", str(B), "--bootstrap", "200", "--out", str(tmp_path / "out")]
    )
    assert [r["verdict"] for r in records] == [SPECIALISED, None, SPECIALISED, SPECIALISED]
    assert "cannot be read as a picture" in records[1]["error"]
    printed = capsys.readouterr().out
    assert printed.count("specialised: largely colour-agnostic: tower 1") >= 6  # under each table, in the summary
    assert printed.count("Δf = 1.00") >= 6
    summary = printed[printed.rindex("summary") :].splitlines()[1:]
    assert [line.split()[0] for line in summary] == [str(p) for p in inputs]
    assert "no verdict: " in summary[1]
    assert (tmp_path / "out" / "figure3_bisection.json").is_file()
    with pytest.raises(SystemExit) as exit:
        analysis.main([str(tmp_path / "kernels.png"), str(tmp_path / "conv1.npy"), "--towers", "2", "--json", str(out)])
    assert exit.value.code == 2 and "--json writes one input's record" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the layouts people publish

LAYOUTS = {  # name: (drawing, the order the towers must be read in); cells of 77 px or more, JPEG's minimum
    "paper": (lambda k: layouts.paper(k, zoom=8), "rows"),
    "paper on a page": (lambda k: layouts.on_a_page(layouts.paper(k, zoom=8)), "rows"),
    "vis_square": (lambda k: layouts.vis_square(k, inches=12), "kernels"),
    "shownet": (lambda k: layouts.shownet(k, inches=16), "rows"),
    "subplots (save_W1)": (lambda k: layouts.subplots(k, inches_per_axes=1.3), "rows"),
    "kernels.png": (lambda k: kernel_grid(k, global_scale=True, zoom=7), "rows"),
}


@functools.cache
def drawn(layout: str) -> np.ndarray:
    return LAYOUTS[layout][0](spread_towers())


@pytest.fixture(scope="module")
def known():
    kernels = spread_towers()
    return kernels, verdict(kernels, permutations=B, sensitivity=False)


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_reads_back(known, layout, format):
    """Known kernels drawn as each tool draws them, saved as PNG and as JPEG quality 75: the same scores
    within 0.05, the same ranking, the same verdict with the same towers, read without any option."""
    kernels, expected = known
    order = LAYOUTS[layout][1]
    read = read_figure(layouts.saved(drawn(layout), format), towers=2, chroma=(2, 2) if format == "JPEG" else None)
    assert read.order == order and any(f"towers by {order}" in note for note in read.notes)
    got = assert_read_back(kernels, read)
    assert got.verdict == expected.verdict == SPECIALISED
    if layout == "paper on a page":
        assert any("cropped the rest away" in note for note in read.notes)


def test_an_impossible_order_names_the_possible_one():
    picture = layouts.saved(drawn("vis_square"), "PNG")  # kernel 48 opens mid-row
    with pytest.raises(FigureError, match="--order kernels can") as error:
        read_figure(picture, towers=2, order="rows")
    assert "--towers" not in str(error.value)
    assert read_figure(picture, towers=2, order="kernels").order == "kernels"


def test_a_grid_problem_does_not_blame_the_tower_count(known):
    """Cells that cannot split into the towers say what to check about the grid, not --towers."""
    picture = layouts.saved(layouts.paper(known[0][:, :40], columns=10), "PNG")  # 80 kernels, 8 rows
    with pytest.raises(FigureError) as error:
        read_figure(picture, towers=3)
    assert "--grid ROWSxCOLS" in str(error.value) and "--towers" not in str(error.value)


SCALES = (1, 0.75, 0.6, 0.5, 0.4, 0.33, 0.25)


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_a_shrinking_figure_is_read_within_005_or_refused(known, format):
    """A paper-style figure (6 x 16 cells of 57 px, like Figure 3's) from 1x down to 0.25x: every size
    is read within 0.05 of the kernels' scores with the same verdict, or refused with the size it needs."""
    kernels, expected = known
    own = color_specificity(kernels).numpy()
    picture = Image.fromarray(layouts.paper(kernels, zoom=5 if format == "PNG" else 9))
    outcomes = []
    for scale in SCALES:
        small = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BICUBIC)
        try:
            read = read_figure(
                layouts.saved(np.asarray(small), format), towers=2, chroma=(2, 2) if format == "JPEG" else None
            )
        except FigureError as e:
            assert "px" in str(e) or "--grid" in str(e)
            outcomes.append("refused")
            continue
        back = color_specificity(read.kernels).numpy()
        assert np.abs(back - own).max() <= 0.05, scale
        assert verdict(read.kernels, permutations=B, sensitivity=False).verdict == expected.verdict
        outcomes.append("read")
    assert outcomes[0] == "read" and outcomes[-1] == "refused"


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_real_kernels_in_caffes_layout_read_back(format):
    """The paper's own kernels (towers.reference: weak and low-contrast ones among them) drawn by vis_square:
    the same scores within 0.05, ranking and verdict, tower 1 (GPU 1) still the grey one."""
    from towers.reference import paper_kernels

    kernels = torch.from_numpy(paper_kernels().astype(np.float64))
    picture = layouts.saved(layouts.vis_square(kernels, inches=12), format)
    read = read_figure(picture, towers=2, chroma=(2, 2) if format == "JPEG" else None)
    assert read.order == "kernels"
    got = verdict(read.kernels, permutations=B, sensitivity=False)
    own, back = color_specificity(kernels).numpy(), color_specificity(read.kernels).numpy()
    assert np.abs(back - own).max() < 0.05 and spearmanr(back, own).statistic >= 0.95
    assert got.verdict == verdict(kernels, permutations=B, sensitivity=False).verdict
    assert got.colour_fraction[0] < 0.1 < 0.5 < got.colour_fraction[1]


def test_kernels_png_with_framed_weak_kernels(tmp_path):
    """analysis/kernels.py draws like the callback (one global scale, the verdict's weak kernels framed), and
    that picture reads back: the same weak kernels, the others within 0.05 (a faint kernel's own score is
    8-bit quantisation noise, which is why the verdict does not judge it)."""
    kernels = spread_towers().clone()
    kernels[0, ::12] *= 0.1
    kernels[1, 5::12] *= 0.1
    np.save(tmp_path / "conv1.npy", kernels.flatten(0, 1).numpy())
    rec = analysis.main([str(tmp_path / "conv1.npy"), "--towers", "2", "--permutations", str(B), "--bootstrap", "200"])
    weak = np.array(rec["kernel_class"]).reshape(2, 48) == "weak"
    assert weak.sum() == 8
    drawn = np.asarray(Image.open(tmp_path / "conv1_kernels.png").convert("RGB"))
    assert np.array_equal(drawn, kernel_grid(kernels, global_scale=True, weak=weak))
    read = read_figure(tmp_path / "conv1_kernels.png", towers=2)
    assert read.offset == "global"
    error = np.abs(color_specificity(read.kernels) - color_specificity(kernels)).numpy().reshape(2, 48)
    assert error[~weak].max() < 0.05
    assert (
        np.array(verdict(read.kernels, permutations=B, sensitivity=False).kernel_class).reshape(2, 48) == "weak"
    ).tolist() == weak.tolist()
