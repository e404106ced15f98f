"""ps-experiment: manifest parsing, the grid, time-to-target, aggregation, findings (pure), and one
small grid end to end (slow: real ps-launch jobs)."""
import csv
import json
import math
import os
import resource
import signal
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT, wait_until
from zpscluster import experiment as ex
from zpscluster.experiment import ManifestError, OptimizerSpec, parse_manifest


# ------------------------------------------------------------------ manifest
def test_defaults_fill_every_key_but_the_workload():
    m = parse_manifest({"workload": "mf"})
    assert m.workload == ("mf",)
    assert m.staleness == ("0", "3", "inf")
    assert m.workers == (4,) and m.servers == (1,)
    assert m.straggler == ("none",) and m.optimizer == (OptimizerSpec(),)
    assert m.seeds == (0,)
    assert m.target_for("mf") == 0.3          # the workload's defaults.target


def test_flags_style_comma_lists_and_toml_style_lists_mean_the_same():
    a = parse_manifest({"workload": "mf,digits", "staleness": "0, 1,INF", "workers": "2,4",
                        "straggler": "none,0:3,random:0.2:3", "optimizer": "sgd:momentum=0.9,adam",
                        "seeds": "3", "staleness_lr": "false,true", "dc_lambda": "0,0.5"})
    b = parse_manifest({"workload": ["mf", "digits"], "staleness": [0, 1, "inf"], "workers": [2, 4],
                        "straggler": ["none", "0:3", "random:0.2:3"],
                        "optimizer": ["sgd:momentum=0.9", "adam"], "seeds": 3,
                        "staleness_lr": [False, True], "dc_lambda": [0, 0.5]})
    assert a == b
    assert a.staleness == ("0", "1", "inf")
    assert a.seeds == (0, 1, 2)
    assert a.optimizer[0] == OptimizerSpec("sgd", momentum=0.9)
    assert str(a.optimizer[0]) == "sgd:momentum=0.9"


def test_targets_apply_to_every_workload_or_per_workload():
    assert parse_manifest({"workload": "mf,digits", "target": "0.5"}).target == {"mf": 0.5, "digits": 0.5}
    m = parse_manifest({"workload": "mf,digits", "target": "mf=0.4"})
    assert m.target_for("mf") == 0.4 and m.target_for("digits") == 0.9
    assert parse_manifest({"workload": "mf", "target": {"mf": 0.45}}).target == {"mf": 0.45}


@pytest.mark.parametrize("values, words", [
    ({}, "workload: the manifest names no workload"),
    ({"workload": "mnist"}, "workload: 'mnist' is not a workload"),
    ({"workload": "mf", "staleness": "0,abc"}, "staleness: 'abc' is not a staleness bound"),
    ({"workload": "mf", "staleness": "-1"}, "staleness: '-1' is not a staleness bound"),
    ({"workload": "mf", "staleness": "0,0"}, "staleness: '0,0' repeats the value '0'"),
    ({"workload": "mf", "workers": "0"}, "workers: '0' must be >= 1"),
    ({"workload": "mf", "workers": "four"}, "workers: 'four' is not an integer"),
    ({"workload": "mf", "straggler": "slow"}, "straggler: 'slow' is not a straggler profile"),
    ({"workload": "mf", "workers": "2,4", "straggler": "3:2"}, "straggler: '3:2' names worker rank 3 but workers=2"),
    ({"workload": "mf", "optimizer": "rmsprop"}, "optimizer: 'rmsprop' names no known optimizer"),
    ({"workload": "mf", "optimizer": "sgd:momentum=1.5"}, "optimizer: 'sgd:momentum=1.5': momentum=1.5 is out of range"),
    ({"workload": "mf", "optimizer": "adam:momentum=0.9"}, "momentum applies to sgd only"),
    ({"workload": "mf", "optimizer": "sgd:beta=2"}, "bad option 'beta=2'"),
    ({"workload": "mf", "lr": "0"}, "lr: '0' must be a finite number > 0"),
    ({"workload": "mf", "staleness_lr": "maybe"}, "staleness_lr: 'maybe' is not a boolean"),
    ({"workload": "mf", "dc_lambda": "-1"}, "dc_lambda: '-1' must be a finite number >= 0"),
    ({"workload": "mf", "seeds": "0"}, "seeds: '0' must be >= 1"),
    ({"workload": "mf", "target": "digits=0.9"}, "target: 'digits'='0.9' names a workload that is not in the grid"),
    ({"workload": "mf", "target": "low"}, "target: 'low' is not a number"),
    ({"workload": "mf", "timeout": "soon"}, "timeout: 'soon' is not a number"),
    ({"workload": "mf", "stalenes": "0"}, "unknown manifest key(s) 'stalenes'"),
    ({"workload": "mf", "workers": ""}, "workers: '' has an empty value"),
])
def test_bad_manifest_values_name_the_key_and_the_value(values, words):
    with pytest.raises(ManifestError) as err:
        parse_manifest(values)
    assert words in str(err.value)


