"""analysis/dashboard.py: the W&B report's panels, built and serialised without a server."""

import wandb_workspaces.reports.v2 as wr  # the dashboard extra, also in dev
from wandb_workspaces import expr

from analysis import dashboard
from towers import records


def _spec(panel) -> dict:
    """The panel as it would be sent to W&B (panel serialisation needs no server)."""
    return panel._to_model().model_dump(by_alias=True, exclude_none=True)


def test_report_sections_and_panel_types():
    report = dashboard.build_report("me", "towers", sweep="abc123")
    assert (report.entity, report.project) == ("me", "towers") and "sweep abc123" in report.title
    headings = [b.text for b in report.blocks if isinstance(b, wr.H2)]
    assert headings == [
        "The verdict by tower count",
        "The verdict run by run",
        "Tower colour fractions",
        "η² by tower count (beside the verdict)",
        "Per-tower colour scores",
        "Kernel grids, run by run",
        "Accuracy against learning rate and batch size",
    ]
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert [[type(p).__name__ for p in g.panels] for g in grids] == [
        ["ScatterPlot", "BarPlot", "BarPlot", "LinePlot"],
        ["BarPlot", "BarPlot", "RunComparer"],
        ["LinePlot", "BarPlot"],
        ["ScatterPlot", "BarPlot", "LinePlot", "LinePlot"],
        ["LinePlot", "BarPlot"],
        ["MediaBrowser", "MediaBrowser"],
        ["ScatterPlot"] * 4,
    ]
    for g in grids:  # every grid shows the sweep's runs only
        (runset,) = g.runsets
        (flt,) = (f.to_model().model_dump() for f in expr.string_to_filterexpr_list(runset.filters))
        assert (flt["key"], flt["op"], flt["value"]) == ({"section": "run", "name": "sweep"}, "=", "abc123")


def test_verdict_panels_serialise_to_the_logged_keys():
    sections = dashboard.panels(max_towers=3)
    scatter, fraction, median, steps = (_spec(p) for p in sections["The verdict by tower count"])
    assert scatter["viewType"] == "Scatter Plot"
    assert (scatter["config"]["xAxis"], scatter["config"]["yAxis"]) == (
        "config:model.value.num_towers",
        "summary:verdict/delta_f",
    )
    assert fraction["viewType"] == "Bar Chart" and fraction["config"]["metrics"] == ["verdict/specialised"]
    # pooled by the one condition (towers.conditions.condition_id, logged in every run's W&B config)
    assert (fraction["config"]["groupBy"], fraction["config"]["groupAgg"]) == ("condition.value", "mean")
    assert median["config"]["metrics"] == ["verdict/delta_f"] and median["config"]["groupAgg"] == "median"
    assert median["config"]["groupBy"] == "condition.value"
    assert dashboard.SUMMARY_KEYS == records.SUMMARY_FIELDS  # the comparer's summary keys are the record's
    assert steps["viewType"] == "Run History Line Plot" and steps["config"]["metrics"] == ["verdict/delta_f"]
    per_run, specialised, comparer = (_spec(p) for p in sections["The verdict run by run"])
    assert per_run["config"]["metrics"] == ["verdict/delta_f"] and "groupBy" not in per_run["config"]
    assert specialised["config"]["metrics"] == ["verdict/specialised"]
    assert comparer["viewType"] == "Run Comparer"  # the summary's verdict, delta_f, colour_fraction beside the config
    lines, bars = (_spec(p) for p in sections["Tower colour fractions"])
    assert lines["config"]["metrics"] == bars["config"]["metrics"] == [f"tower_{k}/colour_fraction" for k in (1, 2, 3)]
    assert (bars["config"]["groupBy"], bars["config"]["groupAgg"]) == ("model.value.num_towers", "median")
    assert (dashboard.DELTA_F, dashboard.SPECIALISED, dashboard.colour_fraction(2)) == (
        "verdict/delta_f",
        "verdict/specialised",
        "tower_2/colour_fraction",
    )


