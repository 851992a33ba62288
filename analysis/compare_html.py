"""The HTML report: one self-contained file (figures embedded), the commit it was made from, the
conditions' lines and table, published figures beside them, the runs' table (sortable, scrolling in
its own box so the page fits a 1400 px window) and every run's config. Part of analysis/compare.py."""

import base64
import html
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import yaml

from analysis.compare_figures import DPI
from analysis.compare_read import Run, table_columns
from analysis.compare_stats import condition_line
from towers.conditions import show
from towers.measure import p_text
from towers.reference import versus_paper_text
from towers.sweep_report import bands_legend, frequency_text

SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], asc = th.dataset.order !== "asc";
  th.closest("tr").querySelectorAll("th").forEach(h => delete h.dataset.order);
  th.dataset.order = asc ? "asc" : "desc";
  const key = r => { const c = r.cells[col], t = (c.dataset.v ?? c.textContent).trim(), n = parseFloat(t);
                     return t === "" ? null : (isNaN(n) || !/^[-+.\\deE]+$/.test(t) ? t : n); };
  const rows = Array.from(body.rows).sort((a, b) => { const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    const c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
    return asc ? c : -c; });
  rows.forEach(r => body.appendChild(r));
}));
"""

# The page fits a 1400 px window: text and figures at most 1300 px wide, every wide table in a box of
# its own that scrolls sideways, long config lines wrapped.
STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; padding: 0 1em; max-width: 1300px; color: #222; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1.5em; }
.scroll { max-width: 100%; overflow-x: auto; max-height: 80vh; overflow-y: auto; border: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; white-space: nowrap; }
th { background: #eee; position: sticky; top: 0; }
table.sortable th { cursor: pointer; }
th[data-order=asc]::after { content: " \\25B2"; } th[data-order=desc]::after { content: " \\25BC"; }
tr.diverged, tr.failed { background: #fdd; } tr.specialised td.verdict { background: #dfd; }
.note { color: #555; font-size: 13px; } li { margin: 0.3em 0; }
pre { white-space: pre-wrap; word-break: break-all; font-size: 12px; background: #f6f6f6; padding: 0.5em; }
"""