def test_seeds_are_a_count_or_an_explicit_list_even_of_one_seed():
    assert parse_manifest({"workload": "mf", "seeds": "7"}).seeds == tuple(range(7))
    assert parse_manifest({"workload": "mf", "seeds": 7}).seeds == tuple(range(7))
    assert parse_manifest({"workload": "mf", "seeds": "7,"}).seeds == (7,)
    assert parse_manifest({"workload": "mf", "seeds": "7,9"}).seeds == (7, 9)
    assert parse_manifest({"workload": "mf", "seeds": [7]}).seeds == (7,)
    with pytest.raises(ManifestError, match="seeds: '7,,' has an empty value"):
        parse_manifest({"workload": "mf", "seeds": "7,,"})


def test_a_whole_float_staleness_bound_is_that_integer(tmp_path):
    f = tmp_path / "grid.toml"
    f.write_text('workload = "mf"\nstaleness = [0, 3.0, "inf"]\n')
    assert parse_manifest(ex.load_manifest_file(str(f))).staleness == ("0", "3", "inf")
    with pytest.raises(ManifestError, match="staleness: 2.5 is not a staleness bound"):
        parse_manifest({"workload": "mf", "staleness": [2.5]})
    with pytest.raises(ManifestError, match="staleness: -1.0 is not a staleness bound"):
        parse_manifest({"workload": "mf", "staleness": [-1.0]})


def test_a_toml_manifest_is_read_and_bad_toml_is_a_clear_error(tmp_path):
    good = tmp_path / "grid.toml"
    good.write_text('workload = "mf"\nstaleness = [0, 8, "inf"]\nstraggler = ["none", "0:3"]\n'
                    'seeds = 2\nsteps = 50\ntarget = 0.5\nbatch-size = 512\n')
    m = parse_manifest(ex.load_manifest_file(str(good)))
    assert (m.staleness, m.straggler, m.seeds, m.steps, m.batch_size) == (
        ("0", "8", "inf"), ("none", "0:3"), (0, 1), (50,), (512,))
    bad = tmp_path / "bad.toml"
    bad.write_text("workload = [mf\n")
    with pytest.raises(ManifestError, match="is not valid TOML"):
        ex.load_manifest_file(str(bad))
    with pytest.raises(ManifestError, match="No such file"):
        ex.load_manifest_file(str(tmp_path / "missing.toml"))


def test_flags_override_the_manifest_file(tmp_path):
    f = tmp_path / "grid.toml"
    f.write_text('workload = "mf"\nstaleness = [0, 8]\nseeds = 3\n')
    args = ex.experiment_parser().parse_args(["--manifest", str(f), "--staleness", "0,inf"])
    m = ex.manifest_from_args(args)
    assert m.staleness == ("0", "inf") and m.seeds == (0, 1, 2)