def test_panels_serialise_to_the_logged_keys():
    sections = dashboard.panels(max_towers=3)
    eta2_section = sections["η² by tower count (beside the verdict)"]
    eta2_scatter, eta2_bar, eta2_steps, p_steps = (_spec(p) for p in eta2_section)
    assert eta2_scatter["viewType"] == "Scatter Plot"
    assert (eta2_scatter["config"]["xAxis"], eta2_scatter["config"]["yAxis"]) == (
        "config:model.value.num_towers",
        "summary:bisection/eta2",
    )
    assert eta2_bar["viewType"] == "Bar Chart"
    assert eta2_bar["config"]["metrics"] == ["bisection/eta2", "bisection/eta2_null"]
    assert (eta2_bar["config"]["groupBy"], eta2_bar["config"]["groupAgg"]) == ("model.value.num_towers", "median")
    assert eta2_steps["viewType"] == "Run History Line Plot" and eta2_steps["config"]["metrics"] == ["bisection/eta2"]
    assert p_steps["config"]["metrics"] == ["bisection/p_value"] and p_steps["config"]["yLogScale"] is True
    per_tower_lines, per_tower_bar = (_spec(p) for p in sections["Per-tower colour scores"])
    assert per_tower_lines["config"]["metrics"] == [f"tower_{k}/color_score" for k in (1, 2, 3)]
    assert per_tower_bar["config"]["metrics"] == [
        "tower_1/color_score",
        "tower_1/color_score_init",
        "tower_2/color_score",
        "tower_2/color_score_init",
        "tower_3/color_score",
        "tower_3/color_score_init",
    ]
    kernels, scores = (_spec(p) for p in sections["Kernel grids, run by run"])
    assert kernels["viewType"] == "Media Browser" and kernels["config"]["mediaKeys"] == ["bisection/kernels"]
    assert kernels["config"]["gallerySettings"] == {"axis": "run"} and kernels["config"]["columnCount"] == 4
    assert scores["config"]["mediaKeys"] == ["bisection/scores"]
    acc_lr, acc_batch, val_lr, delta_lr = (
        _spec(p)["config"] for p in sections["Accuracy against learning rate and batch size"]
    )
    assert (acc_lr["xAxis"], acc_lr["yAxis"], acc_lr["xAxisLogScale"]) == (
        "config:model.value.lr",
        "summary:test/acc",
        True,
    )
    assert (acc_batch["xAxis"], acc_batch["yAxis"]) == ("config:data.value.batch_size", "summary:test/acc")
    assert (val_lr["yAxis"], delta_lr["yAxis"]) == ("summary:val/acc", "summary:verdict/delta_f")


def test_group_filter_for_synced_offline_sweeps_and_no_filter_for_a_project():
    report = dashboard.build_report("me", "towers", group="demo")
    grid = next(b for b in report.blocks if isinstance(b, wr.PanelGrid))
    (flt,) = (f.to_model().model_dump() for f in expr.string_to_filterexpr_list(grid.runsets[0].filters))
    assert (flt["key"], flt["value"]) == ({"section": "run", "name": "group"}, "demo")
    grid = next(b for b in dashboard.build_report("me", "towers").blocks if isinstance(b, wr.PanelGrid))
    assert grid.runsets[0].filters in (None, "")


def test_dry_run_prints_and_saves_nothing(monkeypatch, capsys):
    def no_save(self, *args, **kwargs):
        raise AssertionError("--dry-run must not save")

    monkeypatch.setattr(wr.Report, "save", no_save)
    assert dashboard.main(["--entity", "me", "--project", "towers", "--sweep", "abc123", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "towers: the verdict, sweep abc123 (me/towers)" in out
    assert out.count("- MediaBrowser") == 2 and "filters: Sweep = 'abc123'" in out


def test_save_is_what_main_calls(monkeypatch, capsys):
    saved = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: saved.append(self) or self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.example/r"))
    assert dashboard.main(["--entity", "me", "--project", "towers"]) == 0
    assert (
        len(saved) == 1
        and isinstance(saved[0], wr.Report)
        and "saved: https://wandb.example/r" in capsys.readouterr().out
    )
