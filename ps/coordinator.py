"""``Coordinator``: membership, ranks, address book, barriers and liveness of one job.

The coordinator is the one address a user must know.  Servers and workers
REGISTER with it and get a rank and the job's settings; workers ask it for
the servers' ADDRESSES (answered once every server registered); everyone
sends BEATs, and a role silent for longer than ``job.worker_timeout`` is
declared dead and logged.  A worker that registers again (a restart) gets
its old rank back with a new incarnation.  BARRIERs are answered once every
live worker arrived.  When every live worker said DONE the job state turns
to ``done``; servers learn it from their next BEAT and stop; the coordinator
stops when every server has said DONE (or after ``done_grace`` seconds).

It is never on the data path: it holds no parameters.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

import zmq

from common import protocol as proto
from common.config import CoordinatorSettings
from common.errors import ErrorCode, ProtocolError
from common.protocol import Message, MsgType
from common.control import VERSION
from common.netaddr import probe, unreachable_message
from common.security import Authenticator, CurveKeys
from common.transport import bound_endpoint, make_router

log = logging.getLogger("zps.coordinator")

MAX_POLL_SECONDS = 0.5
ROLES = ("server", "worker")


@dataclasses.dataclass
class Member:
    rank: int
    registered: bool = False
    inc: int = -1
    endpoint: str = ""
    host: str = ""
    pid: int = 0
    last_seen: float = 0.0
    live: bool = True
    done: bool = False
    told: bool = False      # has heard (in a heartbeat reply) that the job is over
    left: bool = False      # gave its rank back (LEAVE) and nobody took it since
    restarts: int = 0
    lost: int = 0
    result: dict = dataclasses.field(default_factory=dict)


class Coordinator:
    """The control plane of one job."""

    def __init__(self, settings: CoordinatorSettings, ctx: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.job = settings.job
        self._clock = clock
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        now = clock()
        self.members = {
            "server": [Member(r, last_seen=now) for r in range(self.job.num_servers)],
            "worker": [Member(r, last_seen=now) for r in range(self.job.num_workers)],
        }
        self.state = "waiting"          # waiting -> running -> done -> stopped
        self.started = now
        self._done_at: float | None = None
        self._parked_addr: list[tuple[bytes, int, float]] = []
        self._parked_reg: list[tuple[bytes, Message, float]] = []
        self._barriers: dict[str, dict] = {}
        self.keys = CurveKeys.from_setting(settings.curve_keys, serve=True)
        # the ZAP handler runs before the socket binds: no client is ever let in unchecked
        self.auth = Authenticator(self.ctx, self.keys).start() if self.keys is not None else None
        try:
            self.sock = make_router(self.ctx, settings.bind, settings.transport, self.keys)
        except BaseException:
            if self.auth is not None:
                self.auth.stop(timeout=5.0)
            raise
        self.endpoint = bound_endpoint(self.sock)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.events: list[dict] = []  # membership history, for the summary

    # ------------------------------------------------------------ lifecycle
    def run_in_background(self) -> "Coordinator":
        self._thread = threading.Thread(target=self.serve, name="zps-coordinator", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def shutdown(self, timeout: float = 5.0) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        self._close()
        return True

    def _close(self) -> None:
        if not self.sock.closed:
            self.sock.close(linger=int(self.settings.transport.linger * 1000))
            if self.auth is not None:
                self.auth.stop(timeout=5.0)
            if self._own_ctx:
                self.ctx.term()

    # ------------------------------------------------------------ loop
    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        log.info("coordinator on %s: %d servers, %d workers, staleness %s", self.endpoint,
                 self.job.num_servers, self.job.num_workers, self.job.staleness)
        try:
            while not self._stop.is_set() and self.state != "stopped":
                events = dict(poller.poll(int(MAX_POLL_SECONDS * 1000)))
                if self.sock in events:
                    for _ in range(256):
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                self._advance(self._clock())
        finally:
            self._stopped.set()
            if self._thread is None:
                self._close()
            log.info("coordinator stopped (%s)", self.state)

    def _event(self, kind: str, role: str, rank: int, **extra) -> None:
        rec = {"t": round(self._clock() - self.started, 3), "event": kind, "role": role, "rank": rank, **extra}
        self.events.append(rec)

    def _retry_registrations(self, now: float) -> None:
        parked, self._parked_reg = self._parked_reg, []
        for ident, msg, deadline in parked:
            m = self._member(msg["role"], msg["want"])
            if not m.live or m.done:
                self._on_register(ident, msg)
            elif now >= deadline:
                self._error(ident, msg.rid, ErrorCode.OVERLOADED,
                            f"{msg['role']} rank {msg['want']} is held by a live process (pid {m.pid} on "
                            f"{m.host}); stop it first")
            else:
                self._parked_reg.append((ident, msg, deadline))

    def _advance(self, now: float) -> None:
        timeout = self.job.worker_timeout
        for role in ROLES:
            for m in self.members[role]:
                if m.registered and m.live and not m.done and now - m.last_seen > timeout:
                    m.live = False
                    m.lost += 1
                    log.warning("%s %d (%s pid %d) missed heartbeats for %.1fs: declared dead",
                                role, m.rank, m.host, m.pid, timeout)
                    self._event("lost", role, m.rank)
        if self._parked_reg:
            self._retry_registrations(now)
        if self.state == "waiting" and all(m.registered for r in ROLES for m in self.members[r]):
            self.state = "running"
            log.info("all %d servers and %d workers registered", self.job.num_servers, self.job.num_workers)
        if self._all_servers():
            for ident, rid, _ in self._parked_addr:
                self._send_addresses(ident, rid)
            self._parked_addr = []
        else:
            keep = []
            for ident, rid, dl in self._parked_addr:
                if now >= dl:
                    missing = [m.rank for m in self.members["server"] if not m.registered]
                    self._error(ident, rid, ErrorCode.STALE_TIMEOUT,
                                f"servers {missing} have not registered in time", {"missing_servers": missing})
                else:
                    keep.append((ident, rid, dl))
            self._parked_addr = keep
        for name in list(self._barriers):
            self._check_barrier(name, now)
        workers = self.members["worker"]
        if self.state in ("waiting", "running") and any(m.registered for m in workers) and all(
                m.done or (m.registered and not m.live) or m.left for m in workers):
            if all(not m.done for m in workers):
                log.error("every worker was lost; the job is over")
            self.state = "done"
            self._done_at = now
            log.info("every live worker finished; telling servers to stop")
        if self.state == "done":
            servers = self.members["server"]
            # a worker still training (the job was shut down under it) learns it from a
            # heartbeat reply: stay until each live one has had one
            untold = [m for m in workers if m.registered and m.live and not m.done and not m.told]
            if (all(m.done or not m.live or not m.registered for m in servers) and not untold) or \
                    now - self._done_at > self.settings.done_grace:
                self.state = "stopped"

    def _all_servers(self) -> bool:
        return all(m.registered for m in self.members["server"])

    # ------------------------------------------------------------ dispatch
    def _send(self, ident: bytes, frames: list) -> None:
        try:
            self.sock.send_multipart([ident, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise

    def _error(self, ident: bytes, rid: int, code: ErrorCode, message: str, detail: dict | None = None):
        self._send(ident, proto.error_frames(rid, code, message, detail))

    def _reply(self, ident: bytes, msg: Message, header: dict) -> None:
        self._send(ident, proto.encode(proto.REPLY_TO[msg.type], {"rid": msg.rid, **header}))

    def _handle(self, frames: list) -> None:
        ident, body = frames[0], frames[1:]
        msg = None
        try:
            msg = proto.decode(body)
            handler = self._handlers.get(msg.type)
            if handler is None:
                raise ProtocolError(f"{msg.type.name} is not a coordinator request", ErrorCode.UNKNOWN_TYPE)
            handler(self, ident, msg)
        except ProtocolError as exc:
            self._error(ident, msg.rid if msg is not None else 0, exc.code, str(exc))
        except Exception as exc:
            log.exception("coordinator: internal error")
            self._error(ident, msg.rid if msg is not None else 0, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _member(self, role: str, rank: int) -> Member:
        if role not in ROLES:
            raise ProtocolError(f"role must be one of {ROLES}, got {role!r}")
        group = self.members[role]
        if not 0 <= rank < len(group):
            raise ProtocolError(f"{role} rank {rank} is outside [0, {len(group)})")
        return group[rank]

    def _on_register(self, ident: bytes, msg: Message) -> None:
        role, want, inc = msg["role"], msg["want"], msg["inc"]
        if role not in ROLES:
            raise ProtocolError(f"role must be one of {ROLES}, got {role!r}")
        if role == "server" and not msg["endpoint"]:
            raise ProtocolError("a server must register with the endpoint workers should connect to")
        if role == "server" and self.settings.reach_timeout > 0:
            # fail fast: a server nobody can reach would only show up as workers timing out.
            # Blocks this loop for at most reach_timeout; a reachable endpoint answers in a round trip.
            ok, _, why = probe(msg["endpoint"], self.settings.reach_timeout)
            if not ok:
                text = unreachable_message(role, msg["want"], msg["host"], msg["pid"], msg["endpoint"], why)
                log.error("%s", text)
                raise ProtocolError(text, ErrorCode.UNREACHABLE)
        group = self.members[role]
        if want >= 0:
            m = self._member(role, want)
            if m.registered and m.live and m.inc != inc and not m.done:
                # the previous holder may have just died: wait (bounded) until it is declared dead
                deadline = self._clock() + 2 * self.job.worker_timeout + 5
                self._parked_reg.append((ident, msg, deadline))
                log.info("%s rank %d asked for by pid %d on %s is still held by pid %d on %s; "
                         "waiting up to %.0fs for its heartbeats to stop", role, want, msg["pid"], msg["host"],
                         m.pid, m.host, deadline - self._clock())
                return
        else:
            m = next((x for x in group if x.registered and x.inc == inc), None) \
                or next((x for x in group if not x.registered), None) \
                or next((x for x in group if not x.live and not x.done), None)
            if m is None:
                raise ProtocolError(
                    f"all {len(group)} {role} ranks are taken by live processes; to replace one that just "
                    f"died, ask for its rank (--rank R: answered once it is declared dead, within "
                    f"{self.job.worker_timeout:.0f}s of its last heartbeat) or retry after that",
                    ErrorCode.OVERLOADED)
        rejoin = m.registered and m.inc != inc
        if rejoin:
            m.restarts += 1
            m.done = False
            log.info("%s %d re-registered (new incarnation, pid %d on %s)", role, m.rank, msg["pid"], msg["host"])
            self._event("rejoined", role, m.rank)
        elif not m.registered:
            self._event("registered", role, m.rank)
        m.registered, m.live, m.inc, m.left = True, True, inc, False
        m.endpoint, m.host, m.pid = msg["endpoint"], msg["host"], msg["pid"]
        m.last_seen = self._clock()
        self._reply(ident, msg, {"rank": m.rank, "job": self.job.to_wire()})
        self._advance(self._clock())

    def _on_addresses(self, ident: bytes, msg: Message) -> None:
        if self._all_servers():
            self._send_addresses(ident, msg.rid)
            return
        dl = msg.header.get("dl", int(self.settings.register_timeout * 1000))
        self._parked_addr.append((ident, msg.rid, self._clock() + dl / 1000.0))

    def _send_addresses(self, ident: bytes, rid: int) -> None:
        servers = [m.endpoint for m in self.members["server"]]
        self._send(ident, proto.encode(MsgType.ADDRESSES_OK, {"rid": rid, "servers": servers}))

    def _on_barrier(self, ident: bytes, msg: Message) -> None:
        name, role, rank = msg["name"], msg["role"], msg["rank"]
        if role != "worker":
            raise ProtocolError(f"barriers are among workers; a {role} cannot join {name!r}")
        m = self._member(role, rank)
        m.last_seen = self._clock()
        b = self._barriers.setdefault(name, {"arrived": set(), "parked": []})
        b["arrived"].add(rank)
        dl = msg.header.get("dl", int(self.settings.register_timeout * 1000))
        b["parked"].append((ident, msg.rid, self._clock() + dl / 1000.0))
        self._check_barrier(name, self._clock())

    def _check_barrier(self, name: str, now: float) -> None:
        b = self._barriers[name]
        needed = {m.rank for m in self.members["worker"] if m.live and not m.left}
        if "members" in b or needed <= b["arrived"]:
            # the members are fixed when it first opens: one that arrives later (declared dead
            # meanwhile, then back) gets the same list, so all agree on who met (Session.finalizer)
            members = b.setdefault("members", sorted(b["arrived"] & needed))
            for ident, rid, _ in b["parked"]:
                self._send(ident, proto.encode(MsgType.BARRIER_OK, {"rid": rid, "members": members}))
            b["parked"] = []
            return
        keep = []
        for ident, rid, dl in b["parked"]:
            if now >= dl:
                missing = sorted(needed - b["arrived"])
                self._error(ident, rid, ErrorCode.STALE_TIMEOUT,
                            f"barrier {name!r}: workers {missing} did not arrive in time",
                            {"blockers": missing})
            else:
                keep.append((ident, rid, dl))
        b["parked"] = keep

    def _on_beat(self, ident: bytes, msg: Message) -> None:
        m = self._member(msg["role"], msg["rank"])
        if m.inc != msg["inc"]:
            raise ProtocolError(f"{msg['role']} {msg['rank']}: incarnation {msg['inc']} was replaced; "
                                "register again", ErrorCode.FENCED)
        m.last_seen = self._clock()
        if not m.live and not m.done:
            m.live = True
            log.info("%s %d is back after being declared dead", msg["role"], m.rank)
            self._event("back", msg["role"], m.rank)
        dead = [x.rank for x in self.members["worker"] if (x.registered and not x.live) or x.left]
        self._reply(ident, msg, {"state": self.state, "dead_workers": dead})
        if self.state in ("done", "stopped"):
            m.told = True
            self._advance(self._clock())

    def _on_done(self, ident: bytes, msg: Message) -> None:
        m = self._member(msg["role"], msg["rank"])
        if m.inc == msg["inc"]:
            m.done = True
            m.result = dict(msg["result"])
            self._event("done", msg["role"], m.rank)
        self._reply(ident, msg, {})
        self._advance(self._clock())

    def _on_leave(self, ident: bytes, msg: Message) -> None:
        """A worker whose start failed after it registered gives its rank back at once.

        A rank this incarnation was the first to hold is free again, as if never
        registered; one it took over from an earlier holder goes back to that
        holder's state, declared dead. Either way nobody waits for its heartbeats
        to stop, and a job whose only worker failed to start is not over.
        """
        role, rank, inc = msg["role"], msg["rank"], msg["inc"]
        if role != "worker":
            raise ProtocolError(f"only a worker can LEAVE (a {role}'s rank holds part of the job)")
        m = self._member(role, rank)
        left = m.registered and m.inc == inc and m.live and not m.done
        if left:
            log.info("worker %d (pid %d on %s) left before training: %s", rank, m.pid, m.host,
                     msg["why"] or "no reason given")
            if m.restarts:
                m.live = False
            else:
                m.registered, m.inc, m.endpoint, m.host, m.pid = False, -1, "", "", 0
                m.left = True   # reported with the dead: servers stop waiting for its first HELLO
            self._event("left", role, rank, why=msg["why"][:200])
        self._reply(ident, msg, {"left": left})
        self._advance(self._clock())

    def _on_status(self, ident: bytes, msg: Message) -> None:
        self._reply(ident, msg, {"status": self.status()})

    def _on_echo(self, ident: bytes, msg: Message) -> None:
        self._send(ident, proto.encode(MsgType.ECHO_OK, {"rid": msg.rid, "n": msg["n"], "time": time.time()},
                                       msg.frames))

    def _on_shutdown(self, ident: bytes, msg: Message) -> None:
        self._reply(ident, msg, {})
        if self.state in ("waiting", "running"):
            self.state = "done"
            self._done_at = self._clock()
            log.info("shutdown requested: telling servers to stop")

    _handlers = {
        MsgType.REGISTER: _on_register, MsgType.ADDRESSES: _on_addresses,
        MsgType.BARRIER: _on_barrier, MsgType.BEAT: _on_beat, MsgType.DONE: _on_done,
        MsgType.STATUS: _on_status, MsgType.SHUTDOWN: _on_shutdown, MsgType.ECHO: _on_echo,
        MsgType.LEAVE: _on_leave,
    }

    def status(self) -> dict:
        def view(m: Member) -> dict:
            return {"rank": m.rank, "registered": m.registered, "live": m.live, "done": m.done,
                    "endpoint": m.endpoint, "host": m.host, "pid": m.pid, "restarts": m.restarts,
                    "lost": m.lost}
        return {"state": self.state, "endpoint": self.endpoint, "job": self.job.to_wire(),
                "time": time.time(), "version": VERSION,
                "uptime": round(self._clock() - self.started, 3),
                "servers": [view(m) for m in self.members["server"]],
                "workers": [view(m) for m in self.members["worker"]],
                "events": self.events[-200:],
                "curve": self.keys is not None,
                **({"auth": self.auth.statistics()} if self.auth is not None else {})}