def test_the_resolved_manifest_reads_back_as_the_same_grid(tmp_path):
    m = parse_manifest({"workload": "mf", "staleness": "0,inf", "optimizer": "sgd:lr=0.5:momentum=0.9,adam",
                        "straggler": "none,pause:all:10:0.5", "seeds": 2, "target": 0.4, "eval_every": 5,
                        "batch_size": "default,512"})
    (tmp_path / "m.toml").write_text(ex.manifest_toml(m))
    back = parse_manifest(ex.load_manifest_file(str(tmp_path / "m.toml")))
    assert ex.grid(back) == ex.grid(m)
    assert back.target == m.target and back.eval_every == 5


def test_the_written_manifest_alone_reproduces_the_experiment_in_the_same_folder(tmp_path):
    m = parse_manifest({"workload": "mf,linreg", "staleness": "0,inf", "seeds": "3,5", "target": "mf=0.4,linreg=0.2",
                        "name": 'grid "one"', "out": str(tmp_path / "exp"), "timeout": 90})
    (tmp_path / "m.toml").write_text(ex.manifest_toml(m))
    back = parse_manifest(ex.load_manifest_file(str(tmp_path / "m.toml")))
    assert back == m


# ------------------------------------------------------------------ grid
def test_the_grid_is_the_product_with_seeds_varying_fastest():
    m = parse_manifest({"workload": "linreg", "staleness": "0,inf", "workers": "2,4", "seeds": 3})
    cells = ex.grid(m)
    assert len(cells) == 2 * 2 * 3
    assert [c.seed for c in cells[:3]] == [0, 1, 2]
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == len(ids)
    assert ids == [c.cell_id for c in ex.grid(m)], "cell ids must be stable across reruns"


def test_the_cell_id_changes_with_every_setting_that_changes_the_run():
    base = {"workload": "linreg", "workers": 2, "staleness": "0", "steps": 30}

    def cell_id(**changes):
        return ex.grid(parse_manifest({**base, **changes}))[0].cell_id

    assert cell_id() == "linreg-S1-W2-s0-none-default-seed0-6315854e", "runs at the trainer's interval keep their ids"
    assert cell_id(eval_every=5) != cell_id()
    assert cell_id(eval_every=5) != cell_id(eval_every=10)
    assert cell_id(eval_every=5) == cell_id(eval_every=5)
    for key, value in (("batch_size", 64), ("lr", 0.1), ("optimizer", "sgd:momentum=0.9"),
                       ("optimizer", "adam:weight_decay=0.01"), ("dc_lambda", 0.1), ("staleness_lr", True),
                       ("steps", 31), ("servers", 2), ("straggler", "0:3"), ("seeds", "1,")):
        assert cell_id(**{key: value}) != cell_id(), key
    assert cell_id(timeout=60, target=0.1) == cell_id(), "neither changes what a run does"


def test_an_optimizer_with_its_own_lr_ignores_the_lr_axis():
    m = parse_manifest({"workload": "mf", "staleness": "0", "optimizer": "sgd:lr=0.5,adam", "lr": "0.01,0.02"})
    cells = ex.grid(m)
    assert sorted((str(c.optimizer), c.effective_lr) for c in cells) == [
        ("adam", 0.01), ("adam", 0.02), ("sgd:lr=0.5", 0.5)]


def test_launch_command_passes_every_key():
    m = parse_manifest({"workload": "mf", "staleness": "inf", "straggler": "0:3",
                        "optimizer": "sgd:lr=0.2:momentum=0.9", "staleness_lr": "true", "dc_lambda": "0.1",
                        "batch_size": "64", "steps": "20", "eval_every": "5", "timeout": "60"})
    cmd = ex.launch_command(ex.grid(m)[0], m, "/tmp/x")
    assert cmd[1].endswith("ps-launch")
    flat = " ".join(cmd[2:])
    for part in ("--workload mf", "--staleness inf", "--straggler 0:3", "--optimizer sgd", "--lr 0.2",
                 "--momentum 0.9", "--staleness-lr", "--dc-lambda 0.1", "--batch-size 64", "--steps 20",
                 "--eval-every 5", "--timeout 60", "--quiet", "--out /tmp/x", "--seed 0", "--workers 4"):
        assert part in flat


