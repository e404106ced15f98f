"""``bin/ps-bench --quick`` runs end to end and reports every section and ratio.

It checks the shape of the report, never speeds: this machine is shared and
its figures are not this test's business (docs/BENCHMARKS.md holds them).
"""
import json
import math
import os
import subprocess
import sys

import pytest

from zpscluster.bench import REQUIRED_RATIOS, REQUIRED_SECTIONS

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bin", "ps-bench")
RUN_TIMEOUT = 280


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--sizes", "1M", "--json", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"ps-bench failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    assert "Ratios" in proc.stdout, "no table on stdout"
    assert "[ps-bench" in proc.stderr, "no progress lines on stderr"
    with open(path) as fh:
        return json.load(fh)


def _figure_ok(fig):
    return all(math.isfinite(fig[k]) and fig[k] > 0 for k in ("median", "min", "max")) and \
        fig["min"] <= fig["median"] <= fig["max"] and fig["n"] >= 1


@pytest.mark.timeout(RUN_TIMEOUT + 20)
def test_quick_run_reports_every_named_ratio_as_a_finite_positive_number(report):
    missing = [k for k in REQUIRED_RATIOS if k not in report["ratios"]]
    assert not missing, f"ratios missing: {missing}"
    bad = {k: v for k, v in report["ratios"].items()
           if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0}
    assert not bad, f"ratios not finite and positive: {bad}"
    assert set(report["targets"]) == set(REQUIRED_RATIOS)


@pytest.mark.timeout(RUN_TIMEOUT + 20)
def test_quick_run_holds_every_section_with_its_figures(report):
    for section in REQUIRED_SECTIONS:
        assert section in report, f"section {section!r} missing"
    meta = report["meta"]
    assert meta["quick"] is True and meta["sizes"] == [1 << 20]
    assert meta["machine"]["nproc"] >= 1 and meta["machine"]["torch"]

    bulk = report["bulk"]["figures"]["1M"]
    assert {"zps_s1", "zps_s2", "bare_r1", "bare_r2", "rpc"} <= set(bulk["push"])
    assert {"zps_s1", "zps_s1_install", "bare_r1", "rpc"} <= set(bulk["pull"])
    assert {"zps_s1", "gloo_all_reduce"} <= set(bulk["exchange"])
    small = report["small"]["figures"]
    assert set(small) == {"push_d1", "push_d8", "pull_d1", "pull_d8", "exchange_d1"}
    for group in ("push_d1", "push_d8", "pull_d1", "pull_d8"):
        assert {"zps_s1", "zps_minimal_client", "bare", "rpc"} <= set(small[group])
    # the server apart from PSClient: its minimal-client ratios are reported beside the client's
    assert {f"small_op_minimal_client_vs_bare_depth{d}" for d in (1, 8)} <= set(report["ratios"])
    update = report["update"]["figures"]
    assert update, "no update figures"
    for per_size in update.values():
        for figs in per_size.values():
            assert {"copy", "sgd_momentum", "adam"} <= set(figs)
    peers = report["peers"]
    assert set(peers["rpc"]["bulk"]["1M"]) == {"push", "pull"}
    assert {"push_d1", "pull_d1"} <= set(peers["rpc"]["small"])
    assert "1M" in peers["gloo"]["all_reduce"]
    for who in ("server", "worker"):
        m = report["memory"][who]
        assert m["floor"] > 0 and m["baseline_rss"] > 0 and m["hwm"] >= m["baseline_rss"]
    for kind in ("conv", "mlp"):
        assert {"local", "zps_s1", "zps_sinf"} <= set(report["train"][kind]["figures"])

    figures = [f for op in bulk.values() for f in op.values()]
    figures += [f for g in small.values() for f in g.values()]
    figures += [f for s in update.values() for figs in s.values() for f in figs.values()]
    figures += [f for kind in ("conv", "mlp") for f in report["train"][kind]["figures"].values()]
    bad = [f for f in figures if not _figure_ok(f)]
    assert not bad, f"figures without a finite positive median/min/max: {bad[:3]}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, says", [
    (["--reps", "0"], "--reps must be >= 1"),
    (["--warmup", "-1"], "--warmup >= 0"),
    (["--json", "{tmp}/a-file/out.json"], "cannot create folder"),
    (["--json", "{tmp}"], "is a folder"),
    (["--sections", "bulk,nothing"], "unknown sections"),
    (["--sizes", "1M,4G"], "give smaller --sizes"),   # 4G elements: a 16 GiB model, held many times over
])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, args, says):
    (tmp_path / "a-file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, BENCH, "--quick", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr
    assert "[ps-bench" not in proc.stderr, "it started measuring before refusing"


@pytest.mark.timeout(200)
def test_an_interrupted_run_keeps_what_it_measured(tmp_path):
    """SIGTERM after the first figures: exit 130, every process ended, the figures so far in the JSON."""
    import selectors
    import signal
    import time

    path = tmp_path / "partial.json"
    proc = subprocess.Popen([sys.executable, BENCH, "--quick", "--sections", "update,memory", "--sizes", "1M",
                             "--json", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 150
        seen = ""
        while "update 1M" not in seen:   # a progress line per measured update figure
            assert time.monotonic() < deadline, f"no update figure within 150 s:\n{seen[-2000:]}"
            assert proc.poll() is None, f"ps-bench ended early:\n{seen[-2000:]}"
            if sel.select(timeout=1.0):
                seen += proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, (seen + err)[-3000:]
    assert "interrupted" in err and "meta.complete is false" in err
    with open(path) as fh:
        report = json.load(fh)
    assert report["meta"]["complete"] is False
    assert "ratios" not in report and "memory" not in report   # stopped during the update section
    figures = report["update"]["figures"]
    assert figures and all(_figure_ok(f) for per in figures.values() for figs in per.values()
                           for f in figs.values())
    assert not list(tmp_path.glob("partial.json.tmp*")), "a temporary file was left behind"


@pytest.mark.parametrize("side,op", [("client", "push"), ("client", "pull"), ("server", "push"), ("server", "pull")])
def test_request_cost_measures_each_side_without_the_network(side, op):
    """benchmarks/request_cost.py (the per-request Python cost, docs/BENCHMARKS.md) runs and says what it measured."""
    script = os.path.join(ROOT, "benchmarks", "request_cost.py")
    proc = subprocess.run([sys.executable, script, side, op, "--count", "100", "--depth", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head, _, rest = proc.stdout.strip().partition(": ")
    assert head == f"{side} {op} depth 2"
    assert float(rest.split()[0]) > 0 and "us/request" in rest
