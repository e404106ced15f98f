"""``PSWorker``: one worker's side of bounded-staleness training.

Per iteration the training loop does::

    worker.read()        # weights for the current clock: SSP cache or pull
    worker.zero_grad()   # waits until the previous push has left the gradient buffer
    loss.backward()
    worker.push()        # gradients tagged with the clock, sent asynchronously; tick

``read`` serves the cached weights while their stamp (the servers'
``min_clock`` when they were read) satisfies ``stamp >= clock - s``; otherwise
it waits (up to ``read_timeout``) for a pull the servers answer once the
slowest worker catches up.  With ``refresh="eager"`` a pull for the next
clock is sent right after each push, so fresh weights usually arrive while
the next iteration's forward pass runs; ``"lazy"`` pulls only when the cache
no longer qualifies.  Every read records its clock, staleness and wait time.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from typing import Sequence

import torch
import zmq

from common.config import ClientSettings, check_timeout, staleness_from_wire
from common.errors import ConfigError, ErrorCode, RemoteError, ZPSError
from worker.binding import ModelBinding
from worker.client import PSClient, PullHandle, PushHandle

log = logging.getLogger("zps.worker")


@dataclasses.dataclass(frozen=True)
class ReadRecord:
    """What one read saw."""

    clock: int
    staleness: int          # clock minus the stamp the weights were served with
    wait_seconds: float     # time the read blocked
    pulled: bool            # new weights were installed by this read
    stamp: int              # servers' min_clock when the weights were read
    step: int               # sum of the servers' update steps at that time


class PSWorker:
    """A model bound to a parameter-server job."""

    def __init__(self, model: torch.nn.Module, servers: Sequence[str], worker_id: int, *,
                 settings: ClientSettings | None = None, incarnation: int | None = None,
                 ctx: zmq.Context | None = None):
        self.settings = settings or ClientSettings()
        self.binding = ModelBinding(model, len(servers), self.settings.frame_elems)
        self.client = PSClient(servers, worker_id, incarnation, self.settings, ctx)
        self.worker_id = worker_id
        self.model = model
        self.clock = 0
        self.staleness: int | float = 0
        self.records: list[ReadRecord] = []
        self._stamp = -(1 << 62)  # nothing installed yet
        self._step = 0
        self._read_steps: list[int] | None = None
        self._pull: PullHandle | None = None
        self._pull_until = 0.0    # when the servers give up on self._pull (its deadline there)
        self._pushes: collections.deque[PushHandle] = collections.deque()
        self.started = False
        self.rejoins = 0
        self.stats = {"pushes_acked": 0, "pushes_fenced": 0}

    @property
    def plan(self):
        return self.binding.plan

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float | None = None) -> "PSWorker":
        """Register with every server, offer initial weights, learn the start clock.

        If that fails the client is closed (its thread and sockets with it).
        """
        check_timeout(timeout)
        self.client.start()
        try:
            replies = self.client.hello(self.plan, timeout)
            bounds = {r["staleness"] for r in replies}
            if len(bounds) != 1:
                raise ConfigError(f"servers disagree on the staleness bound: {sorted(bounds)}")
            staleness = staleness_from_wire(bounds.pop())
            if staleness == math.inf and self.settings.refresh == "lazy":
                raise ConfigError("refresh='lazy' pulls only when the cached weights are too stale, which "
                                  "under staleness inf they never are: this worker would never see an "
                                  "update. Use refresh='eager' (the default) with staleness inf")
            self.staleness = staleness
            self.clock = max(r["start_clock"] for r in replies)
            self.client.init(self.binding.params_host(), timeout)
        except BaseException:
            self.client.close()
            raise
        self.started = True
        log.info("worker %d joined %d servers at clock %d (staleness %s)", self.worker_id,
                 len(replies), self.clock, self.staleness)
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Wait for outstanding pushes (bounded by ``timeout``), then disconnect."""
        try:
            if self.started:
                self.flush(timeout)
        finally:
            self.client.close()

    def _need_start(self) -> None:
        if not self.started:
            raise ZPSError("PSWorker is not started: call start() (or use it as a context manager) first")

    def __enter__(self) -> "PSWorker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ iteration
    def _qualifies(self, clock: int) -> bool:
        return self.staleness == math.inf or self._stamp >= clock - self.staleness

    def _pull_now(self, clock: int, timeout: float | None = None) -> None:
        """Send a pull for ``clock``; the servers park it for ``timeout`` at most."""
        t = self.settings.read_timeout if timeout is None else timeout
        self._pull = self.client.pull(clock, t)
        self._pull_until = time.monotonic() + t

    def _take_pull(self, timeout: float | None) -> None:
        """Install the pull in flight; it is dropped even if it failed (the next read asks anew)."""
        handle, self._pull = self._pull, None
        self._install(handle, timeout)

    def _install(self, handle: PullHandle, timeout: float | None) -> None:
        replies = handle.wait(timeout)
        self.binding.install(replies)
        self._stamp = min(m["min_clock"] for m in replies)
        self._read_steps = [m["step"] for m in replies]
        self._step = sum(self._read_steps)

    def read(self, timeout: float | None = None) -> ReadRecord:
        """Make the model's weights valid for the current clock; record the read.

        A server that restarted (from a checkpoint) fences the requests meant
        for its previous incarnation; the worker then says HELLO again and
        reads anew (up to 3 times per read).
        """
        for attempt in range(4):
            try:
                return self._read(timeout)
            except RemoteError as exc:
                if not _rejoinable(exc) or attempt == 3:
                    raise
                self._pull = None
                self._rejoin(exc)
        raise AssertionError("unreachable")

    def _read(self, timeout: float | None) -> ReadRecord:
        self._need_start()
        check_timeout(timeout)
        self._raise_push_errors()
        c = self.clock
        t0 = time.monotonic()
        pulled = False
        if self._pull is not None and self._pull.done():
            pulled = True
            self._take_pull(0)
        budget = self.settings.read_timeout if timeout is None else timeout
        deadline = t0 + budget
        while not self._qualifies(c):
            if self._pull is not None and self._pull.clock >= c and self._pull_until > deadline + 0.5:
                # the pull sent ahead (after the last push) is parked on the servers for longer
                # than this read may wait: ask again with this read's deadline, so the servers'
                # STALE_TIMEOUT, naming the workers that hold the read back, comes in time
                self._pull = None
            if self._pull is None or self._pull.clock < c:
                if self._pull is not None:  # an older pull still in flight: let it land first
                    pulled = True
                    self._take_pull(max(0.0, deadline - time.monotonic()))
                    if self._qualifies(c):
                        break
                self._pull_now(c, max(0.001, deadline - time.monotonic()))
            pulled = True
            self._take_pull(max(0.0, deadline - time.monotonic()) + 5.0)
        rec = ReadRecord(c, c - self._stamp if self._stamp > -(1 << 61) else 0,
                         time.monotonic() - t0, pulled, self._stamp, self._step)
        self.records.append(rec)
        return rec

    def zero_grad(self) -> None:
        """Zero the flat gradients once the last push no longer needs them."""
        self._need_start()
        if self._pushes:
            self._pushes[-1].wait_released(self.settings.request_timeout)
        self.binding.zero_grad()

    def push(self, tick: bool = True) -> PushHandle:
        """Push the gradients tagged with the current clock; advance the clock if ``tick``."""
        self._need_start()
        grads = self.binding.grads_host()
        handle = self.client.push(grads, self.clock, tick, read_steps=self._read_steps)
        self._pushes.append(handle)
        while len(self._pushes) > self.settings.max_pushes_in_flight:
            self._settle(self._pushes.popleft(), self.settings.request_timeout)
        if tick:
            self.clock += 1
            if self._pull is None and (self.settings.refresh == "eager" or not self._qualifies(self.clock)):
                self._pull_now(self.clock)
        return handle

    def tick(self) -> None:
        """Complete the current clock without pushing."""
        self._need_start()
        self.client.clock(self.clock)
        self.clock += 1

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every push is acknowledged; raise the first push error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pushes:
            h = self._pushes.popleft()
            self._settle(h, None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _raise_push_errors(self) -> None:
        while self._pushes and self._pushes[0].done():
            self._settle(self._pushes.popleft(), 0)

    def _settle(self, handle: PushHandle, timeout: float | None) -> None:
        """Wait for one push's acknowledgements; rejoin if a server fenced us."""
        try:
            handle.wait(timeout)
            self.stats["pushes_acked"] += 1
        except RemoteError as exc:
            if not _rejoinable(exc):
                raise
            self.stats["pushes_fenced"] += 1
            self._rejoin(exc)

    def _rejoin(self, why: Exception) -> None:
        """A server declared this worker dead: register again and continue from its start clock."""
        for h in self._pushes:  # pushes after the fenced one: acknowledged or fenced too
            try:
                h.wait(self.settings.request_timeout)
                self.stats["pushes_acked"] += 1
            except RemoteError:
                self.stats["pushes_fenced"] += 1
        self._pushes.clear()
        replies = self.client.hello(self.plan, clock=self.clock)
        if not all(r["initialized"] for r in replies):
            # a server restarted without its checkpoint: offer our weights (first offer wins)
            self.client.init(self.binding.params_host())
        old = self.clock
        self.clock = max(self.clock, max(r["start_clock"] for r in replies))
        self._stamp = -(1 << 62)
        self.rejoins += 1
        log.warning("worker %d was fenced (%s); rejoined at clock %d (was %d)",
                    self.worker_id, why, self.clock, old)

    def fetch_weights(self, timeout: float | None = None) -> torch.Tensor:
        """Pull the newest weights regardless of staleness and install them."""
        self._need_start()
        check_timeout(timeout)
        if self._pull is not None:
            self._take_pull(timeout)
        h = self.client.pull(-(1 << 62) if self.staleness != math.inf else 0, timeout)
        self._install(h, timeout)
        return self.binding.flat


def _rejoinable(exc: RemoteError) -> bool:
    """Whether saying HELLO again answers ``exc``: a FENCED for a server restart or a
    declared death, not one saying that a newer process now holds this worker id (a
    HELLO would take the id back from it, and the two would take turns)."""
    return exc.code == ErrorCode.FENCED and not exc.detail.get("superseded")