def test_a_cell_is_finished_only_when_its_summary_parses(tmp_path):
    assert not ex.is_finished(str(tmp_path))
    (tmp_path / "summary.json").write_text('{"wall_seconds": ')
    assert not ex.is_finished(str(tmp_path))
    (tmp_path / "summary.json").write_text('{"wall_seconds": 1}')
    assert ex.is_finished(str(tmp_path))


# ------------------------------------------------------------------ time to target
EVALS = [{"clock": 9, "elapsed": 1.0, "eval": 0.9}, {"clock": 29, "elapsed": 3.0, "eval": 0.4},
         {"clock": 19, "elapsed": 2.0, "eval": 0.6}, {"clock": 39, "elapsed": 4.0, "eval": 0.3}]


def test_time_to_target_is_the_first_evaluation_that_reaches_it_lower_is_better():
    assert ex.time_to_target(EVALS, 0.5, higher_is_better=False) == 3.0
    assert ex.time_to_target(EVALS, 0.5, higher_is_better=False, key="clock") == 29
    assert ex.time_to_target(EVALS, 0.9, higher_is_better=False) == 1.0     # reaching counts as <=


def test_time_to_target_higher_is_better():
    acc = [{"clock": c, "elapsed": e, "eval": v} for c, e, v in ((9, 1.0, 0.5), (19, 2.0, 0.91), (29, 3.0, 0.8))]
    assert ex.time_to_target(acc, 0.9, higher_is_better=True) == 2.0
    assert ex.time_to_target(acc, 0.95, higher_is_better=True) is None


def test_time_to_target_never_reached_or_not_finite():
    assert ex.time_to_target(EVALS, 0.1, higher_is_better=False) is None
    assert ex.time_to_target([], 0.1, higher_is_better=False) is None
    rows = [{"clock": 1, "elapsed": 1.0, "eval": math.nan}, {"clock": 2, "elapsed": 2.0, "eval": 0.1}]
    assert ex.time_to_target(rows, 0.5, higher_is_better=False) == 2.0


# ------------------------------------------------------------------ aggregation
def run_row(staleness, seed, ttt, final, straggler="none", wall=10.0):
    return {"workload": "mf", "servers": 1, "workers": 4, "staleness": staleness, "straggler": straggler,
            "optimizer": "default", "lr": "", "staleness_lr": False, "dc_lambda": 0.0, "batch_size": "",
            "steps": 100, "seed": seed, "metric": "rmse", "target": 0.5, "wall_seconds": wall,
            "train_seconds": wall / 2, "iterations": 400, "time_to_target": ttt, "clock_to_target": "",
            "final_metric": final, "final_loss": final ** 2, "staleness_mean": 0.5, "staleness_max": 2,
            "wait_seconds": 4.0, "compute_seconds": 8.0, "delay_seconds": 0.0, "bytes": 1000}


def test_aggregate_groups_over_seeds_with_mean_spread_and_reached_count():
    rows = [run_row("0", 0, 2.0, 0.3, wall=10), run_row("0", 1, 4.0, 0.5, wall=20),
            run_row("0", 2, "", 0.7, wall=30), run_row("inf", 0, "", 0.9)]
    agg = {r["staleness"]: r for r in ex.aggregate(rows)}
    bsp = agg["0"]
    assert bsp["seeds"] == 3 and bsp["reached"] == 2
    assert bsp["time_to_target_mean"] == pytest.approx(3.0)
    assert bsp["time_to_target_std"] == pytest.approx(math.sqrt(2))
    assert (bsp["time_to_target_min"], bsp["time_to_target_max"]) == (2.0, 4.0)
    assert bsp["final_metric_mean"] == pytest.approx(0.5)
    assert bsp["final_metric_std"] == pytest.approx(0.2)
    assert bsp["wall_seconds_min"] == 10 and bsp["wall_seconds_max"] == 30
    asp = agg["inf"]
    assert asp["reached"] == 0 and asp["time_to_target_mean"] == ""
    assert asp["final_metric_std"] == 0.0


