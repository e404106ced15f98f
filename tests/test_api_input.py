"""The training API (PSWorker, join, Session) facing misuse and failure, against real servers."""
import threading
import time

import pytest
import torch

from common.config import ClientSettings
from common.errors import ConfigError, StalenessTimeoutError, ZPSError
from worker.api import join
from worker.session import PSWorker
from zpscluster.procs import bin_cmd

pytestmark = pytest.mark.slow


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 1)


def _step(w: PSWorker, read_timeout=10.0):
    w.read(read_timeout)
    w.zero_grad()
    w.model(torch.ones(2, 4)).sum().backward()
    w.push()


def _client_threads():
    return [t for t in threading.enumerate() if t.name.startswith("zps-client-")]


def test_a_read_that_timed_out_neither_sticks_nor_overstays(procs):
    """read(T) ends after about T with the servers' STALE_TIMEOUT naming the blocker; the next read asks anew."""
    srv = procs.server(0, 1, 2, 0)
    s = ClientSettings(frame_elems=64, read_timeout=60)
    w0 = PSWorker(_model(), [srv.endpoint], 0, settings=s).start(10)
    w1 = PSWorker(_model(), [srv.endpoint], 1, settings=s).start(10)
    try:
        _step(w0)                      # clock 1 now needs worker 1's clock 0
        t0 = time.monotonic()
        with pytest.raises(StalenessTimeoutError) as err:
            w0.read(1.0)               # the pull sent ahead after the push is parked for 60 s
        took = time.monotonic() - t0
        assert took < 4.0, f"read(1.0) took {took:.1f}s"
        assert 1 in err.value.blockers
        _step(w1)
        w1.flush(10)
        rec = w0.read(10)              # the failed pull is gone: this one is answered
        assert rec.clock == 1 and rec.pulled and rec.staleness == 0
    finally:
        w0.close(5)
        w1.close(5)


def test_a_failed_start_leaves_no_thread_behind():
    before = len(_client_threads())
    w = PSWorker(_model(), ["tcp://127.0.0.1:9"], 0,
                 settings=ClientSettings(frame_elems=64, request_timeout=1, attempt_timeout=0.3))
    with pytest.raises(ZPSError):
        w.start(1.0)
    deadline = time.monotonic() + 5
    while len(_client_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_client_threads()) == before, [t.name for t in _client_threads()]


def test_using_a_worker_before_start_says_so():
    w = PSWorker(_model(), ["tcp://127.0.0.1:9"], 0, settings=ClientSettings(frame_elems=64))
    try:
        for call in (w.read, w.zero_grad, w.push, w.tick, w.fetch_weights):
            with pytest.raises(ZPSError, match="call start"):
                call()
    finally:
        w.close(1)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_timeouts_must_be_finite_and_positive(bad):
    w = PSWorker(_model(), ["tcp://127.0.0.1:9"], 0, settings=ClientSettings(frame_elems=64))
    try:
        with pytest.raises(ValueError, match="timeout"):
            w.start(bad)
    finally:
        w.close(1)
    with pytest.raises(ValueError, match="timeout"):
        join(_model(), "tcp://127.0.0.1:9", timeout=bad)


def test_frozen_and_meta_parameters_are_refused_before_anything_is_sent():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    for p in m[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="frozen"):
        PSWorker(m, ["tcp://127.0.0.1:9"], 0)
    with pytest.raises(ConfigError, match="meta device"):
        PSWorker(torch.nn.Linear(4, 1, device="meta"), ["tcp://127.0.0.1:9"], 0)


def test_share_memory_after_binding_keeps_training(procs):
    """share_memory() moves the flat buffers' memory as a whole: pulls and pushes follow it."""
    srv = procs.server(0, 1, 1, "inf", "--lr", "0.5")
    m = _model()
    w = PSWorker(m, [srv.endpoint], 0, settings=ClientSettings(frame_elems=64)).start(10)
    try:
        _step(w)
        m.share_memory()
        before = m.weight.detach().clone()
        _step(w)
        w.flush(10)
        w.fetch_weights(10)
        assert not torch.equal(m.weight.detach(), before), "the pushed gradient never reached the model"
    finally:
        w.close(5)


