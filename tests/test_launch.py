"""The launcher and the daemons end to end, as a user runs them (real processes)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

from tests.conftest import ROOT
from zpscluster.procs import bin_cmd

pytestmark = pytest.mark.slow


class Launcher:
    """bin/ps-launch in a subprocess whose output lines we can wait for."""

    def __init__(self, *args, out):
        self.out = out
        self.lines: list[str] = []
        self.eof = False
        self._cv = threading.Condition()
        self.proc = subprocess.Popen(bin_cmd("ps-launch", "--out", str(out), *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self.eof = True
            self._cv.notify_all()

    def wait_for(self, pred, timeout):
        with self._cv:
            if not self._cv.wait_for(lambda: any(pred(l) for l in self.lines) or self.eof,
                                     timeout):
                raise TimeoutError(f"no matching line within {timeout}s; last: {self.lines[-5:]}")
            for l in self.lines:
                if pred(l):
                    return l
        raise AssertionError(f"launcher exited ({self.proc.returncode}) first; last: {self.lines[-15:]}")

    def wait(self, timeout):
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def launcher():
    started = []

    def start(*args, out):
        l = Launcher(*args, out=out)
        started.append(l)
        return l
    yield start
    for l in started:
        l.kill()


def summary_of(out):
    with open(os.path.join(out, "summary.json")) as fh:
        return json.load(fh)


def metrics_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


REQUIRED = {"workload", "servers", "workers", "staleness", "steps", "wall_seconds", "final_loss",
            "eval_metric", "staleness_max", "staleness_histogram", "wait_seconds_total", "pushes",
            "pulls", "bytes_sent", "bytes_received"}


@pytest.mark.parametrize("workload,steps", [("linreg", 150), ("mf", 40), ("charlm", 12)])
def test_launcher_runs_each_workload_end_to_end(launcher, tmp_path, workload, steps):
    l = launcher("--workload", workload, "--servers", "2", "--workers", "2", "--staleness", "1",
                 "--steps", str(steps), "--quiet", out=tmp_path)
    assert l.wait(240) == 0, l.lines[-20:]
    s = summary_of(tmp_path)
    assert REQUIRED <= set(s)
    assert s["workload"] == workload and s["iterations"] == 2 * steps
    assert s["staleness_max"] <= 1
    assert sum(s["staleness_histogram"].values()) == 2 * steps
    assert s["pushes"] == 2 * 2 * steps  # every push reaches both servers
    rows = metrics_of(tmp_path)
    assert len(rows) == 2 * steps
    assert {"worker", "clock", "loss", "time", "read_staleness", "wait_seconds"} <= set(rows[0])
    if workload == "linreg":  # the textbook example recovers the true weights
        assert s["eval_metric"]["name"] == "weight_distance" and s["eval_metric"]["value"] < 0.1


def test_digits_at_staleness_2_reaches_90_percent_and_the_saved_model_matches(launcher, tmp_path):
    save = tmp_path / "model.pt"
    l = launcher("--workload", "digits", "--servers", "2", "--workers", "4", "--staleness", "2",
                 "--steps", "300", "--save", str(save), "--quiet", out=tmp_path)
    assert l.wait(400) == 0, l.lines[-20:]
    s = summary_of(tmp_path)
    print(f"digits s=2: accuracy {s['eval_metric']['value']:.4f} in {s['wall_seconds']:.1f}s")
    assert s["eval_metric"]["name"] == "accuracy" and s["eval_metric"]["value"] >= 0.90
    assert s["staleness_max"] <= 2
    from worker.workloads import get_workload
    wl = get_workload("digits", seed=0)
    fresh = wl.build_model()
    fresh.load_state_dict(torch.load(save))
    assert wl.evaluate(fresh) == pytest.approx(s["eval_metric"]["value"], abs=1e-9)


def _kill_when_progressed(l, out, rank, clocks, timeout=120):
    line = l.wait_for(lambda x: x.startswith(f"[worker{rank}] READY"), timeout)
    pid = json.loads(line.split("READY ", 1)[1])["pid"]
    path = os.path.join(out, f"metrics-w{rank}.jsonl")
    deadline = time.monotonic() + timeout
    while True:  # wait (bounded) until the worker has trained a few clocks
        if os.path.exists(path) and sum(1 for _ in open(path)) >= clocks:
            break
        assert time.monotonic() < deadline and l.proc.poll() is None, l.lines[-10:]
        threading.Event().wait(0.05)
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.parametrize("rank", [1, 0])
def test_a_worker_killed_mid_run_is_recorded_and_the_others_finish(launcher, tmp_path, rank):
    """Worker 0 too: the lowest live rank then fetches, evaluates and saves the final model."""
    save = tmp_path / "model.pt"
    l = launcher("--workload", "linreg", "--servers", "2", "--workers", "3", "--staleness", "1",
                 "--steps", "400", "--worker-timeout", "3", "--heartbeat-interval", "0.5",
                 "--save", str(save), out=tmp_path)
    _kill_when_progressed(l, tmp_path, rank, 20)
    assert l.wait(240) == 0, l.lines[-20:]
    s = summary_of(tmp_path)
    assert [x["rank"] for x in s["lost_workers"]] == [rank]
    rows = metrics_of(tmp_path)
    survivor = 1 - rank
    assert max(r["clock"] for r in rows if r["worker"] == survivor) == 399
    assert max(r["clock"] for r in rows if r["worker"] == rank) < 399
    assert s["saved"] == str(save) and s["eval_metric"]["value"] < 0.2
    from worker.workloads import get_workload
    wl = get_workload("linreg", seed=0)
    model = wl.build_model()
    model.load_state_dict(torch.load(save))
    assert wl.evaluate(model) == pytest.approx(s["eval_metric"]["value"], abs=1e-9)


def test_a_restarted_worker_rejoins_and_finishes(launcher, tmp_path):
    l = launcher("--workload", "linreg", "--servers", "1", "--workers", "2", "--staleness", "2",
                 "--steps", "300", "--restarts", "1", "--worker-timeout", "3", "--heartbeat-interval", "0.5",
                 out=tmp_path)
    _kill_when_progressed(l, tmp_path, 1, 20)
    assert l.wait(240) == 0, l.lines[-20:]
    s = summary_of(tmp_path)
    assert s["restarts"] == {"1": 1}
    with open(tmp_path / "result-w1.json") as fh:
        res = json.load(fh)
    assert res["start_clock"] > 0 and res["clock"] == 300, res
    assert s["eval_metric"]["value"] < 0.2


def test_a_user_script_trains_through_ps_worker(procs, tmp_path):
    coord = procs.start(bin_cmd("ps-coordinator", "--num-servers", "1", "--num-workers", "2", "--staleness", "2",
                                "--optimizer", "sgd", "--lr", "0.2", "--steps", "300"), "coordinator")
    url = coord.wait_ready(60)["endpoint"]
    procs.start(bin_cmd("ps-server", "--coordinator", url), "server0").wait_ready(60)
    workers = [procs.start(bin_cmd("ps-worker", "--coordinator", url, "--out", str(tmp_path), "--",
                                   sys.executable, "examples/train_mlp.py"), f"worker{i}") for i in range(2)]
    for w in workers:
        assert w.wait(240) == 0, w.tail(20)
    text = " ".join(w.tail(50) for w in workers)
    acc = float(text.split("held-out accuracy ")[1].split()[0])
    assert acc > 0.85
    assert (tmp_path / "model.pt").exists()
    assert coord.wait(30) == 0  # the coordinator stops by itself once the job is done


@pytest.mark.parametrize("flags, says", [
    (["--momentum", "2"], "momentum must be in [0, 1)"),
    (["--optimizer", "foo"], "optimizer must be one of"),
    (["--dc-lambda", "-1"], "dc_lambda must be"),
    (["--straggler", "5:3"], "names worker rank 5"),
    (["--straggler", "bogus"], "straggler profile"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum applies to sgd only"),
    (["--workload", "mf", "--momentum", "0.5"], "--momentum applies to sgd only"),
    (["--workload", "nope"], "unknown workload 'nope'"),
])
def test_a_job_the_flags_describe_badly_is_refused_before_any_role_starts(tmp_path, flags, says):
    out = subprocess.run(bin_cmd("ps-launch", "--servers", "1", "--workers", "2", "--out", str(tmp_path / "job"),
                                 *flags), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and says in out.stderr, out.stderr[-500:]
    assert "READY" not in out.stdout and not (tmp_path / "job" / "summary.json").exists()


def test_no_role_outlives_a_launcher_killed_with_sigkill(tmp_path):
    """The kernel ends every role when ps-launch dies without a chance to stop them (PR_SET_PDEATHSIG)."""
    import re
    import selectors

    launch = subprocess.Popen(bin_cmd("ps-launch", "--workload", "digits", "--servers", "1", "--workers", "2",
                                      "--steps", "1000000", "--out", str(tmp_path / "job")),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    pids, seen = set(), ""
    try:
        sel = selectors.DefaultSelector()
        sel.register(launch.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        while len(pids) < 4:    # coordinator, server, 2 workers
            assert time.monotonic() < deadline and launch.poll() is None, seen[-3000:]
            if sel.select(1.0):
                line = launch.stdout.readline()
                seen += line
                m = re.search(r'READY .*"pid": (\d+)', line)
                if m:
                    pids.add(int(m.group(1)))
        launch.send_signal(signal.SIGKILL)
        launch.wait(10)
        deadline = time.monotonic() + 30
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = {p for p in alive if os.path.exists(f"/proc/{p}") and
                     open(f"/proc/{p}/stat").read().split(") ")[1][0] != "Z"}
            if alive:
                time.sleep(0.1)   # polling for the exits, each bounded by the deadline
        assert not alive, "roles still running after the launcher died: " + "; ".join(
            open(f"/proc/{p}/cmdline").read().replace("\0", " ")[-120:] for p in sorted(alive))
        for f in sorted((tmp_path / "job").glob("*-stop-stacks.txt")):
            # the stop's grace ended a worker whose own clean-up hung: the bound held, say where it hung
            warnings.warn(f"{f.name}: a worker's clean-up overran its grace:\n{f.read_text()[-4000:]}")
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launch.poll() is None:
            launch.kill()
            launch.wait(10)


def test_a_launcher_interrupted_twice_after_its_server_died_stops_every_role_within_seconds(launcher, tmp_path):
    """Workers stuck on a dead server stop together, in about 2 s, not 10 s one after another; the
    second Ctrl-C does not break the stop half way."""
    l = launcher("--workload", "linreg", "--servers", "1", "--workers", "2", "--staleness", "inf",
                 "--steps", "1000000", out=tmp_path)
    line = l.wait_for(lambda x: x.startswith("[server0] READY"), 120)
    server_pid = json.loads(line.split("READY ", 1)[1])["pid"]
    for rank in (0, 1):
        l.wait_for(lambda x, r=rank: x.startswith(f"[worker{r}] READY"), 120)
    os.kill(server_pid, signal.SIGKILL)
    t0 = time.monotonic()
    os.kill(l.proc.pid, signal.SIGINT)
    l.wait_for(lambda x: "interrupted" in x, 30)
    os.kill(l.proc.pid, signal.SIGINT)
    assert l.wait(30) == 130, l.lines[-20:]
    took = time.monotonic() - t0
    assert took < 8, f"stopping took {took:.1f}s: {l.lines[-10:]}"
    assert not any("Traceback" in x for x in l.lines), "\n".join(l.lines)