def summary_rows(ttts, straggler="none", finals=None):
    rows = []
    for i, (s, t) in enumerate(ttts.items()):
        rows += [run_row(s, k, t, (finals or {}).get(s, 0.4), straggler) for k in range(2)]
    return ex.aggregate(rows)


def test_findings_detect_a_u_shape_and_name_the_fastest_bound():
    agg = summary_rows({"0": 9.0, "1": 5.0, "3": 4.0, "inf": 7.0})
    notes = ex.findings(agg, ["staleness"], {"mf": False})
    text = "\n".join(notes)
    assert "staleness 3 reached rmse 0.5 first" in text
    assert "BSP (s=0) took 2.25x as long as s=3" in text
    assert "U-shaped: the minimum is at the interior bound s=3" in text


def test_findings_flag_differences_within_one_standard_deviation():
    rows = []
    for s, ttts in (("0", (8.0, 10.0)), ("3", (3.0, 5.0)), ("inf", (4.0, 5.0))):
        rows += [run_row(s, k, t, 0.4) for k, t in enumerate(ttts)]
    text = "\n".join(ex.findings(ex.aggregate(rows), ["staleness"], {"mf": False}))
    assert "staleness 3 reached rmse 0.5 first" in text
    assert "within one standard deviation of s=inf (4.50 s)" in text
    assert "U-shaped only within noise" in text


def test_findings_rank_by_seeds_reached_before_time():
    rows = [run_row("0", 0, 5.0, 0.4), run_row("0", 1, 6.0, 0.4),
            run_row("inf", 0, 1.0, 0.4), run_row("inf", 1, "", 0.4)]
    text = "\n".join(ex.findings(ex.aggregate(rows), ["staleness"], {"mf": False}))
    assert "staleness 0 reached rmse 0.5 in the most seeds" in text
    assert "faster where fewer seeds reached it: s=inf (1.00 s, 1/2)" in text
    assert "BSP itself ranked first" in text


def test_findings_name_the_clocks_per_worker_of_the_per_iteration_comparison():
    agg = summary_rows({"0": 4.0, "3": 2.0, "inf": 3.0})      # 400 iterations by 4 workers
    text = "\n".join(ex.findings(agg, ["staleness"], {"mf": False}))
    assert "After the same 100 clocks per worker (400 iterations in all) the final rmse" in text


def test_findings_keep_the_other_findings_when_no_bound_reaches_the_target():
    agg = summary_rows({"0": "", "3": "", "inf": ""}, finals={"0": 0.3, "3": 0.35, "inf": 0.45})
    text = "\n".join(ex.findings(agg, ["staleness"], {"mf": False}))
    assert "no bound reached the target rmse 0.5 in any seed" in text
    assert "the final rmse (lower is better) was s=0: 0.3000, s=3: 0.3500, s=inf: 0.4500" in text
    assert "Share of the workers' training time spent waiting for the bound" in text
    assert "reached the target first but" not in text


def test_findings_say_when_the_curve_is_not_u_shaped_and_when_bsp_never_reaches():
    agg = summary_rows({"0": "", "3": 6.0, "inf": 4.0})
    text = "\n".join(ex.findings(agg, ["staleness"], {"mf": False}))
    assert "not U-shaped: the minimum is at the largest bound s=inf" in text
    assert "BSP (s=0) never reached it" in text


