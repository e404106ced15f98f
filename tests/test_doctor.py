"""Addresses and reachability (common.netaddr) and the pre-flight doctor (zpscluster.doctor).

Pure rules first (endpoints, bind/advertise, skew arithmetic, the verdict),
then real sockets on 127.0.0.1: probes against a ZeroMQ ROUTER, a plain TCP
listener and a closed port, and the doctor against an in-process coordinator
and shard server.
"""
import json
import socket
import subprocess
import threading

import pytest
import zmq

from common import netaddr
from common.config import CoordinatorSettings, JobSettings, ServerSettings
from common.errors import ConfigError
from common.netaddr import AddressError
from tests.conftest import ROOT
from zpscluster import doctor as doc
from zpscluster.doctor import Check, Doctor, EchoSample
from zpscluster.procs import bin_cmd


# ------------------------------------------------------------------ endpoints and rules
@pytest.mark.parametrize("ep,expect", [("tcp://10.0.0.1:5555", ("10.0.0.1", 5555)),
                                       ("tcp://node01:0", ("node01", 0)),
                                       ("tcp://[fe80::1]:7", ("fe80::1", 7)),
                                       ("tcp://10.0.0.9:0;10.0.0.1:5555", ("10.0.0.1", 5555))])
def test_split_endpoint_reads_host_and_port(ep, expect):
    assert netaddr.split_endpoint(ep) == expect


@pytest.mark.parametrize("bad", ["10.0.0.1:5555", "tcp://10.0.0.1", "tcp://:5", "tcp://h:99999", "ipc:///x"])
def test_split_endpoint_names_a_bad_value(bad):
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        netaddr.split_endpoint(bad)


def test_join_endpoint_brackets_ipv6():
    assert netaddr.join_endpoint("::1", 5) == "tcp://[::1]:5"
    assert netaddr.join_endpoint("10.0.0.1", 5) == "tcp://10.0.0.1:5"


def test_peers_are_remote_unless_the_coordinator_is_loopback():
    assert not netaddr.peers_are_remote("tcp://127.0.0.1:5555")
    assert not netaddr.peers_are_remote("tcp://localhost:5555")
    assert not netaddr.peers_are_remote("")
    assert netaddr.peers_are_remote("tcp://10.0.0.1:5555")
    assert not netaddr.peers_are_remote("tcp://myhost:1", resolver=lambda h: "127.0.1.1")
    assert netaddr.peers_are_remote("tcp://myhost:1", resolver=lambda h: "10.1.2.3")


@pytest.mark.parametrize("ep", ["tcp://127.0.0.1:4000", "tcp://0.0.0.0:4000", "tcp://localhost:4000",
                                "tcp://*:4000"])
def test_advertising_loopback_or_wildcard_to_remote_peers_is_refused_with_what_to_set(ep):
    with pytest.raises(AddressError) as err:
        netaddr.check_advertisable(ep, peers_remote=True, interfaces=lambda: "eth0 10.0.0.2")
    text = str(err.value)
    assert ep in text and "--bind" in text and "--advertise" in text and "--interface" in text
    assert "eth0 10.0.0.2" in text
    assert isinstance(err.value, ConfigError)


def test_a_name_resolving_to_loopback_is_refused_too():
    with pytest.raises(AddressError, match="resolves to loopback on this host \\(127.0.1.1\\)"):
        netaddr.check_advertisable("tcp://myhost:4000", True, resolver=lambda h: "127.0.1.1",
                                   interfaces=lambda: "")


def test_loopback_is_fine_when_every_peer_is_local_and_real_addresses_always():
    netaddr.check_advertisable("tcp://127.0.0.1:4000", peers_remote=False)
    netaddr.check_advertisable("tcp://10.0.0.2:4000", peers_remote=True)
    netaddr.check_advertisable("tcp://unresolvable.invalid:4000", True, resolver=_fail_resolve)


def _fail_resolve(host):
    raise OSError("no such host")


def test_interface_replaces_a_loopback_bind_and_becomes_the_advertised_address():
    look = {"eth0": "10.0.0.2"}.__getitem__
    assert netaddr.apply_interface("tcp://127.0.0.1:0", "", "eth0", look) == ("tcp://10.0.0.2:0", "10.0.0.2")
    assert netaddr.apply_interface("tcp://0.0.0.0:7000", "", "eth0", look) == ("tcp://0.0.0.0:7000", "10.0.0.2")
    assert netaddr.apply_interface("tcp://127.0.0.1:0", "node2", "eth0", look) == ("tcp://10.0.0.2:0", "node2")
    assert netaddr.apply_interface("tcp://127.0.0.1:0", "", "", look) == ("tcp://127.0.0.1:0", "")
    with pytest.raises(AddressError, match="two different addresses"):
        netaddr.apply_interface("tcp://10.9.9.9:0", "", "eth0", look)


