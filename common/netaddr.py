"""Addresses a daemon binds and advertises, and whether a peer can reach them.

Three questions every multi-host job runs into, answered in one place:

- *Which address is mine?*  ``interface_address("eth0")`` names a card by
  name; ``route_address(host)`` is the source address this host uses to
  reach ``host`` (the address a peer on that network can most likely reach
  us on); ``is_local_address`` says whether an address belongs to this host.
- *May I advertise it?*  ``check_advertisable(endpoint, peers_remote)``
  refuses a loopback or unspecified address when peers are on other hosts,
  with an error that says which flag to set.  ``apply_interface`` folds
  ``--interface NAME`` into a ``--bind``/``--advertise`` pair.
- *Can I reach it?*  ``probe(endpoint, timeout) -> (ok, rtt, error)``: a TCP
  connect plus the ZeroMQ greeting, classified into an error that names the
  likely cause (nothing listening, filtered, no route, not ZeroMQ).  It
  needs no application-level answer, so the coordinator can check a
  server's advertised endpoint while that server still waits for its
  REGISTER reply.

Pure helpers take the values they decide on (an env, a resolver) so tests
run without a network; nothing here configures logging or keeps state.
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct
import time
from typing import Callable, NamedTuple

from common.errors import ConfigError

#: ioctl asking for an interface's IPv4 address (linux/sockios.h).
SIOCGIFADDR = 0x8915
#: First bytes of every ZMTP 3.x greeting: 0xFF, 8 bytes of padding, 0x7F.
ZMTP_SIGNATURE_LEN = 10

_FLAGS = "--bind tcp://ADDRESS:PORT, --advertise HOST or --interface NAME"


class AddressError(ConfigError):
    """An address a daemon would bind or advertise cannot work for its peers."""


# ------------------------------------------------------------------ endpoints
def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (HOST, PORT); IPv6 hosts in brackets; ValueError naming the value."""
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        raise ValueError(f"endpoint must look like tcp://HOST:PORT, got {endpoint!r}")
    rest = endpoint[len("tcp://"):]
    if ";" in rest:  # ZeroMQ's source-address form: tcp://SRC;HOST:PORT
        rest = rest.split(";", 1)[1]
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"endpoint must look like tcp://HOST:PORT, got {endpoint!r}")
    return host, int(port)


