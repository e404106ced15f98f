"""One server in this process on 127.0.0.1 (real sockets), driven by PSClient."""
import numpy as np
import pytest
import torch

from common.config import ClientSettings, ServerSettings
from common.errors import ErrorCode, RemoteError, StalenessTimeoutError
from common.plan import PartitionPlan
from common.protocol import MsgType
from ps.server import ShardServer
from worker.session import PSWorker


@pytest.fixture
def make_server(shard_servers):
    return lambda **kw: shard_servers(**{"num_workers": 1, "staleness": 1, **kw})


@pytest.fixture
def make_client(ps_clients):
    return ps_clients


def plan_of(n, frame=64):
    return PartitionPlan.build([("w", (n,), "float32")], 1, frame_elems=frame)


def pull_flat(c, plan, clk=0):
    m = c.pull(clk, timeout=10).wait(10)[0]
    return np.concatenate([np.frombuffer(f.buffer, dtype="<f4") for f in m.frames]), m


def push(c, plan, g, clk, rs=None, seq=None):
    head = {"w": c.worker_id, "inc": c.incarnation, "seq": clk if seq is None else seq, "clk": clk,
            "ph": plan.hash, "n": plan.total, "tick": True}
    if rs is not None:
        head["rs"] = rs
    frames = [g[a:b].tobytes() for a, b in plan.frames_of(0)]
    return c.request(0, MsgType.PUSH, head, frames).result(10)


def test_staleness_aware_learning_rate_divides_by_the_measured_staleness(make_server, make_client):
    srv = make_server(staleness="inf", lr=1.0, staleness_lr=True)
    c = make_client(srv)
    plan = plan_of(100)
    c.hello(plan)
    c.init(np.zeros(100, np.float32))
    ones = np.ones(100, np.float32)
    for clk in range(3):                  # steps 1..3, each read fresh (rs = current step)
        push(c, plan, ones, clk, rs=clk)
    push(c, plan, ones, 3, rs=0)          # computed on step-0 weights: staleness 3
    w, _ = pull_flat(c, plan)
    assert np.allclose(w, -(3 + 1 / 3))
    hist = c.server_stats(0)["update_staleness"]
    assert hist == {"0": 3, "3": 1}


@pytest.mark.parametrize("segmented", [False, True])
def test_a_push_built_for_another_plan_of_the_same_size_is_refused_and_changes_nothing(
        make_server, make_client, segmented):
    srv = make_server(staleness="inf", lr=1.0)
    c = make_client(srv)
    plan = plan_of(128)
    other = PartitionPlan.build([("v", (128,), "float32")], 1, frame_elems=64)   # same cut, other model
    assert other.hash != plan.hash and other.total == plan.total
    c.hello(plan)
    c.init(np.zeros(128, np.float32))
    head = {"w": 0, "inc": c.incarnation, "seq": 0, "clk": 0, "ph": other.hash, "n": 128, "tick": True}
    if segmented:
        head.update(off=0, segs=1)
    with pytest.raises(RemoteError) as info:
        c.request(0, MsgType.PUSH, head, [np.ones(64, np.float32).tobytes()] * 2).result(10)
    assert info.value.code is ErrorCode.PLAN_MISMATCH
    w, m = pull_flat(c, plan)
    assert not w.any() and m["step"] == 0
    assert push(c, plan, np.ones(128, np.float32), 0)["step"] == 1   # the right plan's push is applied


def test_delay_compensation_adds_lambda_g_squared_times_the_weight_drift(make_server, make_client):
    lam = 0.5
    srv = make_server(staleness="inf", num_workers=2, lr=1.0, dc_lambda=lam)
    a, b = make_client(srv, 0), make_client(srv, 1)
    plan = plan_of(64)
    a.hello(plan)
    b.hello(plan)
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(64).astype(np.float32)
    a.init(w0)
    read, m = pull_flat(b, plan)          # worker 1 reads the step-0 weights
    assert m["step"] == 0 and np.array_equal(read, w0)
    ga = rng.standard_normal(64).astype(np.float32)
    push(a, plan, ga, 0, rs=0)            # worker 0 moves the weights: w1 = w0 - ga
    w1 = w0 - ga
    gb = rng.standard_normal(64).astype(np.float32)
    push(b, plan, gb, 0, rs=0)            # stale by one step: compensated
    want = w1 - (gb + lam * gb * gb * (w1 - w0))
    got, _ = pull_flat(a, plan)
    assert np.allclose(got, want, rtol=1e-6, atol=1e-6)
    dc = a.server_stats(0)["dc"]
    assert (dc["compensated"], dc["misses"]) == (1, 1)  # worker 0 never pulled: nothing to compensate with


def test_a_large_zero_copy_push_and_pull_round_trip_exactly(make_server, make_client):
    n = 300_000  # 1.2 MB: frames go zero-copy with trackers on both sides
    srv = make_server(staleness="inf", lr=1.0)
    c = make_client(srv, frame_elems=1 << 16)
    plan = plan_of(n, 1 << 16)
    c.hello(plan)
    w0 = np.arange(n, dtype=np.float32)
    c.init(w0)
    g = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    handles = [c.push(g, clk) for clk in range(3)]
    for h in handles:
        h.wait_released(10)
        h.wait(10)
    got, _ = pull_flat(c, plan)
    assert np.array_equal(got, ((w0 - g) - g) - g)


