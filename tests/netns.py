"""Network namespaces posing as hosts, for multi-host tests on one machine.

``NetnsCluster(["a", "b", "c"])`` makes one namespace per host, each with
loopback up and one card named ``zps0`` holding a private address
(10.213.0.1, .2, ...), the cards joined by veth pairs to one bridge in the
root namespace (which gets no address: the hosts talk only to each other).
Names carry the test process's pid (``zpsmh<pid><host>``, links
``zmb<pid>`` / ``zmv<pid><host>``), so concurrent runs do not collide, and
``cleanup_stale()`` removes what a crashed earlier run left (a pid that no
longer runs).  ``destroy()`` removes everything this cluster made and
never raises; use the cluster as a context manager or in a ``finally``.

``block_port(host, port)`` drops TCP connections to a port on one host, the
way a firewall would: with iptables when the host has it, else with a
policy-routing rule (``ip rule ... ipproto tcp dport PORT blackhole``), which
needs no netfilter at all.  ``run``/``cmd`` run a command inside a host.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Sequence

PREFIX = "zpsmh"
CARD = "zps0"
_NS_RE = re.compile(rf"^{PREFIX}(\d+)[a-z]+$")
_LINK_RE = re.compile(r"^zm[bvp](\d+)[a-z]*$")


class NetnsError(RuntimeError):
    """A namespace or link could not be made."""


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
    return out


def unavailable_reason() -> str:
    """'' when namespaces can be made here, else why not (for pytest.skip)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (run the tests as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}probe"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"cannot create a network namespace: {out.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def cleanup_stale() -> list[str]:
    """Remove namespaces and links of earlier runs whose process is gone; their names."""
    removed = []
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_RE.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    out = _ip("-o", "link", "show", check=False).stdout
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = _LINK_RE.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


class NetnsCluster:
    """Hosts (network namespaces) on one private bridge."""

    def __init__(self, hosts: Sequence[str] = ("a", "b", "c"), subnet: str = "10.213.0", tag: str | None = None):
        if not hosts or any(not re.fullmatch(r"[a-z]{1,3}", h) for h in hosts):
            raise ValueError(f"host names must be 1-3 lowercase letters, got {list(hosts)!r}")
        self.tag = tag or str(os.getpid())
        self.hosts = list(hosts)
        self.subnet = subnet
        self.bridge = f"zmb{self.tag}"
        self._made_ns: list[str] = []
        self._made_links: list[str] = []
        self._blocks: list[tuple[str, list[str]]] = []

    # -------------------------------------------------------------- names
    def ns(self, host: str) -> str:
        return f"{PREFIX}{self.tag}{host}"

    def addr(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    def cmd(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: Sequence[str], check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        out = subprocess.run(self.cmd(host, argv), capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise NetnsError(f"{host}: {' '.join(argv)}: {out.stderr.strip()}")
        return out

    # -------------------------------------------------------------- lifecycle
    def create(self) -> "NetnsCluster":
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made_links.append(self.bridge)
            _ip("link", "set", self.bridge, "up")
            for h in self.hosts:
                ns, outer, inner = self.ns(h), f"zmv{self.tag}{h}", f"zmp{self.tag}{h}"
                _ip("netns", "add", ns)
                self._made_ns.append(ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                self._made_links.append(outer)
                _ip("link", "set", inner, "netns", ns)
                _ip("-n", ns, "link", "set", inner, "name", CARD)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(h)}/24", "dev", CARD)
                _ip("-n", ns, "link", "set", CARD, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except Exception:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Remove every namespace and link this cluster made; never raises."""
        for ns, undo in reversed(self._blocks):
            subprocess.run(["ip", "netns", "exec", ns, *undo], capture_output=True, timeout=20)
        self._blocks = []
        for ns in reversed(self._made_ns):
            _ip("netns", "del", ns, check=False)
        for link in reversed(self._made_links):
            if _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "del", link, check=False)
        self._made_ns, self._made_links = [], []

    def leftovers(self) -> list[str]:
        """Namespaces and links of this cluster still present (empty after destroy)."""
        names = [ln.split()[0] for ln in _ip("netns", "list", check=False).stdout.splitlines() if ln.split()]
        left = [n for n in names if n.startswith(f"{PREFIX}{self.tag}")]
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            parts = line.split(":")
            if len(parts) > 1:
                name = parts[1].strip().split("@")[0]
                if _LINK_RE.match(name) and _LINK_RE.match(name).group(1) == self.tag:
                    left.append(name)
        return left

    def __enter__(self) -> "NetnsCluster":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()

    # -------------------------------------------------------------- firewalling
    def block_port(self, host: str, port: int) -> str:
        """Drop incoming TCP connections to ``port`` on ``host``; returns the method used.

        'iptables' (an INPUT DROP rule) when the host has iptables, else
        'ip-rule' (a policy-routing blackhole for packets to that port
        arriving on the card).  NetnsError when neither works.
        """
        ns = self.ns(host)
        if shutil.which("iptables"):
            rule = ["-p", "tcp", "--dport", str(port), "-j", "DROP"]
            out = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-A", "INPUT", *rule],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0:
                self._blocks.append((ns, ["iptables", "-D", "INPUT", *rule]))
                return "iptables"
        # Local delivery is decided by the 'local' routing table, looked up by rule 0; move that lookup
        # behind a rule that blackholes TCP to the port for packets that arrive on the card.
        rules = _ip("-n", ns, "rule", "show").stdout
        if "100:\tfrom all lookup local" not in rules:
            _ip("-n", ns, "rule", "add", "pref", "100", "lookup", "local")
            _ip("-n", ns, "rule", "del", "pref", "0", check=False)
        sel = ["iif", CARD, "ipproto", "tcp", "dport", str(port)]
        out = _ip("-n", ns, "rule", "add", "pref", "10", *sel, "blackhole", check=False)
        if out.returncode != 0:
            raise NetnsError(f"cannot block port {port} on {host}: no iptables and `ip rule ... dport` "
                             f"failed ({out.stderr.strip()})")
        self._blocks.append((ns, ["ip", "rule", "del", "pref", "10", *sel, "blackhole"]))
        return "ip-rule"

    def unblock_all(self) -> None:
        for ns, undo in reversed(self._blocks):
            subprocess.run(["ip", "netns", "exec", ns, *undo], capture_output=True, timeout=20)
        self._blocks = []
