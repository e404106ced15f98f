"""The shortcuts that make small requests cheap give exactly the old answers.

Pure tests where the logic is pure: ``SSPGate.poll``'s constant-time idle
check against a gate that always scans, ``PushLedger``'s in-order shortcut,
the server's finite check, the decoder's type lookup and per-key fast path.
Real sockets on 127.0.0.1 and an injected clock for the server loop: a
parked read is released as soon as ``min_clock`` advances (or the weights
arrive), a silent worker is declared dead on time, a parked read expires at
its deadline; replies are sent whole or not at all.  Replies held while
more requests are queued leave in order, a few at a time, and before
anything long (a long request or reply, a checkpoint, a large update).
Busy polling between lone requests: when ``SpinPolicy`` starts and stops
(pure), and a real ``bin/ps-server`` that spins answers as one that does
not, and still stops on SIGTERM while requests keep coming.
"""
from __future__ import annotations

import itertools
import math
import time

import msgpack
import numpy as np
import torch
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol as proto
from common.config import ServerSettings, TransportSettings
from common.errors import ErrorCode, ProtocolError
from common.plan import PartitionPlan
from common.protocol import MsgType
from common.transport import recv_now
from ps.rules import PushLedger
from ps.server import FINITE_BY_NUMPY_MAX_ELEMS, ShardServer, all_finite
from ps.ssp import SSPGate

N = 200          # elements of the one-server plan below: frames of 64, 64, 64, 8
FRAME = 64
PLAN = PartitionPlan.build([("w", (N,), "float32")], 1, frame_elems=FRAME)
REPLY_TIMEOUT = 5.0   # seconds a test waits for a reply the server owes


# ---------------------------------------------------------------- SSPGate: idle check == full scan
class FullScanGate(SSPGate):
    """The gate before the shortcut: every poll scans workers and parked reads."""

    def _idle(self, now, ready, horizon):
        return False


TIMEOUT = 2.0
times = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.75, 2.0, 2.5, TIMEOUT]) | st.floats(0.0, 3.0)
gate_ops = st.lists(st.one_of(
    st.tuples(st.just("join"), st.integers(0, 2), st.integers(1, 3), times),
    st.tuples(st.just("seen"), st.integers(0, 2), st.floats(-0.5, 0.5)),   # may go back in time
    st.tuples(st.just("advance"), st.integers(0, 2), st.integers(0, 4)),
    st.tuples(st.just("park"), st.integers(0, 5), times),
    st.tuples(st.just("poll"), times, st.sampled_from([True, True, True, False]), st.floats(0.0, 1.0)),
    st.tuples(st.just("load"), st.lists(st.integers(0, 4), min_size=3, max_size=3)),
    st.tuples(st.just("drain"),),
), max_size=40)


def _state(gate: SSPGate):
    return ([(s.clock, s.incarnation, s.last_seen, s.live) for s in gate.workers],
            gate.min_clock, gate.parked, gate.next_deadline())


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([0, 1, 3, math.inf]), gate_ops)
def test_poll_answers_exactly_as_a_full_scan_whatever_happened_before(staleness, ops):
    fast, full = SSPGate(staleness, 3, TIMEOUT), FullScanGate(staleness, 3, TIMEOUT)
    now = 0.0
    for op in ops:
        kind = op[0]
        for gate in (fast, full):
            if kind == "join":
                gate.join(op[1], op[2], now + op[3] - 1.0)
            elif kind == "seen":
                gate.seen(op[1], now + op[2])
            elif kind == "advance":
                gate.advance(op[1], op[2])
            elif kind == "park":
                gate.park(("read", now), op[1], now + op[2])
            elif kind == "load":
                gate.load(op[1], [1, 2, 3], now)
            elif kind == "drain":
                assert gate.drain() is not None
        if kind == "poll":
            now += op[1]
            seen_until = now - op[3]
            assert fast.poll(now, op[2], seen_until) == full.poll(now, op[2], seen_until), ops
        assert _state(fast) == _state(full), ops


def test_a_parked_read_is_released_by_the_first_poll_after_min_clock_reaches_its_need():
    gate = SSPGate(0, 2, TIMEOUT)
    gate.park("read", 1, deadline=100.0)
    for t in range(5):                          # many idle polls: nothing moved
        assert gate.poll(now=0.1 * t) == ([], [], [])
    gate.advance(0, 1)
    assert gate.poll(now=0.6) == ([], [], [])   # worker 1 still holds it back
    gate.advance(1, 1)
    assert gate.poll(now=0.6)[0] == ["read"]     # same time: the clock alone released it