def test_findings_report_how_stragglers_change_the_ranking_and_speed_against_quality():
    agg = summary_rows({"0": 4.0, "3": 5.0, "inf": 6.0}) + summary_rows(
        {"0": 9.0, "3": 5.0, "inf": 3.0}, straggler="0:3", finals={"0": 0.3, "3": 0.35, "inf": 0.45})
    text = "\n".join(ex.findings(agg, ["staleness", "straggler"], {"mf": False}))
    assert "none: s=0 < s=3 < s=inf" in text
    assert "0:3: s=inf < s=3 < s=0" in text
    assert "Stragglers changed the fastest bound under 0:3" in text
    assert "s=inf reached the target first but s=0 ended with the best rmse" in text


def test_findings_rank_the_cost_of_staleness_per_optimizer():
    rows = []
    for opt, finals in (("sgd", (0.40, 0.42)), ("adam", (0.30, 0.50))):
        for s, f in zip(("0", "8"), finals):
            r = run_row(s, 0, 1.0, f)
            r["optimizer"] = opt
            rows.append(r)
    text = "\n".join(ex.findings(ex.aggregate(rows), ["staleness", "optimizer"], {"mf": False}))
    assert "Cost of staleness by optimizer" in text
    assert "sgd: s=8 +0.0200; adam: s=8 +0.2000" in text
    assert "adam suffered most and sgd least" in text


def test_the_cost_of_staleness_is_ranked_by_its_mean_over_the_stale_bounds():
    rows = []
    for opt, finals in (("sgd", (0.40, 0.70, 0.40)), ("adam", (0.40, 0.50, 0.50))):
        for s, f in zip(("0", "3", "inf"), finals):
            r = run_row(s, 0, 1.0, f)
            r["optimizer"] = opt
            rows.append(r)
    text = "\n".join(ex.findings(ex.aggregate(rows), ["staleness", "optimizer"], {"mf": False}))
    # at the largest bound adam lost more (0.1 against 0); on average over s=3 and inf sgd did (0.15 against 0.1)
    assert "Averaged over the stale bounds, sgd suffered most and adam least" in text


