"""PSClient's I/O: callers drive the sockets themselves, the background thread fills in.

One server in this process on 127.0.0.1 (real sockets); several client threads.
"""
import concurrent.futures as cf
import threading
import time

import numpy as np
import pytest

from common.config import ClientSettings
from common.errors import ClosedError
from common.plan import PartitionPlan
from common.protocol import MsgType
from worker.client import PSClient

N = 256


@pytest.fixture
def server(shard_servers):
    return lambda **kw: shard_servers(**{"num_workers": 2, "staleness": 0, "lr": 1.0, **kw})


@pytest.fixture
def client(ps_clients):
    return ps_clients


def joined(srv, client, w=0, **kw):
    c = client(srv, w, **kw)
    plan = PartitionPlan.build([("w", (N,), "float32")], 1, frame_elems=64)
    c.hello(plan)
    c.init(np.zeros(N, np.float32))
    return c


def weights(c):
    m = c.pull(0, timeout=10, observer=True).wait(10)[0]
    return np.concatenate([np.frombuffer(f.buffer, dtype="<f4") for f in m.frames])


def test_a_reply_nobody_waits_for_is_completed_by_the_background_thread(server, client):
    srv = server(staleness="inf", num_workers=1)
    c = joined(srv, client)
    handle = c.push(np.ones(N, np.float32), 0)
    # cf.wait looks at the futures' state only: nobody in this thread drives the sockets
    done, not_done = cf.wait(handle.futures, timeout=10)
    assert not not_done
    assert handle.wait(0)[0]["step"] == 1


def test_a_second_thread_is_served_while_the_first_waits_on_a_parked_read(server, client):
    srv = server()                               # BSP, 2 workers: worker 0's read at clock 1 parks
    a = joined(srv, client, 0)
    b = client(srv, 1)
    b.hello(a.plan)
    a.push(np.ones(N, np.float32), 0).wait(10)   # worker 0 completes clock 0, worker 1 has not
    parked = a.pull(1, timeout=20)
    waiter = threading.Thread(target=lambda: parked.wait(20))
    waiter.start()                               # it holds the client's sockets while it waits
    try:
        # the same client, another thread: the request is handed over and answered
        stats = a.request(0, MsgType.STATS).result(10)
        assert stats["stats"]["parked"] == 1
        b.push(np.full(N, 3.0, np.float32), 0).wait(10)   # worker 1 completes clock 0: the read qualifies
        waiter.join(20)
        assert not waiter.is_alive()
        assert parked.done()
        got = np.concatenate([np.frombuffer(f.buffer, dtype="<f4") for f in parked.wait(0)[0].frames])
        assert np.allclose(got, -2.0)            # the average of 1 and 3, applied once
    finally:
        waiter.join(20)


def test_requests_from_many_threads_all_arrive_and_apply_once(server, client):
    srv = server(staleness="inf", num_workers=1)
    c = joined(srv, client)
    errors = []

    def pusher(k):
        try:
            for clk in range(20):
                c.push(np.full(N, 1.0, np.float32), clk, tick=False).wait(20)
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=pusher, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert np.allclose(weights(c), -80.0)
    assert c.server_stats(0)["pushes"] == 80


def test_requests_leave_in_the_order_they_were_made(server, client):
    srv = server(staleness="inf", num_workers=1)
    c = joined(srv, client)
    handles = [c.push(np.full(N, float(k + 1), np.float32), k, tick=False) for k in range(30)]
    steps = [h.wait(10)[0]["step"] for h in handles]
    assert steps == list(range(1, 31))          # applied in the order pushed


def test_close_fails_a_read_another_thread_is_waiting_for(server, client):
    srv = server()
    a = joined(srv, client, 0)
    parked = a.pull(1, timeout=60)             # parks: worker 1 never completes clock 0
    a.push(np.ones(N, np.float32), 0).wait(10)
    failure = []

    def wait():
        try:
            parked.wait(60)
        except Exception as exc:
            failure.append(exc)
    t = threading.Thread(target=wait)
    t.start()
    t0 = time.monotonic()
    a.close()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 5
    assert len(failure) == 1 and isinstance(failure[0], ClosedError)


