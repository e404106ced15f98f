"""``CoordinatorLink``: a role's connection to the coordinator.

Blocking request/reply calls (register, addresses, barrier, done, status)
on one DEALER socket used only by the calling thread, each bounded by a
timeout; heartbeats on a second socket owned by a background thread, which
reports the job state (``running``/``done``) and the workers the
coordinator declared dead to a callback.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from typing import Callable

import zmq

from common import protocol as proto
from common.config import JobSettings, check_timeout
from common.errors import ClosedError, DeadlineExceeded, ProtocolError, ZPSError, remote_error
from common.protocol import Message, MsgType
from common.security import CurveKeys
from common.transport import connect, make_dealer, send_by

log = logging.getLogger("zps.control")

_STOP_SLICE = 0.2   # seconds: how soon a call's wait notices the link closing or interrupted

VERSION = "0.1.0"


def request_once(endpoint: str, msg_type: MsgType, header: dict | None = None, timeout: float = 10.0,
                 ctx: zmq.Context | None = None, secure=None) -> Message:
    """One request to any zps endpoint (server or coordinator) on a fresh socket."""
    check_timeout(timeout, f"{msg_type.name} to {endpoint}", allow_none=False)
    own = ctx is None
    ctx = ctx or zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if secure is not None:
            secure(sock)
        connect(sock, endpoint)
        deadline = time.monotonic() + timeout   # the send's wait for a connection counts against it
        if not send_by(sock, proto.encode(msg_type, {"rid": 1, **(header or {})}), deadline) \
                or not sock.poll(max(0, int((deadline - time.monotonic()) * 1000)) + 1):
            raise DeadlineExceeded(f"{endpoint} did not answer {msg_type.name} within {timeout:.0f}s")
        reply = proto.decode(sock.recv_multipart())
        if reply.type == MsgType.ERROR:
            raise remote_error(reply["code"], reply["msg"], endpoint, reply.header.get("detail"))
        return reply
    finally:
        sock.close(linger=0)
        if own:
            ctx.term()


class CoordinatorLink:
    """Talks to the coordinator for one role process."""

    def __init__(self, url: str, role: str, ctx: zmq.Context | None = None, timeout: float = 30.0,
                 keys: CurveKeys | None = None):
        """``keys``: CURVE keys holding a client pair (None: plain text)."""
        if not url:
            raise ValueError("no coordinator address: pass --coordinator tcp://HOST:PORT or set ZPS_COORDINATOR")
        self.url = url
        self.role = role
        self.timeout = timeout
        self.keys = keys
        if keys is not None:
            keys.require_client()
        self.rank = -1
        self.inc = int.from_bytes(os.urandom(4), "little") | 1
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self._rid = itertools.count(1)
        self._sock = self._dealer()
        self._beat_thread: threading.Thread | None = None
        self._beat_stop = threading.Event()
        self._cut = threading.Event()   # interrupt(): every call of the caller's ends now
        self.state = "waiting"
        self.dead_workers: list[int] = []
        self._closed = False

    def _dealer(self) -> zmq.Socket:
        return make_dealer(self.ctx, self.url, keys=self.keys)

    def call(self, msg_type: MsgType, header: dict | None = None, timeout: float | None = None,
             sock: zmq.Socket | None = None, stop: threading.Event | None = None) -> Message:
        """Send one request and wait for its reply; typed errors on failure.

        ``stop`` (default: the one :meth:`interrupt` sets): once set, the wait
        ends within a fraction of a second with ``ClosedError`` (so that
        ``close`` need not wait out a heartbeat to a coordinator that is gone,
        and a stop signal need not wait out a barrier).
        """
        if self._closed:
            raise ClosedError("coordinator link is closed")
        stop = self._cut if stop is None else stop
        self._check_stop(stop, msg_type)
        sock = sock or self._sock
        t = self.timeout if timeout is None else timeout
        rid = next(self._rid)
        deadline = time.monotonic() + t
        frames = proto.encode(msg_type, {"rid": rid, **(header or {})})
        while not send_by(sock, frames, min(deadline, time.monotonic() + _STOP_SLICE)):
            self._check_stop(stop, msg_type)
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"could not send {msg_type.name} to coordinator {self.url} within {t:.0f}s: "
                                       "no connection to it (is it running and reachable, and do the CURVE "
                                       "keys of both sides match?)")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"coordinator {self.url} did not answer {msg_type.name} within {t:.0f}s; "
                                       "is it running and reachable from this host?")
            if not sock.poll(int(min(left, _STOP_SLICE) * 1000) + 1):
                self._check_stop(stop, msg_type)
                continue
            try:
                reply = proto.decode(sock.recv_multipart())
            except ProtocolError as exc:
                raise ProtocolError(f"bad reply from coordinator {self.url}: {exc}") from None
            if reply.rid != rid:
                continue  # a late reply to an earlier, timed-out call
            if reply.type == MsgType.ERROR:
                raise remote_error(reply["code"], reply["msg"], self.url, reply.header.get("detail"))
            return reply

    def interrupt(self) -> None:
        """End the wait of a call in progress (another thread's) and refuse later calls, with ``ClosedError``.

        Heartbeats go on until :meth:`close`.
        """
        self._cut.set()

    @staticmethod
    def _check_stop(stop: threading.Event, msg_type: MsgType) -> None:
        if stop.is_set():
            raise ClosedError(f"coordinator link closed or interrupted: {msg_type.name} not answered")

    def register(self, want: int = -1, endpoint: str = "", timeout: float | None = None) -> tuple[int, JobSettings]:
        head = {"role": self.role, "want": want, "inc": self.inc, "endpoint": endpoint,
                "host": socket.gethostname(), "pid": os.getpid(), "version": VERSION}
        reply = self.call(MsgType.REGISTER, head, timeout)
        self.rank = reply["rank"]
        return self.rank, JobSettings.from_wire(reply["job"])

    def addresses(self, timeout: float | None = None) -> list[str]:
        t = self.timeout if timeout is None else timeout
        reply = self.call(MsgType.ADDRESSES, {"dl": max(1, int(t * 1000))}, t + 5)
        return list(reply["servers"])

    def barrier(self, name: str, timeout: float | None = None) -> list[int]:
        t = self.timeout if timeout is None else timeout
        reply = self.call(MsgType.BARRIER, {"name": name, "role": self.role, "rank": self.rank,
                                            "dl": max(1, int(t * 1000))}, t + 5)
        return list(reply["members"])

    def done(self, result: dict | None = None, timeout: float | None = None) -> None:
        self.call(MsgType.DONE, {"role": self.role, "rank": self.rank, "inc": self.inc,
                                 "result": result or {}}, timeout)

    def leave(self, why: str, timeout: float = 5.0) -> bool:
        """Give the rank back after a failed start (best effort); whether the coordinator took it."""
        if self.rank < 0 or self._closed:
            return False
        try:
            return bool(self.call(MsgType.LEAVE, {"role": self.role, "rank": self.rank, "inc": self.inc,
                                                  "why": why[:1000]}, timeout)["left"])
        except (ZPSError, zmq.ZMQError) as exc:
            log.warning("could not give rank %d back to coordinator %s: %s", self.rank, self.url, exc)
            return False

    def status(self, timeout: float | None = None) -> dict:
        return self.call(MsgType.STATUS, {}, timeout)["status"]

    # ------------------------------------------------------------ heartbeats
    def start_heartbeats(self, interval: float, on_state: Callable[[str, list], None] | None = None) -> None:
        """Send a BEAT every ``interval`` seconds from a background thread."""
        def run():
            sock = self._dealer()
            try:
                while not self._beat_stop.wait(interval):
                    try:
                        reply = self.call(MsgType.BEAT, {"role": self.role, "rank": self.rank, "inc": self.inc},
                                          max(interval * 3, 2.0), sock=sock, stop=self._beat_stop)
                    except DeadlineExceeded:
                        log.warning("coordinator %s did not answer a heartbeat", self.url)
                        sock.close(linger=0)
                        sock = self._dealer()
                        continue
                    except Exception as exc:  # fenced or closed: report and keep trying
                        if self._beat_stop.is_set():
                            break   # the link is closing: the call was cut short on purpose
                        log.warning("heartbeat to coordinator failed: %s", exc)
                        continue
                    self.state = reply["state"]
                    self.dead_workers = list(reply["dead_workers"])
                    if on_state is not None:
                        on_state(self.state, self.dead_workers)
            finally:
                sock.close(linger=0)

        self._beat_thread = threading.Thread(target=run, name=f"zps-beat-{self.role}", daemon=True)
        self._beat_thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._beat_stop.set()
        stuck = False
        if self._beat_thread is not None:
            self._beat_thread.join(10)
            stuck = self._beat_thread.is_alive()
        self._closed = True
        self._sock.close(linger=500)
        if stuck:   # its socket is still open: ctx.term() would wait for ever
            log.error("the heartbeat thread did not stop within 10s; leaving its socket to the process's exit")
        elif self._own_ctx:
            self.ctx.term()