# ------------------------------------------------------------------ report and plots
def two_workload_rows():
    rows = []
    for wl, metric in (("mf", "rmse"), ("linreg", "weight_distance")):
        for s in ("0", "inf"):
            r = run_row(s, 0, 1.0 if s == "0" else "", 0.4)
            r.update(workload=wl, metric=metric, cell_id=f"{wl}-s{s}")
            rows.append(r)
    return rows


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures make_plots saves, by file name, kept open instead of written."""
    from matplotlib.figure import Figure
    figs = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: figs.__setitem__(os.path.basename(path), fig))
    return figs


def test_each_workload_of_a_grid_is_labelled_with_its_own_metric(tmp_path, saved_figures):
    m = parse_manifest({"workload": "mf,linreg", "staleness": "0,inf"})
    rows = two_workload_rows()
    curves = [{**r, "clock": c, "elapsed": c / 10, "eval": 1.0 / c} for r in rows for c in (1, 2)]
    ex.make_plots(m, str(tmp_path), rows, ex.aggregate(rows), curves, {r["cell_id"]: {"0": 3, "1": 1} for r in rows})
    for png in ("metric_vs_time.png", "metric_vs_clock.png"):
        panels = {ax.get_title(): ax.get_ylabel() for ax in saved_figures[png].axes if ax.get_visible()}
        assert panels == {"workload=linreg": "weight_distance", "workload=mf": "rmse"}, png
    title = saved_figures["time_to_target.png"].axes[0].get_title()
    assert "rmse" in title and "weight_distance" in title

    text = "\n".join(ex.findings(ex.aggregate(rows), m.varying(), {"mf": False, "linreg": False}))
    assert "**workload=mf**: staleness 0 reached rmse 0.5" in text
    assert "**workload=linreg**: staleness 0 reached weight_distance 0.5" in text
    assert "Cost of staleness by workload" not in text, "rmse and weight_distance are not comparable"

    report = ex.render_report(m, "", rows, ex.aggregate(rows), [], [], 4)
    for section in ("## Summary", "## Runs"):
        lines = [ln for ln in report.split(section)[1].split("\n## ")[0].splitlines() if ln.startswith("|")]
        head = [c.strip() for c in lines[0].split("|")]
        rmse, wd = head.index("final rmse"), head.index("final weight_distance")
        for ln in lines[2:]:
            cells = [c.strip() for c in ln.split("|")]
            filled = wd if cells[head.index("workload")] == "linreg" else rmse
            empty = rmse if filled == wd else wd
            assert cells[filled].startswith("0.4") and cells[empty] == "–", (section, ln)


def test_time_to_target_plot_says_so_when_no_bound_reached_the_target(tmp_path, saved_figures):
    m = parse_manifest({"workload": "mf", "staleness": "0,inf"})
    rows = [run_row("0", 0, "", 0.9), run_row("inf", 0, "", 0.9)]
    for r in rows:
        r["cell_id"] = f"mf-s{r['staleness']}"
    ex.make_plots(m, str(tmp_path), rows, ex.aggregate(rows), [], {r["cell_id"]: {"0": 3, "1": 1} for r in rows})
    ax = saved_figures["time_to_target.png"].axes[0]
    assert any("no bound reached the target" in t.get_text() for t in ax.texts)
    assert ax.get_ylim()[0] >= 0 and list(ax.get_yticks()) == []


def fake_finished(run_dir, metric="weight_distance"):
    """What ps-experiment reads of a finished run: a summary.json."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "summary.json"), "w") as fh:
        json.dump({"eval_metric": {"name": metric, "value": 0.5}, "wall_seconds": 1.0, "iterations": 4,
                   "final_loss": 0.25, "staleness_mean": 0.0, "staleness_max": 0, "wait_seconds_total": 0.0,
                   "compute_seconds_total": 0.1}, fh)


def test_runs_that_failed_before_an_interrupt_are_listed_as_failed(tmp_path, monkeypatch):
    ran = []

    def run_cell(cell, m, run_dir):
        ran.append(cell.cell_id)
        if len(ran) == 1:
            return 1, "FAILED (exit 1)"
        raise KeyboardInterrupt        # Ctrl-C during the second cell

    monkeypatch.setattr(ex, "_run_cell", run_cell)
    out = tmp_path / "exp"
    assert ex.main(["--workload", "linreg", "--staleness", "0,3,inf", "--out", str(out)]) == 130
    assert len(ran) == 2
    assert f"3 runs in the grid, 0 finished, 1 failed this time: {ran[0]}." in (out / "report.md").read_text()


# ------------------------------------------------------------------ stop signals (real processes)
MARK = "ZPS_TEST_EXPERIMENT"


def marked_processes(mark):
    """Live processes whose environment carries ``mark`` (every descendant inherits it)."""
    found = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
            with open(f"/proc/{d}/stat", "rb") as fh:
                state = fh.read().rsplit(b") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if f"{MARK}={mark}".encode() in env and state != b"Z":
            found.add(int(d))
    return found


@pytest.fixture
def running_experiment(tmp_path):
    """A ps-experiment whose second cell's job runs (its coordinator is up); the first is already finished."""
    mark = uuid.uuid4().hex
    out = tmp_path / "exp"
    grid_args = {"workload": "linreg", "workers": "1", "staleness": "0,inf", "steps": "1000000"}
    first, second = ex.grid(parse_manifest(grid_args))
    fake_finished(str(out / "runs" / first.cell_id))
    args = [a for k, v in grid_args.items() for a in ("--" + k, v)] + ["--timeout", "300", "--out", str(out)]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "ps-experiment"), *args], cwd=ROOT,
                         env={**os.environ, MARK: mark}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "runs" / second.cell_id / "launch.log"
    try:
        wait_until(lambda: p.poll() is not None or (log.exists() and "[launch] coordinator at" in log.read_text()),
                   120, "the job's coordinator")
        assert p.poll() is None, p.communicate()[0]
        yield p, out, mark
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)
        for pid in marked_processes(mark):   # whatever the code under test left behind
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_stops_the_running_job_and_writes_the_finished_results(running_experiment, signum):
    p, out, mark = running_experiment
    p.send_signal(signum)
    output = p.communicate(timeout=120)[0]
    assert p.returncode == 128 + signum, output
    assert "interrupted" in output
    assert not marked_processes(mark), "the job outlived the experiment"
    assert len(read_csv(out / "runs.csv")) == 1
    assert "2 runs in the grid, 1 finished." in (out / "report.md").read_text()


