"""``PSClient``: a worker's connection to every server.

Every socket (one DEALER per server) is used only by the thread that holds
the client's I/O lock, so a request costs no thread hand-off when it can be
avoided:

* ``request`` sends at once from the calling thread when the sockets are free
  (and hands the request to whoever holds them otherwise, through a queue
  and an inproc doorbell that wakes the holder);
* a thread that waits for a reply (``Future.result``) drives the sockets
  itself until its reply is in, so a round trip wakes the caller once, as a
  plain blocking socket would;
* a background thread keeps things moving when nobody waits: it completes
  replies of asynchronous requests, resends unanswered ones, expires them at
  their deadline and sends the heartbeats.

Every wait takes a timeout. A request's timeout is None (the settings'
default) or a finite number of seconds > 0; anything else, like any other
bad argument, is refused before the request is sent. Requests to different
servers, and several to one server, are in flight at once; requests leave
in the order they were made and a server answers in order, so a pull sent
after a push sees that push.

Data travels zero-copy: a push sends ``zmq.Frame`` views of the caller's
flat gradient buffer (the returned handle says when ZeroMQ has let go of
it), and a pull reply keeps ZeroMQ's receive buffers until the caller copies
them, once, into its flat parameter buffer.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import heapq
import itertools
import logging
import math
import numbers
import os
import queue
import threading
import time
from typing import Sequence

import numpy as np
import zmq

from common import protocol as proto
from common.config import ClientSettings, check_timeout
from common.errors import ClosedError, DeadlineExceeded, ErrorCode, ProtocolError, remote_error
from common.faults import FaultInjector, FaultSpec
from common.plan import PartitionPlan, frame_slices
from common.protocol import Message, MsgType
from common.security import CurveKeys
from common.transport import make_dealer, recv_now, send_now

log = logging.getLogger("zps.client")

_ZERO_COPY_MIN_BYTES = 1 << 16
#: The wire's element type: little-endian fp32.
_WIRE_DTYPE = np.dtype("<f4")
#: Clocks travel as signed 64-bit integers (docs/PROTOCOL.md).
_CLOCK_RANGE = (-(1 << 63), (1 << 63) - 1)


def _wait_timeout(timeout, what: str) -> float | None:
    """``timeout`` of a wait: None (no limit) or a finite number of seconds (0 or less: only look)."""
    if timeout is None:
        return None
    if (type(timeout) is float or type(timeout) is int) and math.isfinite(timeout):
        return float(timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not math.isfinite(timeout):
        raise ValueError(f"{what}: timeout must be None (no limit) or a finite number of seconds, "
                         f"got {timeout!r}")
    return float(timeout)


def _integer(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as a plain int (numpy integers too); TypeError if it is not an integer."""
    if type(value) is int and (lo is None or lo <= value) and (hi is None or value <= hi):
        return value   # the usual case, without the ABC checks (this runs on every request)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {value}")
    return value


def _clock(value, what: str = "clock") -> int:
    """``value`` as a clock: an integer that fits the wire's signed 64 bits."""
    return _integer(value, what, *_CLOCK_RANGE)


def _wait_all(futures: Sequence[cf.Future], timeout: float | None, what: str) -> list:
    """Results of every future, or the first error; ``timeout`` bounds the whole wait.

    A future's own error (its request's ``DeadlineExceeded`` included) is
    raised as it is; only this wait running out becomes "no answer within".
    """
    timeout = _wait_timeout(timeout, what)
    deadline = None if timeout is None else time.monotonic() + timeout
    out = []
    for f in futures:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            out.append(f.result(left))
        except cf.TimeoutError as exc:
            # DeadlineExceeded is a TimeoutError too: tell the request's own from ours
            if cf.Future.done(f) and cf.Future.exception(f, 0) is exc:
                raise
            raise DeadlineExceeded(f"{what}: no answer within {timeout:.1f}s") from None
    return out