def _two_joined(make_server, make_client, staleness):
    """Workers 0 and 1 said HELLO to one server of 64 zeros (worker 0 sent them)."""
    srv = make_server(staleness=staleness, num_workers=2)
    a, b = make_client(srv, 0), make_client(srv, 1)
    plan = plan_of(64)
    a.hello(plan)
    b.hello(plan)
    a.init(np.zeros(64, np.float32))
    return a, b


def test_a_read_past_its_deadline_fails_naming_the_worker_holding_it_back(make_server, make_client):
    a, _ = _two_joined(make_server, make_client, 1)
    for clk in range(2):
        a.push(np.zeros(64, np.float32), clk).wait(10)
    with pytest.raises(StalenessTimeoutError) as err:
        a.pull(3, timeout=0.3).wait(10)   # needs min_clock >= 2; worker 1 is at 0
    assert err.value.blockers == [1]


def test_under_bsp_a_worker_that_completed_its_clock_is_not_named_as_holding_a_read_back(make_server, make_client):
    a, b = _two_joined(make_server, make_client, 0)
    a.push(np.zeros(64, np.float32), 0).wait(10)   # held until worker 1 completes clock 0 too
    with pytest.raises(StalenessTimeoutError) as err:
        a.pull(1, timeout=0.3).wait(10)
    assert err.value.blockers == [1]
    assert "workers [0] completed clock 0" in str(err.value)
    b.push(np.zeros(64, np.float32), 0).wait(10)
    assert a.pull(1, timeout=5).wait(10)[0]["min_clock"] == 1


def test_worker_session_records_staleness_and_serves_reads_from_its_cache(make_server):
    srv = make_server(staleness=3, lr=0.1)
    model = torch.nn.Linear(8, 2)
    pw = PSWorker(model, [srv.endpoint], 0, settings=ClientSettings(frame_elems=64, refresh="lazy")).start()
    try:
        pulls_before = srv.snapshot_stats()["pulls"]
        for _ in range(8):
            pw.read()
            pw.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            pw.push()
        pw.flush(10)
        recs = pw.records
        assert all(r.staleness <= 3 for r in recs)
        assert sum(r.pulled for r in recs) < len(recs)   # most reads were served from the cache
        assert srv.snapshot_stats()["pulls"] - pulls_before < len(recs)
    finally:
        pw.close()


def test_two_workers_with_one_id_do_not_take_turns_the_older_one_stops(make_server):
    """The newest HELLO holds the id; the process it replaced fails with a FENCED it does not
    answer with a HELLO of its own (which would take the id back, and so on in turn)."""
    srv = make_server(staleness="inf", num_workers=1)
    settings = ClientSettings(frame_elems=64, heartbeat_interval=60)
    old = PSWorker(torch.nn.Linear(4, 1), [srv.endpoint], 0, settings=settings).start()
    new = PSWorker(torch.nn.Linear(4, 1), [srv.endpoint], 0, settings=settings).start()
    try:
        def step(pw):
            pw.read(10); pw.zero_grad(); pw.model(torch.ones(2, 4)).sum().backward(); pw.push()
            pw.flush(10)
        step(new)
        with pytest.raises(RemoteError) as err:
            step(old)
        assert err.value.code == ErrorCode.FENCED and err.value.detail["superseded"] is True
        assert "took worker id 0 over" in str(err.value)
        for _ in range(3):
            step(new)
        assert old.rejoins == 0 and new.rejoins == 0
    finally:
        old.close()
        new.close()


def test_a_fenced_worker_rejoins_at_the_current_min_clock(make_server):
    clock = {"now": 0.0}
    srv = ShardServer(ServerSettings(num_servers=1, num_workers=1, staleness="inf", worker_timeout=5),
                      clock=lambda: clock["now"])
    srv.run_in_background()
    model = torch.nn.Linear(4, 1)
    pw = PSWorker(model, [srv.endpoint], 0, settings=ClientSettings(frame_elems=64, heartbeat_interval=60)).start()
    try:
        for _ in range(3):
            pw.read(); pw.zero_grad(); model(torch.randn(2, 4)).sum().backward(); pw.push()
        pw.flush(10)
        pw.fetch_weights(10)   # lands the pull prefetched after the last push: nothing is in flight
        clock["now"] = 100.0              # the server has not heard from the worker for 100 s
        deadline = __import__("time").monotonic() + 10
        while 0 not in srv.snapshot_stats()["dead_workers"]:   # the server notices on its next wake-up
            assert __import__("time").monotonic() < deadline, "the silent worker was never declared dead"
            __import__("threading").Event().wait(0.05)
        pw.read(); pw.zero_grad(); model(torch.randn(2, 4)).sum().backward(); pw.push()
        pw.flush(10)
        assert pw.rejoins == 1
    finally:
        pw.close()
        srv.shutdown(5)


def test_a_finite_gradient_whose_squares_overflow_is_applied_without_a_warning(make_server, make_client):
    """The server's finiteness check sums squares first; an overflow there is no NaN and no warning."""
    import warnings
    srv = make_server(staleness="inf", lr=1e-30)
    c = make_client(srv)
    plan = plan_of(128)
    c.hello(plan)
    c.init(np.zeros(128, np.float32))
    huge = np.full(128, 3e38, np.float32)            # finite; its sum of squares is not
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reply = push(c, plan, huge, 0)
    assert reply["step"] == 1
    w, _ = pull_flat(c, plan)
    assert np.allclose(w, -3e8)                      # applied: -lr * g
    assert not [x for x in caught if issubclass(x.category, RuntimeWarning)], [str(x.message) for x in caught]
    assert c.server_stats(0)["nonfinite"] == 0