@pytest.mark.slow
def test_no_job_outlives_an_experiment_killed_with_sigkill(running_experiment):
    p, out, mark = running_experiment
    p.kill()
    p.wait(10)
    wait_until(lambda: not marked_processes(mark), 60, "the job to stop after the experiment died")


# ------------------------------------------------------------------ end to end
def run_experiment(*args, timeout=240):
    """The completed process and the CPU seconds it and its descendants used (load-independent)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "ps-experiment"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return p, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_a_two_cell_grid_end_to_end_then_a_rerun_skips_both(tmp_path):
    out = tmp_path / "exp"
    args = ("--workload", "linreg", "--workers", "2", "--staleness", "0,inf", "--steps", "30", "--seeds", "1",
            "--eval-every", "5", "--timeout", "120", "--out", str(out))
    p, first_cpu = run_experiment(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[1/2]" in p.stdout and "[2/2]" in p.stdout and "ETA" in p.stdout

    runs = read_csv(out / "runs.csv")
    assert len(runs) == 2
    assert {r["staleness"] for r in runs} == {"0", "inf"}
    for col in ex.GRID_KEYS + ("seed",) + ex.RUN_FIELDS:
        assert col in runs[0], col
    for r in runs:
        assert r["workload"] == "linreg" and r["straggler"] == "none" and r["metric"] == "weight_distance"
        assert float(r["wall_seconds"]) > 0 and int(r["iterations"]) == 60 and int(r["bytes"]) > 0
        assert r["time_to_target"] == "" or float(r["time_to_target"]) >= 0
    summary = read_csv(out / "summary.csv")
    assert len(summary) == 2 and all(s["seeds"] == "1" for s in summary)
    assert "time_to_target_mean" in summary[0] and "reached" in summary[0]
    assert len(read_csv(out / "curves.csv")) >= 2 * 6
    for png in ("metric_vs_time.png", "metric_vs_clock.png", "time_to_target.png", "compute_vs_wait.png",
                "staleness_hist.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    report = (out / "report.md").read_text()
    assert "| staleness | 0, inf |" in report and "| workload | linreg |" in report
    assert "![" in report and "bin/ps-experiment --workload linreg" in report
    assert (out / "manifest.toml").exists() and "runs/" in (out / ".gitignore").read_text()

    logs = {p: os.path.getmtime(p) for p in out.glob("runs/*/launch.log")}
    assert len(logs) == 2
    again, cpu = run_experiment(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skipped (finished)") == 2
    assert "0 to run" in again.stdout
    assert {p: os.path.getmtime(p) for p in logs} == logs, "a finished cell was launched again"
    # CPU time, not wall time, so a loaded machine cannot fail this: one launched job alone costs
    # many CPU seconds (six Python processes importing torch)
    assert cpu < 10 and cpu < first_cpu / 3, f"the rerun used {cpu:.1f} CPU s (first run {first_cpu:.1f})"
    assert read_csv(out / "runs.csv") == runs
