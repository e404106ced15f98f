"""``ps-doctor``: pre-flight checks of a zps job, run from one host.

From the host it runs on, the doctor checks:

==========  ===================================================================
port        each ``--bind`` this host would use can be bound now (address on
            this host, port free)
advertise   the address this host would advertise is not loopback/unspecified
            while peers are on other hosts (``common.netaddr``)
route       the address this host uses to reach the coordinator (information)
reach       the coordinator and every server endpoint accept a connection and
            speak ZeroMQ (``netaddr.probe``: refused / filtered / no route)
version     the coordinator runs this zps version and wire protocol
clock       the coordinator's and each server's clock is within ``--max-skew``
            of ours: skew = remote time - (send + receive) / 2, the round
            trip's half being the uncertainty
echo        round-trip time (best of a few empty ECHOs) and bandwidth (ECHO of
            ``--echo-mib`` MiB, the data travelling both ways) to each server
curve       the CURVE keys match (a pluggable check, ``skip`` without
            ``--curve-keys``)
==========  ===================================================================

It prints one table row per check, a verdict, and for each failure the fix;
it exits 0 when nothing failed (warnings and skips allowed), 1 otherwise, 2
on bad flags.  ``--all`` asks the coordinator for every server and checks
each; ``--server URL`` (repeatable) checks named ones.  ``ps-node --doctor``
runs the same checks from every host of a job before its role starts.

The checks are functions of a :class:`Doctor` holding one ZeroMQ context;
the clocks (wall and monotonic) are injected so skew logic is testable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import zmq

from common import netaddr
from common import protocol as proto
from common.errors import ErrorCode, ProtocolError, ZPSError
from common.protocol import MsgType


OK, FAIL, WARN, SKIP = "ok", "fail", "warn", "skip"
#: Elements per ECHO data frame: 1 MiB of fp32, like the data path's frames.
ECHO_FRAME_ELEMS = 1 << 18


@dataclasses.dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    check: str
    target: str
    status: str
    detail: str
    fix: str = ""
    values: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.status not in (OK, FAIL, WARN, SKIP):
            raise ValueError(f"status must be ok, fail, warn or skip, got {self.status!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ pure pieces
@dataclasses.dataclass(frozen=True)
class EchoSample:
    """One ECHO: wall-clock send and receive times here, the peer's time, the monotonic round trip."""

    sent: float
    remote: float
    received: float
    rtt: float


def clock_skew(sample: EchoSample) -> tuple[float, float]:
    """(skew, uncertainty) of the peer's clock against ours from one ECHO.

    The peer stamped its reply at some instant between our send and our
    receive; assuming the middle, skew = remote - (sent + received) / 2,
    wrong by at most half the round trip.
    """
    return sample.remote - (sample.sent + sample.received) / 2.0, sample.rtt / 2.0


def skew_check(target: str, samples: Sequence[EchoSample], bound: float) -> Check:
    """The clock row from a few ECHOs: the best (shortest round trip) sample decides."""
    if not samples:
        return Check("clock", target, SKIP, "no ECHO answered")
    best = min(samples, key=lambda s: s.rtt)
    skew, unc = clock_skew(best)
    values = {"skew_ms": round(skew * 1e3, 3), "uncertainty_ms": round(unc * 1e3, 3), "bound_ms": bound * 1e3}
    detail = f"skew {skew * 1e3:+.1f} ms (±{unc * 1e3:.1f}, bound {bound * 1e3:.0f} ms)"
    if abs(skew) - unc > bound:
        ahead = "ahead of" if skew > 0 else "behind"
        return Check("clock", target, FAIL, detail,
                     f"the clock of {target} is {abs(skew):.2f}s {ahead} this host's: run NTP/chrony "
                     "(e.g. `chronyc tracking`, `timedatectl set-ntp true`) on both hosts", values)
    return Check("clock", target, OK, detail, values=values)


def bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes per second each way for an ECHO of ``nbytes`` that took ``seconds`` there and back."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return 2.0 * nbytes / seconds