def test_heartbeats_go_out_while_a_caller_waits_for_a_long_time(server, client):
    srv = server(worker_timeout=1.0)
    a = joined(srv, client, 0, heartbeat_interval=0.2)
    b = client(srv, 1, heartbeat_interval=0.2)
    b.hello(a.plan)
    a.push(np.ones(N, np.float32), 0).wait(10)
    parked = a.pull(1, timeout=20)
    t0 = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        parked.futures[0].result(3.0)           # this thread drives the sockets for 3 s
    assert time.monotonic() - t0 >= 2.9
    b.push(np.ones(N, np.float32), 0).wait(10)
    parked.wait(10)
    assert srv.snapshot_stats()["dead_workers"] == []


class _NoBackground(PSClient):
    """A client whose background thread does nothing: every reply must be fetched by its waiter."""

    def _background(self):
        while not self._closed:
            self._kick.wait(0.1)
        self._shutdown_io()


def test_waiters_fetch_their_own_replies_without_the_background_thread(server):
    srv = server(staleness="inf", num_workers=1)
    c = _NoBackground([srv.endpoint], 0, settings=ClientSettings(frame_elems=64)).start()
    try:
        plan = PartitionPlan.build([("w", (N,), "float32")], 1, frame_elems=64)
        c.hello(plan)
        c.init(np.zeros(N, np.float32))
        g = np.ones(N, np.float32)
        h = c.push(g, 0)
        h.wait_released(5)                      # waits for the answer, fetching it itself
        assert h.released() and h.done()
        assert h.wait(0)[0]["step"] == 1
        h = c.push(g, 1)
        deadline = time.monotonic() + 5
        while not h.done():                     # done() looks at the sockets too
            assert time.monotonic() < deadline
        assert np.allclose(weights(c), -2.0)
    finally:
        c.close()


def test_timers_of_answered_requests_do_not_pile_up(server, client):
    # every request arms a retry timer (here 60 s away); answered ones are pruned, so the
    # heap stays near the requests in flight instead of growing with every request made
    from worker.client import _TIMERS_SLACK
    srv = server(staleness="inf", num_workers=1)
    c = joined(srv, client, attempt_timeout=60.0, request_timeout=60.0)
    g = np.ones(N, np.float32)
    sizes = []
    for k in range(3 * _TIMERS_SLACK):
        futs = c.push(g, k).futures + c.push(g, k).futures
        assert [f.result(10)["dup"] for f in futs] == [False, False]
        sizes.append(len(c._timers))
    assert max(sizes) <= 2 * 2 + _TIMERS_SLACK + 1
    assert c.stats["retries"] == 0 and weights(c)[0] == pytest.approx(-6 * _TIMERS_SLACK * 1.0)


def test_result_of_an_answered_request_and_of_a_failed_one(server, client):
    srv = server(staleness="inf", num_workers=1)
    c = joined(srv, client)
    fut = c.push(np.ones(N, np.float32), 0).futures[0]
    first = fut.result(10)
    assert fut.done() and fut.result() is first and fut.result(0) is first
    for bad_timeout in ("x", float("nan"), True):   # checked even when the answer is in
        with pytest.raises(ValueError):
            fut.result(bad_timeout)
    bad = c.request(0, MsgType.PULL, {"w": 0, "clk": 0, "ph": c.plan.hash + 1, "dl": 1000})
    with pytest.raises(Exception) as info:
        bad.result(10)
    with pytest.raises(type(info.value)):   # answered with an error: raised every time
        bad.result()


def test_an_io_thread_that_fails_closes_the_sockets_and_fails_what_waits(server, client, monkeypatch):
    """A bug in the background thread must not leave close() waiting on ctx.term() for ever."""
    srv = server()
    a = joined(srv, client, 0)
    parked = a.pull(1, timeout=60)             # parks: worker 1 never completes clock 0

    def broken(_timeout):
        raise RuntimeError("a bug in the I/O path")
    monkeypatch.setattr(a, "_drive", broken)   # the background thread's next round fails
    a._kick.set()
    a._thread.join(10)
    assert not a._thread.is_alive()
    with pytest.raises(ClosedError, match="I/O thread failed .*a bug in the I/O path"):
        a.push(np.ones(N, np.float32), 0)
    with pytest.raises(ClosedError):
        parked.wait(5)                         # failed at once, not at its 60 s deadline
    closing = threading.Thread(target=a.close, args=(5,))
    closing.start()
    closing.join(10)
    assert not closing.is_alive(), "close() waits on ctx.term() for sockets nobody will close"


