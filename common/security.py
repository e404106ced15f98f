"""CurveZMQ encryption and authentication for every zps socket.

CURVE is on when a role is given a key folder (``--curve-keys DIR``); it is
then on for every socket of that role: ROUTERs (coordinator, servers) are
CURVE servers and accept only the client keys in the allow-list, DEALERs
(workers, and servers talking to the coordinator) are CURVE clients that
check the server key.  A CURVE socket and a plain-text one never talk.

Key folder (written by ``bin/ps-keygen DIR --clients N``, ZeroMQ's
certificate format from ``zmq.auth.create_certificates``)::

    DIR/                      0700
    ├── server.key            public key of every binding role    -> every host
    ├── server.key_secret     its secret (0600)                   -> coordinator and server hosts
    ├── client-0.key          public key of client pair 0
    ├── client-0.key_secret   its secret (0600; holds the public  -> the host(s) using client 0
    │   ...                   key too)
    ├── client-<N-1>.key / client-<N-1>.key_secret
    └── authorized/           0700: the allow-list, one <name>.key -> coordinator and server hosts
        ├── client-0.key      per allowed client (public keys only)
        └── ...

One server key pair serves every binding role (coordinator and servers); a
client pair is used by every connecting role of a host (its workers, and its
servers' link to the coordinator, which is a client too).

What each host needs (``CurveKeys.load`` accepts each of these layouts):

- coordinator host: ``server.key``, ``server.key_secret``, ``authorized/``;
- server host: the same plus one client pair (to reach the coordinator);
- worker-only host: ``server.key`` (public only, no ``server.key_secret``)
  and its own client pair; such a host can connect but cannot serve.

Allow-list changes (revoking a client: delete its file from ``authorized/``)
take effect when the servers and the coordinator restart, or on
``Authenticator.reload()``.  Key rotation: run ``ps-keygen --force`` (which
also empties ``authorized/``), copy the new files, restart every role.

Order matters on a binding role: start an :class:`Authenticator` on the
context *before* ``secure_server`` and ``bind``.  ``secure_server`` refuses
a context with no ZAP handler, and sets ``ZAP_ENFORCE_DOMAIN`` where libzmq
offers it, because a CURVE server with no ZAP handler accepts *any* client
key (libzmq's default).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from common.errors import ConfigError

log = logging.getLogger("zps.security")

#: ZAP domain of every zps CURVE server socket.
ZAP_DOMAIN = "zps"
#: The inproc endpoint libzmq sends ZAP requests to (RFC 27).
ZAP_ENDPOINT = "inproc://zeromq.zap.01"

SERVER_NAME = "server"
CLIENT_PREFIX = "client-"
ALLOW_DIR = "authorized"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

#: Distinct refused keys remembered (each logged once); past this they are counted, not logged.
MAX_REMEMBERED_KEYS = 1024

_CLIENT_RE = re.compile(r"^client-(\d+)\.key_secret$")
_KEYGEN_HINT = "create the folder with bin/ps-keygen DIR (see docs/SECURITY.md)"


# ------------------------------------------------------------------ key folder
def _client_name(client: str | int) -> str:
    text = str(client)
    return f"{CLIENT_PREFIX}{text}" if text.isdigit() else text


def _check_clients(clients) -> int:
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ConfigError(f"clients must be an integer >= 1, got {clients!r}")
    return clients


def generate(dir: str, clients: int = 1, force: bool = False) -> dict:
    """Write a key folder: the server pair, ``clients`` client pairs and the allow-list.

    Secret files get mode 0600, ``dir`` and ``authorized/`` 0700; the keys are
    made in a private staging folder inside ``dir`` and moved into place, so a
    secret is never readable by others, not even for a moment.  Existing keys
    are an error naming the file unless ``force``; with ``force`` every old
    ``client-*`` pair and every key in ``authorized/`` is removed too (a
    rotation must not leave old clients allowed).

    Returns the paths written: ``{"folder", "server_public", "server_secret",
    "clients": [{"name", "public", "secret"}], "authorized", "removed"}``.
    """
    clients = _check_clients(clients)
    folder = os.path.abspath(dir)
    allow = os.path.join(folder, ALLOW_DIR)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"key folder {folder} exists and is not a folder")
    names = [SERVER_NAME] + [f"{CLIENT_PREFIX}{i}" for i in range(clients)]
    old = _existing_keys(folder)
    if old and not force:
        raise ConfigError(f"{old[0]} already exists; refusing to overwrite keys "
                          "(pass --force to replace every key in the folder, then copy the new "
                          "files to every host and restart every role)")
    os.makedirs(allow, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    os.chmod(allow, 0o700)
    staging = tempfile.mkdtemp(prefix=".keygen-", dir=folder)  # mode 0700
    try:
        made = {}
        for name in names:
            public, secret = zmq.auth.create_certificates(staging, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            made[name] = (public, secret)
        removed = []
        for path in old:  # only once the new keys exist
            os.remove(path)
            removed.append(path)
        out: dict[str, Any] = {"folder": folder, "authorized": allow, "clients": [], "removed": removed}
        for name in names:
            public, secret = made[name]
            dst_public = os.path.join(folder, name + PUBLIC_SUFFIX)
            dst_secret = os.path.join(folder, name + SECRET_SUFFIX)
            if name != SERVER_NAME:
                allowed = os.path.join(allow, name + PUBLIC_SUFFIX)
                shutil.copyfile(public, allowed)
                os.chmod(allowed, 0o644)
            os.replace(secret, dst_secret)
            os.replace(public, dst_public)
            if name == SERVER_NAME:
                out["server_public"], out["server_secret"] = dst_public, dst_secret
            else:
                out["clients"].append({"name": name, "public": dst_public, "secret": dst_secret})
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _existing_keys(folder: str) -> list[str]:
    """Key files ``generate`` would write or must remove, server first."""
    found = []
    if not os.path.isdir(folder):
        return found
    for suffix in (PUBLIC_SUFFIX, SECRET_SUFFIX):
        p = os.path.join(folder, SERVER_NAME + suffix)
        if os.path.lexists(p):
            found.append(p)
    for entry in sorted(os.listdir(folder)):
        if entry.startswith(CLIENT_PREFIX) and entry.endswith((PUBLIC_SUFFIX, SECRET_SUFFIX)):
            found.append(os.path.join(folder, entry))
    allow = os.path.join(folder, ALLOW_DIR)
    if os.path.isdir(allow):
        found += [os.path.join(allow, e) for e in sorted(os.listdir(allow)) if e.endswith(PUBLIC_SUFFIX)]
    return found


def _read_cert(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError:
        raise ConfigError(f"cannot read {what} {path}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not a ZeroMQ certificate ({exc}); {_KEYGEN_HINT}") from None
    for key in (public, secret):
        if key is not None:
            _check_z85(key, path)
    return public, secret


def _check_z85(key: bytes, path: str) -> None:
    try:
        ok = len(key) == 40 and len(z85.decode(key)) == 32
    except Exception:  # z85 raises several types on bad input; reported below
        ok = False
    if not ok:
        raise ConfigError(f"{path} holds a malformed CURVE key (want 40 Z85 characters)")


def _warn_if_readable(path: str) -> None:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        log.warning("secret key %s has mode %04o: other users can read it; run chmod 600 %s",
                    path, mode, path)


@dataclasses.dataclass(frozen=True)
class CurveKeys:
    """The CURVE keys of one host, as loaded from a key folder.

    ``server_secret`` is None on a host that only connects (a worker-only
    host holds the server's public key and its own client pair);
    ``client_*`` are None on a host with no client pair (a coordinator-only
    host); ``authorized`` is None where there is no allow-list folder.  What
    a role needs is checked when it uses the keys (``require_server``,
    ``require_client``), with the file to copy named in the error.
    """

    folder: str
    server_public: bytes
    server_secret: bytes | None = dataclasses.field(default=None, repr=False)
    client_name: str | None = None
    client_public: bytes | None = None
    client_secret: bytes | None = dataclasses.field(default=None, repr=False)
    authorized: str | None = None

    @classmethod
    def load(cls, dir: str, client: str | int | None = None) -> "CurveKeys":
        """Read the keys in ``dir``.

        ``client`` names the client pair (``"client-3"`` or ``3``); None takes
        the lowest-numbered ``client-K.key_secret`` present, so a host that
        holds exactly one pair needs no name.  Raises ConfigError naming the
        missing or bad file and what to do.
        """
        folder = os.path.abspath(dir)
        if not os.path.isdir(folder):
            raise ConfigError(f"CURVE key folder {folder} does not exist; {_KEYGEN_HINT}, "
                              "then copy it to this host")
        server_file = os.path.join(folder, SERVER_NAME + PUBLIC_SUFFIX)
        server_secret_file = os.path.join(folder, SERVER_NAME + SECRET_SUFFIX)
        if not os.path.isfile(server_file):
            raise ConfigError(f"{server_file} is missing: every host needs the server public key; "
                              f"copy server.key from the folder bin/ps-keygen wrote ({_KEYGEN_HINT})")
        server_public, _ = _read_cert(server_file, "server public key")
        server_secret = None
        if os.path.isfile(server_secret_file):
            pub, server_secret = _read_cert(server_secret_file, "server secret key")
            if server_secret is None:
                raise ConfigError(f"{server_secret_file} holds no secret key; copy it again from the "
                                  "folder bin/ps-keygen wrote")
            if pub != server_public:
                raise ConfigError(f"{server_secret_file} and {server_file} are not one key pair "
                                  "(copied from two ps-keygen runs?); copy both from the same folder")
            _warn_if_readable(server_secret_file)
        name, client_public, client_secret = cls._load_client(folder, client)
        allow = os.path.join(folder, ALLOW_DIR)
        return cls(folder=folder, server_public=server_public, server_secret=server_secret,
                   client_name=name, client_public=client_public, client_secret=client_secret,
                   authorized=allow if os.path.isdir(allow) else None)

    @classmethod
    def from_setting(cls, folder: str, *, serve: bool = False, connect: bool = False) -> "CurveKeys | None":
        """A role's keys from its ``curve_keys`` setting: None when empty (CURVE off).

        ``serve``: the role binds (coordinator, server); ``connect``: it
        connects (worker, a server's coordinator link).  What the role needs
        is checked here, so a missing file fails at start-up, naming it.
        """
        if not folder:
            return None
        keys = cls.load(folder)
        if serve:
            keys.require_server()
        if connect:
            keys.require_client()
        return keys

    @staticmethod
    def _load_client(folder: str, client) -> tuple[str | None, bytes | None, bytes | None]:
        if client is None:
            found = sorted((int(m.group(1)), m.group(0)) for m in map(_CLIENT_RE.match, os.listdir(folder)) if m)
            if not found:
                return None, None, None
            name = found[0][1][:-len(SECRET_SUFFIX)]
        else:
            name = _client_name(client)
        secret_file = os.path.join(folder, name + SECRET_SUFFIX)
        if not os.path.isfile(secret_file):
            raise ConfigError(f"{secret_file} is missing: copy the client pair {name}.key and "
                              f"{name}.key_secret from the folder bin/ps-keygen wrote to this host")
        public, secret = _read_cert(secret_file, f"client {name} secret key")
        if secret is None:
            raise ConfigError(f"{secret_file} holds no secret key; copy it again from the folder "
                              "bin/ps-keygen wrote")
        public_file = os.path.join(folder, name + PUBLIC_SUFFIX)
        if os.path.isfile(public_file) and _read_cert(public_file, f"client {name} public key")[0] != public:
            raise ConfigError(f"{public_file} and {secret_file} are not one key pair; copy both from "
                              "the same ps-keygen run")
        _warn_if_readable(secret_file)
        return name, public, secret

    @property
    def can_serve(self) -> bool:
        """Can this host bind CURVE server sockets (coordinator, server)?"""
        return self.server_secret is not None and self.authorized is not None

    @property
    def can_connect(self) -> bool:
        """Can this host connect CURVE client sockets (worker, server's coordinator link)?"""
        return self.client_secret is not None

    def require_server(self) -> None:
        """ConfigError unless this host holds what a binding role needs."""
        if self.server_secret is None:
            raise ConfigError(
                f"{os.path.join(self.folder, SERVER_NAME + SECRET_SUFFIX)} is missing: the coordinator and "
                "the servers need the server secret key; copy server.key_secret (mode 0600) from the "
                "folder bin/ps-keygen wrote. A worker-only host needs no server secret.")
        if self.authorized is None:
            raise ConfigError(
                f"{os.path.join(self.folder, ALLOW_DIR)} is missing: the coordinator and the servers need "
                "the allow-list folder authorized/ from the folder bin/ps-keygen wrote")

    def require_client(self) -> None:
        """ConfigError unless this host holds a client key pair."""
        if self.client_secret is None:
            raise ConfigError(
                f"no client key pair in {self.folder}: workers, and servers reaching the coordinator, need "
                f"one; copy {CLIENT_PREFIX}K.key and {CLIENT_PREFIX}K.key_secret (one K per host) from the "
                "folder bin/ps-keygen wrote")

    def allowed_keys(self) -> set[bytes]:
        """The Z85 public keys in the allow-list folder (empty if there is none)."""
        if self.authorized is None:
            return set()
        return set(zmq.auth.load_certificates(self.authorized))


# ------------------------------------------------------------------ sockets
def _unbound(sock: zmq.Socket, what: str) -> None:
    if sock.getsockopt(zmq.LAST_ENDPOINT):
        raise ValueError(f"{what} must be applied before the socket binds or connects")


def zap_handler_running(ctx: zmq.Context) -> bool:
    """Is a ZAP handler (an Authenticator) bound in ``ctx``?

    Probes by binding the ZAP endpoint and unbinding it at once: the bind
    fails with EADDRINUSE exactly when a handler holds it.
    """
    probe = ctx.socket(zmq.REP)
    try:
        try:
            probe.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
        probe.unbind(ZAP_ENDPOINT)
        return False
    finally:
        probe.close(linger=0)


def secure_server(sock: zmq.Socket, keys: CurveKeys) -> zmq.Socket:
    """Make ``sock`` (a ROUTER, not yet bound) a CURVE server with the server key pair.

    Requires an :class:`Authenticator` running on the socket's context: a
    CURVE server with no ZAP handler would accept every client key.
    """
    keys.require_server()
    _unbound(sock, "secure_server")
    if not zap_handler_running(sock.context):
        raise ConfigError("no Authenticator runs on this socket's context: start "
                          "common.security.Authenticator(ctx, keys) before binding, or every client "
                          "key would be accepted")
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.zap_domain = ZAP_DOMAIN.encode()
    enforce = getattr(zmq, "ZAP_ENFORCE_DOMAIN", None)
    if enforce is not None:
        try:  # fail closed should the handler go away (libzmq draft option)
            sock.setsockopt(enforce, 1)
        except zmq.ZMQError:
            pass
    return sock


def secure_client(sock: zmq.Socket, keys: CurveKeys) -> zmq.Socket:
    """Make ``sock`` (a DEALER, not yet connected) a CURVE client of the server key."""
    keys.require_client()
    _unbound(sock, "secure_client")
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret
    return sock


# ------------------------------------------------------------------ ZAP handler
class _KeyVerdicts:
    """The credentials provider pyzmq calls once per CURVE handshake; counts and logs."""

    def __init__(self, owner: "Authenticator"):
        self.owner = owner

    def callback(self, domain: str, key: bytes) -> bool:
        return self.owner._verdict(domain, key)


class _CountingThreadAuthenticator(ThreadAuthenticator):
    """pyzmq's thread authenticator, remembering the peer address of the request in hand."""

    peer = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def stop(self, timeout: float = 5.0) -> bool:  # bounded; pyzmq's joins forever
        if self.pipe is not None:
            try:
                self.pipe.send(b"TERMINATE", zmq.NOBLOCK)
            except zmq.Again:
                pass
            if self.thread is not None:
                self.thread.join(timeout)
                if self.thread.is_alive():
                    return False
            self.thread = None
            self.pipe.close(linger=0)
            self.pipe = None
        if self.zap_socket is not None:
            self.zap_socket.close(linger=0)
            self.zap_socket = None
        return True


class Authenticator:
    """The ZAP handler of one ``zmq.Context``: admits only client keys in the allow-list.

    One per context (libzmq routes every handshake of the context to it); the
    coordinator and each server start one before binding::

        auth = Authenticator(ctx, keys).start()
        sock = make_router(ctx, bind, transport, keys)
        ...
        auth.stop(timeout=5)

    Each refused key is logged once (with the peer address); ``statistics()``
    counts allowed and denied handshakes.  Plain-text peers and peers with the
    wrong server key fail in libzmq's handshake before any ZAP request, so
    they never reach this handler and are not counted here.
    """

    def __init__(self, ctx: zmq.Context, keys: CurveKeys):
        keys.require_server()
        self.ctx = ctx
        self.keys = keys
        self._lock = threading.Lock()
        self._allowed = 0
        self._denied = 0
        self._denied_keys: dict[bytes, str] = {}  # key -> first peer address; bounded
        self._forgetting = False
        self._auth: _CountingThreadAuthenticator | None = None

    def start(self) -> "Authenticator":
        if self._auth is not None:
            return self
        auth = _CountingThreadAuthenticator(self.ctx, log=logging.getLogger("zps.security.zap"))
        try:
            auth.start()
        except zmq.ZMQError as exc:
            auth.stop(timeout=1)
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError("another ZAP handler already runs on this context "
                                  "(one Authenticator per context)") from None
            raise
        self._auth = auth
        self.reload()
        return self

    def reload(self) -> int:
        """Read the allow-list folder again; return how many keys it holds."""
        if self._auth is None:
            raise ConfigError("Authenticator is not running: call start() first")
        if not os.path.isdir(self.keys.authorized):
            raise ConfigError(f"allow-list folder {self.keys.authorized} is gone; copy authorized/ from "
                              "the folder bin/ps-keygen wrote")
        provider = _KeyVerdicts(self)
        for domain in (ZAP_DOMAIN, "*"):  # pyzmq matches the domain exactly; "*" is the empty one
            self._auth.configure_curve(domain=domain, location=self.keys.authorized)
            self._auth.configure_curve_callback(domain=domain, credentials_provider=provider)
        count = len(self._auth.certs.get(ZAP_DOMAIN, {}))
        if count == 0:
            log.warning("allow-list %s holds no keys: every client will be refused", self.keys.authorized)
        return count

    def _verdict(self, domain: str, key: bytes) -> bool:
        """Called in the ZAP thread with the client's Z85 public key."""
        auth = self._auth
        certs = auth.certs.get(domain or "*", auth.certs.get("*", {})) if auth is not None else {}
        ok = bool(certs.get(key))
        with self._lock:
            if ok:
                self._allowed += 1
                return True
            self._denied += 1
            peer = auth.peer if auth is not None else ""
            first = key not in self._denied_keys and len(self._denied_keys) < MAX_REMEMBERED_KEYS
            if first:
                self._denied_keys[key] = peer
            elif key not in self._denied_keys and not self._forgetting:
                self._forgetting = True
                log.warning("more than %d distinct client keys refused: further ones are counted, not logged",
                            MAX_REMEMBERED_KEYS)
        if first:
            log.warning("refused CURVE client key %s from %s: not in the allow-list %s",
                        key.decode("ascii", "replace"), peer or "?", self.keys.authorized)
        return False

    def statistics(self) -> dict:
        """Handshakes allowed and denied so far, and the distinct keys refused (at most MAX_REMEMBERED_KEYS)."""
        with self._lock:
            return {"allowed": self._allowed, "denied": self._denied,
                    "denied_keys": len(self._denied_keys),
                    "running": self._auth is not None and self._auth.is_alive()}

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the ZAP thread within ``timeout`` seconds; True if it stopped (idempotent)."""
        if self._auth is None:
            return True
        if not self._auth.stop(timeout):
            log.error("ZAP handler thread did not stop within %.1fs", timeout)
            return False
        self._auth = None
        return True

    def __enter__(self) -> "Authenticator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------ ps-keygen
def keygen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-keygen",
        description="Write a CurveZMQ key folder for a zps job: one server key pair (coordinator "
                    "and servers), N client key pairs (one per host that connects), and the "
                    "allow-list authorized/. Then pass --curve-keys DIR to every role.")
    p.add_argument("dir", metavar="DIR", help="key folder to write (created with mode 0700)")
    p.add_argument("--clients", type=int, default=1,
                   help="client key pairs to make, e.g. one per host [1]")
    p.add_argument("--force", action="store_true",
                   help="replace existing keys (also removes old client pairs and allow-list entries)")
    return p


def describe_generated(out: dict) -> str:
    """What ``generate`` wrote and which files go to which host, for people."""
    folder = out["folder"]
    names = [c["name"] for c in out["clients"]]
    lines = [f"wrote CURVE keys to {folder} (mode 0700; secret files 0600):",
             f"  {SERVER_NAME}.key, {SERVER_NAME}.key_secret   server key pair (coordinator and servers)"]
    lines += [f"  {n}.key, {n}.key_secret   client key pair {n}" for n in names]
    lines.append(f"  {ALLOW_DIR}/   allow-list: {', '.join(n + '.key' for n in names)}")
    if out["removed"]:
        lines.append(f"  removed {len(out['removed'])} old key files")
    first = names[0]
    lines += [
        "copy to each host (keep the modes: scp -p or rsync -a; the folder must stay 0700):",
        f"  coordinator host:  server.key server.key_secret {ALLOW_DIR}/",
        f"  server hosts:      server.key server.key_secret {ALLOW_DIR}/ and one client pair "
        f"(e.g. {first}.key {first}.key_secret)",
        "  worker-only hosts: server.key and that host's client pair (never server.key_secret)",
        "then pass --curve-keys DIR to every ps-coordinator, ps-server and ps-worker "
        "(or to ps-launch on one host); see docs/SECURITY.md",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = keygen_parser().parse_args(argv)
    try:
        out = generate(ns.dir, ns.clients, ns.force)
    except (ConfigError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(describe_generated(out))
    return 0