@dataclasses.dataclass
class PushHandle:
    """An in-flight push to every server."""

    futures: list[cf.Future]
    trackers: list  # zmq.MessageTracker or None per server

    def released(self) -> bool:
        """Has ZeroMQ let go of the gradient buffer (safe to overwrite)?"""
        return all(t is None or t.done for t in self.trackers)

    def wait_released(self, timeout: float | None) -> None:
        timeout = _wait_timeout(timeout, "wait_released")
        deadline = None if timeout is None else time.monotonic() + timeout
        # the client keeps the frames (to resend them) until the push is answered: wait for
        # that first, which also fetches the answers when no other thread does
        for f in self.futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                f.exception(left)
            except cf.TimeoutError:
                raise DeadlineExceeded(f"push still unanswered after {timeout:.1f}s; its gradient buffer "
                                       "is kept for a resend") from None
        for t in self.trackers:
            if t is None:
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                t.wait(left)
            except zmq.NotDone:
                raise DeadlineExceeded(f"gradient buffer still held by ZeroMQ after {timeout:.1f}s") from None

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self, timeout: float | None) -> list[Message]:
        return _wait_all(self.futures, timeout, "push")


@dataclasses.dataclass
class PullHandle:
    """An in-flight pull from every server; the replies hold the weights."""

    futures: list[cf.Future]
    clock: int
    issued: float

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self, timeout: float | None) -> list[Message]:
        return _wait_all(self.futures, timeout, f"pull at clock {self.clock}")