# ------------------------------------------------------------ the request future (pure logic)
class _Driver:
    """Stands in for PSClient: the future's waits and polls find nothing to drive."""

    def _poke(self):
        pass

    def _wait_for(self, fut, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while fut._state != "FINISHED" and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.001)


def test_a_request_future_is_running_from_the_start_and_cannot_be_cancelled():
    from worker.client import _Reply
    fut = _Reply(_Driver())
    assert fut.running() and not fut.done()
    assert fut.cancel() is False and not fut.cancelled()
    fut.set_result("reply")
    assert fut.done() and fut.result(0) == "reply" and fut.exception(0) is None
    with pytest.raises(cf.InvalidStateError):
        fut.set_result("again")


def test_a_request_future_raises_its_error_every_time_and_runs_its_callbacks():
    from worker.client import _Reply
    fut = _Reply(_Driver())
    seen = []
    fut.add_done_callback(lambda f: seen.append(f.exception(0)))
    err = ValueError("refused")
    fut.set_exception(err)
    assert seen == [err]
    for _ in range(2):
        with pytest.raises(ValueError, match="refused"):
            fut.result(0)
    assert fut.exception() is err
    late = []
    fut.add_done_callback(late.append)   # added once settled: called at once
    assert late == [fut]
    with pytest.raises(cf.TimeoutError):
        _Reply(_Driver()).result(0.01)


def test_no_waiter_of_a_request_future_misses_its_settling():
    """The settler takes no lock while nobody waits; a waiter that comes at the same moment
    (cf.wait, as_completed, result from another thread) must still wake at once."""
    from worker.client import _Reply
    driver = _Driver()
    slow = []
    for trial in range(300):
        futs = [_Reply(driver) for _ in range(3)]
        go = threading.Barrier(3)
        out = {}

        def wait_all():
            go.wait()
            t0 = time.monotonic()
            out["wait"] = cf.wait(futs, timeout=5)
            out["wait_s"] = time.monotonic() - t0

        def first_completed():
            go.wait()
            t0 = time.monotonic()
            out["first"] = next(cf.as_completed(futs, timeout=5))
            out["first_s"] = time.monotonic() - t0

        threads = [threading.Thread(target=wait_all), threading.Thread(target=first_completed)]
        for t in threads:
            t.start()
        go.wait()
        if trial % 3:
            time.sleep(trial % 7 * 1e-5)   # settle before, while and after the waiters look
        for i, f in enumerate(futs):
            f.set_result(i)
        for t in threads:
            t.join(10)
        done, not_done = out["wait"]
        assert done == set(futs) and not not_done
        assert out["first"] in futs
        slow += [s for s in (out["wait_s"], out["first_s"]) if s > 2]
    assert not slow, f"waiters woke only by their timeout: {slow}"


def test_of_two_threads_settling_a_request_future_at_once_one_wins():
    """The I/O thread answering a reply while close() fails it: the future keeps one outcome."""
    from worker.client import _Reply
    for _ in range(200):
        fut = _Reply(_Driver())
        go = threading.Barrier(2)
        outcomes = []

        def settle(how):
            go.wait()
            try:
                how()
                outcomes.append(True)
            except cf.InvalidStateError:
                outcomes.append(False)
        threads = [threading.Thread(target=settle, args=(lambda: fut.set_result("reply"),)),
                   threading.Thread(target=settle, args=(lambda: fut.set_exception(ClosedError("closed")),))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(outcomes) == [False, True]
        won_reply = fut.exception(0) is None
        assert (fut.result(0) == "reply") if won_reply else isinstance(fut.exception(0), ClosedError)
