"""A W&B report that compares the verdict across the runs of a project or sweep, live.

    python analysis/dashboard.py --entity E --project P                  # all runs of the project
    python analysis/dashboard.py --entity E --project P --sweep ID       # the runs of one W&B sweep
    python analysis/dashboard.py --entity E --project P --group demo     # runs of an offline towers.sweep, synced
    python analysis/dashboard.py --entity E --project P --dry-run        # print the panels, save nothing

Built with W&B's ``wandb-workspaces`` library (``pip install wandb-workspaces``, the ``dashboard``
extra of this package); ``save()`` needs a W&B login. ``--update URL`` rewrites the blocks of an
existing report instead of creating a new one. The panels read the keys that
``towers.callbacks.KernelBisectionCallback`` logs: the verdict's scalars (``verdict/delta_f``,
``verdict/specialised``, ``tower_<k>/colour_fraction``), the run summary's ``verdict``, ``delta_f``
and ``colour_fraction`` (the run comparer shows them beside the config), η² (``bisection/eta2``),
``tower_<k>/color_score`` and the ``bisection/kernels`` images; and the config that ``train.py``
stores in the run (``model.*``, ``data.*``, ``trainer.precision``, nested as in the YAML). W&B's
panels pool what they group: group by tower count only runs of one precision, data set and width
policy (filter by them; ``analysis/compare.py`` never pools them, and gives the statistics across
seeds, the one-sided bounds and the test against the one-tower control that panels cannot). The
panels that pool runs group them by ``condition``, the id every run logs in its W&B config
(:func:`towers.conditions.condition_id`, ``T2-3fa2b1c0``: its tower count and a hash of every setting
but the seed), the same id the report names its conditions by; the summary keys are the record's
(:data:`towers.records.SUMMARY_FIELDS`).
"""

import argparse
import sys

from towers.records import (  # noqa: F401
    DELTA_F,
    ETA2,
    ETA2_NULL,
    GRID,
    P_DELTA_F,
    P_VALUE,
    SCORE_PLOT,
    SPECIALISED,
    TEST_ACC,
    VAL_ACC,
    color_score_key,
    image_key,
)
from towers.records import SUMMARY_FIELDS as SUMMARY_KEYS  # noqa: F401  the run summary's answer the comparer shows
from towers.records import colour_fraction_key as colour_fraction

# What the runs log (towers.records, the callback's keys) and the config keys train.py stores (nested, as in the YAML).
CONDITION = "condition"  # towers.runs.SaveRunConfig logs towers.conditions.condition_id into the W&B config
KERNELS, SCORES = image_key(GRID), image_key(SCORE_PLOT)
NUM_TOWERS, LR, BATCH_SIZE, SEED = "model.num_towers", "model.lr", "data.batch_size", "seed_everything"
PRECISION = "trainer.precision"


def tower_score(k: int, init: bool = False) -> str:
    return color_score_key(k, init=init)


def runset(entity: str, project: str, sweep: str | None = None, group: str | None = None):
    import wandb_workspaces.reports.v2 as wr

    filters = []
    if sweep:
        filters.append(f"Sweep = '{sweep}'")
    if group:
        filters.append(f"Group = '{group}'")
    name = f"sweep {sweep}" if sweep else f"group {group}" if group else "all runs"
    return wr.Runset(entity=entity, project=project, name=name, filters=" and ".join(filters))


