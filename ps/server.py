"""``ShardServer``: the ROUTER event loop of one server process.

One thread owns the ROUTER socket.  Every request is decoded defensively
(``common.protocol.decode``), checked against the partition plan, handled,
and answered with its reply or a typed ERROR.  A bad message changes no
state.  Reads that do not yet satisfy the staleness bound are parked in the
``SSPGate`` (no thread blocks) and answered the moment ``min_clock``
advances, or expire at their deadline with the workers that hold them back.
While more requests are queued, short replies leave a few at a time; while
requests come one at a time and often, the loop polls for the next one a
little while before it sleeps (``SpinPolicy``, bin/ps-server only).

Lifecycle (as every long-lived zps component)::

    server = ShardServer(settings)      # binds; server.endpoint is the real address
    server.run_in_background()          # or server.serve() in the calling thread
    server.shutdown(timeout=5)          # ask, join; idempotent

With ``settings.curve_keys`` the ROUTER is a CURVE server and the server
starts (and, on shutdown, stops) the ``Authenticator`` of its context before
binding; a caller that hands in its own ``sock`` runs that Authenticator
itself and may pass it as ``authenticator`` for the statistics.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import threading
import time
from typing import Callable

import msgpack
import numpy as np
import torch
import zmq

from common import protocol as proto
from common.config import ServerSettings, describe, staleness_to_wire
from common.errors import ConfigError, ErrorCode, ProtocolError
from common.plan import PartitionPlan
from common.protocol import Message, MsgType
from ps import checkpoint as ckpt
from ps.optim import OptimizerSpec, ShardOptimizer
from ps.rules import ApplyOnArrival, DelayCompensation, PushLedger, SyncAveraging
from ps.shard import ShardStore
from ps.ssp import SSPGate
from common.security import Authenticator, CurveKeys
from common.transport import bound_endpoint, make_router, recv_now, send_now

log = logging.getLogger("zps.server")

#: Longest the loop sleeps in poll, so liveness is checked even when idle (seconds).
MAX_POLL_SECONDS = 0.5
#: Messages handled per wake-up before timers are looked at again.
BATCH = 256
#: A segmented push whose segments are not all in yet: at most this many per worker are held.
MAX_HELD_PER_WORKER = 16
#: An update of at least this many elements is shared among ``apply_threads`` threads ...
PARALLEL_MIN_ELEMS = 4 << 20
#: ... in pieces of this many elements (rounded to whole chunks).
PIECE_ELEMS = 2 << 20
#: While more requests are queued, replies of at most REPLY_DEFER_BYTES wait in an
#: outbox and go out together, at most REPLY_BATCH at a time: sending to a
#: socket whose I/O thread has gone idle wakes it, which costs 14-18 µs on a
#: virtual machine (docs/BENCHMARKS.md, finding 11); replies sent back to back
#: share that one wake-up.
REPLY_BATCH = 4
REPLY_DEFER_BYTES = 60 << 10
#: Before an update of at least this many elements (BSP applies one on a short CLOCK
#: message) the outbox is sent, so held replies do not wait for it.
FLUSH_BEFORE_STEP_ELEMS = 1 << 18
#: Messages on the loop's wake pipe (from other threads): stop; workers the coordinator declared dead.
WAKE_STOP = b"stop"
WAKE_DEAD = b"dead:"
#: See SpinPolicy.
SPIN_MAX_COMPANY = 0.1
SPIN_DECAY = 0.95
SPIN_GAP_FACTOR = 2.0
#: A pushed frame of at most this many elements is checked for NaN and infinity by numpy
#: (less overhead per call), a longer one by torch's sum (faster per element).
FINITE_BY_NUMPY_MAX_ELEMS = 1 << 15


class SpinPolicy:
    """When the event loop busy-polls for the next request instead of sleeping.

    Waking a thread that sleeps in poll costs tens of µs on a virtual machine,
    and the code that runs next starts cold (docs/BENCHMARKS.md, finding 12).
    After a wake-up, the loop polls without sleeping for up to ``seconds``, but
    only while requests come one at a time (fewer than SPIN_MAX_COMPANY of the
    recent wake-ups found a second request queued, an average that decays by
    SPIN_DECAY per wake-up) and the last one came within SPIN_GAP_FACTOR x
    ``seconds`` of the answer before it.  Requests that queue up get none (the
    loop is busy then, and spinning would take the CPU their senders need),
    nor do requests that come seldom (a spin would only burn the CPU).
    """

    __slots__ = ("seconds", "company", "answered_at")

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.company = 1.0           # decaying share of wake-ups that found more than one request
        self.answered_at = -math.inf

    def after(self, handled: int, arrived: float, now: float) -> bool:
        """A wake-up whose first request ``arrived`` (seconds) handled ``handled``
        requests and ended at ``now``: whether to spin before sleeping again."""
        self.company = self.company * SPIN_DECAY + (1 - SPIN_DECAY) * (handled > 1)
        recent = arrived - self.answered_at < SPIN_GAP_FACTOR * self.seconds
        self.answered_at = now
        return self.seconds > 0 and self.company < SPIN_MAX_COMPANY and recent


class _HeldPush:
    """The segments of one segmented push received so far (their frames, not copies)."""

    __slots__ = ("segs", "clk", "tick", "rs", "parts", "waiters", "elems")

    def __init__(self, segs: int, clk: int, tick: bool, rs):
        self.segs, self.clk, self.tick, self.rs = segs, clk, tick, rs
        self.parts: dict[int, tuple[int, list]] = {}      # off -> (n, gradient chunks)
        self.waiters: list[tuple[bytes, int]] = []        # (ident, rid) of every request to answer
        self.elems = 0


class _ApplyPool:
    """Runs the pieces of one update on the calling thread and ``threads - 1`` helpers.

    Pieces are taken in turn from a shared counter, so a helper that does not
    get a core in time holds nothing up: the calling thread takes the rest and
    then waits only for pieces a helper already started.
    """

    def __init__(self, threads: int, name: str):
        self.threads = threads
        self._name = name
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._helpers: list[threading.Thread] = []

    def run(self, piece: Callable[[int], None], count: int, timeout: float = 600.0) -> None:
        if self.threads <= 1 or count <= 1:
            for i in range(count):
                piece(i)
            return
        if not self._helpers:
            for k in range(self.threads - 1):
                t = threading.Thread(target=self._helper, name=f"{self._name}-apply-{k}", daemon=True)
                t.start()
                self._helpers.append(t)
        job = _Job(piece, count)
        for _ in self._helpers:
            self._jobs.put(job)
        try:
            job.work()
            job.wait(timeout)
        finally:
            job.piece = None  # the update's buffers (a push's frames) are not kept past it

    def _helper(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.work()
            job = None  # nothing of it is kept while this thread waits for the next one

    def close(self, timeout: float = 5.0) -> None:
        for _ in self._helpers:
            self._jobs.put(None)
        for t in self._helpers:
            t.join(timeout)
        self._helpers = []


class _Job:
    __slots__ = ("piece", "count", "_next", "_finished", "_cond", "error")

    def __init__(self, piece: Callable[[int], None], count: int):
        self.piece, self.count = piece, count
        self._next = itertools.count()
        self._finished = 0
        self._cond = threading.Condition()
        self.error: BaseException | None = None

    def work(self) -> None:
        while True:
            i = next(self._next)  # atomic under the GIL
            piece = self.piece
            if i >= self.count or piece is None:
                return
            try:
                piece(i)
            except BaseException as exc:
                self.error = self.error or exc
            finally:
                with self._cond:
                    self._finished += 1
                    if self._finished == self.count:
                        self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._finished == self.count, timeout):
                raise RuntimeError(f"an update piece did not finish within {timeout:.0f}s")
        if self.error is not None:
            raise self.error


class ShardServer:
    """Holds one range of the flat parameter vector and serves pushes and pulls."""

    def __init__(self, settings: ServerSettings, ctx: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic, sock: zmq.Socket | None = None,
                 authenticator: Authenticator | None = None, restore_from: tuple | None = None):
        """``restore_from``: the ``(path, meta, arrays)`` of ``ckpt.read_latest`` to restore, when
        the caller already read it (``--restore``; else the newest checkpoint is read here)."""
        self.settings = settings
        self._clock = clock
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.incarnation = int.from_bytes(os.urandom(4), "little") | 1
        self.gate = SSPGate(settings.staleness, settings.num_workers, settings.worker_timeout, clock())
        self.ledger = PushLedger()
        self.plan: PartitionPlan | None = None
        self.store: ShardStore | None = None
        self.optimizer: ShardOptimizer | None = None
        self.rule = None
        self.dc: DelayCompensation | None = None
        self._push_scale = 1.0
        self._held: dict[tuple[int, int], _HeldPush] = {}       # (w, seq) -> segments so far
        self._refused: dict[tuple[int, int], tuple] = {}        # refused (NaN) pushes: (segs, offsets seen)
        self._pool = _ApplyPool(settings.apply_threads, f"zps-server-{settings.rank}")
        # replies held back while more requests are queued (None: send at once)
        self._outbox: list[tuple[bytes, list, int]] | None = None
        self._spin = SpinPolicy(settings.spin_us / 1e6)
        self.stats = {
            "requests": 0, "pushes": 0, "pulls": 0, "dup_pushes": 0, "nonfinite": 0,
            "errors": {}, "bytes_in": 0, "bytes_out": 0, "parked_total": 0,
            "expired_reads": 0, "unroutable": 0, "send_blocked": 0, "dead_workers": [],
            "update_staleness": {},
            "segments": 0, "held_dropped": 0, "replies_coalesced": 0, "spin_caught": 0, "spin_missed": 0,
            "checkpoints": 0, "checkpoint_seconds": 0.0,
        }
        self._stopping = False
        self._closed = False
        self._last_ckpt_time = clock()
        self._drained_at = clock()  # the last time the receive queue was found empty
        self._last_ckpt_step = 0
        self._ckpt_due: str | None = None   # a periodic checkpoint to write after this request (its reason)
        self.last_checkpoint = ""
        self.restored_from = ""
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        # The socket is created and bound here so ``endpoint`` is known at once;
        # after this it is used only by the thread that runs ``serve``.
        self.keys = CurveKeys.from_setting(settings.curve_keys, serve=True)
        self.auth = authenticator
        self._own_auth = False
        if sock is None:
            if self.keys is not None and self.auth is None:
                self.auth = Authenticator(self.ctx, self.keys).start()  # before bind: no unchecked client
                self._own_auth = True
            try:
                sock = make_router(self.ctx, settings.bind, settings.transport, self.keys)
            except BaseException:
                self._stop_auth()
                raise
        self.sock = sock
        self.endpoint = bound_endpoint(self.sock)
        self._wake_addr = f"inproc://zps-server-wake-{id(self)}"
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(self._wake_addr)
        self._wake_lock = threading.Lock()
        if settings.restore:
            try:
                self._restore(restore_from)
            except BaseException:
                self._close()   # no socket (nor a context of its own) outlives a failed restore
                raise

    # ------------------------------------------------------------ lifecycle
    def run_in_background(self, spin: bool = False) -> "ShardServer":
        """Serve from a new thread.

        ``spin``: keep ``settings.spin_us`` of busy polling, for a process that does
        nothing else (bin/ps-server); off by default, as the program's other threads
        would wait for the GIL while the loop polls.
        """
        if not spin:
            self._spin.seconds = 0.0
        self._thread = threading.Thread(target=self.serve, name=f"zps-server-{self.settings.rank}",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def request_stop(self) -> None:
        """Ask the loop to stop (safe from any thread and from signal handlers)."""
        self._wake(WAKE_STOP)

    def report_dead(self, workers) -> None:
        """The coordinator declared ``workers`` dead (``BEAT_OK.dead_workers``); safe from any thread.

        The loop's thread acts on it (``_coordinator_dead``): a worker this
        server never heard HELLO from, or has not heard from for longer than
        ``worker_timeout``, leaves ``min_clock`` as a timed-out worker does;
        the others are left as they are (this server still hears them).
        """
        ws = [w for w in workers if isinstance(w, int) and not isinstance(w, bool)]
        if ws:
            self._wake(WAKE_DEAD + msgpack.packb(ws))

    def _wake(self, data: bytes) -> None:
        # bounded: a signal handler may interrupt this very thread inside _close, which holds the lock
        if not self._wake_lock.acquire(timeout=1.0):
            return
        try:
            if not self._done.is_set() and not self._closed:
                self._wake_tx.send(data, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        finally:
            self._wake_lock.release()

    def _on_wake(self) -> bool:
        """Take every message on the wake pipe (the loop's thread only); whether one asks to stop."""
        stop = False
        while True:
            try:
                data = self._wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                return stop
            if data == WAKE_STOP:
                stop = True
            elif data.startswith(WAKE_DEAD) and not stop:
                self._coordinator_dead(msgpack.unpackb(data[len(WAKE_DEAD):]))

    def _coordinator_dead(self, workers: list) -> None:
        ws = [w for w in workers if 0 <= w < self.settings.num_workers]
        # as in poll: silence is measured up to the last time every arrived message was handled
        died = self.gate.declare_dead(ws, min(self._clock(), self._drained_at))
        if not died:
            return
        for w in died:
            never = self.gate.workers[w].incarnation == -1
            log.warning("worker %d declared dead by the coordinator and %s: dropped from min_clock", w,
                        "never said HELLO here" if never
                        else f"silent here for more than {self.settings.worker_timeout:.1f}s")
            self.stats["dead_workers"].append(w)
        if self.rule is not None:
            self.rule.on_membership()
        self._advance_time()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the loop has stopped (SHUTDOWN request or ``request_stop``)."""
        while not self._done.wait(0.2 if timeout is None else timeout):
            if timeout is not None:
                return False
        return True

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Ask the loop to stop and wait up to ``timeout`` seconds; True if it stopped."""
        if self._closed:
            return True
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("server %d did not stop within %.1fs", self.settings.rank, timeout)
                return False
        stopped = self._done.is_set() or self._thread is None
        if stopped:
            self._close()
        return stopped

    def _close(self) -> None:
        if self._closed:
            return
        with self._wake_lock:   # no other thread is sending on the wake pipe while it closes
            self._closed = True
            self._wake_tx.close(linger=0)
        self._pool.close()
        for s in (self._wake_rx, self.sock):
            s.close(linger=int(self.settings.transport.linger * 1000))
        self._stop_auth()
        if self._own_ctx:
            self.ctx.term()

    def _stop_auth(self) -> None:
        if self._own_auth and self.auth is not None:
            self.auth.stop(timeout=5.0)
            self._own_auth = False

    # ------------------------------------------------------------ loop
    def serve(self) -> None:
        """Run the event loop in the calling thread until SHUTDOWN or ``shutdown()``."""
        # all_finite's sum of squares may overflow (the elements are then looked at one
        # by one): no RuntimeWarning for it in this thread (numpy's error state is per thread)
        with np.errstate(over="ignore"):
            self._serve()

    def _serve(self) -> None:
        poller = zmq.Poller()   # what the loop waits for: a request or the stop pipe
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        # whether another request is queued: cheaper to ask this than to catch the
        # zmq.Again of a receive from an empty queue, or to read the socket's EVENTS
        queued = zmq.Poller()
        queued.register(self.sock, zmq.POLLIN)
        self._ready.set()
        log.info("server %d serving on %s (staleness %s, %d workers)", self.settings.rank,
                 self.endpoint, self.settings.staleness, self.settings.num_workers)
        try:
            spin = False
            while not self._stopping:
                now = self._clock()
                nd = self.gate.next_deadline()
                wait = MAX_POLL_SECONDS if nd is None else min(MAX_POLL_SECONDS, max(0.0, nd - now))
                # the spin is timed by the real clock (self._clock may be a test's)
                events = self._spin_for(poller, min(wait, self._spin.seconds)) if spin else None
                if not events:
                    if spin:
                        wait = max(0.0, wait - self._spin.seconds)   # already spent spinning
                    events = dict(poller.poll(int(math.ceil(wait * 1000))))
                spin = False
                if self._wake_rx in events and self._on_wake():
                    self._stopping = True
                    break
                if self.sock not in events:
                    self._drained_at = self._clock()  # nothing waiting: everybody's news is in
                else:
                    # time passed before these messages arrived: a worker silent past its
                    # timeout (as of the last time the queue was empty) is dead before its
                    # late message is handled
                    self._advance_time()
                    self._outbox = []
                    arrived = time.monotonic()
                    try:
                        frames, handled = recv_now(self.sock), 0
                        while True:
                            more = queued.poll(0)   # another request behind this one?
                            if not more:
                                self._drained_at = self._clock()
                                if not self._outbox:
                                    self._outbox = None     # a lone request: answered at once
                            size = sum(map(len, frames))
                            if self._outbox and size > REPLY_DEFER_BYTES:
                                self._flush()   # a long request: what is answered goes first
                            self._handle(frames, size)
                            handled += 1
                            if self._stopping or not more or handled >= BATCH:
                                break
                            if len(self._outbox) >= REPLY_BATCH:
                                self._flush()
                            frames = recv_now(self.sock)
                    finally:
                        self._flush()
                        self._outbox = None
                    spin = self._spin.after(handled, arrived, time.monotonic())
                self._advance_time()
                if self._ckpt_due:   # a step of this wake-up's requests (their replies are out), or of a
                    self._checkpoint_if_due()   # membership change (s = 0)
                every = self.settings.checkpoint_every_seconds
                if every and self._clock() - self._last_ckpt_time >= every and \
                        self.optimizer is not None and self.optimizer.steps != self._last_ckpt_step:
                    self._checkpoint_safely("every %.0fs" % every)
        finally:
            if self.settings.checkpoint_dir and self._initialized:
                self._checkpoint_safely("shutdown")
            for token in self.gate.drain():
                ident, rid = token[0], token[1]
                self._send(ident, proto.error_frames(rid, ErrorCode.SHUTTING_DOWN, "server is stopping"))
            self._done.set()
            log.info("server %d stopped", self.settings.rank)
            if self._thread is None:
                self._close()

    def _spin_for(self, poller: zmq.Poller, seconds: float) -> dict | None:
        """Poll without sleeping for up to ``seconds``; the events, or None if none came."""
        poll, clock = poller.poll, time.monotonic
        end = clock() + seconds
        while clock() < end:
            events = poll(0)
            if events:
                self.stats["spin_caught"] += 1
                return dict(events)
        self.stats["spin_missed"] += 1
        return None

    def _advance_time(self) -> None:
        released, expired, died = self.gate.poll(self._clock(), ready=self._initialized,
                                                 seen_until=self._drained_at)
        for w in died:
            log.warning("worker %d missed heartbeats for %.1fs: dropped from min_clock",
                        w, self.settings.worker_timeout)
            self.stats["dead_workers"].append(w)
        if died and self.rule is not None:
            self.rule.on_membership()
            released2, expired2, _ = self.gate.poll(self._clock(), ready=self._initialized,
                                                    seen_until=self._drained_at)
            released += released2
            expired += expired2
        for token in released:
            self._reply_pull(*token)
        for exp in expired:
            ident, rid, clk, w = exp.token
            self.stats["expired_reads"] += 1
            if not self._initialized:
                self._error(ident, rid, ErrorCode.NOT_INITIALIZED,
                            f"read at clock {clk} waited for initial weights until its deadline; "
                            "no worker has sent INIT")
                continue
            # under BSP a worker that completed the clock is still counted below it until
            # all have: it waits with the reader and is not named as holding it back
            waiting = self.rule.waiting() if self.rule is not None else frozenset()
            blockers = [b for b in exp.blockers if b not in waiting]
            done = sorted(waiting.intersection(exp.blockers))
            self._error(ident, rid, ErrorCode.STALE_TIMEOUT,
                        f"read at clock {clk} needs min_clock >= {exp.need} but min_clock is "
                        f"{self.gate.min_clock}; held back by workers {blockers}"
                        + (f" (workers {done} completed clock {self.gate.min_clock} and wait for them too)"
                           if done else ""),
                        {"blockers": blockers,
                         "need": None if math.isinf(exp.need) else int(exp.need),
                         "min_clock": self.gate.min_clock})

    @property
    def _initialized(self) -> bool:
        return self.store is not None and self.store.initialized

    # ------------------------------------------------------------ dispatch
    def _handle(self, frames: list, size: int | None = None) -> None:
        """Answer one request; ``size`` is the bytes of ``frames`` (counted here if None)."""
        ident = frames[0].bytes
        body = frames[1:]
        self.stats["requests"] += 1
        self.stats["bytes_in"] += (sum(map(len, frames)) if size is None else size) - len(ident)
        try:
            msg = proto.decode(body)
        except ProtocolError as exc:
            self._error(ident, _peek_rid(body), exc.code, str(exc))
            return
        handler = self._handlers.get(msg.type)
        if handler is None:
            self._error(ident, msg.rid, ErrorCode.UNKNOWN_TYPE,
                        f"{msg.type.name} is not a request a server handles")
            return
        try:
            handler(self, ident, msg)
        except ProtocolError as exc:
            self._error(ident, msg.rid, exc.code, str(exc), exc.detail or None)
        except ConfigError as exc:
            self._error(ident, msg.rid, ErrorCode.MALFORMED, str(exc))
        except Exception as exc:  # never let one request kill the server
            log.exception("server %d: internal error handling %s", self.settings.rank, msg.type.name)
            self._error(ident, msg.rid, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _send(self, ident: bytes, frames: list) -> bool:
        """Send (or, inside a batch, hold) one reply; False if it was dropped.

        A held reply that cannot be queued when the outbox is sent is dropped
        and counted (``send_blocked``, ``unroutable``) just the same.
        """
        if len(frames) == 1 and type(frames[0]) is bytes:   # a header alone (most replies)
            nbytes = len(frames[0])
        else:
            nbytes = sum(map(proto.frame_bytes, frames))
        if self._outbox is not None:
            if nbytes <= REPLY_DEFER_BYTES:
                self._outbox.append((ident, frames, nbytes))
                return True
            self._flush()
        return self._send_now(ident, frames, nbytes)

    def _flush(self) -> None:
        """Send the replies held in the outbox, in order."""
        out = self._outbox
        if out:
            self._outbox = []
            self.stats["replies_coalesced"] += len(out) - 1   # sent right behind another
            for ident, frames, nbytes in out:
                self._send_now(ident, frames, nbytes)

    def _send_now(self, ident: bytes, frames: list, nbytes: int) -> bool:
        try:
            send_now(self.sock, [ident, *frames])
        except zmq.Again:
            self.stats["send_blocked"] += 1
            log.warning("server %d: reply dropped, the peer's queue is full (raise sndhwm)",
                        self.settings.rank)
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.stats["unroutable"] += 1
                return False
            raise
        self.stats["bytes_out"] += nbytes
        return True

    def _error(self, ident: bytes, rid: int, code: ErrorCode, message: str, detail: dict | None = None):
        errs = self.stats["errors"]
        name = ErrorCode(code).name
        errs[name] = errs.get(name, 0) + 1
        self._send(ident, proto.error_frames(rid, code, message, detail))

    def _reply(self, ident: bytes, msg: Message, header: dict, frames: list = ()) -> None:
        self._send(ident, proto.encode(proto.REPLY_TO[msg.type], header, frames, msg.rid))

    def _need_plan(self, msg: Message) -> None:
        plan = self.plan
        if plan is not None and msg.header.get("ph") == plan.hash:
            return   # the usual case (check_plan says what is wrong otherwise)
        if plan is None:
            raise ProtocolError("this server has no partition plan yet: send HELLO first", ErrorCode.NO_PLAN)
        proto.check_plan(msg, plan.hash)

    def _check_worker(self, w: int, inc: int | None = None, to: int | None = None) -> None:
        try:
            self.gate.check_worker(w)
        except ConfigError as exc:
            raise ProtocolError(str(exc)) from None
        if to is not None and to != self.incarnation:
            raise ProtocolError(
                f"request meant for server incarnation {to:#x}; this server restarted as "
                f"{self.incarnation:#x}: send HELLO and read the weights again", ErrorCode.FENCED)
        if inc is not None:
            known = self.ledger.incarnation(w)
            if known != inc:
                if known is None:
                    raise ProtocolError(f"worker {w} incarnation {inc} has not said HELLO to this server: "
                                        "send HELLO first", ErrorCode.FENCED)
                # another process said HELLO as this worker since: a restart, or two processes
                # given the same worker id; the newest registration stands
                raise ProtocolError(
                    f"worker {w} is now registered by another process (incarnation {known}, not {inc}): "
                    f"a newer process took worker id {w} over (a restart of this worker, or two workers "
                    "started with the same id); this one must stop", ErrorCode.FENCED,
                    {"superseded": True, "registered": known})
            if not self.gate.workers[w].live:
                raise ProtocolError(self._dead_text(w), ErrorCode.FENCED)
        self.gate.seen(w, self._clock())

    def _dead_text(self, w: int) -> str:
        return (f"worker {w} was declared dead (silent for more than {self.settings.worker_timeout:.1f}s, "
                "or reported dead by the coordinator before it said HELLO here); send HELLO to rejoin at "
                "the current min_clock")

    # ------------------------------------------------------------ handlers
    def _on_hello(self, ident: bytes, msg: Message) -> None:
        w, inc = msg["w"], msg["inc"]
        try:
            plan = PartitionPlan.from_wire(msg["plan"])
        except ConfigError as exc:
            raise ProtocolError(f"HELLO carries an unusable plan: {exc}") from None
        if plan.hash != msg["ph"]:
            raise ProtocolError("HELLO plan hash differs from its plan", ErrorCode.PLAN_MISMATCH)
        if plan.num_servers != self.settings.num_servers:
            raise ProtocolError(f"plan is cut for {plan.num_servers} servers but this job has "
                                f"{self.settings.num_servers}", ErrorCode.PLAN_MISMATCH)
        try:
            self.gate.check_worker(w)
        except ConfigError as exc:
            raise ProtocolError(str(exc)) from None
        if self.plan is None:
            self._adopt(plan)
        else:
            proto.check_plan(msg, self.plan.hash)
        was_dead = not self.gate.workers[w].live
        new_inc = self.ledger.incarnation(w) != inc
        if new_inc:
            self.ledger.reset(w, inc)
        if new_inc or was_dead:  # what an earlier life of this worker left half-sent is void
            for key in [k for k in self._held if k[0] == w]:
                self._drop_held(key, "the worker said HELLO again", answer=False)
            for key in [k for k in self._refused if k[0] == w]:
                del self._refused[key]
        start = self.gate.join(w, inc, self._clock())
        claimed = msg.header.get("clk")
        if claimed is not None and claimed > start and not new_inc and self.settings.staleness != 0:
            # the same incarnation rejoining a restored server: its updates for the clocks
            # since the checkpoint were lost with the old server and will not come again
            self.gate.advance(w, claimed)
            start = claimed
        if was_dead or new_inc:
            start = self.rule.rejoin_clock(w, start)
        if was_dead:
            log.info("worker %d rejoined (incarnation %d) at clock %d", w, inc, start)
        lo, hi = plan.range_of(self.settings.rank)
        self._reply(ident, msg, {
            "rank": self.settings.rank, "lo": lo, "hi": hi, "ph": plan.hash,
            "step": self.optimizer.steps, "min_clock": self.gate.min_clock,
            "start_clock": start, "initialized": self._initialized, "sinc": self.incarnation,
            "staleness": staleness_to_wire(self.settings.staleness),
        })
        self._advance_time()

    def _adopt(self, plan: PartitionPlan) -> None:
        self._flush()   # allocating a large shard takes a while
        n = plan.size_of(self.settings.rank)
        self.plan = plan
        self.store = ShardStore(n, plan.frame_elems)
        spec = OptimizerSpec(**self.settings.optimizer_options)
        self.optimizer = ShardOptimizer(self.store.weights, spec, plan.frame_elems)
        if self.settings.staleness == 0:
            self.rule = SyncAveraging(self.gate, self._apply_step, n, plan.frame_elems)
        else:
            self.rule = ApplyOnArrival(self.gate, self._apply_step, lambda w, clk: self._push_scale)
            if self.settings.dc_lambda > 0:
                self.dc = DelayCompensation(self.settings.dc_lambda, n, plan.frame_elems)
        log.info("server %d adopted %s; holds %d elements", self.settings.rank, plan.describe(), n)

    def _apply_step(self, grads, lr_scale: float) -> None:
        if self.store.n >= FLUSH_BEFORE_STEP_ELEMS:
            self._flush()
        if self.store.n >= PARALLEL_MIN_ELEMS and self._pool.threads > 1:
            per = max(1, PIECE_ELEMS // self.plan.frame_elems)
            pieces = -(-len(grads) // per)

            def piece(i: int) -> None:
                a = i * per
                self.optimizer.step(grads[a:a + per], lr_scale, first=a, count=i == 0)
            self._pool.run(piece, pieces)
        else:   # the gradients were checked against the plan on arrival (and sums are of those)
            self.optimizer.step_whole(grads, lr_scale)
        self.store.version += 1
        n = self.settings.checkpoint_every_steps
        if n and self.settings.checkpoint_dir and self.optimizer.steps % n == 0:
            # written once the request that made this step is recorded and answered
            # (_checkpoint_if_due), never from inside it
            self._ckpt_due = "every %d steps" % n

    # ------------------------------------------------------------ durability
    def checkpoint(self, reason: str) -> str:
        """Write an atomic checkpoint of everything needed to resume; return its folder."""
        if not self.settings.checkpoint_dir or not self._initialized:
            return ""
        self._flush()   # writing may take seconds: answered requests are not kept waiting
        t0 = time.monotonic()
        arrays = {"weights": self.store.array}
        opt = self.optimizer.state_dict()
        for kind, buf in opt["buffers"].items():
            arrays[f"opt-{kind}"] = buf.numpy()
        meta = {
            "plan": self.plan.to_wire(), "plan_hash": self.plan.hash,
            "optimizer": {k: v for k, v in opt.items() if k != "buffers"},
            "clocks": [st.clock for st in self.gate.workers],
            "live": [st.live for st in self.gate.workers],
            "incarnations": [st.incarnation for st in self.gate.workers],
            "ledger": self.ledger.state(), "server_incarnation": self.incarnation,
            "endpoint": self.endpoint, "settings": describe(self.settings),
            "min_clock": self.gate.min_clock, "reason": reason,
        }
        path = ckpt.write(self.settings.checkpoint_dir, self.settings.rank, self.optimizer.steps, arrays, meta,
                          keep=self.settings.checkpoint_keep, pause_between_files=self.settings.checkpoint_pause)
        dt = time.monotonic() - t0
        self.stats["checkpoints"] += 1
        self.stats["checkpoint_seconds"] += dt
        self._last_ckpt_time = self._clock()
        self._last_ckpt_step = self.optimizer.steps
        self.last_checkpoint = path
        log.info("server %d checkpoint at step %d (%s) in %.3fs: %s", self.settings.rank,
                 self.optimizer.steps, reason, dt, path)
        return path

    def _restore(self, found: tuple | None = None) -> None:
        found = found or ckpt.read_latest(self.settings.checkpoint_dir, self.settings.rank, check=check_restorable)
        if found is None:
            raise ConfigError(f"--restore: no complete checkpoint in "
                              f"{ckpt.server_dir(self.settings.checkpoint_dir, self.settings.rank)}")
        path, meta, arrays = found
        try:
            self._restore_from(path, meta, arrays)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:   # well-formed but odd values
            raise ConfigError(f"--restore: checkpoint {path} cannot be used: {type(exc).__name__}: {exc}") from None

    def _restore_from(self, path: str, meta: dict, arrays: dict) -> None:
        plan = PartitionPlan.from_wire(meta["plan"])
        if plan.num_servers != self.settings.num_servers or meta["rank"] != self.settings.rank:
            raise ConfigError(f"checkpoint {path} belongs to server {meta['rank']} of {plan.num_servers}, "
                              f"not {self.settings.rank} of {self.settings.num_servers}")
        if len(meta["clocks"]) != self.settings.num_workers:
            raise ConfigError(f"checkpoint {path} has {len(meta['clocks'])} workers, the job {self.settings.num_workers}")
        self._adopt(plan)
        weights = arrays["weights"]
        if weights.shape != (self.store.n,):
            raise ConfigError(f"checkpoint {path}: weights hold {weights.shape}, the plan {self.store.n}")
        self.store.set_from([weights[a:b] for a, b in plan.frames_of(self.settings.rank)])
        opt = dict(meta["optimizer"])
        opt["buffers"] = {k[4:]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("opt-")}
        self.optimizer.load_state_dict(opt)
        self.gate.load(meta["clocks"], meta["incarnations"], self._clock())
        self.ledger.load(meta["ledger"])
        self._last_ckpt_step = self.optimizer.steps
        self.restored_from = path
        self.stats["restored_from"] = path
        self.stats["restored_step"] = self.optimizer.steps
        log.info("server %d restored step %d from %s (new incarnation %#x)", self.settings.rank,
                 self.optimizer.steps, path, self.incarnation)

    def _on_init(self, ident: bytes, msg: Message) -> None:
        self._need_plan(msg)
        self._check_worker(msg["w"], msg["inc"], msg.header.get("to"))
        proto.check_layout(msg, self.store.n, self.plan.frame_elems)
        chunks = proto.payload(msg)
        if self.store.initialized:
            self._reply(ident, msg, {"accepted": False})
            return
        if not all(np.isfinite(c).all() for c in chunks):
            self.stats["nonfinite"] += 1
            raise ProtocolError("INIT weights hold NaN or infinity", ErrorCode.NONFINITE)
        self.store.set_from(chunks)
        log.info("server %d initialized by worker %d", self.settings.rank, msg["w"])
        self._reply(ident, msg, {"accepted": True})
        self._advance_time()

    def _on_push(self, ident: bytes, msg: Message) -> None:
        self._need_plan(msg)
        head = msg.header
        w, seq, clk = head["w"], head["seq"], head["clk"]
        self._check_worker(w, head["inc"], head.get("to"))
        off, segs = self._check_segment(msg)
        if self.ledger.applied(w, seq):
            self.stats["dup_pushes"] += 1
            self._reply(ident, msg, {"step": self.optimizer.steps, "dup": True})
            return
        if not self._initialized:
            raise ProtocolError("no weights yet: INIT before pushing", ErrorCode.NOT_INITIALIZED)
        key = (w, seq)
        refused = self._refused.get(key) if self._refused else None
        if refused is not None:   # the rest of a refused push; once all of it is seen, forget it
            refused[1].add(off)
            if len(refused[1]) >= refused[0]:
                del self._refused[key]
            raise ProtocolError(f"push {seq} of worker {w} was refused: a segment held NaN or "
                                "infinity; not applied", ErrorCode.NONFINITE)
        arrays = _writable_views(msg)
        if not all_finite(arrays):
            self.stats["nonfinite"] += 1
            text = f"gradient from worker {w} at clock {clk} holds NaN or infinity; not applied"
            if segs > 1:
                held = self._held.pop(key, None)
                self._refuse(key, segs, {off, *(held.parts if held else ())})
                for wid, wrid in (held.waiters if held else ()):
                    self._error(wid, wrid, ErrorCode.NONFINITE, text)
            raise ProtocolError(text, ErrorCode.NONFINITE)
        grads = [torch.from_numpy(a) for a in arrays]
        if segs == 1:
            self._apply_push(w, seq, clk, head["tick"], head.get("rs"), grads, [(ident, msg.rid)])
            return
        # a segment of a longer push: hold it (its frames, no copy) until the last one is in
        self.stats["segments"] += 1
        held = self._held.get(key)
        if held is None:
            mine = [k for k in self._held if k[0] == w]
            if len(mine) >= MAX_HELD_PER_WORKER:  # a client that never completes its pushes
                self._drop_held(min(mine, key=lambda k: k[1]), "too many incomplete pushes")
            held = self._held[key] = _HeldPush(segs, clk, msg["tick"], msg.header.get("rs"))
        elif (segs, clk, msg["tick"]) != (held.segs, held.clk, held.tick):
            self._drop_held(key, "segments disagree")
            raise ProtocolError(f"segment at {off} of push {seq} (worker {w}) says segs={segs}, clk={clk}, "
                                f"tick={msg['tick']}; its first segment said segs={held.segs}, "
                                f"clk={held.clk}, tick={held.tick}")
        n = msg["n"]
        if off in held.parts:    # a resent segment: not held twice, but answered too
            if (ident, msg.rid) not in held.waiters and len(held.waiters) < 4 * held.segs:
                held.waiters.append((ident, msg.rid))
            return
        for o, (m, _) in held.parts.items():
            if o < off + n and off < o + m:
                self._drop_held(key, "segments overlap")
                raise ProtocolError(f"segment [{off}, {off + n}) of push {seq} (worker {w}) overlaps "
                                    f"segment [{o}, {o + m})")
        held.parts[off] = (n, grads)
        held.waiters.append((ident, msg.rid))
        held.elems += n
        if held.elems < self.store.n:
            return
        del self._held[key]
        if len(held.parts) != held.segs:
            for wid, wrid in held.waiters:
                self._error(wid, wrid, ErrorCode.MALFORMED,
                            f"push {seq} of worker {w} came in {len(held.parts)} segments, "
                            f"announced {held.segs}")
            return
        grads = [g for o in sorted(held.parts) for g in held.parts[o][1]]
        self._apply_push(w, seq, held.clk, held.tick, held.rs, grads, held.waiters)

    def _apply_push(self, w: int, seq: int, clk: int, tick: bool, rs, grads: list,
                    waiters: list) -> None:
        """Apply one whole, checked push and answer every request that carried a part of it."""
        staleness = max(0, self.optimizer.steps - rs) if rs is not None else None
        self._push_scale = 1.0 / max(1, staleness or 0) if self.settings.staleness_lr else 1.0
        if self.dc is not None and rs is not None:
            grads = self.dc.compensate(w, rs, grads, self.store.weights)
        try:
            self.rule.on_push(w, clk, grads, tick)
        except ProtocolError as exc:
            if len(waiters) == 1:
                raise
            for ident, rid in waiters:
                self._error(ident, rid, exc.code, str(exc))
            return
        if staleness is not None:
            hist = self.stats["update_staleness"]
            key = str(min(staleness, 64))
            hist[key] = hist.get(key, 0) + 1
        self.ledger.record(w, seq)
        self.stats["pushes"] += 1
        head = {"step": self.optimizer.steps, "dup": False}
        for ident, rid in waiters:
            self._send(ident, proto.encode(MsgType.PUSH_OK, head, (), rid))
        self._advance_time()

    def _check_segment(self, msg: Message) -> tuple[int, int]:
        """``(off, segs)`` of a PUSH, its frame layout checked (a whole range is ``(0, 1)``)."""
        head = msg.header
        if "segs" not in head and "off" not in head:   # the whole range in one message
            proto.check_layout(msg, self.store.n, self.plan.frame_elems)
            return 0, 1
        off, segs = head.get("off", 0), head.get("segs", 1)
        n, total, fe = msg["n"], self.store.n, self.plan.frame_elems
        if segs < 1:
            raise ProtocolError(f"PUSH.segs must be >= 1, got {segs}")
        if segs == 1 and off != 0:
            raise ProtocolError(f"PUSH.off={off} needs segs > 1 (a single message carries the whole range)")
        if segs > 1:
            if off % fe or off >= total or n == 0 or off + n > total or (n % fe and off + n != total):
                raise ProtocolError(
                    f"PUSH segment [{off}, {off + n}) does not fit this range of {total} elements cut "
                    f"in frames of {fe} (segments start on a frame and end on one or at the range's end)")
            if segs > -(-total // fe):
                raise ProtocolError(f"PUSH.segs={segs} exceeds the {-(-total // fe)} frames of this range")
            proto.check_layout(msg, n, fe, off)
        else:
            proto.check_layout(msg, total, fe)
        return off, segs

    def _refuse(self, key: tuple[int, int], segs: int, seen: set) -> None:
        if len(seen) < segs:
            self._refused[key] = (segs, seen)
        while len(self._refused) > 64:
            self._refused.pop(next(iter(self._refused)))

    def _drop_held(self, key: tuple[int, int], why: str, answer: bool = True) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        self.stats["held_dropped"] += 1
        if answer:
            for ident, rid in held.waiters:
                self._error(ident, rid, ErrorCode.OVERLOADED,
                            f"push {key[1]} of worker {key[0]} was dropped incomplete ({why}); send it again")

    def _on_pull(self, ident: bytes, msg: Message) -> None:
        self._need_plan(msg)
        w, clk = msg["w"], msg["clk"]
        self.stats["pulls"] += 1
        if msg.header.get("obs"):
            # an observer (ps-stat, tests, export tools): reads whatever is there, is no worker
            if not self._initialized:
                raise ProtocolError("no weights yet", ErrorCode.NOT_INITIALIZED)
            self._reply_pull(ident, msg.rid, clk, -1)
            return
        self._check_worker(w)
        st = self.gate.workers[w]
        if not st.live:
            raise ProtocolError(self._dead_text(w), ErrorCode.FENCED)
        if self._initialized and self.gate.qualifies(clk):
            self._reply_pull(ident, msg.rid, clk, w)
            return
        if self.gate.parked >= self.settings.max_parked:
            raise ProtocolError(f"{self.gate.parked} reads already parked", ErrorCode.OVERLOADED)
        dl = msg.header.get("dl")
        wait = self.settings.read_timeout if dl is None else min(dl / 1000.0, self.settings.read_timeout)
        self.gate.park((ident, msg.rid, clk, w), clk, self._clock() + wait)
        self.stats["parked_total"] += 1

    def _reply_pull(self, ident: bytes, rid: int, clk: int, w: int) -> None:
        frames = self.store.reply_frames()
        header = {"rid": rid, "min_clock": self.gate.min_clock, "step": self.optimizer.steps,
                  "n": self.store.n}
        if self.dc is not None and w >= 0:
            self.dc.remember(w, self.optimizer.steps, self.store.weights)
        self._send(ident, proto.encode(MsgType.PULL_OK, header, frames))

    def _on_clock(self, ident: bytes, msg: Message) -> None:
        if self.rule is None:
            raise ProtocolError("no plan yet: send HELLO first", ErrorCode.NO_PLAN)
        w = msg["w"]
        self._check_worker(w, msg["inc"], msg.header.get("to"))
        self.rule.on_clock(w, msg["clk"])
        self._reply(ident, msg, {"min_clock": self.gate.min_clock})
        self._advance_time()

    def _on_heartbeat(self, ident: bytes, msg: Message) -> None:
        w = msg["w"]
        self._check_worker(w, msg["inc"])
        self._reply(ident, msg, {"min_clock": self.gate.min_clock, "sinc": self.incarnation})

    def _on_stats(self, ident: bytes, msg: Message) -> None:
        self._reply(ident, msg, {"stats": self.snapshot_stats()})

    def _checkpoint_if_due(self) -> None:
        """Write the periodic checkpoint an update step asked for (``checkpoint_every_steps``).

        Called by the loop once the requests of a wake-up were handled: the push is
        in the push record (so the checkpoint holds it as applied) and its
        reply is out before the files are written; a failure is logged and
        counted (``_checkpoint_safely``), never returned to that request.
        """
        reason, self._ckpt_due = self._ckpt_due, None
        if reason:
            self._checkpoint_safely(reason)

    def _checkpoint_safely(self, reason: str) -> str:
        try:
            return self.checkpoint(reason)
        except Exception as exc:  # a full disk must not kill the server; say so loudly
            log.error("server %d: checkpoint (%s) failed: %s", self.settings.rank, reason, exc)
            self.stats["errors"]["CHECKPOINT_FAILED"] = self.stats["errors"].get("CHECKPOINT_FAILED", 0) + 1
            return ""

    def _on_checkpoint(self, ident: bytes, msg: Message) -> None:
        if not self.settings.checkpoint_dir:
            raise ProtocolError("this server has no --checkpoint-dir", ErrorCode.MALFORMED)
        if not self._initialized:
            raise ProtocolError("nothing to checkpoint yet: no weights", ErrorCode.NOT_INITIALIZED)
        try:
            path = self.checkpoint("requested")
        except OSError as exc:
            raise ProtocolError(f"checkpoint failed: {exc}", ErrorCode.INTERNAL) from None
        self._reply(ident, msg, {"path": path, "step": self.optimizer.steps})

    def _on_echo(self, ident: bytes, msg: Message) -> None:
        self._reply(ident, msg, {"n": msg["n"], "time": time.time()}, msg.frames)

    def _on_shutdown(self, ident: bytes, msg: Message) -> None:
        log.info("server %d: shutdown requested", self.settings.rank)
        self._reply(ident, msg, {})
        self._stopping = True

    _handlers = {
        MsgType.HELLO: _on_hello, MsgType.INIT: _on_init, MsgType.PUSH: _on_push,
        MsgType.PULL: _on_pull, MsgType.CLOCK: _on_clock, MsgType.HEARTBEAT: _on_heartbeat,
        MsgType.STATS: _on_stats, MsgType.SHUTDOWN: _on_shutdown, MsgType.ECHO: _on_echo,
        MsgType.CHECKPOINT: _on_checkpoint,
    }

    def snapshot_stats(self) -> dict:
        """A msgpack-friendly view of the server's state and counters."""
        s = dict(self.stats)
        s["errors"] = dict(s["errors"])
        s["update_staleness"] = dict(s["update_staleness"])
        if self.dc is not None:
            s["dc"] = self.dc.stats()
        s["dead_workers"] = list(s["dead_workers"])
        s["curve"] = self.keys is not None
        if self.auth is not None:
            s["auth"] = self.auth.statistics()
        s.update({
            "rank": self.settings.rank, "endpoint": self.endpoint, "sinc": self.incarnation,
            "plan_hash": self.plan.hash if self.plan else None,
            "elements": self.store.n if self.store else 0,
            "initialized": self._initialized,
            "step": self.optimizer.steps if self.optimizer else 0,
            "min_clock": self.gate.min_clock,
            "clocks": [st.clock for st in self.gate.workers],
            "live": [st.live for st in self.gate.workers],
            "parked": self.gate.parked,
            "snapshot_bytes": self.store.snapshots.nbytes() if self.store else 0,
            "last_checkpoint": self.last_checkpoint,
            "settings": describe(self.settings),
        })
        return s


#: What a server's checkpoint must hold to be restored (``checkpoint`` writes all of it).
RESTORE_META = ("rank", "plan", "optimizer", "clocks", "incarnations", "ledger")


def check_restorable(path: str, meta: dict, arrays: dict) -> None:
    """CheckpointError unless ``meta`` and ``arrays`` hold what a restore needs.

    A checkpoint that fails this is skipped like a corrupt one (``ckpt.read_latest``),
    so ``--restore`` falls back to the one written before it.
    """
    missing = [k for k in RESTORE_META if k not in meta] + ([] if "weights" in arrays else ["weights.npy"])
    if missing:
        raise ckpt.CheckpointError(f"{path}: the checkpoint lacks {', '.join(missing)}")
    try:
        PartitionPlan.from_wire(meta["plan"])
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ckpt.CheckpointError(f"{path}: the checkpoint's plan is unusable ({exc})") from None
    if not isinstance(meta["optimizer"], dict) or not isinstance(meta["ledger"], dict) \
            or not isinstance(meta["clocks"], list) or not isinstance(meta["incarnations"], list):
        raise ckpt.CheckpointError(f"{path}: the checkpoint's optimizer, ledger, clocks or incarnations "
                                   "have the wrong type")


def all_finite(arrays: list[np.ndarray]) -> bool:
    """Whether every element is finite.

    Every frame gets one summing pass first, and only a sum that is not finite
    (NaN, infinity, or an overflow) gets the closer look, element by element: a
    sum is finite only if every element is.  A short frame sums its squares
    (numpy's dot: a third of the time of numpy's element check at 4 KiB; an
    overflow there warns unless numpy's ``over`` error is ignored, as the
    server's loop does), a long one its elements (torch: several times faster
    per element than numpy's check).
    """
    for a in arrays:
        if a.size > FINITE_BY_NUMPY_MAX_ELEMS:
            if math.isfinite(float(torch.from_numpy(a).sum())):
                continue
        elif math.isfinite(a.dot(a)):
            continue   # a sum of squares is finite only if every element is (overflow: look closer)
        if not np.isfinite(a).all():
            return False
    return True


def _writable_views(msg: Message) -> list[np.ndarray]:
    """fp32 views of received frames (ZeroMQ's receive buffers; no copy)."""
    out = []
    for f in msg.frames:
        arr = np.frombuffer(f, dtype=proto.WIRE_DTYPE)   # a zmq.Frame is a writable buffer
        if not arr.flags.writeable:  # bytes: copy once rather than warn on every step
            arr = arr.copy()
        out.append(arr)
    return out


def _peek_rid(frames: list) -> int:
    """Best-effort request id of an undecodable message, to address the error reply."""
    if not frames or len(frames[0]) > proto.DEFAULT_LIMITS.max_header_bytes:
        return 0
    try:
        head = msgpack.unpackb(frames[0].bytes if isinstance(frames[0], zmq.Frame) else frames[0],
                               raw=False, max_str_len=1024, max_bin_len=1024,
                               max_array_len=64, max_map_len=64, max_ext_len=0)
        rid = head.get("rid", 0) if isinstance(head, dict) else 0
        return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 1 << 64 else 0
    except Exception:
        return 0