@pytest.mark.parametrize("change", ["double", "assign"])
def test_a_model_changed_after_binding_is_refused_at_the_next_push(procs, change):
    srv = procs.server(0, 1, 1, "inf")
    m = _model()
    w = PSWorker(m, [srv.endpoint], 0, settings=ClientSettings(frame_elems=64)).start(10)
    try:
        _step(w)
        if change == "double":
            m.double().float()                       # converted away and back: new storage
        else:
            m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
        w.read(10)
        w.zero_grad()
        m(torch.ones(2, 4)).sum().backward()
        with pytest.raises(ConfigError, match="after (it|the model) was bound"):
            w.push()
    finally:
        w.close(5)


def test_lazy_refresh_under_asp_is_refused(procs):
    srv = procs.server(0, 1, 1, "inf")
    w = PSWorker(_model(), [srv.endpoint], 0, settings=ClientSettings(frame_elems=64, refresh="lazy"))
    with pytest.raises(ConfigError, match="refresh='lazy'"):
        w.start(10)


def test_join_checks_the_model_before_it_takes_a_rank(procs, monkeypatch):
    coord = procs.start(bin_cmd("ps-coordinator", "--bind", "tcp://127.0.0.1:0", "--num-servers", "1",
                                "--num-workers", "1", "--staleness", "inf"), "coordinator")
    cep = coord.wait_ready(60)["endpoint"]
    procs.start(bin_cmd("ps-server", "--coordinator", cep, "--bind", "tcp://127.0.0.1:0"), "server0").wait_ready(60)
    for bad in (torch.nn.ReLU(), torch.nn.Linear(2, 2).half()):
        with pytest.raises(ConfigError):
            join(bad, cep, timeout=10)
    monkeypatch.setenv("ZPS_WORKER_RANK", "zero")
    with pytest.raises(ConfigError, match="ZPS_WORKER_RANK"):
        join(torch.nn.Linear(2, 2), cep, timeout=10)
    monkeypatch.delenv("ZPS_WORKER_RANK")
    # rank 0 is still free: the refused joins took nothing
    with join(torch.nn.Linear(2, 2), cep, rank=0, timeout=30) as ps:
        assert ps.rank == 0
        with ps.step():
            ps.model(torch.ones(1, 2)).sum().backward()


def test_a_job_shut_down_under_a_training_loop_raises_job_stopped(procs):
    from common.control import request_once
    from common.errors import JobStopped
    from common.protocol import MsgType

    coord = procs.start(bin_cmd("ps-coordinator", "--bind", "tcp://127.0.0.1:0", "--num-servers", "1",
                                "--num-workers", "1", "--staleness", "inf", "--heartbeat-interval", "0.2",
                                "--worker-timeout", "5"), "coordinator")
    cep = coord.wait_ready(60)["endpoint"]
    procs.start(bin_cmd("ps-server", "--coordinator", cep, "--bind", "tcp://127.0.0.1:0"), "server0").wait_ready(60)
    m = _model()
    steps = 0
    with pytest.raises(JobStopped, match="shut down"):
        with join(m, cep, timeout=30) as ps:
            for _ in range(20):
                with ps.step():
                    m(torch.ones(2, 4)).sum().backward()
            request_once(cep, MsgType.SHUTDOWN, timeout=10)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 30:       # stops at the next heartbeat, not at a timeout
                with ps.step():
                    m(torch.ones(2, 4)).sum().backward()
                steps += 1
    assert time.monotonic() - t0 < 10, f"the loop ran {time.monotonic() - t0:.1f}s after the shutdown"


def test_a_join_that_fails_after_registering_gives_its_rank_back():
    """The rank is free at once; the job neither waits for the failed process to be declared
    dead nor ends when it is (it was the only worker)."""
    from common.config import CoordinatorSettings, JobSettings
    from common.control import CoordinatorLink, request_once
    from common.protocol import MsgType
    from ps.coordinator import Coordinator

    now = {"t": 0.0}
    coord = Coordinator(CoordinatorSettings(bind="tcp://127.0.0.1:0", reach_timeout=0,
                                            job=JobSettings(num_servers=1, num_workers=1, worker_timeout=5)),
                        clock=lambda: now["t"]).run_in_background()
    server = CoordinatorLink(coord.endpoint, "server", timeout=10)
    retry = CoordinatorLink(coord.endpoint, "worker", timeout=10)

    def status():
        request_once(coord.endpoint, MsgType.STATUS, timeout=10)   # the loop advances after answering
        return request_once(coord.endpoint, MsgType.STATUS, timeout=10)["status"]
    try:
        server.register(0, "tcp://127.0.0.1:9")     # an address nobody serves: the worker's HELLO fails
        with pytest.raises(ZPSError):
            join(_model(), coord.endpoint, timeout=1)
        st = status()
        assert st["workers"][0]["registered"] is False
        assert [e["event"] for e in st["events"] if e["role"] == "worker"] == ["registered", "left"]
        beat = {"role": "server", "rank": 0, "inc": server.inc}
        assert server.call(MsgType.BEAT, beat)["dead_workers"] == [0]   # servers stop waiting for it
        now["t"] = 100.0                             # long past worker_timeout
        st = status()
        assert st["state"] == "running" and st["workers"][0]["live"] is True   # not declared dead
        assert retry.register(0)[0] == 0             # granted at once, not parked
        assert server.call(MsgType.BEAT, beat)["dead_workers"] == []
    finally:
        retry.close()
        server.close()
        coord.shutdown(5)


