"""ps-ctl, ps-stat and ps-export as a user runs them."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from common.config import ClientSettings
from common.plan import PartitionPlan
from tests.conftest import ROOT
from worker.client import PSClient
from zpscluster.procs import bin_cmd

pytestmark = pytest.mark.slow


def run(*cmd, timeout=120):
    return subprocess.run(bin_cmd(*cmd), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_ps_ctl_checkpoint_and_ps_stat_on_a_live_server(procs, tmp_path):
    server = procs.server(0, 1, 1, 1, "--checkpoint-dir", str(tmp_path))
    plan = PartitionPlan.build([("w", (300,), "float32")], 1, frame_elems=128)
    c = PSClient([server.endpoint], 0, settings=ClientSettings(frame_elems=128)).start()
    try:
        c.hello(plan)
        c.init(np.ones(300, np.float32))
        c.push(np.ones(300, np.float32), 0).wait(10)
    finally:
        c.close()
    out = run("ps-ctl", "checkpoint", "--servers", server.endpoint)
    assert out.returncode == 0, out.stderr
    assert "step 1 ->" in out.stdout and os.path.isdir(out.stdout.split("-> ")[1].strip())
    stat = run("ps-stat", "--servers", server.endpoint, "--json")
    assert stat.returncode == 0, stat.stderr
    doc = json.loads(stat.stdout)
    s = doc["servers"][0]
    assert s["step"] == 1 and s["checkpoints"] == 1
    assert {"read_timeout", "worker_timeout", "max_parked"} <= set(s["settings"])
    assert {"sndhwm", "rcvhwm", "linger"} <= set(s["settings"]["transport"])
    # ps-ctl status shows what ps-stat does, wherever its options stand
    for argv in (("status", "--servers", server.endpoint), ("--servers", server.endpoint, "--timeout", "5", "status")):
        st = run("ps-ctl", *argv)
        assert st.returncode == 0, st.stderr
        assert f"server 0 {server.endpoint}: step 1 " in st.stdout


@pytest.mark.parametrize("cmd, says", [
    (("ps-stat", "--servers", "tcp://127.0.0.1:9", "--timeout", "-1"), "above 0"),
    (("ps-stat", "--servers", "tcp://127.0.0.1:9", "--timeout", "inf"), "above 0"),
    (("ps-ctl", "status", "--servers", "tcp://127.0.0.1:9", "--timeout", "0"), "above 0"),
    (("ps-ctl", "shutdown", "--servers", "tcp://127.0.0.1:9"), "give --coordinator"),
    (("ps-export", "{tmp}", "{tmp}/no-such-folder/model.pt"), "does not exist"),
    (("ps-export", "{tmp}", "{tmp}"), "is a directory"),
])
def test_bad_arguments_get_a_clear_error_at_once(tmp_path, cmd, says):
    out = run(*[c.replace("{tmp}", str(tmp_path)) for c in cmd], timeout=60)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr


def test_request_once_refuses_a_wait_without_end():
    from common.control import request_once
    from common.protocol import MsgType
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="above 0"):
            request_once("tcp://127.0.0.1:9", MsgType.STATS, timeout=bad)


def test_ps_export_gives_a_state_dict_the_model_loads(tmp_path):
    ck = tmp_path / "ckpt"
    out = subprocess.run(bin_cmd("ps-launch", "--workload", "linreg", "--servers", "2", "--workers", "2",
                                 "--staleness", "1", "--steps", "120", "--checkpoint-dir", str(ck), "--quiet",
                                 "--out", str(tmp_path / "job")), capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:]
    summary = json.load(open(tmp_path / "job" / "summary.json"))
    exp = run("ps-export", str(ck), str(tmp_path / "model.pt"))
    assert exp.returncode == 0, exp.stderr
    assert sorted(p.name for p in tmp_path.glob("model.pt*")) == ["model.pt"], "a temporary file was left"
    from worker.workloads import get_workload
    wl = get_workload("linreg", seed=0)
    model = wl.build_model()
    model.load_state_dict(torch.load(tmp_path / "model.pt"))   # strict: every name and shape matches
    assert wl.evaluate(model) == pytest.approx(summary["eval_metric"]["value"], rel=1e-6)


def test_ps_export_names_what_is_missing(tmp_path):
    out = run("ps-export", str(tmp_path), str(tmp_path / "m.pt"))
    assert out.returncode == 1 and "server-" in out.stderr


def test_ps_ctl_shutdown_ends_a_running_job_promptly(tmp_path):
    """Workers stop at their next heartbeat (ps-worker exits 3), servers checkpoint, ps-launch says so."""
    import re
    import selectors
    import time

    ck = tmp_path / "ck"
    launch = subprocess.Popen(bin_cmd("ps-launch", "--workload", "digits", "--servers", "1", "--workers", "2",
                                      "--steps", "1000000", "--out", str(tmp_path / "job"),
                                      "--checkpoint-dir", str(ck)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        sel = selectors.DefaultSelector()
        sel.register(launch.stdout, selectors.EVENT_READ)
        url, seen, deadline = None, "", time.monotonic() + 120
        while not (url and seen.count('"role": "worker"') >= 2):   # both workers training
            assert time.monotonic() < deadline and launch.poll() is None, seen[-3000:]
            if sel.select(1.0):
                line = launch.stdout.readline()
                seen += line
                m = re.search(r"coordinator at (tcp://\S+);", line)
                url = url or (m and m.group(1))
        t0 = time.monotonic()
        out = run("ps-ctl", "shutdown", "--coordinator", url, timeout=60)
        assert out.returncode == 0, out.stderr
        rest, _ = launch.communicate(timeout=90)
        took = time.monotonic() - t0
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait(10)
    assert launch.returncode == 3, (seen + rest)[-3000:]
    assert took < 30, f"the job took {took:.0f}s to end after the shutdown"
    assert "job shut down (ps-ctl shutdown)" in rest and "stopped at clock" in rest
    assert list(ck.glob("server-0/ckpt-*")), "the server did not checkpoint at shutdown"


def test_after_a_shutdown_the_coordinator_stays_until_every_training_worker_was_told():
    """A worker learns of a shutdown from a heartbeat reply: the coordinator may not leave before."""
    from common.config import CoordinatorSettings, JobSettings
    from common.control import CoordinatorLink, request_once
    from common.protocol import MsgType
    from ps.coordinator import Coordinator

    coord = Coordinator(CoordinatorSettings(bind="tcp://127.0.0.1:0", done_grace=60, reach_timeout=0,
                                            job=JobSettings(num_servers=1, num_workers=1))).run_in_background()
    server = CoordinatorLink(coord.endpoint, "server", timeout=10)
    worker = CoordinatorLink(coord.endpoint, "worker", timeout=10)
    try:
        server.register(0, "tcp://127.0.0.1:9")
        worker.register(0)
        request_once(coord.endpoint, MsgType.SHUTDOWN, timeout=10)
        server.done({})                          # the server stopped at once; DONE's answer comes after
        assert coord.state == "done", "left before the training worker heard of the shutdown"   # its advance
        assert worker.call(MsgType.BEAT, {"role": "worker", "rank": 0, "inc": worker.inc}, 10)["state"] == "done"
        assert coord.wait(10), "did not stop once every worker was told"
        assert coord.state == "stopped"
    finally:
        worker.close()
        server.close()
        coord.shutdown(5)


def test_a_request_with_no_connection_to_send_on_fails_by_its_deadline(zctx):
    # a DEALER whose peer never completes a handshake (a CURVE coordinator refusing a plain
    # client; here: nothing listens and IMMEDIATE keeps the pipe away) blocks in a plain send
    import socket
    import time

    import zmq

    from common.control import CoordinatorLink
    from common.errors import DeadlineExceeded
    from common.protocol import MsgType
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    link = CoordinatorLink(nobody, "worker", ctx=zctx, timeout=0.5)
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect(nobody)
    try:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="could not send STATUS"):
            link.call(MsgType.STATUS, {}, 0.5, sock=sock)
        assert time.monotonic() - t0 < 5
    finally:
        sock.close(0)
        link.close()


def test_closing_a_link_does_not_wait_out_a_heartbeat_to_a_silent_coordinator(zctx):
    # a heartbeat waits up to 3 intervals for its answer; close() cuts that wait short
    import time

    import zmq

    from common.control import CoordinatorLink
    silent = zctx.socket(zmq.ROUTER)   # takes the beats, never answers
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    link = CoordinatorLink(f"tcp://127.0.0.1:{port}", "worker", ctx=zctx, timeout=5)
    try:
        link.start_heartbeats(1.0)   # each beat waits up to 3 s for its answer
        assert silent.poll(10_000), "no heartbeat arrived"
        silent.recv_multipart()      # the beat thread now waits for an answer that never comes
        t0 = time.monotonic()
        link.close()
        took = time.monotonic() - t0
        assert took < 1.5, f"close took {took:.1f}s: it waited out the heartbeat"
        assert not link._beat_thread.is_alive()
    finally:
        link.close()
        silent.close(0)


def test_interrupting_a_link_ends_another_threads_wait_at_once(zctx):
    # a stop signal's watcher interrupts the session: a barrier the loop waits in ends too
    import threading
    import time

    import zmq

    from common.control import CoordinatorLink
    from common.errors import ClosedError
    silent = zctx.socket(zmq.ROUTER)   # takes the request, never answers
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    link = CoordinatorLink(f"tcp://127.0.0.1:{port}", "worker", ctx=zctx, timeout=30)
    got = []

    def wait():
        try:
            link.barrier("finished", 30)
        except Exception as exc:
            got.append(exc)
    t = threading.Thread(target=wait)
    try:
        t.start()
        assert silent.poll(10_000), "the barrier request never arrived"
        t0 = time.monotonic()
        link.interrupt()
        t.join(5)
        assert not t.is_alive() and time.monotonic() - t0 < 2
        assert len(got) == 1 and isinstance(got[0], ClosedError), got
        with pytest.raises(ClosedError):
            link.status(1)                 # later calls are refused, not sent
    finally:
        link.interrupt()
        t.join(5)
        link.close()
        silent.close(0)
