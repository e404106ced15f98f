"""ZeroMQ sockets configured the zps way, and endpoint helpers.

Every socket gets a finite LINGER and explicit high-water marks; ROUTER
sockets get ROUTER_MANDATORY (a reply to a vanished peer is an error, never
a silent drop) and MAXMSGSIZE when configured.  Given ``keys``
(``common.security.CurveKeys``) a ROUTER is a CURVE server and a DEALER a
CURVE client; a CURVE ROUTER needs an ``Authenticator`` running on its
context first.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import time
from urllib.parse import urlparse

import zmq

from common.config import TransportSettings
from common.errors import ConfigError
from common.netaddr import split_endpoint
from common.security import CurveKeys, secure_client, secure_server

log = logging.getLogger("zps.transport")


def make_router(ctx: zmq.Context, bind: str, transport, keys: CurveKeys | None = None) -> zmq.Socket:
    """A ROUTER socket with zps's options, bound to ``bind`` (port 0 picks a free port).

    With ``keys`` it is a CURVE server (start an ``Authenticator`` on ``ctx`` first).
    """
    _check_port(bind)
    sock = _socket(ctx, zmq.ROUTER, transport)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if keys is not None:
        try:
            secure_server(sock, keys)
        except BaseException:
            sock.close(linger=0)
            raise
    try:
        sock.bind(_zmq_bind_form(bind))
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise OSError(f"cannot bind {bind}: {exc} (is the port in use, or the address not on this host?)") from None
    return sock


def _check_port(bind: str) -> None:
    """Refuse a TCP port outside 0-65535 (ZeroMQ would bind it modulo 65536, somewhere else)."""
    if not bind.startswith("tcp://"):
        return
    port = bind.rpartition(":")[2]
    if port.isdigit() and int(port) > 65535:
        raise OSError(f"cannot bind {bind}: port {port} is above 65535")


def _socket(ctx: zmq.Context, kind: int, transport) -> zmq.Socket:
    """A socket with the options every zps socket has: LINGER, high-water marks, MAXMSGSIZE."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, int(transport.linger * 1000))
    sock.setsockopt(zmq.SNDHWM, transport.sndhwm)
    sock.setsockopt(zmq.RCVHWM, transport.rcvhwm)
    if transport.max_msg_bytes:
        sock.setsockopt(zmq.MAXMSGSIZE, transport.max_msg_bytes)
    return sock


def make_dealer(ctx: zmq.Context, endpoint: str, transport: TransportSettings | None = None,
                keys: CurveKeys | None = None, reconnect_max: float | None = None) -> zmq.Socket:
    """A DEALER socket with zps's options, connected to ``endpoint``; a CURVE client with ``keys``.

    ``reconnect_max`` (seconds) caps ZeroMQ's exponential backoff when the peer is down.
    """
    sock = _socket(ctx, zmq.DEALER, transport or TransportSettings())
    if reconnect_max is not None:
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(reconnect_max * 1000))
    try:
        if keys is not None:
            secure_client(sock, keys)
        connect(sock, endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def connect(sock: zmq.Socket, endpoint: str) -> None:
    """``sock.connect(endpoint)``, or ConfigError saying what a good address looks like."""
    try:
        if endpoint.startswith("tcp://"):
            split_endpoint(endpoint)   # ZeroMQ would take port 99999 as 34463
        sock.connect(endpoint)
    except (zmq.ZMQError, ValueError) as exc:   # a malformed address: "127.0.0.1:5555", "nonsense"
        why = exc.strerror if isinstance(exc, zmq.ZMQError) else "not HOST:PORT with a port in 0-65535"
        raise ConfigError(f"cannot connect to {endpoint!r}: {why}; an address is tcp://HOST:PORT "
                          "(or ipc://PATH, inproc://NAME)") from None


#: Flags as plain ints: zmq's are enum members, slow to combine on every frame.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def send_now(sock: zmq.Socket, frames: list) -> None:
    """Queue one multipart message without blocking (zero-copy where pyzmq copies nothing).

    What ``send_multipart(frames, NOBLOCK, copy=False)`` does, without its
    per-frame enum arithmetic and type checks (2-3 µs a message).  Raises
    ``zmq.Again`` when the peer's queue is full.
    """
    for f in frames[:-1]:
        sock.send(f, _NOBLOCK_MORE, copy=False)
    sock.send(frames[-1], _NOBLOCK, copy=False)


def send_by(sock: zmq.Socket, frames: list, deadline: float) -> bool:
    """Queue one multipart message, waiting until ``deadline`` (``time.monotonic()``) for room.

    False if there was none by then. A DEALER with no connection to send on
    (its peer's CURVE handshake refused it, say) would otherwise block in
    ``send`` for ever.
    """
    while True:
        try:
            send_now(sock, frames)
            return True
        except zmq.Again:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1, zmq.POLLOUT):
                return False


def recv_now(sock: zmq.Socket) -> list:
    """The frames of the message queued on ``sock`` (one must be), not copied.

    What ``recv_multipart(NOBLOCK, copy=False)`` does, asking each frame
    rather than the socket (a ``getsockopt(RCVMORE)`` a frame) whether more
    follow.
    """
    frames = [sock.recv(_NOBLOCK, copy=False)]
    while frames[-1].more:
        frames.append(sock.recv(_NOBLOCK, copy=False))
    return frames


def _zmq_bind_form(endpoint: str) -> str:
    """ZeroMQ writes the wildcard as ``*``; accept ``0.0.0.0`` too."""
    return endpoint.replace("://0.0.0.0:", "://*:")


def bound_endpoint(sock: zmq.Socket) -> str:
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def host_of(endpoint: str) -> str:
    return urlparse(endpoint).hostname or ""


def port_of(endpoint: str) -> int:
    return urlparse(endpoint).port or 0


def is_wildcard(host: str) -> bool:
    return host in ("*", "0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def advertised_endpoint(bound: str, advertise: str = "") -> str:
    """The address peers should connect to for a socket bound at ``bound``.

    ``advertise`` (a host name or address) wins; a wildcard bind is advertised
    under this host's name-resolved address.
    """
    port = port_of(bound)
    host = host_of(bound)
    if advertise:
        return f"tcp://{advertise}:{port}"
    if is_wildcard(host):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"tcp://{host}:{port}"


def warn_if_exposed(bound: str, curve: bool) -> None:
    """A non-loopback bind without CURVE is readable by anyone on the network: say so."""
    host = host_of(bound)
    if not curve and not is_loopback(host):
        msg = (f"WARNING: {bound} is reachable from other hosts and traffic is neither encrypted "
               "nor authenticated; use --curve-keys DIR (see bin/ps-keygen) across untrusted networks")
        log.warning(msg)
        print(msg, file=sys.stderr)
