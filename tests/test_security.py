"""CurveZMQ keys, CURVE sockets and the ZAP allow-list (real sockets on 127.0.0.1).

Every socket is closed with linger 0 and every context terminated; nothing
sleeps: waits are polls with timeouts, and a refused handshake is observed
through the ROUTER's socket monitor before the ROUTER is polled for the
message that must never arrive.
"""
import dataclasses
import logging
import os
import shutil
import stat

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from common import security
from common.errors import ConfigError
from common.security import (Authenticator, CurveKeys, generate, main, secure_client, secure_server,
                             zap_handler_running)

pytestmark = pytest.mark.timeout(30)

WAIT_MS = 5000          # longest any expected event may take
SILENCE_MS = 200        # how long a refused peer's message is given to (not) arrive
FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
          | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def keydir(tmp_path):
    out = generate(str(tmp_path / "keys"), clients=2)
    return out["folder"]


@pytest.fixture
def net():
    """A context whose sockets are closed (linger 0) and which is terminated at teardown."""
    n = Net()
    try:
        yield n
    finally:
        n.close()


class Net:
    def __init__(self):
        self.ctx = zmq.Context()
        self.socks = []
        self.monitors = []
        self.auths = []

    def socket(self, kind):
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        self.socks.append(s)
        return s

    def authenticator(self, keys):
        a = Authenticator(self.ctx, keys).start()
        self.auths.append(a)
        return a

    def curve_router(self, keys):
        """Authenticator, CURVE ROUTER on a random port, and a monitor of its handshakes."""
        auth = self.authenticator(keys)
        router = self.socket(zmq.ROUTER)
        secure_server(router, keys)
        router.bind("tcp://127.0.0.1:0")
        mon = router.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | FAILED)
        self.monitors.append((router, mon))
        return auth, router, mon, router.getsockopt_string(zmq.LAST_ENDPOINT)

    def dealer(self, endpoint, keys=None, server_key=None):
        d = self.socket(zmq.DEALER)
        d.setsockopt(zmq.RECONNECT_IVL, 10)  # a refused peer retries quickly
        if keys is not None:
            secure_client(d, keys)
        if server_key is not None:
            d.curve_serverkey = server_key
        d.connect(endpoint)
        return d

    def close(self):
        for router, mon in self.monitors:
            router.disable_monitor()
            mon.close(linger=0)
        for s in self.socks:
            s.close(linger=0)
        for a in self.auths:
            assert a.stop(timeout=5)
        self.ctx.term()


def next_handshake(mon, timeout_ms=WAIT_MS):
    """The next handshake event of a ROUTER monitor (dict), or fail after ``timeout_ms``."""
    assert mon.poll(timeout_ms), "no handshake within the deadline"
    return recv_monitor_message(mon)


def received(router, timeout_ms):
    """Every message the ROUTER gets within ``timeout_ms`` (then until it is idle)."""
    got = []
    while router.poll(timeout_ms):
        got.append(router.recv_multipart())
        timeout_ms = 0
    return got


def a_stranger(tmp_path):
    """A client pair (and server key) from another ps-keygen run: in no allow-list here."""
    return CurveKeys.load(generate(str(tmp_path / "other"), clients=1)["folder"])


def worker_only_copy(keydir, dest, client="client-0"):
    """What a host that only runs workers holds: the server PUBLIC key and its own pair."""
    os.makedirs(dest, mode=0o700)
    for name in ("server.key", f"{client}.key", f"{client}.key_secret"):
        shutil.copy2(os.path.join(keydir, name), os.path.join(dest, name))
    return dest


# ---------------------------------------------------------------- (a) allowed
def test_authorized_client_request_reaches_curve_router_and_gets_reply(keydir, tmp_path, net):
    server_keys = CurveKeys.load(keydir)
    client_keys = CurveKeys.load(worker_only_copy(keydir, str(tmp_path / "worker-host")))
    auth, router, mon, ep = net.curve_router(server_keys)
    dealer = net.dealer(ep, client_keys)

    dealer.send_multipart([b"ping"])
    assert router.poll(WAIT_MS)
    ident, body = router.recv_multipart()
    assert body == b"ping"
    router.send_multipart([ident, b"pong"])
    assert dealer.poll(WAIT_MS)
    assert dealer.recv_multipart() == [b"pong"]
    assert auth.statistics()["allowed"] == 1
    assert auth.statistics()["denied"] == 0


