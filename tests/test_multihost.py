"""A job across three "hosts" (network namespaces on one bridge), as a user runs one.

    host a  10.213.0.1   coordinator (rank 0), server 0 (rank 1)
    host b  10.213.0.2   server 1 (rank 2)
    host c  10.213.0.3   workers 0 and 1 (ranks 3, 4)

Every process is ``ip netns exec NS python bin/...`` waited on through its
READY line and stopped by pid at teardown; the namespaces and links are
removed even when a test fails, and stale ones of a crashed earlier run are
removed first.  Skipped only where namespaces cannot be made (not root, no
``ip``).
"""
import json
import os
import sys

import pytest

from tests.conftest import ROOT
from tests.netns import NetnsCluster, NetnsError, cleanup_stale, unavailable_reason
from zpscluster.procs import RoleFailed, RoleProcess, bin_cmd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MASTER_PORT = 29500
ENV = {"PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    stale = cleanup_stale()
    if stale:
        print(f"removed stale namespaces/links of a crashed run: {stale}")
    c = NetnsCluster(["a", "b", "c"])
    try:
        try:
            c.create()
        except NetnsError as exc:
            pytest.skip(f"cannot build the namespace cluster: {exc}")
        yield c
    finally:
        c.destroy()
        assert not c.leftovers(), f"namespaces or links left behind: {c.leftovers()}"


class Hosts:
    """Processes started inside the cluster's hosts; every one stopped by pid at teardown."""

    def __init__(self, cluster: NetnsCluster):
        self.c = cluster
        self.procs: list[RoleProcess] = []

    def start(self, host: str, name: str, cmd: list[str], env: dict | None = None) -> RoleProcess:
        p = RoleProcess(self.c.cmd(host, cmd), name, env={**ENV, **(env or {})}, cwd=ROOT)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=10)


@pytest.fixture
def hosts(cluster):
    h = Hosts(cluster)
    try:
        yield h
    finally:
        h.stop_all()


def test_a_crashed_runs_namespaces_and_links_are_removed_and_live_ones_kept(cluster):
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not os.path.exists(f"/proc/{pid}"))
    ghost = NetnsCluster(["a"], tag=str(dead)).create()  # what a run killed mid-test leaves behind
    try:
        removed = cleanup_stale()
        assert set(removed) >= {ghost.ns("a"), f"zmb{dead}"}, removed  # its veth went with the namespace
        assert not ghost.leftovers()
        assert cluster.leftovers()  # this run's cluster belongs to a live process: kept
    finally:
        ghost.destroy()