def join_endpoint(host: str, port: int) -> str:
    """(HOST, PORT) -> ``tcp://HOST:PORT`` (brackets around an IPv6 address)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def is_unspecified(host: str) -> bool:
    """The wildcard: '', '*', 0.0.0.0 or ::."""
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def is_loopback_host(host: str, resolver: Callable[[str], str] | None = None) -> bool:
    """A loopback address, ``localhost``, or a name that resolves to loopback.

    A name that does not resolve is *not* loopback (we cannot tell; the
    coordinator's reachability check catches it if it is wrong).
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addr = (resolver or resolve_host)(host)
    except OSError:
        return False
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def resolve_host(host: str) -> str:
    """The address ``host`` resolves to on this host (IPv4 first); OSError if it does not."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    if not infos:
        raise OSError(f"{host!r} resolves to no address")
    return infos[0][4][0]


# ------------------------------------------------------------------ this host's addresses
def _ipv4_of(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])


def _ipv6_of(name: str) -> list[str]:
    """Global-scope IPv6 addresses of ``name`` from /proc/net/if_inet6 (Linux)."""
    out = []
    try:
        with open("/proc/net/if_inet6") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and parts[5] == name and parts[3] == "00":  # scope global
                    out.append(str(ipaddress.IPv6Address(bytes.fromhex(parts[0]))))
    except OSError:
        pass
    return out


def interface_addresses() -> dict[str, list[str]]:
    """Every interface of this host with its addresses (IPv4 first), for messages and the doctor."""
    out = {}
    for _, name in socket.if_nameindex():
        addrs = ([a] if (a := _ipv4_of(name)) else []) + _ipv6_of(name)
        out[name] = addrs
    return out


def describe_interfaces(addrs: dict[str, list[str]] | None = None) -> str:
    """``eth0 10.0.0.2, ib0 192.168.1.2`` (interfaces with an address, loopback last)."""
    addrs = interface_addresses() if addrs is None else addrs
    items = sorted(((n, a) for n, a in addrs.items() if a), key=lambda kv: kv[0] == "lo")
    return ", ".join(f"{n} {' '.join(a)}" for n, a in items) or "none"


def interface_address(name: str, family: int = socket.AF_INET,
                      table: dict[str, list[str]] | None = None) -> str:
    """The address of the network card ``name`` (IPv4 unless ``family`` is AF_INET6).

    AddressError naming the card and listing this host's cards when it does
    not exist or holds no address of that family.
    """
    table = interface_addresses() if table is None else table
    if name not in table:
        raise AddressError(f"--interface {name}: this host has no network interface named {name!r}; "
                           f"it has: {describe_interfaces(table)}")
    want6 = family == socket.AF_INET6
    for addr in table[name]:
        if (":" in addr) == want6:
            return addr
    kind = "IPv6" if want6 else "IPv4"
    raise AddressError(f"--interface {name}: the interface has no {kind} address "
                       f"(this host: {describe_interfaces(table)})")


def is_local_address(host: str) -> bool:
    """Does ``host`` (an address) belong to this host?  Binding it is the test."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


def route_address(host: str, port: int = 9) -> str:
    """The source address this host would use to reach ``host`` (no packet is sent).

    For a peer on another host this is the address that peer can most
    likely reach us on; OSError if ``host`` does not resolve or has no route.
    """
    addr = resolve_host(host)
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect((addr, port))
        return s.getsockname()[0]


# ------------------------------------------------------------------ bind and advertise rules
def peers_are_remote(coordinator: str, resolver: Callable[[str], str] | None = None) -> bool:
    """Are this job's peers on other hosts?  Yes unless the coordinator URL is loopback.

    An empty URL (a standalone daemon) means no peers elsewhere.
    """
    if not coordinator:
        return False
    try:
        host, _ = split_endpoint(coordinator)
    except ValueError:
        return False
    return not is_loopback_host(host, resolver)


def check_advertisable(endpoint: str, peers_remote: bool, role: str = "server",
                       resolver: Callable[[str], str] | None = None,
                       interfaces: Callable[[], str] = describe_interfaces) -> None:
    """Refuse to advertise a loopback or unspecified address to peers on other hosts.

    ``endpoint`` is what this daemon would tell its peers; ``peers_remote``
    whether any peer is on another host (see :func:`peers_are_remote`).
    Raises AddressError saying which flag to set; returns None when fine.
    """
    if not peers_remote:
        return
    host, port = split_endpoint(endpoint)
    if is_unspecified(host):
        what = "the unspecified address (a wildcard bind)"
    elif is_loopback_host(host, resolver):
        what = "a loopback address" if host in ("localhost",) or _is_ip(host) else \
            f"a name that resolves to loopback on this host ({(resolver or resolve_host)(host)})"
    else:
        return
    raise AddressError(
        f"{role} would advertise {endpoint}, {what}, but its peers are on other hosts: they cannot "
        f"connect to it. Set {_FLAGS} to an address the other hosts can reach "
        f"(this host: {interfaces()}).")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def apply_interface(bind: str, advertise: str, interface: str,
                    lookup: Callable[[str], str] = interface_address) -> tuple[str, str]:
    """Fold ``--interface NAME`` into (bind, advertise).

    The card's address becomes the advertised host unless ``--advertise`` is
    given; it replaces the bind host when that is loopback (the default) and
    is kept beside a wildcard bind.  A ``--bind`` naming another specific
    address conflicts: AddressError naming both.
    """
    if not interface:
        return bind, advertise
    addr = lookup(interface)
    host, port = split_endpoint(bind)
    if is_loopback_host(host, resolver=lambda h: h) or host == addr:
        bind = join_endpoint(addr, port)
    elif not is_unspecified(host):
        raise AddressError(f"--bind {bind} and --interface {interface} ({addr}) name two different "
                           "addresses; give one of them, or --bind tcp://0.0.0.0:PORT to listen on all")
    return bind, advertise or addr


def default_bind(coordinator: str, port: int = 0, route: Callable[[str], str] = route_address) -> str:
    """The bind endpoint a daemon picks when told nothing: loopback when every peer is local,
    else the address this host uses to reach the coordinator."""
    if not peers_are_remote(coordinator):
        return join_endpoint("127.0.0.1", port)
    host, _ = split_endpoint(coordinator)
    try:
        return join_endpoint(route(host), port)
    except OSError as exc:
        raise AddressError(f"cannot find this host's address towards the coordinator {coordinator}: {exc}; "
                           f"set {_FLAGS}") from None


# ------------------------------------------------------------------ reachability
class ProbeResult(NamedTuple):
    """``ok``; ``rtt`` (seconds to connect, None when it failed); ``error`` ('' when ok)."""

    ok: bool
    rtt: float | None
    error: str


def probe(endpoint: str, timeout: float = 3.0) -> ProbeResult:
    """Can this host reach ``endpoint``?  A TCP connect, then the peer's ZeroMQ greeting.

    Works on a bound ZeroMQ socket whose owner does not read it yet (the
    greeting is sent by ZeroMQ's I/O thread).  The error names the likely
    cause and the fix.  ``timeout`` bounds the whole probe.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    try:
        host, port = split_endpoint(endpoint)
    except ValueError as exc:
        return ProbeResult(False, None, str(exc))
    if is_unspecified(host):
        return ProbeResult(False, None, f"{endpoint} is the unspecified address: nobody can connect to it; "
                                        f"the daemon must advertise a real address ({_FLAGS})")
    deadline = time.monotonic() + timeout
    try:
        addr = resolve_host(host)
    except OSError as exc:
        return ProbeResult(False, None, f"cannot resolve host {host!r} here ({exc}); advertise an address, "
                                        "or a name every host resolves")
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    t0 = time.monotonic()
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect((addr, port))
        except socket.timeout:
            return ProbeResult(False, None, f"no answer from {host}:{port} within {timeout:g}s: a firewall "
                                            "drops the port, or the address is not routable from here")
        except ConnectionRefusedError:
            return ProbeResult(False, None, f"connection refused by {host}:{port}: nothing listens there "
                                            "(the process is not running, or it bound another address "
                                            "than it advertises)")
        except OSError as exc:
            return ProbeResult(False, None, _oserror_text(exc, host, port))
        rtt = time.monotonic() - t0
        greeting = b""
        try:
            while len(greeting) < ZMTP_SIGNATURE_LEN:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout
                sock.settimeout(left)
                chunk = sock.recv(ZMTP_SIGNATURE_LEN - len(greeting))
                if not chunk:
                    break
                greeting += chunk
        except socket.timeout:
            return ProbeResult(False, rtt, f"{host}:{port} accepted the connection but sent no ZeroMQ "
                                           f"greeting within {timeout:g}s (another program on that port?)")
        except OSError as exc:
            return ProbeResult(False, rtt, _oserror_text(exc, host, port))
        if len(greeting) < ZMTP_SIGNATURE_LEN or greeting[0] != 0xFF or greeting[9] != 0x7F:
            return ProbeResult(False, rtt, f"{host}:{port} is not a ZeroMQ endpoint (it answered "
                                           f"{greeting[:ZMTP_SIGNATURE_LEN]!r}); another program holds the port")
        return ProbeResult(True, rtt, "")
    finally:
        sock.close()


def _oserror_text(exc: OSError, host: str, port: int) -> str:
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route to {host}:{port} ({exc.strerror}): the address is not on a network this host reaches"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{host}:{port} is blocked by a local firewall or routing rule ({exc.strerror})"
    if exc.errno == errno.ECONNRESET:
        return f"{host}:{port} reset the connection (a firewall, or a TLS/other service on that port)"
    return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def unreachable_message(role: str, rank: int, host: str, pid: int, endpoint: str, error: str) -> str:
    """What the coordinator answers a REGISTER whose advertised endpoint it cannot reach."""
    who = f"{role} {rank}" if rank >= 0 else f"a {role}"
    return (f"{who} (host {host or '?'}, pid {pid}) advertised {endpoint}, which the coordinator cannot "
            f"reach: {error}. Fix: start it with --advertise HOST or --interface NAME naming an address the "
            f"other hosts reach, bind that address (--bind), and open the port; "
            f"check with bin/ps-doctor --coordinator URL --all")


def port_free(bind: str) -> tuple[bool, str]:
    """Could a daemon bind ``bind`` now?  (ok, reason).  Port 0 is always free.

    Binds with SO_REUSEADDR as ZeroMQ does, so a port in TIME_WAIT counts as free.
    """
    try:
        host, port = split_endpoint(bind)
    except ValueError as exc:
        return False, str(exc)
    if host == "*":
        host = "0.0.0.0"
    if not is_unspecified(host) and not is_local_address(host):
        return False, (f"{host} is not an address of this host; pick one of: {describe_interfaces()}")
    if port == 0:
        return True, "port 0: the system picks a free port"
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False, f"port {port} on {host} is in use by another process"
            return False, f"cannot bind {host}:{port}: {exc.strerror or exc}"
    return True, f"port {port} on {host} is free"