class PSClient:
    """Talks to the servers of one job on behalf of one worker."""

    def __init__(self, endpoints: Sequence[str], worker_id: int, incarnation: int | None = None,
                 settings: ClientSettings | None = None, ctx: zmq.Context | None = None):
        if isinstance(endpoints, (str, bytes)):
            raise TypeError(f"endpoints must be a list of endpoints, got the single {type(endpoints).__name__} "
                            f"{endpoints!r}; pass [{endpoints!r}]")
        if not endpoints:
            raise ValueError("PSClient needs at least one server endpoint")
        if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < 0:
            raise ValueError(f"worker_id must be a non-negative integer, got {worker_id!r}")
        settings = settings or ClientSettings()
        self.endpoints = list(endpoints)
        self.worker_id = worker_id
        self.incarnation = (int.from_bytes(os.urandom(4), "little") | 1) if incarnation is None else incarnation
        self.settings = settings
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self._rid = itertools.count(1)
        self._seq = [itertools.count(0) for _ in self.endpoints]
        # I/O state: used only by the thread holding _io (see the module docstring)
        self._io = threading.Lock()
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()  # requests handed to the holder of _io
        self._bell_addr = f"inproc://zps-client-{id(self)}"
        self._bell_lock = threading.Lock()
        self._bell: zmq.Socket | None = None
        self._bell_rx: zmq.Socket | None = None
        self._socks: list[zmq.Socket] = []
        self._poller: zmq.Poller | None = None
        self._queued: list[zmq.Poller] = []
        self._pending: dict[int, _Request] = {}
        self._timers: list[tuple[float, int, int]] = []   # (when, rid, attempt): resend or expire
        self._prune_at = _TIMERS_SLACK                     # heap size that drops answered requests' timers
        self._next_beat = 0.0
        self._io_closed = False                            # sockets closed: nobody drives any more
        self._io_failure: BaseException | None = None      # what ended the I/O thread, if not close()
        self._socks_closed = False
        self._kick = threading.Event()                     # wakes the background thread
        self._thread: threading.Thread | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._heartbeat_on = False
        self.stats = {"requests": 0, "bytes_sent": 0, "bytes_received": 0, "late_replies": 0,
                      "pushes": 0, "pulls": 0, "retries": 0, "send_blocked": 0}
        self.server_inc: list[int | None] = [None] * len(self.endpoints)
        self.server_restarts = [0] * len(self.endpoints)
        self._fenced: list[int | None] = [None] * len(self.endpoints)  # restarts already acted on
        self.keys = CurveKeys.from_setting(self.settings.curve_keys, connect=True)
        spec = FaultSpec.parse(self.settings.faults, self.settings.fault_seed)
        self._faults = FaultInjector(spec, f"w{worker_id}") if spec.active else None

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> "PSClient":
        """Open the sockets and start the background thread; return at once.

        Nothing here waits for a server (the first request does), so
        ``timeout`` is ignored; it is kept for callers that pass it.
        """
        if self._thread is not None:
            return self
        with self._io:
            self._bell_rx = self.ctx.socket(zmq.PAIR)
            self._bell_rx.bind(self._bell_addr)
            self._bell = self.ctx.socket(zmq.PAIR)
            self._bell.setsockopt(zmq.LINGER, 0)
            self._bell.connect(self._bell_addr)
            self._socks = [self._socket(ep) for ep in self.endpoints]
            self._poller = zmq.Poller()
            self._poller.register(self._bell_rx, zmq.POLLIN)
            for sock in self._socks:
                self._poller.register(sock, zmq.POLLIN)
            # per socket: is another reply queued? (cheaper than reading EVENTS or catching Again)
            self._queued = []
            for sock in self._socks:
                self._queued.append(zmq.Poller())
                self._queued[-1].register(sock, zmq.POLLIN)
        self._thread = threading.Thread(target=self._background, name=f"zps-client-w{self.worker_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the background thread (pending requests fail with ClosedError) and close sockets."""
        timeout = check_timeout(timeout, "close", allow_none=False)
        with self._close_lock:   # close may come from two threads (a stop signal's watcher)
            if self._closed:
                return
            self._closed = True
        if self._thread is not None:
            self._kick.set()
            self._thread.join(timeout)
            if self._thread.is_alive() or not self._socks_closed:   # ctx.term() would wait for ever
                log.error("client I/O thread did not close its sockets within %.1fs; leaving them to the "
                          "process's exit", timeout)
                return
        if self._own_ctx:
            self.ctx.term()

    def _closed_error(self) -> ClosedError:
        if self._io_failure is not None:
            return ClosedError(f"client I/O thread failed ({type(self._io_failure).__name__}: "
                               f"{self._io_failure}); see the log, and start a new client")
        return ClosedError("client is closed or not started")

    def __enter__(self) -> "PSClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ requests
    def request(self, server: int, msg_type: MsgType, header: dict | None = None, frames: Sequence = (),
                timeout: float | None = None, track: bool = False):
        """Send one request to one server; return its Future (and tracker if ``track``).

        The Future resolves to the decoded reply ``Message``, or raises
        ``RemoteError`` for an ERROR reply, ``DeadlineExceeded`` after
        ``timeout`` seconds (default: the request timeout) and ``ClosedError``
        if the client closes first.  A bad ``server`` or ``timeout`` raises
        before anything is sent.
        """
        timeout = check_timeout(timeout, "request")
        if type(server) is not int or not 0 <= server < len(self.endpoints):
            if isinstance(server, bool) or not isinstance(server, numbers.Integral):
                raise TypeError(f"server must be an integer index into endpoints, got {server!r}")
            if not 0 <= server < len(self.endpoints):
                raise ValueError(f"server must be in [0, {len(self.endpoints)}) (the client's endpoints), "
                                 f"got {server!r}")
            server = int(server)
        if self._closed or self._thread is None or self._io_closed:
            raise self._closed_error()
        rid = next(self._rid)
        tracker = None
        if track and frames:
            data = [f for f in frames if isinstance(f, zmq.Frame)]
            if data:
                tracker = zmq.MessageTracker(*data)
        frames = proto.encode(msg_type, header, frames, rid)
        fut = _Reply(self)
        t = self.settings.request_timeout if timeout is None else timeout
        attempt = self.settings.attempt_timeout
        if msg_type == MsgType.PULL:  # a parked pull is answered by its deadline at the latest
            attempt += (header or {}).get("dl", 0) / 1000.0
        req = _Request(rid, server, frames, fut, t, attempt, msg_type)
        frames = None
        if self._io.acquire(blocking=False):   # the sockets are free: send it from here
            try:
                self._take_handed()                  # earlier requests leave first
                self._admit(req)
            finally:
                self._io.release()
        else:                                        # hand it to whoever holds them
            self._cmds.put(req)
            with self._bell_lock:
                try:
                    self._bell.send(b"", zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self._kick.set()
            if self._io_closed:  # the client closed meanwhile: nobody will take it any more
                self._fail_handed()
        return (fut, tracker) if track else fut

    def _flat(self, arr, what: str) -> np.ndarray:
        """``arr`` if it is the plan's flat vector: 1-D, C-contiguous, fp32, ``plan.total`` long."""
        n = self.plan.total
        if type(arr) is np.ndarray and arr.dtype == _WIRE_DTYPE and arr.ndim == 1 and arr.size == n \
                and arr.flags.c_contiguous:
            return arr   # the usual case, without building the messages below
        want = f"a 1-D C-contiguous numpy float32 array of {n} elements (the plan's total)"
        if not isinstance(arr, np.ndarray):
            if type(arr).__module__.split(".")[0] == "torch":
                raise TypeError(f"{what}: expected {want}, got a torch tensor; pass t.detach().cpu().numpy() "
                                "(of a float32 tensor) instead")
            raise TypeError(f"{what}: expected {want}, got {type(arr).__name__}")
        if arr.dtype != _WIRE_DTYPE:
            got = arr.dtype.name if arr.dtype.isnative else f"{arr.dtype.str} ({arr.dtype.name}, byte-swapped)"
            raise TypeError(f"{what}: expected {want}, got dtype {got}; convert with .astype(np.float32)")
        if arr.ndim != 1 or arr.size != n:
            raise ValueError(f"{what}: expected {want}, got shape {arr.shape} ({arr.size} elements)")
        if not arr.flags.c_contiguous:
            raise ValueError(f"{what}: expected {want}, got a non-contiguous view (strides {arr.strides}); "
                             "pass np.ascontiguousarray(...) of it")
        return arr

    def _data_frames(self, arr: np.ndarray, lo: int, hi: int, frame_elems: int) -> list:
        part = arr[lo:hi]
        if part.nbytes < _ZERO_COPY_MIN_BYTES:
            if 0 < hi - lo <= frame_elems:
                return [part.tobytes()]
            return [part[a:b].tobytes() for a, b in frame_slices(hi - lo, frame_elems)]
        return [zmq.Frame(memoryview(part[a:b]), copy=False, track=True)
                for a, b in frame_slices(hi - lo, frame_elems)]

    def _to(self, k: int) -> dict:
        """The server incarnation a request is meant for (a restarted server refuses it)."""
        inc = self.server_inc[k]
        return {} if inc is None else {"to": inc}

    def hello(self, plan: PartitionPlan, timeout: float | None = None, clock: int | None = None) -> list[dict]:
        """Register with every server under ``plan``; return their HELLO_OK headers.

        ``clock`` (on a rejoin) is the clock this worker has reached: a server
        restored from an older checkpoint stops waiting for its lost updates.
        """
        timeout = check_timeout(timeout, "hello")
        if plan.num_servers != len(self.endpoints):
            raise ValueError(f"plan is cut for {plan.num_servers} servers, client has {len(self.endpoints)}")
        head = {"w": self.worker_id, "inc": self.incarnation, "plan": plan.to_wire(), "ph": plan.hash}
        if clock is not None:
            head["clk"] = _clock(clock)
        futs = [self.request(k, MsgType.HELLO, head, timeout=timeout) for k in range(len(self.endpoints))]
        replies = [m.header for m in _wait_all(futs, timeout or self.settings.request_timeout, "hello")]
        self.plan = plan
        self._next_beat = time.monotonic()
        self._heartbeat_on = True
        self._kick.set()
        return replies

    def init(self, flat: np.ndarray, timeout: float | None = None) -> list[bool]:
        """Offer initial weights; the first offer a server sees wins. True where ours did."""
        timeout = check_timeout(timeout, "init")
        flat = self._flat(flat, "init")
        futs = []
        for k in range(len(self.endpoints)):
            lo, hi = self.plan.range_of(k)
            head = {"w": self.worker_id, "inc": self.incarnation, "ph": self.plan.hash, "n": hi - lo,
                    **self._to(k)}
            futs.append(self.request(k, MsgType.INIT, head, self._data_frames(flat, lo, hi, self.plan.frame_elems),
                                     timeout=timeout))
        return [m["accepted"] for m in _wait_all(futs, timeout or self.settings.request_timeout, "init")]

    def push(self, flat_grad: np.ndarray, clock: int, tick: bool = True,
             timeout: float | None = None, read_steps: Sequence[int] | None = None) -> PushHandle:
        """Send each server its range of ``flat_grad`` (zero-copy), tagged with ``clock``.

        ``read_steps[k]`` is server k's update step when the weights this
        gradient was computed on were read (for staleness-aware learning
        rates and delay compensation).  Do not write ``flat_grad`` until
        ``PushHandle.released()``.  ``flat_grad`` is a 1-D C-contiguous numpy
        float32 array of ``plan.total`` elements; it is never copied here.
        """
        timeout = check_timeout(timeout, "push")
        flat_grad = self._flat(flat_grad, "push")
        if type(clock) is not int or not _CLOCK_RANGE[0] <= clock <= _CLOCK_RANGE[1]:
            clock = _clock(clock)
        if read_steps is not None:
            if len(read_steps) != len(self.endpoints):
                raise ValueError(f"read_steps needs one step per server ({len(self.endpoints)}), "
                                 f"got {len(read_steps)}")
            read_steps = [_integer(s, f"read_steps[{k}]") for k, s in enumerate(read_steps)]
        futs, trackers = [], []
        fe = self.plan.frame_elems
        bounds = self.plan.bounds
        per = self.settings.push_segment_frames * fe
        for k in range(len(self.endpoints)):
            lo, hi = bounds[k], bounds[k + 1]
            head = {"w": self.worker_id, "inc": self.incarnation, "seq": next(self._seq[k]),
                    "clk": clock, "ph": self.plan.hash, "n": hi - lo, "tick": tick}
            if self.server_inc[k] is not None:   # the incarnation it is meant for (see _to)
                head["to"] = self.server_inc[k]
            if read_steps is not None and read_steps[k] >= 0:
                head["rs"] = read_steps[k]
            if per and hi - lo > per:
                # segments: the server checks each while the next ones are still on the way
                segs = -(-(hi - lo) // per)
                for off in range(0, hi - lo, per):
                    n = min(per, hi - lo - off)
                    f, t = self.request(k, MsgType.PUSH, {**head, "n": n, "off": off, "segs": segs},
                                        self._data_frames(flat_grad, lo + off, lo + off + n, fe),
                                        timeout=timeout, track=True)
                    futs.append(f)
                    trackers.append(t)
                continue
            f, t = self.request(k, MsgType.PUSH, head, self._data_frames(flat_grad, lo, hi, fe),
                                timeout=timeout, track=True)
            futs.append(f)
            trackers.append(t)
        self.stats["pushes"] += 1
        return PushHandle(futs, trackers)

    def pull(self, clock: int, timeout: float | None = None, observer: bool = False) -> PullHandle:
        """Ask every server for its range as of a read at ``clock`` (parked until it qualifies).

        An ``observer`` pull (no HELLO needed; e.g. to export or inspect the
        weights) reads whatever the servers hold now and counts as no worker.
        """
        timeout = check_timeout(timeout, "pull")
        clock = _clock(clock)
        t = self.settings.read_timeout if timeout is None else timeout
        head = {"w": self.worker_id, "clk": clock, "ph": self.plan.hash,
                "dl": min(max(1, int(t * 1000)), (1 << 63) - 1)}
        if observer:
            head["obs"] = True
        # the local deadline is a little later than the server's, so the server's
        # typed STALE_TIMEOUT (naming the blockers) arrives first
        futs = [self.request(k, MsgType.PULL, head, timeout=t + min(5.0, 0.1 * t + 0.5))
                for k in range(len(self.endpoints))]
        self.stats["pulls"] += 1
        return PullHandle(futs, clock, time.monotonic())

    def clock(self, clock: int, timeout: float | None = None) -> list[int]:
        """Complete ``clock`` without a push; return each server's min_clock."""
        timeout = check_timeout(timeout, "clock")
        clock = _clock(clock)
        futs = [self.request(k, MsgType.CLOCK, {"w": self.worker_id, "inc": self.incarnation, "clk": clock,
                                                **self._to(k)}, timeout=timeout)
                for k in range(len(self.endpoints))]
        return [m["min_clock"] for m in _wait_all(futs, timeout or self.settings.request_timeout, "clock")]

    def server_stats(self, server: int, timeout: float | None = None) -> dict:
        """Server ``server``'s statistics (its STATS reply)."""
        timeout = check_timeout(timeout, "server_stats")
        return self.request(server, MsgType.STATS, timeout=timeout).result(
            timeout or self.settings.request_timeout)["stats"]

    # ------------------------------------------------------------ I/O (holder of _io only)
    def _socket(self, endpoint: str) -> zmq.Socket:
        # a server that is down is retried by ZeroMQ with capped exponential backoff
        return make_dealer(self.ctx, endpoint, self.settings.transport, self.keys,
                           reconnect_max=self.settings.backoff_max)

    def _admit(self, req: "_Request") -> None:
        """Send a new request and arm its retry timer."""
        if self._io_closed:
            req.release()
            _fail(req.future, ClosedError("client closed"))
            return
        self.stats["requests"] += 1
        self._pending[req.rid] = req
        self._transmit(req)
        self._schedule(req)

    def _take_handed(self) -> None:
        """Admit the requests other threads handed over while the sockets were busy."""
        while not self._cmds.empty():
            try:
                req = self._cmds.get_nowait()
            except queue.Empty:
                return
            self._admit(req)

    def _send(self, req: "_Request", copies: int) -> None:
        sock, frames = self._socks[req.server], req.frames
        for _ in range(copies):
            try:
                send_now(sock, frames)
            except zmq.Again:
                self.stats["send_blocked"] += 1
        self.stats["bytes_sent"] += req.nbytes * copies

    def _transmit(self, req: "_Request") -> None:
        copies, delay = self._faults.plan(req.mtype.name) if self._faults else (1, 0.0)
        if delay > 0:  # held back by the fault injector: sent when its timer fires
            heapq.heappush(self._timers, (time.monotonic() + delay, req.rid, -1 - req.attempt))
            return
        self._send(req, copies)

    def _schedule(self, req: "_Request") -> None:
        wait = req.attempt_timeout if req.attempt == 0 else min(
            self.settings.backoff_max * 4, req.attempt_timeout)
        timers = self._timers
        if len(timers) > self._prune_at:
            # an answered request's timer stays in the heap until it would fire; at
            # thousands of requests a second that is a heap of (rate x attempt_timeout)
            # entries, every push into it slower: keep only those of requests in flight
            pending = self._pending
            live = [t for t in timers if t[1] in pending]
            heapq.heapify(live)
            timers[:] = live   # one step: the background thread's _next_wake sees a heap
            self._prune_at = 2 * len(live) + _TIMERS_SLACK   # amortized: each entry pruned once
        heapq.heappush(timers, (min(req.deadline, time.monotonic() + wait), req.rid, req.attempt))

    def _next_wake(self, now: float) -> float:
        wake = self._next_beat if self._heartbeat_on else now + 1.0
        try:   # the background thread asks without the sockets' lock: the heap may just have emptied
            wake = min(wake, self._timers[0][0])
        except IndexError:
            pass
        return wake

    def _drive(self, timeout: float) -> int:
        """One round of I/O, waiting up to ``timeout`` seconds; return the replies handled.

        Waits for a reply, the doorbell or the next timer, whichever comes
        first, then handles everything that is due.
        """
        now = time.monotonic()
        wait = max(0.0, min(timeout, self._next_wake(now) - now))
        events = dict(self._poller.poll(int(wait * 1000 + 0.999)))
        handled = 0
        if self._bell_rx in events:
            while self._bell_rx.get(zmq.EVENTS) & zmq.POLLIN:
                self._bell_rx.recv(zmq.NOBLOCK)
        self._take_handed()
        for k, sock in enumerate(self._socks):
            if sock not in events:
                continue
            queued = self._queued[k]
            while True:  # one message is in; more while the one-socket poll says so
                self._on_reply(k, recv_now(sock))
                handled += 1
                if not queued.poll(0):
                    break
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, rid, attempt = heapq.heappop(timers)
            req = self._pending.get(rid)
            if req is None:
                continue
            if attempt < 0:        # a send the fault injector held back
                if -1 - attempt == req.attempt:
                    self._send(req, 1)
                continue
            if attempt != req.attempt:
                continue
            if now >= req.deadline:
                del self._pending[rid]
                req.release()
                req.future.set_exception(DeadlineExceeded(
                    f"{req.mtype.name} to server {req.server} ({self.endpoints[req.server]}) got no "
                    f"answer within {req.timeout:.1f}s after {req.attempt + 1} attempts; "
                    "is the server running and reachable?"))
                continue
            req.attempt += 1
            self.stats["retries"] += 1
            self._transmit(req)
            self._schedule(req)
        if self._heartbeat_on and now >= self._next_beat:
            self._next_beat = now + self.settings.heartbeat_interval
            head = proto.encode(MsgType.HEARTBEAT, {"rid": 0, "w": self.worker_id, "inc": self.incarnation})
            for sock in self._socks:
                try:
                    sock.send_multipart(head, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        return handled

    def _wait_for(self, fut: "_Reply", timeout: float | None) -> None:
        """Drive the sockets from this thread until ``fut`` is done or ``timeout`` passes.

        If another thread holds the sockets, it completes ``fut`` as it goes;
        this thread then only checks back every few milliseconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while fut._state != _FINISHED:   # the plain state check, not _Reply.done's I/O
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            if not self._closed and self._io.acquire(blocking=False):
                try:
                    # in slices, so that a close() from another thread is noticed; once
                    # closing, the background thread fails every pending reply
                    while fut._state != _FINISHED and not self._closed:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            return
                        self._drive(_LEAD_SLICE if left is None else min(left, _LEAD_SLICE))
                finally:
                    self._io.release()
            else:
                cf.wait([fut], _FOLLOW_SLICE if left is None else min(left, _FOLLOW_SLICE))

    def _poke(self) -> None:
        """Handle whatever has arrived, without waiting (if the sockets are free)."""
        if not self._closed and self._io.acquire(blocking=False):
            try:
                if not self._io_closed:
                    self._drive(0)
            finally:
                self._io.release()

    def _background(self) -> None:
        """Heartbeats, retries, deadlines, and replies nobody waits for.

        However it ends, it closes the sockets and fails what is pending: a
        thread that died with them open would leave ``close`` waiting on
        ``ctx.term()`` for ever, and every request waiting for its deadline.
        """
        try:
            self._serve_io()
        except BaseException as exc:
            self._io_failure = exc
            log.exception("client I/O thread of worker %d failed; the client is unusable now", self.worker_id)
        finally:
            self._shutdown_io()

    def _serve_io(self) -> None:
        idle = _BG_MIN
        while not self._closed:
            now = time.monotonic()
            wake = self._next_wake(now)
            # never asleep for long: a request needs no wake-up call (which would cost the
            # caller a GIL hand-off), its reply is looked for within _BG_MAX at the latest
            wake = min(wake, now + (idle if self._pending or not self._cmds.empty() else _BG_MAX))
            self._kick.wait(max(0.0, wake - now))
            self._kick.clear()
            if self._closed:
                break
            if self._io.acquire(blocking=False):    # else a waiting caller is driving
                try:
                    handled = self._drive(0)
                finally:
                    self._io.release()
                idle = _BG_MIN if handled else min(_BG_MAX, idle * 2)

    def _shutdown_io(self) -> None:
        # a thread driving the sockets lets go within one slice once _closed is set
        held = self._io.acquire(timeout=_LEAD_SLICE * 20)
        if not held:
            log.error("client I/O: a waiting thread kept the sockets; closing them anyway")
        try:
            self._io_closed = True
            try:
                pending = list(self._pending.values())
                self._pending.clear()
                for req in pending:
                    req.release()
                    _fail(req.future, ClosedError(
                        f"client closed before {req.mtype.name} to server {req.server} was answered"))
                self._fail_handed()
            finally:   # whatever failed above, the sockets close: close() terms the context only then
                for sock in self._socks:
                    sock.close()
                self._bell_rx.close(linger=0)
                with self._bell_lock:
                    self._bell.close(linger=0)
                self._socks_closed = True
        finally:
            if held:
                self._io.release()

    def _fail_handed(self) -> None:
        """Fail the requests still waiting to be handed over (the client is closed)."""
        while True:
            try:
                req = self._cmds.get_nowait()
            except queue.Empty:
                return
            req.release()
            _fail(req.future, ClosedError("client closed"))

    def _on_reply(self, k: int, frames: list) -> None:
        self.stats["bytes_received"] += sum(map(len, frames))
        try:
            msg = proto.decode(frames)
        except ProtocolError as exc:
            log.error("undecodable reply from server %d (%s): %s", k, self.endpoints[k], exc)
            return
        if msg.rid == 0:  # heartbeat replies: notice a restarted server
            if msg.type == MsgType.HEARTBEAT_OK:
                known = self.server_inc[k]
                if known is not None and msg["sinc"] != known and self._fenced[k] != msg["sinc"]:
                    self._fenced[k] = msg["sinc"]
                    self._fence_server(k, msg["sinc"])
            return
        req = self._pending.pop(msg.rid, None)
        if req is None:
            self.stats["late_replies"] += 1
            return
        req.release()
        if msg.type == MsgType.ERROR:
            req.future.set_exception(remote_error(msg["code"], msg["msg"], self.endpoints[k],
                                                  msg.header.get("detail")))
        else:
            if msg.type == MsgType.HELLO_OK:
                self.server_inc[k] = msg["sinc"]
            req.future.set_result(msg)

    def _fence_server(self, k: int, new_inc: int) -> None:
        """Server k restarted: every request addressed to its old incarnation fails FENCED."""
        log.warning("server %d (%s) restarted (incarnation %#x -> %#x)", k, self.endpoints[k],
                    self.server_inc[k], new_inc)
        self.server_restarts[k] += 1
        pending = self._pending
        for rid in [r for r, req in pending.items() if req.server == k and req.mtype != MsgType.HELLO]:
            req = pending.pop(rid)
            req.release()
            req.future.set_exception(remote_error(
                ErrorCode.FENCED, f"server {k} restarted; its previous incarnation's requests are void",
                self.endpoints[k], {"server": k}))


#: Timers the heap may hold beyond twice those left at the last pruning before it is pruned again.
_TIMERS_SLACK = 256
#: Longest a waiting thread drives the sockets before it looks at the clock and close() again.
def _fail(fut: cf.Future, exc: BaseException) -> None:
    """Fail ``fut`` unless it was settled meanwhile (by a thread still driving the sockets)."""
    try:
        fut.set_exception(exc)
    except cf.InvalidStateError:
        pass


_LEAD_SLICE = 0.05
#: How often a thread whose reply another thread is fetching checks back (seconds).
_FOLLOW_SLICE = 0.002
#: The background thread looks for replies nobody waits for this often at first ...
_BG_MIN = 0.001
#: ... backing off to this while nothing arrives (a waiting caller never waits for it);
#: it also never sleeps longer than this, so a new request needs no wake-up call.
_BG_MAX = 0.05


#: concurrent.futures' states of a request's future (read without its lock: see _Reply).
_RUNNING = cf._base.RUNNING
_FINISHED = cf._base.FINISHED


class _Reply(cf.Future):
    """A Future whose waiter fetches its own reply (see the module docstring).

    A request is under way once it is made, so its future is RUNNING from
    the start (``cancel`` says False). It has no Condition until a thread
    waits on it through ``concurrent.futures`` (``cf.wait``, ``as_completed``,
    a second thread waiting for the same reply), and the thread that holds
    the sockets settles it without a lock while it has none (``_settle``): a
    Condition and two lock round trips less per request. No waiter misses a
    settling: the settler writes the state before it looks for a Condition,
    and a waiter makes the Condition before it reads the state.
    """

    def __init__(self, client: "PSClient"):
        # not Future.__init__, which makes the Condition at once (see __getattr__)
        self._state = _RUNNING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks = []
        self._client = client

    def __getattr__(self, name: str):
        if name == "_condition":   # the first waiter's: one for all, however many ask at once
            return self.__dict__.setdefault("_condition", threading.Condition())
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _settle(self, result, exception: BaseException | None = None) -> None:
        """``set_result(result)`` or ``set_exception(exception)``, without the lock if nobody waits on it."""
        mine = object()   # dict.setdefault is atomic: of two threads settling at once, one wins
        if self._state == _FINISHED or self.__dict__.setdefault("_settled_by", mine) is not mine:
            raise cf.InvalidStateError(f"{self!r} is settled already")
        self._result = result
        self._exception = exception
        self._state = _FINISHED
        cond = self.__dict__.get("_condition")
        if cond is not None:
            with cond:
                for waiter in self._waiters:
                    if exception is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
                cond.notify_all()
        if self._done_callbacks:
            self._invoke_callbacks()

    def set_result(self, result) -> None:
        self._settle(result)

    def set_exception(self, exception: BaseException) -> None:
        self._settle(None, exception)

    def done(self) -> bool:
        if self._state != _FINISHED:
            self._client._poke()
        return self._state == _FINISHED

    def result(self, timeout: float | None = None):
        timeout = _wait_timeout(timeout, "result")
        if self._state != _FINISHED:
            self._client._wait_for(self, timeout)
            if self._state != _FINISHED:
                return super().result(_remaining(timeout))   # raises TimeoutError, or settled meanwhile
        if self._exception is not None:
            try:
                raise self._exception
            finally:
                self = None   # as Future.result: no cycle through the traceback
        return self._result

    def exception(self, timeout: float | None = None):
        timeout = _wait_timeout(timeout, "exception")
        if self._state != _FINISHED:
            self._client._wait_for(self, timeout)
            if self._state != _FINISHED:
                return super().exception(_remaining(timeout))
        return self._exception


def _remaining(timeout: float | None) -> float:
    # _wait_for returned without the reply: its deadline passed (or the client closed, in
    # which case the reply fails with ClosedError at once); wait no longer
    return 0 if timeout is not None else _LEAD_SLICE


class _Request:
    """One request in flight: its frames are kept until it is answered, to resend them."""

    __slots__ = ("rid", "server", "frames", "future", "deadline", "timeout", "attempt_timeout",
                 "attempt", "mtype", "nbytes")

    def __init__(self, rid, server, frames, future, timeout, attempt_timeout, mtype):
        self.rid, self.server, self.frames, self.future = rid, server, frames, future
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.attempt_timeout = attempt_timeout
        self.attempt = 0
        self.mtype = mtype
        self.nbytes = sum(map(len, frames))

    def release(self) -> None:
        """Drop the frames: ZeroMQ's tracker reports a zero-copy buffer free only then."""
        self.frames = None
