"""Segmented pushes: a long range sent as several PUSH messages, applied once, atomically.

One server in this process on 127.0.0.1 (real sockets), driven by PSClient
and by raw segment requests built here.
"""
import concurrent.futures as cf

import numpy as np
import pytest

from common.errors import ErrorCode, RemoteError
from common.plan import PartitionPlan
from common.protocol import MsgType
from ps.server import MAX_HELD_PER_WORKER, PARALLEL_MIN_ELEMS

FRAME = 64
N = 600          # 10 frames, the last one of 24 elements


@pytest.fixture
def make_server(shard_servers):
    return lambda **kw: shard_servers(**{"num_workers": 1, "staleness": "inf", "lr": 1.0, **kw})


@pytest.fixture
def make_client(ps_clients):
    return ps_clients


def plan_of(n=N, frame=FRAME):
    return PartitionPlan.build([("w", (n,), "float32")], 1, frame_elems=frame)


def weights(c):
    m = c.pull(0, timeout=10).wait(10)[0]
    return np.concatenate([np.frombuffer(f.buffer, dtype="<f4") for f in m.frames])


def joined(srv, make_client, w0=None, n=N, frame=FRAME, **kw):
    c = make_client(srv, frame_elems=frame, **kw)
    plan = plan_of(n, frame)
    c.hello(plan)
    c.init(np.zeros(n, np.float32) if w0 is None else w0)
    return c, plan


def segment(c, plan, g, off, n, segs, seq=0, clk=0, tick=True):
    """Send one segment [off, off + n) of gradient ``g`` as a raw PUSH; return its future."""
    head = {"w": c.worker_id, "inc": c.incarnation, "seq": seq, "clk": clk, "ph": plan.hash,
            "n": n, "tick": tick, "off": off, "segs": segs}
    frames = [g[off + a:off + min(a + plan.frame_elems, n)].tobytes() for a in range(0, n, plan.frame_elems)]
    return c.request(0, MsgType.PUSH, head, frames, timeout=10)


def grad(seed=0, n=N):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def test_the_client_cuts_a_long_push_into_segments_applied_as_one_step(make_server, make_client):
    srv = make_server()
    c, plan = joined(srv, make_client, push_segment_frames=3)   # 10 frames: segments of 3, 3, 3, 1
    g = grad()
    handle = c.push(g, 0)
    assert len(handle.futures) == 4
    replies = handle.wait(10)
    assert {(m["step"], m["dup"]) for m in replies} == {(1, False)}
    assert np.array_equal(weights(c), -g)
    st = c.server_stats(0)
    assert (st["pushes"], st["segments"], st["step"]) == (1, 4, 1)


def test_segments_in_any_order_and_resent_ones_are_applied_exactly_once(make_server, make_client):
    srv = make_server()
    c, plan = joined(srv, make_client)
    g = grad(1)
    cuts = [(384, N - 384), (0, 128), (128, 256)]      # last segment first; one resent
    futs = [segment(c, plan, g, off, n, 3) for off, n in cuts[:2]]
    again = segment(c, plan, g, 0, 128, 3)           # a retry of a held segment
    with pytest.raises(cf.TimeoutError):             # nothing answered before the push is whole
        futs[0].result(0.3)
    futs.append(segment(c, plan, g, 128, 256, 3))
    replies = [f.result(10) for f in futs[1:] + [again]]
    assert {(m["step"], m["dup"]) for m in replies} == {(1, False)}
    assert not futs[0].done() or futs[0].result(0)["step"] == 1
    assert np.array_equal(weights(c), -g)
    # the whole push again: a duplicate, answered at once, not applied again
    dup = segment(c, plan, g, 0, 128, 3).result(10)
    assert dup["dup"] is True
    assert np.array_equal(weights(c), -g)
    assert c.server_stats(0)["pushes"] == 1