def test_a_read_that_qualifies_when_parked_is_released_by_the_next_poll_even_after_quiet_ones():
    gate = SSPGate(0, 2, TIMEOUT)
    gate.park("first", 0, deadline=100.0)
    assert gate.poll(now=1.0)[0] == ["first"]
    assert gate.poll(now=1.1) == ([], [], [])
    gate.park("second", 0, deadline=100.0)
    assert gate.poll(now=1.2)[0] == ["second"]


def test_a_read_parked_before_the_weights_is_released_by_the_first_ready_poll():
    gate = SSPGate(math.inf, 1, TIMEOUT)
    gate.park("read", 0, deadline=100.0)
    assert gate.poll(now=1.0, ready=False) == ([], [], [])
    assert gate.poll(now=1.0, ready=False) == ([], [], [])
    assert gate.poll(now=1.0, ready=True)[0] == ["read"]


def test_a_silent_worker_is_declared_dead_by_the_first_poll_past_its_timeout():
    gate = SSPGate(1, 2, TIMEOUT)
    gate.join(0, 1, now=0.0)
    gate.join(1, 1, now=0.0)
    for t in range(1, 60):                      # worker 1 keeps talking, worker 0 is silent
        now = 0.05 * t
        gate.seen(1, now)
        assert gate.poll(now=now)[2] == ([0] if now > TIMEOUT else []), now
        if now > TIMEOUT:
            break
    assert gate.live_workers() == [1]


def test_a_worker_seen_at_an_earlier_time_than_before_is_checked_from_that_time():
    gate = SSPGate(1, 1, TIMEOUT)
    gate.join(0, 1, now=10.0)
    assert gate.poll(now=10.5) == ([], [], [])
    gate.seen(0, 5.0)                           # an injected clock that went back
    assert gate.poll(now=7.5)[2] == [0]


def test_a_parked_read_expires_by_the_first_poll_at_its_deadline():
    gate = SSPGate(0, 2, TIMEOUT)
    gate.park("early", 1, deadline=1.0)
    gate.park("late", 1, deadline=1.5)
    assert gate.poll(now=0.99)[1] == []
    assert [e.token for e in gate.poll(now=1.0)[1]] == ["early"]
    assert gate.poll(now=1.49)[1] == []
    assert [e.token for e in gate.poll(now=1.5)[1]] == ["late"]


def test_a_clock_table_loaded_from_a_checkpoint_is_checked_for_liveness_from_the_load():
    gate = SSPGate(1, 2, TIMEOUT)
    gate.load([4, 6], [7, 8], now=3.0)
    assert gate.min_clock == 4 and [s.incarnation for s in gate.workers] == [7, 8]
    assert gate.poll(now=3.0 + TIMEOUT) == ([], [], [])
    assert gate.poll(now=3.0 + TIMEOUT + 0.01)[2] == [0, 1]


# ---------------------------------------------------------------- PushLedger: in-order shortcut
class SetLedger:
    """The ledger's meaning, with no bound on memory: the set of applied seqs."""

    def __init__(self):
        self.seqs: set[int] = set()

    def record(self, seq):
        self.seqs.add(seq)

    def applied(self, seq):
        return seq in self.seqs


@given(st.lists(st.integers(0, 40), max_size=80))
def test_the_ledger_knows_exactly_the_applied_pushes_in_any_order(seqs):
    ledger, ref = PushLedger(), SetLedger()
    ledger.reset(0, 1)
    for seq in seqs:
        ledger.record(0, seq)
        ref.record(seq)
        assert all(ledger.applied(0, s) == ref.applied(s) for s in range(42))
        state = ledger.state()["0"]          # what a checkpoint keeps: the mark as high as it goes
        mark = state["mark"]
        assert set(range(mark + 1)) | set(state["extra"]) == ref.seqs
        assert all(s > mark + 1 for s in state["extra"])


def test_in_order_pushes_leave_nothing_above_the_mark():
    ledger = PushLedger()
    ledger.reset(3, 9)
    for seq in range(100):
        ledger.record(3, seq)
    assert ledger.state()["3"] == {"inc": 9, "mark": 99, "extra": []}