def test_leave_gives_back_only_what_its_incarnation_holds():
    from common.config import CoordinatorSettings, JobSettings
    from common.control import CoordinatorLink, request_once
    from common.errors import RemoteError
    from common.protocol import MsgType
    from ps.coordinator import Coordinator

    now = {"t": 0.0}
    coord = Coordinator(CoordinatorSettings(bind="tcp://127.0.0.1:0", reach_timeout=0,
                                            job=JobSettings(num_servers=1, num_workers=2, worker_timeout=5)),
                        clock=lambda: now["t"]).run_in_background()
    links = [CoordinatorLink(coord.endpoint, role, timeout=10) for role in ("server", "worker", "worker")]
    server, first, second = links

    def workers():
        request_once(coord.endpoint, MsgType.STATUS, timeout=10)   # the loop advances after answering
        return request_once(coord.endpoint, MsgType.STATUS, timeout=10)["status"]["workers"]
    try:
        server.register(0, "tcp://127.0.0.1:9")
        first.register(0)
        now["t"] = 100.0     # worker 1 never registered: the job is not over when worker 0 is lost
        assert workers()[0]["live"] is False           # first stopped beating: declared dead
        assert second.register(0)[0] == 0              # a restart takes rank 0 over
        assert first.leave("late") is False            # not the holder any more: no effect
        assert workers()[0]["live"] is True
        assert second.leave("its start failed") is True
        w = workers()[0]
        assert w["registered"] is True and w["live"] is False and w["restarts"] == 1   # dead again
        assert second.leave("again") is False
        with pytest.raises(RemoteError, match="only a worker can LEAVE"):
            server.call(MsgType.LEAVE, {"role": "server", "rank": 0, "inc": server.inc, "why": ""})
    finally:
        for link in links:
            link.close()
        coord.shutdown(5)


def test_the_finished_barrier_skips_a_given_back_rank_and_late_arrivals_get_its_first_members():
    """A rank given back holds neither the barrier nor the job's end; a worker declared dead and back
    after the barrier opened is told the members it opened with (so only one finalizes)."""
    from common.config import CoordinatorSettings, JobSettings
    from common.control import CoordinatorLink, request_once
    from common.protocol import MsgType
    from ps.coordinator import Coordinator

    now = {"t": 0.0}
    coord = Coordinator(CoordinatorSettings(bind="tcp://127.0.0.1:0", reach_timeout=0, done_grace=60,
                                            job=JobSettings(num_servers=1, num_workers=3, worker_timeout=5)),
                        clock=lambda: now["t"]).run_in_background()
    links = [CoordinatorLink(coord.endpoint, role, timeout=10) for role in ("server", "worker", "worker", "worker")]
    server, gone, late, first = links
    try:
        server.register(0, "tcp://127.0.0.1:9")
        assert gone.register(0)[0] == 0 and gone.leave("its start failed")
        late.register(1)
        first.register(2)
        now["t"] = 4.0                                      # within worker_timeout (5 s) of everyone
        first.call(MsgType.BEAT, {"role": "worker", "rank": 2, "inc": first.inc})
        now["t"] = 8.0                                      # worker 1 and the server silent since 0: dead
        request_once(coord.endpoint, MsgType.STATUS, timeout=10)   # the loop advances after answering
        assert first.barrier("finished", 10) == [2]         # rank 0 gave its rank back, rank 1 is dead
        late.call(MsgType.BEAT, {"role": "worker", "rank": 1, "inc": late.inc})   # back after it opened
        assert late.barrier("finished", 10) == [2]          # the list it opened with: 2 finalizes alone
        late.done({})
        first.done({})
        assert coord.wait(10), f"the job did not end ({coord.state})"   # its only server is dead: it stops
    finally:
        for link in links:
            link.close()
        coord.shutdown(5)