def git_commit(where: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the checkout holding this file (or ``where``); "unknown" outside one."""
    folder = Path(where or Path(__file__).resolve().parent)
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit:
        return "unknown"
    dirty = subprocess.run(
        ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return commit + (" (with uncommitted changes)" if dirty else "")


def _css_width(png: bytes, dpi: float = DPI) -> int:
    """The figure's width in CSS pixels (96 per inch) at its saved size, read from the PNG header, so that
    every figure shows at one scale and its 8 pt text as 8 pt (narrower windows scale it down)."""
    return round(int.from_bytes(png[16:20], "big") * 96 / dpi)


def _num(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


P_COLUMNS = ("p_delta_f", "p_eta2", "p_eta2_init")  # permutation p-values (same B per run)


def _cell(run: Run, column: str) -> str:
    value = run.row.get(column)
    if column in P_COLUMNS and value is not None:  # "≤ 1e-4" at the floor; sorted by the number
        return f'<td data-v="{value!r}">{html.escape(p_text(value, run.row.get("permutations")))}</td>'
    if column == "verdict":
        return f'<td class="verdict">{_num(value)}</td>'
    return f"<td>{_num(value)}</td>"


def _interval(x, lo, hi) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if lo is None or hi is None or math.isnan(lo):
        return f"{x:.2f}"
    return f"{x:.2f} [{lo:.2f}, {hi:.2f}]"


def conditions_table(summary: list[dict], references: list[dict], level: float) -> str:
    """Per condition and per published figure: the verdict's numbers side by side."""
    head = [
        "condition",
        "seeds specialised",
        f"one-sided {level:.0%} lower bound",
        "median Δf [order-statistic interval, its level]",
        "one-tower control, same selection: median Δf",
        "towers vs control p (Mann-Whitney)",
        "median ω² [interval]",
        "onset step (median)",
        "at init: specialised / p < α",
        "beside the paper's Figure 3 (a description)",
    ]
    rows = []
    for s in summary:
        level_text = "" if math.isnan(s["median_level"]) else f", {s['median_level']:.1%}"
        control = s["control"] or not s["control_seeds"]
        rows.append(
            [
                f"{s['label']} [{s['id']}]",
                f"{s['specialised']} of {s['seeds']}",
                f"{s['bound']:.2f}",
                _interval(s["delta_f_median"], s["delta_f_low"], s["delta_f_high"]) + level_text,
                "(control)"
                if s["control"]
                else "none"
                if control
                else f"{_num(s['control_median'])} ({s['control_seeds']} seeds, {s['num_towers']} groups)",
                "" if control else f"{s['control_p']:.2g} (n = {s['seeds']} vs {s['control_seeds']})",
                _interval(s["omega2_median"], s["omega2_low"], s["omega2_high"]),
                "" if s["onset_median"] is None else f"{s['onset_median']:g} ({s['onsets']} seeds)",
                f"{s['init_specialised']} of {s['init_judged']} / {s['init_significant']} of {s['init_p']}",
                versus_paper_text(s["versus_paper"]) if s.get("versus_paper") else "",
            ]
        )
    for ref in references:
        fractions = ", ".join(
            _interval(f, lo, hi)
            for f, lo, hi in zip(
                ref["colour_fraction"] or [], ref["colour_fraction_low"] or [], ref["colour_fraction_high"] or []
            )
        )
        rows.append(
            [
                f"published: {ref['name']} (T={ref['num_towers']})",
                ref["verdict"],
                "",
                f"Δf {_num(ref['delta_f'])}, p {p_text(ref['p_delta_f'], ref['permutations'])}",
                "",
                "",
                "" if ref["omega2"] is None else f"{ref['omega2']:.3f}",
                "",
                f"colour fractions {fractions}",
                f"frequency {frequency_text(ref)}" if frequency_text(ref) else "",
            ]
        )
    return (
        "<div class=scroll><table class=conditions><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        + "</tbody></table></div>"
    )


def conditions_section(summary: list[dict]) -> str:
    """Every condition's settings in full, by its id, folded (what makes runs poolable: towers.conditions)."""
    parts = []
    for s in summary:
        settings = "\n".join(show(k, v) + f"   ({k})" for k, v in s["condition"].items())
        parts.append(
            f"<details><summary>{html.escape(s['id'])}: {html.escape(s['label'])}</summary>"
            f"<pre>{html.escape(settings)}</pre></details>"
        )
    return "\n".join(parts)


def sensitivity_table(summary: list[dict]) -> str:
    """Conditions x colour cuts: k of n seeds specialised at that cut (median delta f)."""
    cuts = sorted({row["cut"] for s in summary for row in s["sensitivity"]})
    if not cuts:
        return "<p class=note>No record carries a sensitivity table (bisection.json format 1).</p>"
    head = "".join(f"<th>cut {c:g}</th>" for c in cuts)
    rows = []
    for s in summary:
        cells = {row["cut"]: row for row in s["sensitivity"]}
        rows.append(
            f"<tr><td>{html.escape(s['label'])}</td>"
            + "".join(
                f"<td>{cells[c]['specialised']} of {cells[c]['seeds']} ({_num(cells[c]['delta_f_median'])})</td>"
                if c in cells
                else "<td></td>"
                for c in cuts
            )
            + "</tr>"
        )
    return (
        f"<div class=scroll><table><thead><tr><th>condition</th>{head}</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )


def configs_section(runs: list[Run]) -> str:
    """Every run's config, as read, folded."""
    parts = []
    for run in runs:
        text = (
            yaml.safe_dump(run.config, sort_keys=True, allow_unicode=True, default_flow_style=False)
            if run.config
            else "(no config found)"
        )
        parts.append(f"<details><summary>{html.escape(run.name)}</summary><pre>{html.escape(text)}</pre></details>")
    return "\n".join(parts)


def report_html(
    runs: list[Run],
    summary: list[dict],
    figures: dict,
    references: list[dict],
    source: str,
    commit: str,
    level: float = 0.95,
) -> str:
    """``figures``: {title: (note, png bytes)}."""
    columns = table_columns(runs)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join(
        f'<tr class="{html.escape(str(r.row["status"] or ""))} '
        f'{html.escape(str(r.row["verdict"] or ""))}">' + "".join(_cell(r, c) for c in columns) + "</tr>"
        for r in runs
    )
    lines = [f"<li>{html.escape(condition_line(s, level))}</li>" for s in summary]
    lines += [
        f"<li>published figure {html.escape(ref['name'])}: {html.escape(ref['verdict'])}, Δf "
        f"{_num(ref['delta_f'])}, p "
        f"{html.escape(p_text(ref['p_delta_f'], ref['permutations']))}</li>"
        for ref in references
    ]
    left_out = [r for r in runs if not r.judged]
    if left_out:
        why = {
            r.name: str(r.row["status"] or "no final measurement")
            if not r.usable
            else r.row["message"] or "no verdict in its bisection.json"
            for r in left_out
        }
        lines.append(
            "<li>Not counted in any statistic: "
            + ", ".join(f"{html.escape(r.name)} ({html.escape(why[r.name])})" for r in left_out)
            + "</li>"
        )
    imgs = "\n".join(
        f"<h2>{html.escape(title)}</h2>\n<p class=note>{html.escape(note)}</p>\n"
        f'<img alt="{html.escape(title)}" width="{_css_width(png)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for title, (note, png) in figures.items()
    )
    bands = next((r.last.value("frequency_bands") for r in runs if r.last and r.last.value("frequency_bands")), None)
    frequency_note = (
        f" towerK_frequency_grey / _colour: its grey / colour kernels counted by the dominant spatial frequency of "
        f"their luminance part, {html.escape(bands_legend(bands))}; towerK_frequency_median: the median over its grey "
        "and colour kernels, cycles per pixel (a description beside the verdict, not part of it)."
        if bands
        else ""
    )
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>towers: the verdict across runs</title>
<style>{STYLE}</style></head><body>
<h1>Do the first-layer kernels split into a colour-agnostic and a colour-specific tower?</h1>
<p class=note>{len(runs)} runs from {html.escape(source)}; made {when} with analysis/compare.py at commit
<code id=commit>{html.escape(commit)}</code>. A run is <i>specialised</i> when one tower is largely grey and
another largely colour (the verdict, towers/verdict.py, the README's "The verdict"); Δf is the specific
tower's colour fraction less the agnostic tower's. With one tower, the control, its kernels are split into
random groups and judged the same way: into two on its own row, and into as many as the towers it is compared
with. A condition is every setting that can change the network, its data, its training or the measurement
(all but the seed and the settings towers/conditions.py names, each with its reason): runs that differ in any
are never pooled. Below, each condition is named by the settings that differ between them; its id opens the
full list. Every interval here is checked for coverage by benchmarks/seed_simulation.py (BENCHMARKS.md).</p>
<ul>{"".join(lines)}</ul>
{conditions_table(summary, references, level)}
<h2>Conditions</h2>
{conditions_section(summary)}
<h2>Sensitivity to the colour cut</h2><p class=note>Seeds specialised when a kernel counts as colour from
a score of <i>cut</i> on (the rule's cut is 1/3 ≈ 0.333; everything else in the rule unchanged), and their median
Δf. A verdict that holds only near one cut is fragile.</p>
{sensitivity_table(summary)}
{imgs}
<h2>Runs</h2><p class=note>Click a column header to sort. towerK_colour_fraction: colour kernels / (grey + colour)
of tower K (of half A, B for the one-tower control) with its exact 95% interval; agnostic/specific tower named
only for specialised runs.{frequency_note}</p>
<div class=scroll><table class="runs sortable"><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table></div>
<h2>Configs of the runs</h2>
{configs_section(runs)}
<script>{SORT_SCRIPT}</script>
</body></html>
"""