@pytest.mark.parametrize("options", [
    {"optimizer": "adam", "lr": 0.01},
    {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
])
def test_a_segmented_push_updates_exactly_as_a_whole_one(make_server, make_client, options):
    whole_srv, seg_srv = make_server(**options), make_server(**options)
    w0 = grad(7)
    whole, _ = joined(whole_srv, make_client, w0, push_segment_frames=0)
    seg, _ = joined(seg_srv, make_client, w0, push_segment_frames=2)
    for clk in range(4):
        g = grad(10 + clk)
        whole.push(g, clk).wait(10)
        assert len(seg.push(g, clk).futures) == 5
    seg.push(g, 4).wait(10)
    whole.push(g, 4).wait(10)
    assert np.array_equal(weights(whole), weights(seg))


def test_a_nonfinite_segment_refuses_the_whole_push_and_its_other_segments(make_server, make_client):
    srv = make_server()
    c, plan = joined(srv, make_client)
    g = grad(2)
    bad = g.copy()
    bad[300] = np.nan                                   # in the second segment
    first = segment(c, plan, bad, 0, 256, 3)
    second = segment(c, plan, bad, 256, 256, 3)
    third = segment(c, plan, bad, 512, N - 512, 3)      # arrives after the refusal
    for f in (first, second, third):
        with pytest.raises(RemoteError) as e:
            f.result(10)
        assert e.value.code == ErrorCode.NONFINITE
    assert np.array_equal(weights(c), np.zeros(N, np.float32))
    # seq 0 was not recorded: sent again, clean, it applies
    for off, n in ((256, 256), (0, 256), (512, N - 512)):
        last = segment(c, plan, g, off, n, 3)
    assert last.result(10)["dup"] is False
    assert np.array_equal(weights(c), -g)
    st = c.server_stats(0)
    assert st["nonfinite"] == 1 and st["pushes"] == 1


@pytest.mark.parametrize("cuts, segs, what", [
    ([(0, 256), (128, 256)], 3, "overlaps"),
    ([(0, 100)], 2, "does not fit"),                    # ends inside a frame
    ([(32, 64)], 2, "does not fit"),                    # starts inside a frame
    ([(0, 256), (256, 256)], 0, ">= 1"),
    ([(0, 64)], 11, "exceeds"),
])
def test_malformed_segments_are_refused_and_change_nothing(make_server, make_client, cuts, segs, what):
    srv = make_server()
    c, plan = joined(srv, make_client)
    g = grad(3)
    futs = [segment(c, plan, g, off, n, segs) for off, n in cuts]
    with pytest.raises(RemoteError) as e:
        futs[-1].result(10)
    assert e.value.code == ErrorCode.MALFORMED and what in str(e.value)
    assert np.array_equal(weights(c), np.zeros(N, np.float32))


def test_segments_that_disagree_on_the_clock_drop_the_push(make_server, make_client):
    srv = make_server()
    c, plan = joined(srv, make_client)
    g = grad(4)
    held = segment(c, plan, g, 0, 256, 2, clk=0)
    with pytest.raises(RemoteError) as e:
        segment(c, plan, g, 256, N - 256, 2, clk=1).result(10)
    assert e.value.code == ErrorCode.MALFORMED and "clk=1" in str(e.value)
    with pytest.raises(RemoteError) as e:
        held.result(10)
    assert e.value.code == ErrorCode.OVERLOADED  # its held half is dropped and answered: send again
    assert np.array_equal(weights(c), np.zeros(N, np.float32))


def test_a_worker_holds_a_bounded_number_of_incomplete_pushes(make_server, make_client):
    srv = make_server()
    c, plan = joined(srv, make_client)
    g = grad(5)
    futs = [segment(c, plan, g, 0, 64, 2, seq=s) for s in range(MAX_HELD_PER_WORKER + 1)]
    with pytest.raises(RemoteError) as e:
        futs[0].result(10)                              # the oldest is dropped, answered OVERLOADED
    assert e.value.code == ErrorCode.OVERLOADED and "send it again" in str(e.value)
    # the others are still held: completing one applies it
    last = segment(c, plan, g, 64, N - 64, 2, seq=MAX_HELD_PER_WORKER)
    assert last.result(10)["step"] == 1 and futs[-1].result(10)["step"] == 1
    assert not any(f.done() for f in futs[1:-1])
    st = c.server_stats(0)
    assert st["held_dropped"] == 1 and st["pushes"] == 1


def test_a_new_incarnation_voids_what_the_old_one_left_half_sent(make_server, make_client):
    srv = make_server()
    old, plan = joined(srv, make_client)
    g = grad(6)
    segment(old, plan, g, 0, 256, 2, seq=0)
    # asked on the same connection, after the segment: it is held by the time this answers
    assert old.server_stats(0)["segments"] == 1
    new = make_client(srv)                               # same worker id, new incarnation
    new.hello(plan)
    assert new.server_stats(0)["held_dropped"] == 1
    new.push(np.ones(N, np.float32), 0).wait(10)        # seq 0 of the new life: its own push
    assert np.array_equal(weights(new), -np.ones(N, np.float32))


def test_segmented_pushes_survive_dropped_and_duplicated_messages(make_server, make_client):
    srv = make_server()
    c, plan = joined(srv, make_client, push_segment_frames=2, attempt_timeout=0.3, backoff_max=0.1,
                     faults="drop=0.3,dup=0.3,types=PUSH", fault_seed=3)
    total = np.zeros(N, np.float32)
    for clk in range(6):
        g = grad(20 + clk)
        c.push(g, clk).wait(20)
        total += g
    assert np.allclose(weights(c), -total, atol=1e-5)
    st = c.server_stats(0)
    assert st["pushes"] == 6 and st["step"] == 6
    assert c.stats["retries"] > 0


def test_bsp_sums_segmented_pushes_of_two_workers(make_server, make_client):
    srv = make_server(staleness=0, num_workers=2)
    a, plan = joined(srv, make_client, push_segment_frames=4)
    b = make_client(srv, w=1, push_segment_frames=4)
    b.hello(plan)
    ga, gb = grad(30), grad(31)
    ha = a.push(ga, 0)
    hb = b.push(gb, 0)
    ha.wait(10)
    hb.wait(10)
    assert np.allclose(weights(a), -(ga + gb) / 2, atol=1e-6)


@pytest.mark.parametrize("options", [{"optimizer": "adam", "lr": 0.01},
                                     {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}])
def test_a_large_update_shared_by_two_threads_equals_one_thread(make_server, make_client, options):
    n = PARALLEL_MIN_ELEMS + 12_345
    frame = 1 << 18
    w0 = grad(40, n)
    servers = [make_server(apply_threads=k, **options) for k in (1, 2)]
    clients = [joined(s, make_client, w0, n=n, frame=frame)[0] for s in servers]
    for clk in range(3):
        g = grad(41 + clk, n)
        for c in clients:
            c.push(g, clk).wait(30)
    one, two = (weights(c) for c in clients)
    assert np.array_equal(one, two)
    assert not np.array_equal(one, w0)


def test_the_apply_pool_keeps_nothing_of_an_update_once_it_is_done():
    import gc
    import weakref

    from ps.server import _ApplyPool

    class Buffers:
        pass
    pool = _ApplyPool(2, "test")
    try:
        done = []
        bufs = Buffers()
        ref = weakref.ref(bufs)

        def piece(i, bufs=bufs):
            done.append(i)
        pool.run(piece, 16)
        assert sorted(done) == list(range(16))
        del bufs, piece
        gc.collect()
        assert ref() is None          # neither the pool nor its helper thread holds the job
    finally:
        pool.close()


def test_an_error_in_one_piece_of_a_shared_update_reaches_the_caller():
    from ps.server import _ApplyPool
    pool = _ApplyPool(2, "test")
    try:
        def piece(i):
            if i == 5:
                raise ValueError("piece 5")
        with pytest.raises(ValueError, match="piece 5"):
            pool.run(piece, 8)
        pool.run(lambda i: None, 8)   # still usable
    finally:
        pool.close()