def test_interface_address_of_loopback_and_an_unknown_card():
    assert netaddr.interface_address("lo") == "127.0.0.1"
    with pytest.raises(AddressError, match="no network interface named 'nosuch0'.*lo 127.0.0.1"):
        netaddr.interface_address("nosuch0")
    table = {"eth0": ["fd00::2"]}
    with pytest.raises(AddressError, match="no IPv4 address"):
        netaddr.interface_address("eth0", table=table)
    assert netaddr.interface_address("eth0", socket.AF_INET6, table=table) == "fd00::2"


def test_local_addresses_and_routes():
    assert netaddr.is_local_address("127.0.0.1")
    assert not netaddr.is_local_address("192.0.2.55")  # TEST-NET-1: never assigned
    assert not netaddr.is_local_address("not-an-address")
    assert netaddr.route_address("127.0.0.1") == "127.0.0.1"


def test_default_bind_is_loopback_for_local_peers_else_the_route_to_the_coordinator():
    assert netaddr.default_bind("tcp://127.0.0.1:5") == "tcp://127.0.0.1:0"
    assert netaddr.default_bind("tcp://10.0.0.1:5", 7000, route=lambda h: "10.0.0.3") == "tcp://10.0.0.3:7000"


def test_unreachable_message_names_the_node_the_address_and_the_fix():
    text = netaddr.unreachable_message("server", 1, "nodeB", 4242, "tcp://10.0.0.99:4000", "no route")
    assert "server 1 (host nodeB, pid 4242)" in text and "tcp://10.0.0.99:4000" in text
    assert "--advertise" in text and "ps-doctor" in text
    assert netaddr.unreachable_message("server", -1, "", 1, "tcp://x:1", "e").startswith("a server (host ?")


# ------------------------------------------------------------------ probes (real sockets on 127.0.0.1)
@pytest.fixture
def router(zctx):
    s = zctx.socket(zmq.ROUTER)
    s.bind("tcp://127.0.0.1:0")
    yield s.getsockopt_string(zmq.LAST_ENDPOINT)
    s.close(linger=0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_reaches_a_zeromq_socket_nobody_reads_yet(router):
    ok, rtt, err = netaddr.probe(router, 2.0)
    assert ok and rtt is not None and rtt >= 0 and err == ""


def test_probe_says_nothing_listens_on_a_closed_port():
    ok, rtt, err = netaddr.probe(f"tcp://127.0.0.1:{_closed_port()}", 2.0)
    assert not ok and rtt is None and "refused" in err and "nothing listens" in err


def test_probe_tells_another_program_from_zeromq():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def answer():
        c, _ = srv.accept()
        c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        c.close()
    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        ok, _, err = netaddr.probe(f"tcp://127.0.0.1:{port}", 2.0)
        assert not ok and "not a ZeroMQ endpoint" in err
    finally:
        t.join(5)
        srv.close()


def test_probe_gives_up_on_a_silent_listener_within_its_timeout():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)  # the kernel completes the handshake; nobody ever writes
    try:
        ok, _, err = netaddr.probe(f"tcp://127.0.0.1:{srv.getsockname()[1]}", 0.3)
        assert not ok and "no ZeroMQ greeting within 0.3s" in err
    finally:
        srv.close()


def test_probe_rejects_the_unspecified_address_and_bad_endpoints():
    assert "unspecified" in netaddr.probe("tcp://0.0.0.0:5", 1).error
    assert not netaddr.probe("nonsense", 1).ok
    with pytest.raises(ValueError):
        netaddr.probe("tcp://127.0.0.1:5", 0)


def test_port_free_knows_a_taken_port_a_free_one_and_a_foreign_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        ok, why = netaddr.port_free(f"tcp://127.0.0.1:{port}")
        assert not ok and f"port {port} on 127.0.0.1 is in use" in why
    assert netaddr.port_free("tcp://127.0.0.1:0")[0]
    assert netaddr.port_free(f"tcp://127.0.0.1:{_closed_port()}")[0]
    ok, why = netaddr.port_free("tcp://192.0.2.55:0")
    assert not ok and "not an address of this host" in why


