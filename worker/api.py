"""The training API: a few lines turn a PyTorch training loop into a zps worker.

    from worker import join

    model = Net()
    with join(model) as ps:                    # coordinator from ZPS_COORDINATOR
        data = ps.shard(dataset)               # this worker's part of the data
        for x, y in loader_over(data):
            with ps.step():                    # read weights (SSP cache or pull), zero grads
                loss = loss_fn(model(x), y)
                loss.backward()                # on exit: push gradients, tick the clock
            if ps.clock >= ps.steps:
                break

``join`` registers with the coordinator, learns the job (servers, staleness,
optimizer) and binds the model's parameters to flat buffers.  Leaving the
``with`` block waits for the last pushes, meets the other workers at a
barrier and tells the coordinator this worker is done.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Iterator

import torch

from common.config import ClientSettings, JobSettings, check_timeout
from common.control import CoordinatorLink
from common.errors import ClosedError, ConfigError, DeadlineExceeded, ErrorCode, JobStopped, RemoteError, ZPSError
from common.security import CurveKeys
from worker.binding import check_model
from worker.session import PSWorker, ReadRecord
from worker.workloads import partition

log = logging.getLogger("zps.worker")


class Session:
    """One worker's membership in a job, with its bound model."""

    def __init__(self, link: CoordinatorLink, job: JobSettings, rank: int, worker: PSWorker):
        self.link = link
        self.job = job
        self.rank = rank
        self.worker = worker
        self.model = worker.model
        self.last_read: ReadRecord | None = None
        self._finished = False
        self._finishing = False
        self._met = False      # the "finished" barrier is behind us (a retried finish skips it)
        #: the live workers that met at the "finished" barrier (None until then, or if it failed)
        self.finished_with: list[int] | None = None
        self._stopped_at: int | None = None   # the clock at which the job was shut down under us
        self._interrupted = False             # interrupt() was called (a stop signal)

    @property
    def world_size(self) -> int:
        return self.job.num_workers

    @property
    def clock(self) -> int:
        return self.worker.clock

    @property
    def steps(self) -> int:
        return self.job.steps

    @property
    def staleness(self):
        return self.worker.staleness

    def shard(self, dataset) -> torch.utils.data.Subset:
        """This worker's contiguous part of ``dataset``."""
        return torch.utils.data.Subset(dataset, list(partition(len(dataset), self.rank, self.world_size)))

    def read(self, timeout: float | None = None) -> ReadRecord:
        self.last_read = self._call(self.worker.read, timeout)
        return self.last_read

    def zero_grad(self) -> None:
        self._call(self.worker.zero_grad)

    def push(self) -> None:
        self._call(self.worker.push)

    # ------------------------------------------------------------ the job ending under us
    def _on_state(self, state: str, _dead: list) -> None:
        """Coordinator heartbeat: a job that ended while this worker still trains was shut down."""
        if state in ("done", "stopped") and not self._finishing and self._stopped_at is None:
            self._stopped_at = self.worker.clock
            log.warning("worker %d: the job was shut down at clock %d; stopping", self.rank, self._stopped_at)
            self.worker.client.close()   # whatever waits on a server stops waiting now

    def _job_stopped(self) -> JobStopped:
        return JobStopped(f"the job was shut down (ps-ctl shutdown) while worker {self.rank} was at clock "
                          f"{self._stopped_at}, before its {self.steps or 'last'} steps were done")

    def interrupt(self) -> None:
        """Stop the training loop from another thread (a stop signal's watcher).

        Whatever the loop waits on from the servers or the coordinator ends
        now, and its next ``read``, ``push`` or ``step`` raises
        ``KeyboardInterrupt``. Pushes already sent are not waited for.
        """
        self._interrupted = True
        self.link.interrupt()
        self.worker.client.close()

    def _call(self, fn, *args):
        """``fn(*args)``, with the errors of a job shut down under us told as ``JobStopped``."""
        if self._interrupted:
            raise KeyboardInterrupt
        if self._stopped_at is not None:
            raise self._job_stopped()
        try:
            return fn(*args)
        except (ClosedError, DeadlineExceeded, RemoteError) as exc:
            if self._interrupted:
                raise KeyboardInterrupt from exc
            if isinstance(exc, RemoteError) and exc.code != ErrorCode.SHUTTING_DOWN:
                raise
            if self._stopped_at is None and not isinstance(exc, ClosedError):
                try:   # a server stopping, or silent: ask the coordinator whether the job is over
                    if self.link.status(timeout=5)["state"] in ("done", "stopped"):
                        self._on_state("done", [])
                except ZPSError:
                    pass
            if self._stopped_at is not None:
                raise self._job_stopped() from exc
            raise

    @contextlib.contextmanager
    def step(self) -> Iterator[ReadRecord]:
        """read + zero_grad on entry; push + tick on a normal exit."""
        rec = self.read()
        self.zero_grad()
        yield rec
        self.push()

    @property
    def finalizer(self) -> bool:
        """Whether this worker is the one to fetch and save the final weights.

        The lowest rank among the live workers that met at the "finished"
        barrier (so a job whose worker 0 was lost still saves its model);
        worker 0 before the barrier, or if it failed.
        """
        met = self.finished_with
        return self.rank == (min(met) if met else 0)

    def finish(self, result: dict | None = None, timeout: float | None = None,
               before_done=None) -> None:
        """Wait for outstanding pushes, meet the other workers, report done.

        ``before_done()`` runs after every worker arrived and before this one
        reports done (the servers stay up until every worker reported), e.g.
        to fetch and save the final weights (on the :attr:`finalizer` only).
        If it raises (a push not acknowledged in time, say), calling it again
        takes up where it failed.
        """
        if self._finished:
            return
        if self._stopped_at is not None:
            raise self._job_stopped()
        self._finishing = True
        t = self.job.read_timeout if timeout is None else timeout
        self.worker.flush(t)
        if not self._met:
            try:
                self.finished_with = self.link.barrier("finished", t)
            except ZPSError as exc:
                log.warning("worker %d: finish barrier failed: %s", self.rank, exc)
            self._met = True
        if before_done is not None:
            before_done()
        self.link.done(result or {"clock": self.clock})
        self._finished = True

    def close(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout`` seconds) for unacknowledged pushes, then disconnect."""
        try:
            if self._stopped_at is None and not self._interrupted:
                self.worker.close(timeout)
            else:   # the servers are gone: nothing left to wait for
                self.worker.client.close()
        finally:
            self.link.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()


def join(model: torch.nn.Module, coordinator: str | None = None, rank: int | None = None,
         timeout: float = 300.0, settings: ClientSettings | None = None,
         curve_keys: str | None = None) -> Session:
    """Register ``model`` as a worker of the job run by ``coordinator``.

    ``coordinator`` defaults to ``$ZPS_COORDINATOR``; ``rank`` to
    ``$ZPS_WORKER_RANK`` or any free rank; ``curve_keys`` (the CurveZMQ key
    folder, see docs/SECURITY.md) to ``$ZPS_CURVE_KEYS`` or plain text.
    Blocks until every server has registered (at most ``timeout`` seconds).
    """
    url = coordinator or os.environ.get("ZPS_COORDINATOR", "")
    check_timeout(timeout, "join", allow_none=False)
    if rank is None:
        raw = os.environ.get("ZPS_WORKER_RANK", "-1")
        try:
            rank = int(raw)
        except ValueError:
            raise ConfigError(f"ZPS_WORKER_RANK must be a worker rank (an integer, -1 for any), "
                              f"got {raw!r}") from None
    # the model is checked before this worker takes a rank: a job never waits for a
    # worker that could not have joined
    check_model(model)
    if curve_keys is None:
        curve_keys = (settings.curve_keys if settings is not None else "") or os.environ.get("ZPS_CURVE_KEYS", "")
    keys = CurveKeys.from_setting(curve_keys, connect=True)
    link = CoordinatorLink(url, "worker", timeout=timeout, keys=keys)
    try:
        got, job = link.register(rank)
        servers = link.addresses(timeout)
        session: list[Session] = []   # the heartbeat thread tells it once it exists

        def on_state(state: str, dead: list) -> None:
            if session:
                session[0]._on_state(state, dead)
        link.start_heartbeats(job.heartbeat_interval, on_state)
        cs = settings or ClientSettings(read_timeout=job.read_timeout, heartbeat_interval=job.heartbeat_interval,
                                        frame_elems=job.frame_elems, faults=job.faults,
                                        fault_seed=job.seed * 1000 + max(got, 0))
        cs = dataclasses.replace(cs, curve_keys=curve_keys)
        pw = PSWorker(model, servers, got, settings=cs, incarnation=link.inc)
        pw.start(timeout)
    except BaseException as exc:
        # registered but not started: give the rank back now rather than when the
        # coordinator declares this process dead (which would end a one-worker job)
        link.leave(f"{type(exc).__name__}: {exc}")
        link.close()
        raise
    log.info("worker %d of %d joined (%d servers, staleness %s)", got, job.num_workers, len(servers), pw.staleness)
    session.append(Session(link, job, got, pw))
    return session[0]