# ---------------------------------------------------------------- (b)-(d) refused
def assert_refused(net, router, mon, ep, good_keys, expect_event):
    """A refused DEALER sent a message: it must never reach the ROUTER."""
    event = next_handshake(mon)
    assert event["event"] == expect_event, event
    assert received(router, SILENCE_MS) == []
    # the ROUTER works: an allowed client's message arrives, and only that one
    good = net.dealer(ep, good_keys)
    good.send_multipart([b"good"])
    assert router.poll(WAIT_MS)
    got = received(router, SILENCE_MS)
    assert [frames[1:] for frames in got] == [[b"good"]]
    return got


def test_plain_text_client_never_reaches_curve_router(keydir, net):
    keys = CurveKeys.load(keydir)
    auth, router, mon, ep = net.curve_router(keys)
    plain = net.dealer(ep)
    plain.send_multipart([b"let me in"])
    assert_refused(net, router, mon, ep, keys, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    # refused by libzmq's mechanism check, before any ZAP request
    assert auth.statistics()["denied"] == 0


def test_client_key_not_in_allow_list_is_denied_and_logged_once(keydir, tmp_path, net, caplog):
    keys = CurveKeys.load(keydir)
    stranger = a_stranger(tmp_path)
    auth, router, mon, ep = net.curve_router(keys)
    caplog.set_level(logging.WARNING, logger="zps.security")
    # right server key, own pair: CURVE itself succeeds, the allow-list says no;
    # two connections with that key are two refusals and one log line
    intruder = dataclasses.replace(stranger, server_public=keys.server_public)
    for _ in range(2):
        net.dealer(ep, intruder).send_multipart([b"let me in"])
        assert next_handshake(mon)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert auth.statistics() == {"allowed": 0, "denied": 2, "denied_keys": 1, "running": True}
    refusals = [r.getMessage() for r in caplog.records if "refused CURVE client key" in r.getMessage()]
    assert len(refusals) == 1
    assert stranger.client_public.decode() in refusals[0] and "from 127.0.0.1" in refusals[0]
    good = net.dealer(ep, keys)
    good.send_multipart([b"good"])
    assert next_handshake(mon)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert [f[1:] for f in received(router, WAIT_MS)] == [[b"good"]]  # nothing from the intruders
    assert auth.statistics()["allowed"] == 1


def test_client_with_wrong_server_key_never_reaches_curve_router(keydir, tmp_path, net):
    keys = CurveKeys.load(keydir)
    auth, router, mon, ep = net.curve_router(keys)
    fooled = net.dealer(ep, keys, server_key=a_stranger(tmp_path).server_public)
    fooled.send_multipart([b"hello?"])
    assert_refused(net, router, mon, ep, keys, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    assert auth.statistics()["denied"] == 0  # the server could not even read its HELLO


def test_refused_keys_are_remembered_up_to_a_bound(keydir, net, monkeypatch, caplog):
    monkeypatch.setattr(security, "MAX_REMEMBERED_KEYS", 2)
    auth = net.authenticator(CurveKeys.load(keydir))
    caplog.set_level(logging.WARNING, logger="zps.security")
    for k in (b"a", b"b", b"c", b"d", b"a"):  # what pyzmq hands the provider, per handshake
        assert auth._verdict("zps", k * 40) is False
    assert auth.statistics()["denied"] == 5 and auth.statistics()["denied_keys"] == 2
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("refused CURVE client key" in m for m in msgs) == 2
    assert sum("further ones are counted, not logged" in m for m in msgs) == 1


def test_curve_server_refuses_a_context_without_authenticator(keydir, net):
    # libzmq lets every client key in when no ZAP handler runs: never allow that state
    router = net.socket(zmq.ROUTER)
    assert not zap_handler_running(net.ctx)
    with pytest.raises(ConfigError, match="Authenticator"):
        secure_server(router, CurveKeys.load(keydir))


def test_one_authenticator_per_context(keydir, net):
    keys = CurveKeys.load(keydir)
    net.authenticator(keys)
    assert zap_handler_running(net.ctx)
    with pytest.raises(ConfigError, match="one Authenticator per context"):
        Authenticator(net.ctx, keys).start()


def test_secure_socket_after_bind_is_an_error(keydir, net):
    keys = CurveKeys.load(keydir)
    net.authenticator(keys)
    router = net.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:0")
    with pytest.raises(ValueError, match="before the socket binds"):
        secure_server(router, keys)


# ---------------------------------------------------------------- (e) key folder
def test_keygen_modes_secret_0600_folders_0700(keydir):
    assert mode_of(keydir) == 0o700
    assert mode_of(os.path.join(keydir, "authorized")) == 0o700
    for name in ("server", "client-0", "client-1"):
        assert mode_of(os.path.join(keydir, f"{name}.key_secret")) == 0o600
    assert sorted(os.listdir(os.path.join(keydir, "authorized"))) == ["client-0.key", "client-1.key"]
    assert not [e for e in os.listdir(keydir) if e.startswith(".keygen")]


def test_keygen_refuses_to_overwrite_and_force_rotates(keydir):
    before = CurveKeys.load(keydir)
    with pytest.raises(ConfigError, match=r"server\.key already exists.*--force"):
        generate(keydir, clients=1)
    assert CurveKeys.load(keydir).server_public == before.server_public
    out = generate(keydir, clients=1, force=True)
    after = CurveKeys.load(keydir)
    assert after.server_public != before.server_public
    # no old client pair nor old allow-list entry survives a rotation
    assert not os.path.exists(os.path.join(keydir, "client-1.key_secret"))
    assert os.listdir(os.path.join(keydir, "authorized")) == ["client-0.key"]
    assert after.allowed_keys() == {after.client_public}
    assert os.path.join(keydir, "client-1.key") in out["removed"]


def test_keygen_rejects_bad_client_count(tmp_path):
    with pytest.raises(ConfigError, match="clients must be an integer >= 1, got 0"):
        generate(str(tmp_path / "k"), clients=0)


def test_keygen_cli_prints_files_and_hosts(tmp_path, capsys):
    d = str(tmp_path / "k")
    assert main([d, "--clients", "2"]) == 0
    out = capsys.readouterr().out
    assert "worker-only hosts" in out and "server.key_secret" in out and "--curve-keys" in out
    assert main([d]) == 2
    assert "server.key already exists" in capsys.readouterr().err


def test_worker_only_layout_loads_as_client_not_server(keydir, tmp_path):
    keys = CurveKeys.load(worker_only_copy(keydir, str(tmp_path / "w"), "client-1"))
    assert keys.server_secret is None and keys.authorized is None
    assert keys.can_connect and not keys.can_serve
    assert keys.client_name == "client-1"
    keys.require_client()
    with pytest.raises(ConfigError, match=r"server\.key_secret is missing.*worker-only host needs no"):
        keys.require_server()


def test_client_pair_chosen_by_name_or_number(keydir):
    assert CurveKeys.load(keydir).client_name == "client-0"  # lowest number by default
    one = CurveKeys.load(keydir, client=1)
    assert one.client_name == "client-1"
    assert one.client_public == CurveKeys.load(keydir, client="client-1").client_public
    assert one.client_public != CurveKeys.load(keydir).client_public


def test_secrets_stay_out_of_repr(keydir):
    keys = CurveKeys.load(keydir)
    assert keys.server_secret.decode() not in repr(keys)
    assert keys.client_secret.decode() not in repr(keys)


# ---------------------------------------------------------------- (f) load errors
def test_load_error_names_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere does not exist.*ps-keygen"):
        CurveKeys.load(str(tmp_path / "nowhere"))


def test_load_error_names_missing_server_key(keydir):
    os.remove(os.path.join(keydir, "server.key"))
    with pytest.raises(ConfigError, match=r"server\.key is missing.*copy server\.key"):
        CurveKeys.load(keydir)


def test_load_error_names_missing_client_pair(keydir):
    with pytest.raises(ConfigError, match=r"client-7\.key_secret is missing.*client-7\.key"):
        CurveKeys.load(keydir, client=7)


def test_coordinator_host_without_client_pair_loads_but_cannot_connect(keydir):
    for name in os.listdir(keydir):
        if name.startswith("client-"):
            os.remove(os.path.join(keydir, name))
    keys = CurveKeys.load(keydir)
    assert keys.can_serve and not keys.can_connect
    with pytest.raises(ConfigError, match=r"no client key pair in .*client-K\.key_secret"):
        keys.require_client()


def test_load_error_names_missing_allow_list(keydir):
    shutil.rmtree(os.path.join(keydir, "authorized"))
    keys = CurveKeys.load(keydir)
    with pytest.raises(ConfigError, match=r"authorized is missing"):
        keys.require_server()


def test_load_error_names_corrupt_key_file(keydir):
    path = os.path.join(keydir, "server.key")
    with open(path, "w") as fh:
        fh.write("curve\n    public-key = \"too short\"\n")
    with pytest.raises(ConfigError, match=r"server\.key holds a malformed CURVE key"):
        CurveKeys.load(keydir)


def test_load_error_names_mismatched_pair(keydir, tmp_path):
    other = generate(str(tmp_path / "other"))["folder"]
    shutil.copy2(os.path.join(other, "server.key"), os.path.join(keydir, "server.key"))
    with pytest.raises(ConfigError, match=r"server\.key_secret and .*server\.key are not one key pair"):
        CurveKeys.load(keydir)