# ------------------------------------------------------------------ pure doctor pieces
def test_clock_skew_takes_the_middle_of_the_round_trip():
    skew, unc = doc.clock_skew(EchoSample(sent=100.0, remote=105.5, received=101.0, rtt=1.0))
    assert skew == pytest.approx(5.0) and unc == pytest.approx(0.5)


def test_skew_check_uses_the_fastest_sample_and_allows_its_uncertainty():
    slow = EchoSample(100.0, 103.0, 104.0, 4.0)     # would say +1 s, but +-2 s
    fast = EchoSample(100.0, 100.002, 100.002, 0.002)
    c = doc.skew_check("server 0", [slow, fast], bound=0.5)
    assert c.status == "ok" and c.values["skew_ms"] == pytest.approx(1.0, abs=1e-6)
    bad = doc.skew_check("server 0", [EchoSample(100.0, 102.0, 100.01, 0.01)], bound=0.5)
    assert bad.status == "fail" and "ahead of" in bad.fix and "NTP" in bad.fix
    assert doc.skew_check("x", [], 1.0).status == "skip"


def test_bandwidth_counts_both_directions():
    assert doc.bandwidth(4 << 20, 0.5) == pytest.approx(16 << 20)
    with pytest.raises(ValueError):
        doc.bandwidth(1, 0)


def test_verdict_and_table_list_every_failure_with_its_fix():
    checks = [Check("reach", "server 1 tcp://h:1", "fail", "refused", "start server 1"),
              Check("clock", "coordinator", "ok", "skew +0.1 ms"),
              Check("curve", "-", "skip", "no keys"), Check("reach", "server 2", "warn", "not registered")]
    ok, text = doc.verdict(checks)
    assert not ok and text.startswith("FAIL: 1 of 4 checks failed")
    table = doc.render(checks, "title")
    assert table.splitlines()[0] == "title" and "FAIL" in table and "fixes:" in table
    assert "  - reach server 1 tcp://h:1: start server 1" in table
    assert doc.verdict(checks[1:])[0]
    with pytest.raises(ValueError):
        Check("x", "y", "bad", "z")


# ------------------------------------------------------------------ the doctor against a live job (in-process)
@pytest.fixture(scope="module")
def job():
    from common.control import CoordinatorLink
    from ps.coordinator import Coordinator
    from ps.server import ShardServer

    coord = Coordinator(CoordinatorSettings(bind="tcp://127.0.0.1:0",
                                            job=JobSettings(num_servers=1, num_workers=1))).run_in_background()
    server = ShardServer(ServerSettings(bind="tcp://127.0.0.1:0")).run_in_background()
    link = CoordinatorLink(coord.endpoint, "server", timeout=10)
    try:
        link.register(0, server.endpoint)
        yield coord.endpoint, server.endpoint
    finally:
        link.close()
        server.shutdown(5)
        coord.shutdown(5)


def _by(checks, check, target_prefix):
    return [c for c in checks if c.check == check and c.target.startswith(target_prefix)]


def test_doctor_passes_against_a_healthy_job(job):
    url, server = job
    checks = Doctor(url, all_servers=True, binds=["tcp://127.0.0.1:0"], echo_bytes=1 << 20, timeout=5).run()
    ok, text = doc.verdict(checks)
    assert ok, doc.render(checks)
    assert _by(checks, "reach", "coordinator")[0].status == "ok"
    assert _by(checks, "version", "coordinator")[0].status == "ok"
    assert [c.target for c in _by(checks, "reach", "server 0")] == [f"server 0 {server}"]
    echo = _by(checks, "echo", "server 0")[0]
    assert echo.values["rtt_ms"] > 0 and echo.values["mib_per_s"] > 0 and "1 MiB echo" in echo.detail
    assert {c.status for c in _by(checks, "clock", "")} == {"ok"}
    assert _by(checks, "curve", "")[0].status == "skip"


def test_doctor_reports_a_skewed_clock_with_the_fix(job):
    url, _ = job
    checks = Doctor(url, all_servers=True, echo_bytes=0, wallclock=lambda: __import__("time").time() - 30).run()
    clocks = _by(checks, "clock", "")
    assert clocks and all(c.status == "fail" and "ahead of" in c.fix for c in clocks)
    assert not doc.verdict(checks)[0]