# ---------------------------------------------------------------- the finite check
SIZES = [1, 1024, FINITE_BY_NUMPY_MAX_ELEMS, FINITE_BY_NUMPY_MAX_ELEMS + 64]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_frame_with_one_nonfinite_element_is_not_finite(size, bad, where):
    a = np.full(size, 1e-3, dtype=np.float32)
    a[{"first": 0, "middle": size // 2, "last": size - 1}[where]] = bad
    assert all_finite([np.ones(8, dtype=np.float32), a]) is False


@pytest.mark.parametrize("size", SIZES)
def test_finite_frames_whose_sum_overflows_are_still_finite(size):
    big = np.full(size, 3e38, dtype=np.float32)      # a sum of two or more overflows
    alternating = np.where(np.arange(size) % 2, -3e38, 3e38).astype(np.float32)
    with np.errstate(over="ignore"):   # as in the server's loop
        assert all_finite([big, alternating, np.zeros(size, dtype=np.float32)]) is True


@pytest.mark.parametrize("size", SIZES[1:])
def test_plus_and_minus_infinity_that_cancel_in_a_sum_are_not_finite(size):
    a = np.zeros(size, dtype=np.float32)
    a[0], a[-1] = math.inf, -math.inf
    assert all_finite([a]) is False


def test_no_frames_are_finite():
    assert all_finite([]) is True


# ---------------------------------------------------------------- decoder fast path
def test_a_type_code_counts_only_as_an_integer():
    for bad in (True, False, 5.0, "5", None, 99, -1):
        head = msgpack.packb({"v": 1, "t": bad, "w": 0, "inc": 1})
        with pytest.raises(ProtocolError) as err:
            proto.decode([head])
        assert err.value.code == ErrorCode.UNKNOWN_TYPE and repr(bad) in str(err.value)
    assert proto.decode(proto.encode(MsgType.HEARTBEAT, {"w": 0, "inc": 1})).type is MsgType.HEARTBEAT


#: A good value for every required key of every type (data types announce 0 elements).
GOOD_VALUES = {
    "w": 0, "inc": 1, "plan": {}, "ph": 7, "rank": 0, "lo": 0, "hi": 1, "step": 0, "min_clock": 0,
    "start_clock": 0, "initialized": True, "sinc": 1, "staleness": 1, "n": 0, "accepted": True,
    "seq": 0, "clk": 0, "tick": True, "dup": False, "stats": {}, "role": "worker", "want": 0,
    "endpoint": "tcp://127.0.0.1:1", "host": "h", "pid": 1, "version": "1", "job": {},
    "servers": [], "name": "b", "members": [], "state": "running", "dead_workers": [],
    "result": {}, "status": {}, "time": 0.0, "path": "/p", "code": 1, "msg": "m", "why": "w",
    "left": True,
}
EDGE_VALUES = [0, 1, -1, (1 << 63) - 1, 1 << 63, -(1 << 63), (1 << 64) - 1,   # all msgpack holds
               True, False, 1.5, 0.0, "x", b"x", None, [], {}, [1], {"a": 1}]


def _verdict(fn) -> str | None:
    try:
        fn()
    except ProtocolError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
def test_every_header_key_is_accepted_or_refused_exactly_as_check_field_says(msg_type):
    """The decoder's fast accept never differs from the full per-key check, nor do its errors."""
    good = {k: GOOD_VALUES[k] for k in proto.SCHEMA[msg_type]}
    assert _verdict(lambda: proto.decode(proto.encode(msg_type, good))) is None
    for key, typ in {**proto.SCHEMA[msg_type], **proto.OPTIONAL.get(msg_type, {})}.items():
        if key == "n" and msg_type in proto.DATA_TYPES:
            continue   # n must also match the data frames: test_protocol covers it
        for value in EDGE_VALUES:
            if msg_type is MsgType.PULL and key == "dl" and value == 0:
                continue   # a good integer, refused by the later dl > 0 check
            expected = _verdict(lambda: proto._check_field(msg_type, key, value, typ))
            got = _verdict(lambda: proto.decode(proto.encode(msg_type, {**good, key: value})))
            assert got == expected, (key, value)


# ---------------------------------------------------------------- the server over real sockets
class FakeClock:
    """The server's clock, moved by the test."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def set(self, now: float) -> None:
        self.now = now


class RawWorker:
    """A worker that speaks the protocol on its own DEALER, one visible request at a time."""

    def __init__(self, ctx: zmq.Context, endpoint: str, w: int, inc: int = 11):
        self.w, self.inc = w, inc
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._rid = itertools.count(1)
        self.sinc = None

    def send(self, msg_type: MsgType, header: dict, frames=()) -> int:
        rid = next(self._rid)
        self.sock.send_multipart(proto.encode(msg_type, {"rid": rid, **header}, frames))
        return rid

    def recv(self, timeout: float = REPLY_TIMEOUT) -> proto.Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return proto.decode(self.sock.recv_multipart())

    def request(self, msg_type: MsgType, header: dict, frames=()) -> proto.Message:
        rid = self.send(msg_type, header, frames)
        reply = self.recv()
        assert reply is not None, f"no reply to {msg_type.name} within {REPLY_TIMEOUT}s"
        assert reply.rid == rid
        return reply

    def hello(self) -> proto.Message:
        reply = self.request(MsgType.HELLO, {"w": self.w, "inc": self.inc, "plan": PLAN.to_wire(),
                                             "ph": PLAN.hash})
        assert reply.type is MsgType.HELLO_OK, reply.header
        self.sinc = reply["sinc"]
        return reply

    def init(self) -> proto.Message:
        return self.request(MsgType.INIT, {"w": self.w, "inc": self.inc, "ph": PLAN.hash, "n": N,
                                           "to": self.sinc}, _frames(np.zeros(N, dtype=np.float32)))

    def push(self, seq: int, clk: int) -> proto.Message:
        return self.request(MsgType.PUSH, {"w": self.w, "inc": self.inc, "seq": seq, "clk": clk,
                                           "ph": PLAN.hash, "n": N, "tick": True, "to": self.sinc},
                            _frames(np.full(N, 0.5, dtype=np.float32)))

    def heartbeat(self) -> proto.Message:
        return self.request(MsgType.HEARTBEAT, {"w": self.w, "inc": self.inc})

    def stats(self) -> dict:
        return self.request(MsgType.STATS, {})["stats"]

    def close(self) -> None:
        self.sock.close(linger=0)


def _frames(vec: np.ndarray) -> list[bytes]:
    return [vec[a:b].tobytes() for a, b in PLAN.frames_of(0)]


@pytest.fixture
def server():
    made = []

    def make(clock, **kw) -> ShardServer:
        s = ShardServer(ServerSettings(**{"num_servers": 1, "num_workers": 2, "staleness": 1,
                                          "worker_timeout": 60.0, **kw}), clock=clock)
        made.append(s.run_in_background())
        return s
    yield make
    for s in made:
        assert s.shutdown(5)


@pytest.fixture
def workers(zctx):
    made = []

    def make(srv, w, **kw) -> RawWorker:
        made.append(RawWorker(zctx, srv.endpoint, w, **kw))
        return made[-1]
    yield make
    for r in made:
        r.close()


def _wait_for(predicate, what: str, timeout: float = REPLY_TIMEOUT) -> None:
    """Ask ``predicate`` (a request to the server) until it holds: the loop acts on its own wake-ups."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"


def test_a_parked_read_is_answered_by_the_push_that_lifts_min_clock(server, workers):
    clock = FakeClock()                      # never moves: only clocks can release the read
    srv = server(clock)
    w0, w1, observer = workers(srv, 0), workers(srv, 1), workers(srv, 0)
    w0.hello()
    w1.hello()
    w0.init()
    rid = w0.send(MsgType.PULL, {"w": 0, "clk": 2, "ph": PLAN.hash, "dl": 60_000})   # needs min_clock 1
    _wait_for(lambda: observer.stats()["parked"] == 1, "parking the read")
    assert w0.push(seq=0, clk=0).type is MsgType.PUSH_OK        # worker 0 at clock 1, worker 1 at 0
    assert observer.stats()["parked"] == 1
    assert w0.sock.poll(0) == 0
    assert w1.push(seq=0, clk=0).type is MsgType.PUSH_OK        # min_clock 1
    reply = w0.recv()
    assert reply is not None and reply.type is MsgType.PULL_OK and reply.rid == rid
    assert reply["min_clock"] == 1 and reply["step"] == 2


def test_a_read_parked_before_any_weights_is_answered_by_the_init(server, workers):
    srv = server(FakeClock(), staleness="inf")
    w0, observer = workers(srv, 0), workers(srv, 1)
    w0.hello()
    rid = w0.send(MsgType.PULL, {"w": 0, "clk": 0, "ph": PLAN.hash, "dl": 60_000})
    _wait_for(lambda: observer.stats()["parked"] == 1, "parking the read")
    assert w0.init().type is MsgType.INIT_OK
    reply = w0.recv()
    assert reply is not None and reply.type is MsgType.PULL_OK and reply.rid == rid


def test_a_silent_worker_is_declared_dead_once_its_timeout_has_passed_and_not_before(server, workers):
    clock = FakeClock(100.0)
    srv = server(clock, worker_timeout=5.0)
    w0, w1, observer = workers(srv, 0), workers(srv, 1), workers(srv, 1, inc=99)
    w0.hello()
    w1.hello()
    clock.set(104.0)
    assert w1.heartbeat().type is MsgType.HEARTBEAT_OK           # worker 1 seen at 104, worker 0 at 100
    clock.set(105.0)                                             # exactly worker 0's timeout: not yet
    for _ in range(3):
        assert observer.stats()["dead_workers"] == []
    clock.set(105.5)
    _wait_for(lambda: observer.stats()["dead_workers"] == [0], "declaring worker 0 dead")
    assert observer.stats()["live"] == [False, True]
    fenced = w0.heartbeat()
    assert fenced.type is MsgType.ERROR and fenced["code"] == ErrorCode.FENCED
    assert w1.heartbeat().type is MsgType.HEARTBEAT_OK


def test_a_parked_read_expires_at_its_deadline_naming_its_blockers(server, workers):
    clock = FakeClock()
    srv = server(clock)
    w0, w1, observer = workers(srv, 0), workers(srv, 1), workers(srv, 1, inc=99)
    w0.hello()
    w1.hello()
    w0.init()
    rid = w0.send(MsgType.PULL, {"w": 0, "clk": 2, "ph": PLAN.hash, "dl": 1000})     # deadline 1.0
    _wait_for(lambda: observer.stats()["parked"] == 1, "parking the read")
    clock.set(0.999)
    assert observer.stats()["parked"] == 1 and w0.sock.poll(0) == 0
    clock.set(1.0)
    reply = w0.recv()
    assert reply is not None and reply.type is MsgType.ERROR and reply.rid == rid
    assert reply["code"] == ErrorCode.STALE_TIMEOUT
    assert reply["detail"] == {"blockers": [0, 1], "need": 1, "min_clock": 0}
    assert observer.stats()["expired_reads"] == 1


def test_a_burst_of_requests_is_answered_in_order_and_counted(server, workers):
    srv = server(FakeClock())
    w0 = workers(srv, 0)
    w0.hello()
    rids = [w0.send(MsgType.HEARTBEAT, {"w": 0, "inc": w0.inc}) for _ in range(300)]   # > one batch
    replies = [w0.recv() for _ in rids]
    assert [r.rid for r in replies] == rids
    assert all(r.type is MsgType.HEARTBEAT_OK for r in replies)
    stats = w0.stats()
    assert stats["requests"] == 302 and stats["bytes_in"] > 0 and stats["bytes_out"] > 0


def test_an_echo_of_many_frames_comes_back_frame_for_frame(server, workers):
    srv = server(FakeClock())
    w0 = workers(srv, 0)
    sent = [np.arange(k, k + 3 * k + 1, dtype=np.float32).tobytes() for k in range(5)]
    n = sum(len(f) for f in sent) // 4
    reply = w0.request(MsgType.ECHO, {"n": n}, sent)
    assert reply.type is MsgType.ECHO_OK and reply["n"] == n
    assert [bytes(f) for f in reply.frames] == sent


# ---------------------------------------------------------------- _recv and _send, the socket in this thread
@pytest.fixture
def idle_server():
    """A server whose loop does not run: the test thread owns its socket."""
    made = []

    def make(**kw) -> ShardServer:
        s = ShardServer(ServerSettings(num_servers=1, num_workers=1, staleness=1, **kw))
        made.append(s)
        return s
    yield make
    for s in made:
        s._close()


def _peer(zctx, srv, **opts) -> tuple[zmq.Socket, bytes]:
    """A DEALER connected to ``srv`` and the identity the server knows it by."""
    d = zctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    for opt, value in opts.items():
        d.setsockopt(getattr(zmq, opt), value)
    d.connect(srv.endpoint)
    d.send_multipart([b"a", b"bb", b""])
    assert srv.sock.poll(int(REPLY_TIMEOUT * 1000))
    frames = recv_now(srv.sock)
    assert [f.bytes for f in frames[1:]] == [b"a", b"bb", b""]
    return d, frames[0].bytes


def test_recv_returns_every_frame_of_the_next_message_and_no_more(zctx, idle_server):
    srv = idle_server()
    d, ident = _peer(zctx, srv)
    d.send_multipart([b"one"])
    d.send_multipart([b"two", b"three"])
    assert srv.sock.poll(int(REPLY_TIMEOUT * 1000))
    assert [f.bytes for f in recv_now(srv.sock)] == [ident, b"one"]
    assert srv.sock.poll(int(REPLY_TIMEOUT * 1000))
    assert [f.bytes for f in recv_now(srv.sock)] == [ident, b"two", b"three"]
    d.close()


def test_a_reply_to_an_unknown_peer_is_counted_unroutable(idle_server):
    srv = idle_server()
    assert srv._send(b"\0nobody", [b"head", b"data"]) is False
    assert srv.stats["unroutable"] == 1 and srv.stats["bytes_out"] == 0


def test_replies_to_a_peer_that_does_not_read_are_dropped_whole_and_counted(zctx, idle_server):
    srv = idle_server(transport=TransportSettings(sndhwm=4, rcvhwm=4))
    d, ident = _peer(zctx, srv, RCVHWM=4, RCVBUF=1 << 14)
    data = b"x" * (16 << 10)
    sent = 0
    while srv._send(ident, [b"head-%d" % sent, data, b"y"]):
        sent += 1
        assert sent < 10_000, "the peer's queue never filled"
    assert srv.stats["send_blocked"] == 1
    assert srv.stats["bytes_out"] == sum(len(b"head-%d" % i) + len(data) + 1 for i in range(sent))
    got = []
    while len(got) < sent and d.poll(int(REPLY_TIMEOUT * 1000)):
        got.append(d.recv_multipart())
    assert got == [[b"head-%d" % i, data, b"y"] for i in range(sent)]
    assert d.poll(100) == 0        # and nothing of the refused reply follows
    d.close()


# ---------------------------------------------------------------- the outbox: replies sent together
def _queued_server(zctx, name: str, **kw) -> ShardServer:
    """A server on an inproc endpoint of ``zctx``, its loop not started: a request sent to it
    is in its queue when ``send`` returns, so the test knows what one wake-up finds."""
    return ShardServer(ServerSettings(num_servers=1, num_workers=1, staleness=1,
                                      bind=f"inproc://zps-test-{name}-{id(zctx)}", **kw), ctx=zctx)


def _echo(w: RawWorker, elems: int, fill: float = 0.0) -> int:
    """Send an ECHO of ``elems`` elements equal to ``fill``; return its request id."""
    return w.send(MsgType.ECHO, {"n": elems}, [np.full(elems, fill, dtype=np.float32).tobytes()])


def _replies(w: RawWorker, count: int) -> list[proto.Message]:
    replies = [w.recv() for _ in range(count)]
    assert None not in replies, f"{replies.count(None)} of {count} replies missing"
    return replies


def test_replies_to_queued_requests_leave_in_order_a_few_at_a_time(zctx):
    from ps.server import REPLY_BATCH
    srv = _queued_server(zctx, "order")
    w = RawWorker(zctx, srv.endpoint, 0)
    count = 13
    rids = [_echo(w, 4, i) for i in range(count)]
    srv.run_in_background()
    try:
        replies = _replies(w, count)
        assert [r.rid for r in replies] == rids
        assert [bytes(r.frames[0]) for r in replies] == \
            [np.full(4, i, dtype=np.float32).tobytes() for i in range(count)]
        # one wake-up found them all: they left REPLY_BATCH at a time, the rest together at the end
        full, rest = divmod(count, REPLY_BATCH)
        together = full * (REPLY_BATCH - 1) + max(rest - 1, 0)
        assert srv.stats["replies_coalesced"] == together
        # the queue is empty now: a lone request is answered at once, sharing nothing
        rid = _echo(w, 4)
        assert [r.rid for r in _replies(w, 1)] == [rid]
        assert srv.stats["replies_coalesced"] == together
    finally:
        assert srv.shutdown(5)
        w.close()


def test_a_long_request_and_a_long_reply_let_the_held_replies_go_first(zctx, monkeypatch):
    from ps.server import REPLY_DEFER_BYTES
    srv = _queued_server(zctx, "long")
    w = RawWorker(zctx, srv.endpoint, 0)
    big = REPLY_DEFER_BYTES // 4 + 1       # an echo of this many elements is long both ways
    held_at_long = []
    echo = ShardServer._handlers[MsgType.ECHO]

    def watching_echo(self, ident, msg):
        if msg["n"] == big:
            held_at_long.append(len(self._outbox))
        echo(self, ident, msg)
    monkeypatch.setitem(ShardServer._handlers, MsgType.ECHO, watching_echo)
    rids = [_echo(w, elems) for elems in (4, 4, big, 4, 4)]
    srv.run_in_background()
    try:
        replies = _replies(w, 5)
        assert [r.rid for r in replies] == rids
        assert replies[2]["n"] == big and len(replies[2].frames[0]) == 4 * big
        assert held_at_long == [0]          # 1 and 2 had left before the long request was handled
        assert srv.stats["replies_coalesced"] == 2     # 1 with 2, and 4 with 5 at the end
    finally:
        assert srv.shutdown(5)
        w.close()


def test_held_replies_leave_before_a_checkpoint_is_written(zctx, idle_server, tmp_path, monkeypatch):
    import ps.checkpoint as ckpt
    srv = idle_server(checkpoint_dir=str(tmp_path))
    w0 = RawWorker(zctx, srv.endpoint, 0)
    try:
        for msg_type, header, frames in (
                (MsgType.HELLO, {"w": 0, "inc": w0.inc, "plan": PLAN.to_wire(), "ph": PLAN.hash}, ()),
                (MsgType.INIT, {"w": 0, "inc": w0.inc, "ph": PLAN.hash, "n": N},
                 _frames(np.zeros(N, dtype=np.float32)))):
            w0.send(msg_type, header, frames)
            assert srv.sock.poll(int(REPLY_TIMEOUT * 1000))
            srv._handle(recv_now(srv.sock))
            assert w0.recv().type is not MsgType.ERROR
        srv._outbox = []
        rid = w0.send(MsgType.HEARTBEAT, {"w": 0, "inc": w0.inc})
        assert srv.sock.poll(int(REPLY_TIMEOUT * 1000))
        srv._handle(recv_now(srv.sock))
        assert len(srv._outbox) == 1                       # answered, held
        seen = []
        write = ckpt.write

        def watching_write(*args, **kwargs):
            seen.append(w0.recv())                         # the held reply is out already
            return write(*args, **kwargs)
        monkeypatch.setattr(ckpt, "write", watching_write)
        assert srv.checkpoint("test")
        assert seen[0] is not None and seen[0].rid == rid and seen[0].type is MsgType.HEARTBEAT_OK
    finally:
        srv._outbox = None
        w0.close()


def test_held_replies_leave_before_a_long_update(idle_server, zctx):
    from ps.server import FLUSH_BEFORE_STEP_ELEMS
    srv = idle_server()
    n = FLUSH_BEFORE_STEP_ELEMS
    plan = PartitionPlan.build([("w", (n,), "float32")], 1)
    srv._adopt(plan)
    srv.store.initialized = True
    d, ident = _peer(zctx, srv)
    try:
        srv._outbox = [(ident, proto.encode(MsgType.ECHO_OK, {"rid": 7, "n": 0, "time": 0.0}), 32)]
        at_step = []
        step = srv.optimizer.step_whole
        srv.optimizer.step_whole = lambda *a, **k: (at_step.append(list(srv._outbox)), step(*a, **k))
        srv._apply_step([torch.zeros(b - a) for a, b in plan.frames_of(0)], 1.0)
        assert at_step == [[]]                             # sent before the update began
        assert d.poll(int(REPLY_TIMEOUT * 1000)) and proto.decode(d.recv_multipart()).rid == 7
    finally:
        srv._outbox = None
        d.close()


# ---------------------------------------------------------------- busy polling between lone requests
def _wake_ups(policy, handled: list[int], t: float = 0.0, gap: float = 50e-6,
              busy: float = 20e-6) -> tuple[list[bool], float]:
    """Feed ``policy`` one wake-up per entry of ``handled`` (requests found), each ``gap``
    after the previous answer; its verdicts and the time the last one ended."""
    verdicts = []
    for h in handled:
        arrived = t + gap
        t = arrived + busy
        verdicts.append(policy.after(h, arrived, t))
    return verdicts, t


def test_spinning_starts_once_requests_have_come_alone_for_a_while_and_goes_on():
    from ps.server import SPIN_DECAY, SPIN_MAX_COMPANY, SpinPolicy
    lone = 1
    while SPIN_DECAY ** lone >= SPIN_MAX_COMPANY:   # the share of wake-ups with company decays from 1
        lone += 1
    verdicts, _ = _wake_ups(SpinPolicy(200e-6), [1] * (lone + 50))
    assert verdicts.index(True) == lone - 1
    assert all(verdicts[lone - 1:])


def test_requests_that_queue_up_stop_the_spinning_and_keep_it_off():
    from ps.server import SpinPolicy
    p = SpinPolicy(200e-6)
    verdicts, t = _wake_ups(p, [1] * 100)
    assert verdicts[-1]
    verdicts, t = _wake_ups(p, [3, 3], t)      # the loop found company twice: requests queue up
    assert verdicts == [True, False]
    # every other wake-up finds company: once that share has settled, no more spinning
    verdicts, _ = _wake_ups(p, [1, 2] * 100, t)
    assert not any(verdicts[2:])


def test_a_request_long_after_the_last_answer_gets_no_spin():
    from ps.server import SPIN_GAP_FACTOR, SpinPolicy
    p = SpinPolicy(200e-6)
    _, t = _wake_ups(p, [1] * 100)
    late, t = _wake_ups(p, [1], t, gap=SPIN_GAP_FACTOR * 200e-6 * 1.01)
    soon, t = _wake_ups(p, [1], t, gap=SPIN_GAP_FACTOR * 200e-6 * 0.99)
    assert late == [False] and soon == [True]


def test_no_spin_time_no_spinning():
    from ps.server import SpinPolicy
    verdicts, _ = _wake_ups(SpinPolicy(0.0), [1] * 200, gap=0.0)
    assert not any(verdicts)


def test_a_server_thread_in_another_program_does_not_spin_unless_asked(zctx):
    srv = _queued_server(zctx, "nospin", spin_us=500.0)
    try:
        assert srv._spin.seconds == 500e-6
        srv.run_in_background()
        assert srv._spin.seconds == 0.0
    finally:
        assert srv.shutdown(5)


def test_spin_us_is_checked():
    from common.errors import ConfigError
    for bad in (-1.0, 200_000.0, float("nan")):
        with pytest.raises(ConfigError, match="spin_us"):
            ServerSettings(spin_us=bad)


@pytest.mark.parametrize("spin_us", [0, 5000])
def test_a_ps_server_answers_lone_requests_alike_spinning_or_not(procs, zctx, spin_us):
    """bin/ps-server spins between requests that come one at a time (5 ms here, so a loaded
    machine still sends the next one in time), and does not with --spin-us 0."""
    p = procs.server(0, 1, 1, 1, "--spin-us", str(spin_us), "--worker-timeout", "60")
    w = RawWorker(zctx, p.endpoint, 0)
    try:
        w.hello()
        w.init()
        pushes = 150
        steps = [w.push(seq, seq) for seq in range(pushes)]
        assert [m.type for m in steps] == [MsgType.PUSH_OK] * pushes
        assert [m["step"] for m in steps] == list(range(1, pushes + 1))
        st = w.stats()
        if spin_us:
            assert st["spin_caught"] > 0
        else:
            assert st["spin_caught"] == st["spin_missed"] == 0
    finally:
        w.close()


def test_a_spinning_ps_server_stops_on_sigterm_while_requests_keep_coming(procs, zctx):
    """The spin watches the stop pipe too: a stop is seen even if a request always
    comes before the spin (up to 0.1 s here) runs out."""
    import signal
    import threading
    p = procs.server(0, 1, 1, 1, "--spin-us", "100000")
    w, probe = RawWorker(zctx, p.endpoint, 0), RawWorker(zctx, p.endpoint, 1)
    done = threading.Event()

    def hammer():
        while not done.is_set():
            _echo(w, 1)
            if w.recv(1.0) is None:   # the server is gone
                return
    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        _wait_for(lambda: probe.stats()["spin_caught"] > 20, "spinning")
        assert t.is_alive()     # requests are still coming
        p.signal(signal.SIGTERM)
        p.wait(10)    # subprocess.TimeoutExpired if the loop never looked at its stop pipe
    finally:
        done.set()
        t.join(5)
        w.close()
        probe.close()
