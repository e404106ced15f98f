"""Servers act on the coordinator's verdict: a worker declared dead before it said HELLO holds nobody back.

The servers count a worker that has not said HELLO yet as live at clock 0, so
nobody runs ahead of a worker that is still starting.  One that dies while
starting never says HELLO, and never times out on a server; the coordinator
declares it dead (no BEAT) and lists it in every BEAT_OK's ``dead_workers``,
which the servers now act on (docs/PROTOCOL.md §10.6).
"""
import json
import time

import numpy as np
import pytest

from common.config import ClientSettings
from common.control import CoordinatorLink, request_once
from common.plan import PartitionPlan
from common.protocol import MsgType
from tests.conftest import wait_until
from worker.client import PSClient
from zpscluster.procs import bin_cmd

N = 300
PLAN = PartitionPlan.build([("w", (N,), "float32")], 1, frame_elems=128)


def test_a_read_held_back_by_a_worker_that_never_said_hello_is_answered_once_the_coordinator_reports_it_dead(
        shard_servers):
    srv = shard_servers(num_workers=3, staleness=1, worker_timeout=30.0, read_timeout=60.0)
    c = PSClient([srv.endpoint], 0, settings=ClientSettings(frame_elems=128)).start()
    other = PSClient([srv.endpoint], 2, settings=ClientSettings(frame_elems=128)).start()
    try:
        c.hello(PLAN)
        other.hello(PLAN)
        c.init(np.zeros(N, np.float32))
        for clk in range(2):
            c.push(np.ones(N, np.float32), clk).wait(10)
            other.push(np.ones(N, np.float32), clk).wait(10)
        read = c.pull(2)                       # needs min_clock >= 1: worker 1 (no HELLO) is at 0
        wait_until(lambda: c.server_stats(0)["parked"] == 1, 10, "the read to be parked")
        srv.report_dead([0, 1, 2])             # from this thread, as the heartbeat thread does
        read.wait(10)
        stats = c.server_stats(0)
        # 1 never said HELLO: it leaves; 0 and 2 were heard from just now: the verdict does not touch them
        assert stats["live"] == [True, False, True] and stats["min_clock"] == 2
        assert stats["dead_workers"] == [1]
        late = PSClient([srv.endpoint], 1, settings=ClientSettings(frame_elems=128)).start()
        try:
            (reply,) = late.hello(PLAN)        # it was only slow: it joins as a rejoin does
            assert reply["start_clock"] == 2
        finally:
            late.close()
        assert c.server_stats(0)["live"] == [True, True, True]
    finally:
        c.close()
        other.close()


def test_a_worker_that_dies_before_its_hello_does_not_stall_the_others_until_their_read_timeout(procs, tmp_path):
    """coordinator + 1 server + a worker that registers and dies before HELLO + a worker that trains."""
    steps = 30
    coord = procs.start(bin_cmd("ps-coordinator", "--bind", "tcp://127.0.0.1:0", "--num-servers", "1",
                                "--num-workers", "2", "--staleness", "1", "--workload", "linreg",
                                "--steps", str(steps), "--worker-timeout", "3", "--heartbeat-interval", "0.5",
                                "--read-timeout", "120", "--done-grace", "10"), "coordinator")
    url = coord.wait_ready(60)["endpoint"]
    # worker 0 registers, then its process "dies" before it says HELLO: no BEAT, no LEAVE
    link = CoordinatorLink(url, "worker", timeout=30)
    try:
        assert link.register(want=0)[0] == 0
    finally:
        link.close()
    server = procs.start(bin_cmd("ps-server", "--coordinator", url, "--rank", "0", "--bind", "tcp://127.0.0.1:0"),
                         "server0")
    server.wait_ready(60)
    t0 = time.monotonic()
    worker = procs.start(bin_cmd("ps-worker", "--coordinator", url, "--rank", "1", "--out", str(tmp_path),
                                 "--progress", "off"), "worker1")
    # without the coordinator's verdict worker 1 would wait at clock 2 for worker 0 until its read
    # timeout (120 s) and fail; with it, it waits about worker_timeout (3 s) once
    code = worker.wait(90)
    took = time.monotonic() - t0
    assert code == 0, worker.tail(30)
    result = json.load(open(tmp_path / "result-w1.json"))
    print(f"worker 1 trained {steps} steps in {took:.1f}s beside a worker that died before its HELLO")
    assert result["clock"] == steps, result
    assert server.wait(60) == 0, server.tail(20)
    assert any("worker 0 declared dead by the coordinator and never said HELLO here" in line
               for line in server.lines), server.tail(20)
    assert coord.wait(60) == 0, coord.tail(20)


@pytest.mark.parametrize("listed", [[5], [-1], ["x"], [True]], ids=["beyond-job", "negative", "string", "bool"])
def test_a_server_ignores_worker_ids_outside_its_job_in_the_coordinators_list(shard_servers, listed):
    srv = shard_servers(num_workers=2, staleness=1)

    def stats():
        return request_once(srv.endpoint, MsgType.STATS, timeout=10)["stats"]
    srv.report_dead(listed)
    srv.report_dead([1])                       # handled after the odd one: the loop is still fine
    wait_until(lambda: stats()["dead_workers"] == [1], 10, "worker 1 to be dropped")
    assert stats()["live"] == [True, False]