def test_doctor_names_an_unreachable_server_and_a_version_mismatch(job, monkeypatch):
    url, _ = job
    dead = f"tcp://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr("common.control.VERSION", "0.0.0-other")
    checks = Doctor(url, servers=[dead], echo_bytes=0, timeout=2).run()
    reach = _by(checks, "reach", "server 0")[0]
    assert reach.status == "fail" and dead in reach.target and "start server 0" in reach.fix
    version = _by(checks, "version", "coordinator")[0]
    assert version.status == "fail" and "0.0.0-other" in version.detail


def test_doctor_stops_at_an_unreachable_coordinator():
    url = f"tcp://127.0.0.1:{_closed_port()}"
    checks = Doctor(url, all_servers=True, timeout=1).run()
    assert [c.check for c in checks if c.status == "fail"] == ["reach"]
    assert not _by(checks, "version", "")


def test_doctor_fails_a_port_in_use(job):
    _, server = job
    checks = Doctor(binds=[server]).run()
    assert checks[0].check == "port" and checks[0].status == "fail" and "in use" in checks[0].detail


def test_the_curve_check_is_pluggable_and_skipped_without_keys(job):
    url, _ = job
    seen = []

    def fake(keys, endpoints, timeout):
        seen.append((keys, list(endpoints)))
        return [Check("curve", "fake", "ok", "plugged in")]
    checks = Doctor(url, all_servers=True, echo_bytes=0, curve_keys="/keys", curve_check=fake).run()
    assert seen[0][0] == "/keys" and [n for n, _ in seen[0][1]] == ["coordinator", "server 0"]
    assert _by(checks, "curve", "fake")[0].detail == "plugged in"
    assert doc.check_curve(None, [("coordinator", url)], 1)[0].status == "skip"


def test_the_curve_check_fails_on_a_missing_key_folder(tmp_path):
    pytest.importorskip("common.security")
    (row,) = doc.check_curve(str(tmp_path / "nokeys"), [], 1)
    assert row.status == "fail" and "ps-keygen" in row.fix


def test_the_curve_check_completes_a_handshake_and_spots_a_plain_server(tmp_path, zctx):
    security = pytest.importorskip("common.security")
    folder = security.generate(str(tmp_path / "keys"), clients=1)["folder"]
    keys = security.CurveKeys.load(folder)
    auth = security.Authenticator(zctx, keys).start()
    secure = security.secure_server(zctx.socket(zmq.ROUTER), keys)
    plain = zctx.socket(zmq.ROUTER)
    try:
        secure.bind("tcp://127.0.0.1:0")
        plain.bind("tcp://127.0.0.1:0")
        rows = doc.check_curve(folder, [("server 0", secure.getsockopt_string(zmq.LAST_ENDPOINT)),
                                        ("server 1", plain.getsockopt_string(zmq.LAST_ENDPOINT))], 3)
        assert [r.status for r in rows] == ["ok", "fail"], rows
        assert "server 1" in rows[1].target and "CURVE" in rows[1].fix
    finally:
        secure.close(linger=0)
        plain.close(linger=0)
        auth.stop(5)


# ------------------------------------------------------------------ the command line
def test_ps_doctor_needs_something_to_check():
    out = subprocess.run(bin_cmd("ps-doctor"), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--coordinator" in out.stderr
    out = subprocess.run(bin_cmd("ps-doctor", "--coordinator", "nonsense"), capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "tcp://HOST:PORT" in out.stderr


def test_ps_doctor_prints_the_table_and_json_and_exits_by_the_verdict(job, tmp_path):
    url, server = job
    path = tmp_path / "d.json"
    out = subprocess.run(bin_cmd("ps-doctor", "--coordinator", url, "--all", "--echo-mib", "1", "--json", str(path)),
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CHECK" in out.stdout and "verdict: PASS" in out.stdout and server in out.stdout
    data = json.loads(path.read_text())
    assert data["passed"] and {c["check"] for c in data["checks"]} >= {"reach", "clock", "echo", "version"}
    # --json -: stdout is the JSON alone, for a pipe; the table goes to stderr
    out = subprocess.run(bin_cmd("ps-doctor", "--coordinator", url, "--echo-mib", "0", "--json", "-"),
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["passed"] and "verdict: PASS" in out.stderr
    dead = f"tcp://127.0.0.1:{_closed_port()}"
    out = subprocess.run(bin_cmd("ps-doctor", "--coordinator", url, "--server", dead, "--echo-mib", "0"),
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1 and "verdict: FAIL" in out.stdout and "fixes:" in out.stdout and dead in out.stdout