def verdict(checks: Iterable[Check]) -> tuple[bool, str]:
    """(passed, one line): passed unless some check failed."""
    checks = list(checks)
    counts = {s: sum(c.status == s for c in checks) for s in (OK, FAIL, WARN, SKIP)}
    parts = [f"{counts[OK]} ok"] + [f"{counts[s]} {n}" for s, n in ((WARN, "warning"), (SKIP, "skipped"))
                                    if counts[s]]
    if counts[FAIL]:
        return False, f"FAIL: {counts[FAIL]} of {len(checks)} checks failed ({', '.join(parts)})"
    return True, f"PASS: every check passed ({', '.join(parts)})"


def render(checks: Sequence[Check], title: str = "") -> str:
    """The table, the verdict and the fixes, as printed."""
    head = ("CHECK", "TARGET", "STATUS", "DETAIL")
    rows = [(c.check, c.target, c.status.upper(), c.detail) for c in checks]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = [title] if title else []
    for r in [head, *rows]:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
    ok, text = verdict(checks)
    lines.append("")
    lines.append("verdict: " + text)
    fixes = [c for c in checks if c.status == FAIL and c.fix]
    if fixes:
        lines.append("fixes:")
        lines += [f"  - {c.check} {c.target}: {c.fix}" for c in fixes]
    return "\n".join(lines)


# ------------------------------------------------------------------ CURVE (pluggable)
CurveCheck = Callable[[str | None, Sequence[tuple[str, str]], float], list[Check]]


def check_curve(keys_dir: str | None, endpoints: Sequence[tuple[str, str]], timeout: float) -> list[Check]:
    """Do this host's CURVE keys open a session with each endpoint?

    ``endpoints`` are (name, tcp://...) pairs.  Without ``keys_dir`` the
    check is skipped with a note.  With it, the keys are loaded
    (``common.security.CurveKeys``) and a CURVE client handshake is tried on
    each endpoint; a socket monitor tells a completed handshake from a
    refused one (wrong server key, or this host's key not in the allow-list).
    """
    if not keys_dir:
        return [Check("curve", "-", SKIP, "no --curve-keys given: traffic is neither encrypted nor "
                                           "authenticated (fine on a trusted network)")]
    try:
        from common import security
    except ImportError:
        return [Check("curve", keys_dir, SKIP, "this build has no CURVE support (common.security)")]
    try:
        keys = security.CurveKeys.load(keys_dir)
        keys.require_client()
    except ZPSError as exc:
        return [Check("curve", keys_dir, FAIL, "cannot use the key folder", str(exc))]
    out = []
    ctx = zmq.Context()
    try:
        for name, ep in endpoints:
            out.append(_curve_handshake(ctx, security, keys, name, ep, timeout))
    finally:
        ctx.destroy(linger=0)
    return out


def _curve_handshake(ctx, security, keys, name: str, endpoint: str, timeout: float) -> Check:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security.secure_client(sock, keys)
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        from zmq.utils.monitor import recv_monitor_message
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not mon.poll(int(left * 1000) + 1):
                return Check("curve", name, FAIL, f"no CURVE handshake with {endpoint} within {timeout:g}s",
                             f"{name} may run without CURVE while this host uses keys: give every role the "
                             "same --curve-keys folder")
            ev = recv_monitor_message(mon)["event"]
            if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return Check("curve", name, OK, f"CURVE handshake with {endpoint} succeeded "
                                                f"(client key {keys.client_name})")
            if ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return Check("curve", name, FAIL, f"{endpoint} refused client key {keys.client_name}",
                             f"copy authorized/{keys.client_name}.key to the allow-list of {name}'s host, "
                             "or use a client pair that is listed; then restart it")
            if ev in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                return Check("curve", name, FAIL, f"CURVE handshake with {endpoint} failed",
                             f"the server key differs from {keys.folder}/server.key, or {name} runs without "
                             "CURVE: copy server.key from the folder bin/ps-keygen wrote to every host")
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)


