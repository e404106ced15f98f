"""The SSP gate: which reads may be served now, as pure logic.

No sockets, no threads, no wall clock: time is passed in by the caller
(``now`` in seconds from any monotonic origin), so every decision can be
tested table-driven and instantly.

Definitions (docs/PROTOCOL.md and DESIGN.md, "Consistency"):

* ``clock[w]`` is the number of clocks of worker ``w`` whose pushes this
  server has fully applied.
* ``min_clock`` is the minimum of ``clock[w]`` over live workers.  Workers
  the job expects but that have not said HELLO yet count as live at clock 0,
  so nobody runs ahead of a worker that is still starting -- until the
  coordinator declares one dead (:meth:`SSPGate.declare_dead`: it died while
  starting), which takes it out of ``min_clock``.
* A read at worker clock ``c`` qualifies when ``min_clock >= c - s``.
  ``s = 0`` is BSP, ``s = math.inf`` is ASP.
* A read that does not qualify is parked with a deadline; it is released the
  moment ``min_clock`` advances far enough, or expires with the list of the
  workers that hold it back.
* A worker that joined and then stays silent longer than ``worker_timeout``
  is dead: it leaves the ``min_clock`` computation.  A worker that (re)joins
  with a new incarnation, or after it was declared dead (by either rule),
  starts at the ``min_clock`` of the others.

:meth:`SSPGate.poll` runs after every request, so it answers "nothing to do"
in constant time when nothing is parked (or no clock moved and no parked
deadline passed) and no worker can have timed out yet.  For that the gate
keeps two bounds up to date, so change the clock table only through its
methods (``join``, ``seen``, ``advance``, ``park``, ``load``, ``declare_dead``), never by
writing to ``workers`` directly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from common.config import parse_staleness
from common.errors import ConfigError


@dataclasses.dataclass
class WorkerState:
    clock: int = 0
    incarnation: int = -1      # -1: never said HELLO
    last_seen: float = 0.0
    live: bool = True


@dataclasses.dataclass
class ParkedRead:
    token: Any
    need: int | float          # min_clock the read needs
    deadline: float            # absolute, same origin as ``now``


@dataclasses.dataclass(frozen=True)
class Expired:
    token: Any
    need: int | float
    blockers: tuple[int, ...]


class SSPGate:
    """Clock table, liveness and parked reads of one server."""

    def __init__(self, staleness, num_workers: int, worker_timeout: float, now: float = 0.0):
        self.staleness = parse_staleness(staleness)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"num_workers must be a positive integer, got {num_workers!r}")
        if (isinstance(worker_timeout, bool) or not isinstance(worker_timeout, (int, float))
                or not worker_timeout > 0):
            raise ConfigError(f"worker_timeout must be > 0 seconds, got {worker_timeout!r}")
        self.num_workers = num_workers
        self.worker_timeout = float(worker_timeout)
        self.workers = [WorkerState(last_seen=now) for _ in range(num_workers)]
        self._parked: list[ParkedRead] = []
        # What lets poll() skip its scans (each a bound: stale only in the safe direction):
        self._oldest_seen = math.inf   # <= last_seen of every live worker that said HELLO
        self._first_deadline = math.inf  # <= deadline of every parked read
        self._moved = True             # clocks or membership changed, or a read was parked ...
        self._ready = None             # ... or ``ready`` changed, since the last full poll

    # -- membership --------------------------------------------------------
    def check_worker(self, w: int) -> None:
        if type(w) is not int or not 0 <= w < self.num_workers:   # a bool is not a worker id
            raise ConfigError(f"worker id {w!r} is outside this job's [0, {self.num_workers})")

    def join(self, w: int, incarnation: int, now: float) -> int:
        """Register worker ``w`` (HELLO); return the clock it starts at.

        The same incarnation saying HELLO again (a retry) changes nothing.  A
        new incarnation, or a worker that was declared dead, restarts at the
        ``min_clock`` of the other live workers (its own clock if none).
        """
        self.check_worker(w)
        st = self.workers[w]
        st.last_seen = now
        self._oldest_seen = min(self._oldest_seen, now)
        self._moved = True
        if st.incarnation == incarnation and st.live:
            return st.clock
        if st.incarnation == -1 and st.live:
            st.incarnation = incarnation  # first HELLO
            return st.clock
        others = [o.clock for i, o in enumerate(self.workers) if i != w and o.live]
        st.clock = min(others) if others else st.clock
        st.incarnation = incarnation
        st.live = True
        return st.clock

    def seen(self, w: int, now: float) -> None:
        self.workers[w].last_seen = now
        if now < self._oldest_seen:  # only if time went back (tests) or nobody is checked yet
            self._oldest_seen = now

    def declare_dead(self, ws, now: float) -> list[int]:
        """The coordinator declared workers ``ws`` dead; return those that leave ``min_clock`` now.

        A worker leaves if it never said HELLO here, or said it and has been
        silent here for longer than ``worker_timeout`` as of ``now`` (the same
        test as :meth:`poll`'s); one this server still hears from stays, the
        coordinator's verdict notwithstanding (it may be old, or the worker
        may only have lost its way to the coordinator).  A worker already
        dead is not returned again.  Like a timed-out worker, one that leaves
        starts at the others' ``min_clock`` when it (or its replacement)
        says HELLO.  Unknown ids are a ConfigError and change nothing.
        """
        ws = list(ws)
        for w in ws:
            self.check_worker(w)
        died = []
        for w in ws:
            st = self.workers[w]
            if st.live and (st.incarnation == -1 or now - st.last_seen > self.worker_timeout):
                st.live = False
                died.append(w)
        if died:
            self._moved = True
        return died

    def load(self, clocks, incarnations, now: float) -> None:
        """Take the clock table of a checkpoint: every worker live, last seen at ``now``."""
        for st, clk, inc in zip(self.workers, clocks, incarnations):
            st.clock, st.incarnation, st.last_seen, st.live = clk, inc, now, True
        self._oldest_seen = min(self._oldest_seen, now)
        self._moved = True

    def live_workers(self) -> list[int]:
        return [i for i, st in enumerate(self.workers) if st.live]

    def dead_workers(self) -> list[int]:
        return [i for i, st in enumerate(self.workers) if not st.live]

    # -- clocks ------------------------------------------------------------
    @property
    def min_clock(self) -> int:
        """Minimum applied clock over live workers (-1 when none is live)."""
        live = [st.clock for st in self.workers if st.live]
        return min(live) if live else -1

    def advance(self, w: int, clocks_applied: int) -> None:
        """Record that ``clocks_applied`` clocks of ``w`` are applied (never goes back)."""
        st = self.workers[w]
        if clocks_applied > st.clock:
            st.clock = clocks_applied
            self._moved = True

    def need(self, clk: int) -> int | float:
        return clk - self.staleness

    def qualifies(self, clk: int) -> bool:
        """May a read at worker clock ``clk`` be served now?"""
        if self.staleness == math.inf:
            return True
        return self.min_clock >= clk - self.staleness

    def blockers(self, need) -> tuple[int, ...]:
        """Live workers whose clock is below ``need``."""
        return tuple(i for i, st in enumerate(self.workers) if st.live and st.clock < need)

    # -- parked reads ------------------------------------------------------
    def park(self, token: Any, clk: int, deadline: float) -> None:
        self._parked.append(ParkedRead(token, self.need(clk), deadline))
        self._first_deadline = min(self._first_deadline, deadline)
        self._moved = True

    @property
    def parked(self) -> int:
        return len(self._parked)

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`poll` may have something to do."""
        times = [p.deadline for p in self._parked]
        times += [st.last_seen + self.worker_timeout for st in self.workers
                  if st.live and st.incarnation != -1]
        return min(times) if times else None

    def poll(self, now: float, ready: bool = True,
             seen_until: float | None = None) -> tuple[list[Any], list[Expired], list[int]]:
        """Apply time and clocks: ``(released tokens, expired reads, newly dead workers)``.

        ``ready=False`` (the server has no weights yet) releases nothing but
        still expires and detects.  ``seen_until`` (default ``now``) is the
        last time every message that had arrived was handled: a worker is dead
        only if it was silent for ``worker_timeout`` before that, so a server
        busy with one long request never declares its queued-up peers dead.
        """
        horizon = now if seen_until is None else min(now, seen_until)
        if self._idle(now, ready, horizon):
            return [], [], []
        died = []
        for i, st in enumerate(self.workers):
            if st.live and st.incarnation != -1 and horizon - st.last_seen > self.worker_timeout:
                st.live = False
                died.append(i)
        released, expired, keep = [], [], []
        mc = self.min_clock
        for p in self._parked:
            if ready and (mc >= p.need or self.staleness == math.inf):
                released.append(p.token)
            elif now >= p.deadline:
                expired.append(Expired(p.token, p.need, self.blockers(p.need)))
            else:
                keep.append(p)
        self._parked = keep
        self._first_deadline = min((p.deadline for p in keep), default=math.inf)
        self._oldest_seen = min((st.last_seen for st in self.workers if st.live and st.incarnation != -1),
                                default=math.inf)
        self._moved, self._ready = False, ready
        return released, expired, died

    def _idle(self, now: float, ready: bool, horizon: float) -> bool:
        """Whether a full :meth:`poll` would find nothing to do (decided in constant time).

        No worker dies: ``horizon - last_seen`` is largest for the oldest
        ``last_seen`` (float subtraction is monotonic), the same test as the
        scan's.  No parked read is released: nothing that decides it (clocks,
        membership, the set of reads, ``ready``) changed since the last full
        poll, which released every read it could.  None expires: ``now`` is
        before the earliest deadline.
        """
        if horizon - self._oldest_seen > self.worker_timeout:
            return False
        return not self._parked or (not self._moved and ready == self._ready
                                    and now < self._first_deadline)

    def drain(self) -> list[Any]:
        """Remove and return every parked token (at shutdown)."""
        tokens = [p.token for p in self._parked]
        self._parked = []
        return tokens