def node_env(rank: int, local_rank: int, local_world: int, world: int = 5) -> dict:
    """What torchrun (or a PyTorchJob) sets in each process of a multi-node job."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world), "MASTER_ADDR": "10.213.0.1", "MASTER_PORT": str(MASTER_PORT)}


def _digits_across_three_hosts(hosts, tmp_path, extra_flags=()):
    out = str(tmp_path / "out")
    job = [*bin_cmd("ps-node"), "--servers", "2", "--workers", "2", "--workload", "digits", "--steps", "300",
           "--staleness", "2", "--out", out, "--save", str(tmp_path / "model.pt"), *extra_flags]
    placement = [("a", 0, 0, 2, []), ("a", 1, 1, 2, []), ("b", 2, 0, 1, ["--interface", "zps0"]),
                 ("c", 3, 0, 2, []), ("c", 4, 1, 2, [])]
    procs = [hosts.start(h, f"rank{r}@{h}", job + extra, node_env(r, lr, lw)) for h, r, lr, lw, extra in placement]
    coord, s0, s1, w0, w1 = procs
    info = coord.wait_ready(90)
    assert info["role"] == "coordinator" and info["bound"] == f"tcp://10.213.0.1:{MASTER_PORT + 1}"
    e0, e1 = s0.wait_ready(90)["endpoint"], s1.wait_ready(90)["endpoint"]
    assert e0.startswith("tcp://10.213.0.1:") and e1.startswith("tcp://10.213.0.2:"), (e0, e1)
    for w in (w0, w1):
        assert w.wait_ready(120)["servers"] == [e0, e1]
    for p in procs:
        assert p.wait(180) == 0, f"{p.name}: {p.tail(15)}"
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    assert s["eval_metric"]["name"] == "accuracy" and s["eval_metric"]["value"] >= 0.90
    assert s["workers"] == 2 and s["iterations"] == 600 and s["staleness_max"] <= 2
    return s, procs


def test_digits_across_three_hosts_with_ps_node_reaches_the_target(cluster, hosts, tmp_path):
    s, _ = _digits_across_three_hosts(hosts, tmp_path)
    print(f"3 hosts, digits s=2: accuracy {s['eval_metric']['value']:.4f} in {s['wall_seconds']:.1f}s")


def _cluster_without_workers(cluster, hosts):
    """Coordinator and server 0 on a, server 1 on b, waiting for a worker that never comes."""
    coord = hosts.start("a", "coordinator", bin_cmd("ps-coordinator", "--bind", "tcp://10.213.0.1:0",
                                                    "--num-servers", "2", "--num-workers", "1"))
    url = coord.wait_ready(60)["endpoint"]
    s0 = hosts.start("a", "server0", bin_cmd("ps-server", "--coordinator", url, "--rank", "0",
                                             "--bind", "tcp://10.213.0.1:0"))
    s1 = hosts.start("b", "server1", bin_cmd("ps-server", "--coordinator", url, "--rank", "1",
                                             "--bind", "tcp://10.213.0.2:0"))
    return url, s0.wait_ready(60)["endpoint"], s1, s1.wait_ready(60)["endpoint"]


def _doctor(cluster, tmp_path, url, name):
    path = tmp_path / f"{name}.json"
    out = cluster.run("c", [sys.executable, os.path.join(ROOT, "bin", "ps-doctor"), "--coordinator", url, "--all",
                            "--timeout", "2", "--json", str(path)], check=False, timeout=90)
    print(out.stdout)
    with open(path) as fh:
        return out, json.load(fh)["checks"]


def test_doctor_passes_on_the_cluster_and_names_a_blocked_server_port(cluster, hosts, tmp_path):
    url, e0, s1, e1 = _cluster_without_workers(cluster, hosts)
    out, checks = _doctor(cluster, tmp_path, url, "healthy")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verdict: PASS" in out.stdout
    assert {c["status"] for c in checks} <= {"ok", "skip"}
    kinds = {(c["check"], c["target"].split(" tcp://")[0]) for c in checks}
    for target in ("coordinator", "server 0", "server 1"):
        assert ("reach", target) in kinds and ("clock", target) in kinds
    for target in ("server 0", "server 1"):
        echo = next(c for c in checks if c["check"] == "echo" and c["target"] == target)
        assert echo["values"]["rtt_ms"] > 0 and echo["values"]["mib_per_s"] > 0
    assert any(c["check"] == "curve" and c["status"] == "skip" for c in checks)

    port = int(e1.rsplit(":", 1)[1])
    try:
        method = cluster.block_port("b", port)
    except NetnsError as exc:  # no way to filter here: take the server away instead
        method = f"killed server 1 ({exc})"
        s1.kill()
    print(f"blocked {e1} on host b with: {method}")
    out, checks = _doctor(cluster, tmp_path, url, "blocked")
    assert out.returncode == 1, out.stdout
    assert "verdict: FAIL" in out.stdout
    failed = [c for c in checks if c["status"] == "fail"]
    assert [c["target"] for c in failed] == [f"server 1 {e1}"], failed
    assert failed[0]["check"] == "reach"
    if method in ("iptables", "ip-rule"):
        assert "no answer" in failed[0]["detail"] and f"open TCP port {port}" in failed[0]["fix"]
    else:
        assert "refused" in failed[0]["detail"]
    assert "fixes:" in out.stdout and e1 in out.stdout
    cluster.unblock_all()


def test_the_coordinator_refuses_a_server_advertising_an_address_it_cannot_reach(cluster, hosts):
    coord = hosts.start("a", "coordinator", bin_cmd("ps-coordinator", "--bind", "tcp://10.213.0.1:0",
                                                    "--num-servers", "1", "--num-workers", "1"))
    url = coord.wait_ready(60)["endpoint"]
    bad = "10.213.0.99"  # on the hosts' network, but nobody holds it
    server = hosts.start("b", "server0", bin_cmd("ps-server", "--coordinator", url, "--bind", "tcp://10.213.0.2:0",
                                                 "--advertise", bad))
    try:
        info = server.wait_ready(40)
    except RoleFailed:
        text = server.tail(20)
        print(text)
        assert server.wait(5) != 0
        assert f"tcp://{bad}:" in text and "server" in text and "cannot reach" in text, text
        return
    pytest.fail(f"the coordinator accepted server 0 advertising {info['endpoint']}, unreachable from it")


def test_the_same_job_again_with_curve_on(cluster, hosts, tmp_path):
    """The three-host digits job with --curve-keys on every role: encrypted, authenticated, same result."""
    from common.security import generate

    keys = generate(str(tmp_path / "keys"), clients=1)["folder"]
    s, procs = _digits_across_three_hosts(hosts, tmp_path, ["--curve-keys", keys])
    text = " ".join(p.tail(400) for p in procs)
    assert "neither encrypted nor authenticated" not in text   # no plain-text warning with CURVE on
    print(f"3 hosts with CURVE: accuracy {s['eval_metric']['value']:.4f} in {s['wall_seconds']:.1f}s")