def panels(max_towers: int = 4) -> dict:
    """The panels, by section: {section title: [panel, ...]}."""
    import wandb_workspaces.reports.v2 as wr

    towers, condition = wr.Config(NUM_TOWERS), wr.Config(CONDITION)
    fractions = [colour_fraction(k) for k in range(1, max_towers + 1)]
    return {
        "The verdict by tower count": [
            wr.ScatterPlot(
                title="Δf per run (seed) against tower count (1 tower: its random halves)",
                x=towers,
                y=wr.SummaryMetric(DELTA_F),
            ),
            wr.BarPlot(
                title="fraction of runs specialised, by condition (mean of verdict/specialised)",
                metrics=[SPECIALISED],
                groupby=condition,
                groupby_aggfunc="mean",
                groupby_rangefunc="none",
                orientation="v",
            ),
            wr.BarPlot(
                title="Δf by condition: median over runs, min-max",
                metrics=[DELTA_F],
                groupby=condition,
                groupby_aggfunc="median",
                groupby_rangefunc="minmax",
                orientation="v",
            ),
            wr.LinePlot(title="Δf over training, run by run", x="Step", y=[DELTA_F]),
        ],
        "The verdict run by run": [
            wr.BarPlot(title="Δf per run", metrics=[DELTA_F], orientation="h"),
            wr.BarPlot(title="specialised (1) or not (0), per run", metrics=[SPECIALISED], orientation="h"),
            # config and summary side by side: verdict, delta_f, colour_fraction, trainer.precision
            wr.RunComparer(diff_only="split"),
        ],
        "Tower colour fractions": [
            wr.LinePlot(title="colour fraction per tower over training", x="Step", y=fractions),
            wr.BarPlot(
                title="colour fraction per tower by tower count: median over runs, min-max",
                metrics=fractions,
                groupby=towers,
                groupby_aggfunc="median",
                groupby_rangefunc="minmax",
                orientation="v",
            ),
        ],
        "η² by tower count (beside the verdict)": [
            wr.ScatterPlot(title="η² per run (seed) against tower count", x=towers, y=wr.SummaryMetric(ETA2)),
            wr.BarPlot(
                title="η² by tower count: median over runs, min-max; chance (T-1)/(K-1)",
                metrics=[ETA2, ETA2_NULL],
                groupby=towers,
                groupby_aggfunc="median",
                groupby_rangefunc="minmax",
                orientation="v",
            ),
            wr.LinePlot(
                title="η² over training, by tower count",
                x="Step",
                y=[ETA2],
                groupby=towers,
                groupby_aggfunc="median",
                groupby_rangefunc="minmax",
            ),
            wr.LinePlot(title="permutation p-value over training", x="Step", y=[P_VALUE], log_y=True),
        ],
        "Per-tower colour scores": [
            wr.LinePlot(
                title="median colour score per tower over training",
                x="Step",
                y=[tower_score(k) for k in range(1, max_towers + 1)],
            ),
            wr.BarPlot(
                title="median colour score per tower, trained and at initialisation",
                metrics=[m for k in range(1, max_towers + 1) for m in (tower_score(k), tower_score(k, True))],
                groupby=towers,
                groupby_aggfunc="median",
                groupby_rangefunc="minmax",
                orientation="v",
            ),
        ],
        "Kernel grids, run by run": [
            wr.MediaBrowser(
                title="first-layer kernels (Figure 3), one column per run",
                media_keys=[KERNELS],
                num_columns=4,
                mode="gallery",
                gallery_axis="run",
            ),
            wr.MediaBrowser(
                title="kernel colour scores per tower",
                media_keys=[SCORES],
                num_columns=4,
                mode="gallery",
                gallery_axis="run",
            ),
        ],
        "Accuracy against learning rate and batch size": [
            wr.ScatterPlot(
                title="test accuracy against learning rate", x=wr.Config(LR), y=wr.SummaryMetric(TEST_ACC), log_x=True
            ),
            wr.ScatterPlot(
                title="test accuracy against batch size",
                x=wr.Config(BATCH_SIZE),
                y=wr.SummaryMetric(TEST_ACC),
                log_x=True,
            ),
            wr.ScatterPlot(
                title="validation accuracy against learning rate",
                x=wr.Config(LR),
                y=wr.SummaryMetric(VAL_ACC),
                log_x=True,
            ),
            wr.ScatterPlot(title="Δf against learning rate", x=wr.Config(LR), y=wr.SummaryMetric(DELTA_F), log_x=True),
        ],
    }


def build_report(
    entity: str, project: str, sweep: str | None = None, group: str | None = None, max_towers: int = 4, report=None
):
    """The report object (not saved). ``report``: an existing ``wr.Report`` whose blocks to replace."""
    import wandb_workspaces.reports.v2 as wr

    scope = f"sweep {sweep}" if sweep else f"group {group}" if group else f"project {project}"
    blocks = [
        wr.P(
            f"Do the first-layer kernels split into a colour-agnostic and a colour-specific tower, across the "
            f"runs of {scope}? The verdict of every run (specialised or not), Δf (the specific tower's colour "
            "fraction less the agnostic tower's) and each tower's colour fraction; η² of the colour scores "
            "with its p beside them; the kernel grids side by side. Runs pool by condition (every setting but the "
            "seed; its id is in each run's config). The statistics across seeds (k of n specialised with its one-sided bound, "
            "the test against the one-tower control): python analysis/compare.py."
        )
    ]
    for title, section in panels(max_towers).items():
        blocks += [wr.H2(title), wr.PanelGrid(runsets=[runset(entity, project, sweep, group)], panels=section)]
    if report is None:
        report = wr.Report(
            entity=entity,
            project=project,
            title=f"towers: the verdict, {scope}",
            description="verdict, Δf, tower colour fractions, η² and kernel grids across runs",
            width="fluid",
        )
    report.blocks = blocks
    return report


def describe(report) -> str:
    import wandb_workspaces.reports.v2 as wr

    lines = [f"{report.title} ({report.entity}/{report.project})"]
    for block in report.blocks:
        if isinstance(block, wr.H2):
            lines.append(f"  {block.text}")
        elif isinstance(block, wr.PanelGrid):
            lines.append(f"    runs: {block.runsets[0].name} (filters: {block.runsets[0].filters or 'none'})")
            for p in block.panels:
                lines.append(f"    - {type(p).__name__}: {getattr(p, 'title', None) or 'config and summary per run'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python analysis/dashboard.py", description=__doc__.split("\n")[0])
    parser.add_argument("--entity", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--sweep", help="only the runs of this W&B sweep (its ID)")
    parser.add_argument("--group", help="only the runs of this group (towers.sweep groups a sweep's runs by its name)")
    parser.add_argument("--max-towers", type=int, default=4, help="tower_<k> panels for k up to this")
    parser.add_argument("--update", metavar="URL", help="replace the panels of this existing report")
    parser.add_argument("--dry-run", action="store_true", help="print the panels; do not contact W&B")
    args = parser.parse_args(argv)
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise SystemExit(
            "analysis/dashboard.py needs wandb-workspaces: pip install wandb-workspaces "
            "(or pip install -e '.[dashboard]')"
        ) from None
    existing = None if args.dry_run or not args.update else wr.Report.from_url(args.update)
    report = build_report(args.entity, args.project, args.sweep, args.group, args.max_towers, existing)
    print(describe(report))
    if args.dry_run:
        return 0
    report.save()
    print(f"saved: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