# ------------------------------------------------------------------ the doctor
class Doctor:
    """Runs the checks from this host against one job."""

    def __init__(self, coordinator: str = "", *, servers: Sequence[str] = (), all_servers: bool = False,
                 binds: Sequence[str] = (), advertise: str = "", interface: str = "",
                 curve_keys: str | None = None, curve_check: CurveCheck = check_curve,
                 timeout: float = 3.0, echo_bytes: int = 4 << 20, echo_reps: int = 3, rtt_reps: int = 5,
                 max_skew: float = 1.0, wallclock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if echo_bytes < 0 or echo_bytes % 4:
            raise ValueError(f"echo_bytes must be a non-negative multiple of 4, got {echo_bytes!r}")
        if max_skew <= 0:
            raise ValueError(f"max_skew must be > 0 seconds, got {max_skew!r}")
        self.coordinator = coordinator
        self.servers = list(servers)
        self.all_servers = all_servers
        self.binds = list(binds)
        self.advertise = advertise
        self.interface = interface
        self.curve_keys = curve_keys
        self.curve_check = curve_check
        self.timeout = timeout
        self.echo_bytes = echo_bytes
        self.echo_reps = max(1, echo_reps)
        self.rtt_reps = max(1, rtt_reps)
        self.max_skew = max_skew
        self.wallclock = wallclock
        self.monotonic = monotonic
        self._rid = 0

    # -------------------------------------------------------------- plumbing
    def _dealer(self, ctx: zmq.Context, endpoint: str) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if self.curve_keys:
            try:
                from common import security
                security.secure_client(s, security.CurveKeys.load(self.curve_keys))
            except (ImportError, ZPSError):
                pass  # the curve row reports why
        s.connect(endpoint)
        return s

    def _call(self, sock: zmq.Socket, msg_type: MsgType, header: dict, frames=()) -> proto.Message:
        self._rid += 1
        rid = self._rid
        sock.send_multipart(proto.encode(msg_type, {"rid": rid, **header}, frames), copy=False)
        deadline = self.monotonic() + self.timeout
        while True:
            left = deadline - self.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                raise TimeoutError(f"no {proto.REPLY_TO[msg_type].name} within {self.timeout:g}s")
            reply = proto.decode(sock.recv_multipart(copy=False))
            if reply.rid != rid:
                continue
            if reply.type == MsgType.ERROR:
                raise ProtocolError(reply["msg"], reply["code"])
            return reply

    def _echo(self, sock: zmq.Socket, nbytes: int = 0) -> EchoSample:
        n = nbytes // 4
        data = np.zeros(n, dtype=proto.WIRE_DTYPE)
        frames = [data[i:i + ECHO_FRAME_ELEMS] for i in range(0, n, ECHO_FRAME_ELEMS)]
        sent, t0 = self.wallclock(), self.monotonic()
        reply = self._call(sock, MsgType.ECHO, {"n": n}, frames)
        rtt, received = self.monotonic() - t0, self.wallclock()
        if reply["n"] != n:
            raise ProtocolError(f"ECHO_OK says {reply['n']} elements, {n} were sent")
        return EchoSample(sent, float(reply["time"]), received, rtt)

    # -------------------------------------------------------------- checks
    def local_checks(self) -> list[Check]:
        out = []
        binds = list(self.binds)
        if self.interface:
            try:
                addr = netaddr.interface_address(self.interface)
                out.append(Check("interface", self.interface, OK, f"address {addr}"))
                if not binds:
                    binds.append(netaddr.join_endpoint(addr, 0))
            except ZPSError as exc:
                out.append(Check("interface", self.interface, FAIL, "no such card or no address",
                                 str(exc)))
        for b in binds:
            ok, why = netaddr.port_free(b)
            out.append(Check("port", b, OK if ok else FAIL, why,
                             "" if ok else f"free the port or pick another (--bind tcp://ADDRESS:0 lets the "
                                           f"system pick); interfaces here: {netaddr.describe_interfaces()}"))
        remote = netaddr.peers_are_remote(self.coordinator)
        for b in binds if (remote or self.advertise) else ():
            host, port = netaddr.split_endpoint(b)
            adv = netaddr.join_endpoint(self.advertise or host, port)
            try:
                netaddr.check_advertisable(adv, remote)
                out.append(Check("advertise", adv, OK,
                                 "not loopback or unspecified: other hosts can use it" if remote
                                 else "every peer on this host"))
            except ZPSError as exc:
                out.append(Check("advertise", adv, FAIL, "loopback or unspecified while peers are remote",
                                 str(exc)))
        return out

    def peer_checks(self, ctx: zmq.Context, name: str, endpoint: str, measure: bool) -> list[Check]:
        """reach, clock and (for servers) echo rows for one endpoint."""
        ok, rtt, err = netaddr.probe(endpoint, self.timeout)
        if not ok:
            return [Check("reach", f"{name} {endpoint}", FAIL, err, self._reach_fix(name, endpoint, err))]
        rows = [Check("reach", f"{name} {endpoint}", OK, f"TCP connect {rtt * 1e3:.2f} ms, ZeroMQ greeting")]
        sock = self._dealer(ctx, endpoint)
        try:
            samples = [self._echo(sock) for _ in range(self.rtt_reps)]
            rows.append(skew_check(name, samples, self.max_skew))
            best = min(s.rtt for s in samples)
            if measure:
                durations = []
                if self.echo_bytes:
                    durations = [self._echo(sock, self.echo_bytes).rtt for _ in range(self.echo_reps)]
                mib = self.echo_bytes / (1 << 20)
                bw = bandwidth(self.echo_bytes, min(durations)) / (1 << 20) if durations else 0.0
                rows.append(Check("echo", name, OK,
                                  f"rtt {best * 1e3:.2f} ms" + (f", {bw:.0f} MiB/s ({mib:g} MiB echo)"
                                                                if durations else ""),
                                  values={"rtt_ms": round(best * 1e3, 3), "mib_per_s": round(bw, 1)}))
        except TimeoutError as exc:
            rows.append(Check("echo", name, FAIL, f"accepts connections but {exc}",
                              f"{name} at {endpoint} is stopped, hung or overloaded, or runs with CURVE while "
                              "this doctor does not (pass --curve-keys): check its process and log"))
        except ProtocolError as exc:
            rows.append(Check("version", name, FAIL, f"bad ECHO reply: {exc}",
                              "run the same zps version on every host" if exc.code == ErrorCode.BAD_VERSION
                              else f"{endpoint} is not a zps daemon of this version"))
        finally:
            sock.close(linger=0)
        return rows

    @staticmethod
    def _reach_fix(name: str, endpoint: str, err: str) -> str:
        if "refused" in err:
            return (f"start {name}, or make it bind the address it advertises ({endpoint}): "
                    "--bind tcp://ADDRESS:PORT with --advertise ADDRESS, or --interface NAME")
        if "within" in err or "blocked" in err:
            return (f"open TCP port {netaddr.split_endpoint(endpoint)[1]} on {name}'s host towards this host "
                    "(firewall / security group), or advertise an address this host can route to")
        if "route" in err:
            return f"{name} advertises an address on a network this host does not reach: use --advertise/--interface"
        return err

    def coordinator_checks(self, ctx: zmq.Context) -> tuple[list[Check], list[tuple[str, str]]]:
        """Rows for the coordinator, and the (name, endpoint) of servers to check."""
        rows: list[Check] = []
        servers = [(f"server {i}", ep) for i, ep in enumerate(self.servers)]
        if not self.coordinator:
            return rows, servers
        try:
            host, _ = netaddr.split_endpoint(self.coordinator)
            src = netaddr.route_address(host)
            rows.append(Check("route", "coordinator", OK, f"this host reaches {host} from {src}"))
        except (ValueError, OSError) as exc:
            rows.append(Check("route", "coordinator", FAIL, f"no route: {exc}",
                              "check the coordinator host name/address and this host's network"))
        reach = self.peer_checks(ctx, "coordinator", self.coordinator, measure=False)
        rows += reach
        if reach[0].status != OK:
            return rows, servers
        sock = self._dealer(ctx, self.coordinator)
        try:
            status = self._call(sock, MsgType.STATUS, {})["status"]
        except (TimeoutError, ProtocolError) as exc:
            rows.append(Check("version", "coordinator", FAIL, f"no STATUS answer: {exc}",
                              "run the same zps version on every host"))
            return rows, servers
        finally:
            sock.close(linger=0)
        from common.control import VERSION
        theirs = status.get("version", "?")
        rows.append(Check("version", "coordinator", OK if theirs == VERSION else FAIL,
                          f"zps {theirs}, protocol {proto.VERSION} (this host: zps {VERSION})",
                          "" if theirs == VERSION else f"install zps {theirs} on this host, or the same "
                                                       "version everywhere"))
        if self.all_servers:
            servers = []
            for m in status.get("servers", []):
                name = f"server {m.get('rank')}"
                if not m.get("registered") or not m.get("endpoint"):
                    rows.append(Check("reach", name, WARN, "not registered with the coordinator yet",
                                      "start it (it registers at start-up), then run the doctor again"))
                else:
                    servers.append((name, m["endpoint"]))
        return rows, servers

    def run(self) -> list[Check]:
        """Every check, in table order."""
        rows = self.local_checks()
        ctx = zmq.Context()
        try:
            coord_rows, servers = self.coordinator_checks(ctx)
            rows += coord_rows
            for name, ep in servers:
                rows += self.peer_checks(ctx, name, ep, measure=True)
        finally:
            ctx.destroy(linger=0)
        targets = ([("coordinator", self.coordinator)] if self.coordinator else []) + servers
        rows += self.curve_check(self.curve_keys, targets, self.timeout)
        return rows


# ------------------------------------------------------------------ command line
def doctor_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-doctor",
        description="Pre-flight checks of a zps job from this host: the coordinator and every server "
                    "reachable, versions, clock skew, round-trip time and bandwidth, free ports, "
                    "bind/advertise rules, CURVE keys. Prints a table and a verdict; exits 1 on any "
                    "failure (with the fix), 0 otherwise.")
    p.add_argument("--coordinator", default="", metavar="URL", help="the job's coordinator tcp://HOST:PORT")
    p.add_argument("--all", action="store_true", help="ask the coordinator for every server and check each")
    p.add_argument("--server", action="append", default=[], metavar="URL",
                   help="check this server endpoint (repeatable)")
    p.add_argument("--bind", action="append", default=[], metavar="URL",
                   help="an endpoint a daemon on this host would bind: check it is free (repeatable)")
    p.add_argument("--advertise", default="", metavar="HOST",
                   help="the address a daemon on this host would advertise (checked with --bind)")
    p.add_argument("--interface", default="", metavar="NAME", help="the network card daemons here would use")
    p.add_argument("--curve-keys", default=None, metavar="DIR",
                   help="CURVE key folder (bin/ps-keygen); without it the CURVE check is skipped")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds each probe or ECHO may take [3]")
    p.add_argument("--echo-mib", type=float, default=4.0, help="MiB per bandwidth ECHO [4]")
    p.add_argument("--max-skew", type=float, default=1.0, help="largest clock skew allowed, seconds [1]")
    p.add_argument("--json", default="", metavar="PATH", help="also write the checks as JSON here ('-': stdout, the table then goes to stderr)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = doctor_parser().parse_args(argv)
    if not (args.coordinator or args.server or args.bind or args.interface):
        sys.stderr.write("error: nothing to check: pass --coordinator URL (with --all for every server), "
                         "--server URL or --bind URL\n")
        return 2
    if args.all and not args.coordinator:
        sys.stderr.write("error: --all asks the coordinator for the servers: pass --coordinator URL\n")
        return 2
    try:
        for url in [args.coordinator, *args.server, *args.bind]:
            if url:
                netaddr.split_endpoint(url)
        doctor = Doctor(args.coordinator, servers=args.server, all_servers=args.all, binds=args.bind,
                        advertise=args.advertise, interface=args.interface, curve_keys=args.curve_keys,
                        timeout=args.timeout, echo_bytes=int(args.echo_mib * (1 << 20)) // 4 * 4,
                        max_skew=args.max_skew)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    checks = doctor.run()
    title = f"ps-doctor from {_hostname()}" + (f" -> {args.coordinator}" if args.coordinator else "")
    # with --json - stdout holds the JSON alone (for a pipe); the table goes to stderr
    print(render(checks, title), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps({"passed": verdict(checks)[0], "checks": [c.to_json() for c in checks]}, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    sys.stdout.flush()
    return 0 if verdict(checks)[0] else 1


def _hostname() -> str:
    import socket
    return socket.gethostname()


if __name__ == "__main__":
    sys.exit(main())
