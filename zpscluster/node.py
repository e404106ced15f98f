"""``ps-node``: one entry point for every process of a job, started by any launcher.

A launcher (torchrun, Slurm's srun, Open MPI's mpirun, Kubeflow's PyTorchJob,
or a hand-written loop) starts ``bin/ps-node`` once per process with the same
job flags as ``bin/ps-launch``; each process reads its rank and the world
size from the launcher's environment and becomes one role::

    rank 0               the coordinator (in this process; it binds the coordinator
                         host's address, never loopback unless every rank is local)
    ranks 1 .. S         servers 0 .. S-1
    ranks S+1 .. S+W     workers 0 .. W-1

(``--coordinator-rank R`` moves the coordinator; ``--roles c,s*2,w*3`` spells
the mapping out.)  Servers and workers first wait for the coordinator (retrying
until ``--connect-timeout``), then run ``ps-server`` / ``ps-worker`` in-process.
Rank 0 writes ``OUT/summary.json`` at the end when OUT holds every worker's files
(one host, or a shared file system).

Conventions read (``detect_placement``; the first that applies wins)::

    launcher   rank / world size                         coordinator host
    torchrun   RANK / WORLD_SIZE (LOCAL_WORLD_SIZE)      MASTER_ADDR   port MASTER_PORT+1
    kubeflow   RANK / WORLD_SIZE (PyTorchJob env)        MASTER_ADDR   port MASTER_PORT+1
    openmpi    OMPI_COMM_WORLD_RANK / _SIZE              --coordinator-host or ZPS_COORDINATOR_HOST
    pmi        PMI_RANK / PMI_SIZE (MPICH, Intel MPI)    --coordinator-host or ZPS_COORDINATOR_HOST
    slurm      SLURM_PROCID / SLURM_NTASKS               first host of SLURM_STEP_NODELIST,
                                                         SLURM_JOB_NODELIST or SLURM_NODELIST

``--port`` (or ZPS_COORDINATOR_PORT) sets the coordinator's port; by default
it is MASTER_PORT + 1 (torchrun's own store holds MASTER_PORT), under Slurm
without MASTER_PORT a port derived from SLURM_JOB_ID, else 29600.

The decisions are pure functions of (flags, env) with the address lookups
injected, so every convention is unit-tested without a launcher.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import threading
import time
import types
from typing import Callable, Mapping, Sequence

from common import netaddr
from common.errors import ConfigError, DeadlineExceeded, ZPSError

log = logging.getLogger("zps.node")

DEFAULT_PORT = 29600
ROLE_NAMES = {"c": "coordinator", "coordinator": "coordinator", "s": "server", "server": "server",
              "w": "worker", "worker": "worker"}
LAUNCHERS = ("auto", "torchrun", "kubeflow", "openmpi", "pmi", "slurm", "flags")


# ------------------------------------------------------------------ placement: rank, world, coordinator host
@dataclasses.dataclass(frozen=True)
class Placement:
    """Where this process sits in the launcher's world."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int = 0
    coordinator_host: str = ""     # '' when the convention names none
    master_port: int = 0           # the launcher's own rendezvous port (0: none)
    all_local: bool | None = None  # every rank on this host? (None: the launcher does not say)
    slurm_job_id: int = 0
    source: str = ""               # which variables gave rank and world size, for messages


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def _opt_int(env: Mapping[str, str], name: str) -> int | None:
    return _int(env, name) if env.get(name, "").strip() else None


def _same(a: int | None, b: int | None) -> bool | None:
    return None if a is None or b is None else a == b


def expand_nodelist(text: str) -> list[str]:
    """Slurm's compressed host list -> host names, in order.

    ``node[01-03,07]`` -> node01 node02 node03 node07 (zero padding kept);
    several groups (``a[1-2],b5``) and several brackets in one name
    (``r[1-2]-n[1-2]``: every combination, leftmost slowest) are handled.
    ValueError naming the text if a bracket is unbalanced or a range bad.
    """
    text = text.strip()
    if not text:
        return []
    hosts: list[str] = []
    for item in _split_top(text):
        hosts += _expand_one(item, text)
    return hosts


def _split_top(text: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    items.append(cur)
    return [i.strip() for i in items if i.strip()]


def _expand_one(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    out = []
    for part in m.group(1).split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in node list {whole!r}")
        if not sep:
            values = [lo]
        else:
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"range {part!r} runs backwards in node list {whole!r}")
            width = len(lo) if lo.startswith("0") else 0
            values = [str(v).zfill(width) for v in range(a, b + 1)]
        for v in values:
            out += _expand_one(head + v + tail, whole)
    return out


def detect_placement(env: Mapping[str, str], launcher: str = "auto", rank: int | None = None,
                     world_size: int | None = None) -> Placement:
    """Rank, world size and coordinator host from the launcher's environment.

    ``launcher`` forces a convention (``auto``: torchrun/Kubeflow, then Open
    MPI, then PMI, then Slurm — an mpirun or torchrun inside a Slurm
    allocation sees its own variables first).  ``rank``/``world_size``
    (flags) override whatever the environment says.  ConfigError when no
    convention applies, naming what to set.
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    master_port = _opt_int(env, "MASTER_PORT") or 0
    p: Placement | None = None
    order = ("torchrun", "openmpi", "pmi", "slurm") if launcher == "auto" else (launcher,)
    for name in order:
        p = _CONVENTIONS[name](env, master_port)
        if p is not None:
            break
    if rank is not None or world_size is not None:
        if p is None:
            if rank is None or world_size is None:
                raise ConfigError("pass both --rank and --world-size (no launcher environment found)")
            p = Placement("flags", rank, world_size, master_port=master_port, source="--rank/--world-size")
        else:
            p = dataclasses.replace(p, rank=p.rank if rank is None else rank,
                                    world_size=p.world_size if world_size is None else world_size,
                                    source=p.source + " (overridden by flags)")
    if p is None:
        wanted = "any launcher" if launcher == "auto" else launcher
        raise ConfigError(
            f"no rank found for {wanted}: start ps-node under torchrun (RANK, WORLD_SIZE), Slurm's srun "
            "(SLURM_PROCID, SLURM_NTASKS), mpirun (OMPI_COMM_WORLD_RANK/SIZE or PMI_RANK/SIZE) or a "
            "Kubeflow PyTorchJob, or pass --rank R --world-size N")
    if p.world_size < 1 or not 0 <= p.rank < p.world_size:
        raise ConfigError(f"rank {p.rank} is outside [0, {p.world_size}) (from {p.source})")
    return p


def _torch(env, master_port):
    if not ("RANK" in env and "WORLD_SIZE" in env):
        return None
    if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
        name = "torchrun"
    elif any(k.startswith("PET_") for k in env) or "KUBERNETES_SERVICE_HOST" in env:
        name = "kubeflow"
    else:
        name = "torchrun"
    world = _int(env, "WORLD_SIZE")
    local_world = _opt_int(env, "LOCAL_WORLD_SIZE")
    all_local = _same(local_world, world)
    if name == "kubeflow" and all_local is None:
        all_local = world == 1  # one process per pod: every other rank is another host
    return Placement(name, _int(env, "RANK"), world, _opt_int(env, "LOCAL_RANK") or 0,
                     env.get("MASTER_ADDR", "").strip(), master_port, all_local,
                     source="RANK/WORLD_SIZE" + (" from torchrun" if name == "torchrun" else " from the PyTorchJob"))


def _openmpi(env, master_port):
    if not ("OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env):
        return None
    world = _int(env, "OMPI_COMM_WORLD_SIZE")
    return Placement("openmpi", _int(env, "OMPI_COMM_WORLD_RANK"), world,
                     _opt_int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0, "", master_port,
                     _same(_opt_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"), world),
                     source="OMPI_COMM_WORLD_RANK/SIZE from Open MPI")


def _pmi(env, master_port):
    if not ("PMI_RANK" in env and "PMI_SIZE" in env):
        return None
    world = _int(env, "PMI_SIZE")
    return Placement("pmi", _int(env, "PMI_RANK"), world, _opt_int(env, "MPI_LOCALRANKID") or 0, "",
                     master_port, _same(_opt_int(env, "MPI_LOCALNRANKS"), world),
                     source="PMI_RANK/PMI_SIZE from the MPI launcher")


def _slurm(env, master_port):
    if "SLURM_PROCID" not in env:
        return None
    size_var = next((v for v in ("SLURM_NTASKS", "SLURM_NPROCS") if env.get(v, "").strip()), None)
    if size_var is None:
        raise ConfigError("SLURM_PROCID is set but SLURM_NTASKS is not: start ps-node with srun inside the "
                          "allocation (srun --ntasks N ...), or pass --world-size N")
    host = ""
    for var in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(var, "").strip():
            try:
                nodes = expand_nodelist(env[var])
            except ValueError as exc:
                raise ConfigError(f"{var}: {exc}") from None
            host = nodes[0] if nodes else ""
            break
    nnodes = _opt_int(env, "SLURM_STEP_NUM_NODES") or _opt_int(env, "SLURM_JOB_NUM_NODES") \
        or _opt_int(env, "SLURM_NNODES")
    return Placement("slurm", _int(env, "SLURM_PROCID"), _int(env, size_var), _opt_int(env, "SLURM_LOCALID") or 0,
                     host, master_port, None if nnodes is None else nnodes == 1,
                     slurm_job_id=_opt_int(env, "SLURM_JOB_ID") or 0,
                     source=f"SLURM_PROCID/{size_var} from Slurm")


_CONVENTIONS: dict[str, Callable] = {"torchrun": _torch, "kubeflow": _torch, "openmpi": _openmpi,
                                     "pmi": _pmi, "slurm": _slurm, "flags": lambda env, mp: None}


def coordinator_port(p: Placement, env: Mapping[str, str], port: int | None = None) -> int:
    """--port > ZPS_COORDINATOR_PORT > MASTER_PORT+1 > (Slurm) 20000 + job id % 20000 > 29600."""
    if port:
        return port
    if env.get("ZPS_COORDINATOR_PORT", "").strip():
        return _int(env, "ZPS_COORDINATOR_PORT")
    if p.master_port:
        return p.master_port + 1
    if p.launcher == "slurm" and p.slurm_job_id:
        return 20000 + p.slurm_job_id % 20000
    return DEFAULT_PORT


def coordinator_host(p: Placement, env: Mapping[str, str], flag: str = "") -> str:
    """--coordinator-host > ZPS_COORDINATOR_HOST > the launcher's convention > 127.0.0.1 when all local."""
    host = flag or env.get("ZPS_COORDINATOR_HOST", "").strip() or p.coordinator_host
    if host:
        return host
    if p.all_local:
        return "127.0.0.1"
    if p.launcher in ("openmpi", "pmi"):
        raise ConfigError(f"{p.launcher}: MPI names no coordinator host: pass --coordinator-host HOST (the host "
                          "of rank 0) or export ZPS_COORDINATOR_HOST (e.g. mpirun -x ZPS_COORDINATOR_HOST=node01)")
    raise ConfigError(f"{p.launcher}: no coordinator host (MASTER_ADDR or a Slurm node list): pass "
                      "--coordinator-host HOST or --coordinator tcp://HOST:PORT")


# ------------------------------------------------------------------ roles
@dataclasses.dataclass(frozen=True)
class Role:
    """This process's role and its index among that role (the coordinator is index 0)."""

    kind: str
    index: int


def parse_roles(spec: str) -> list[str]:
    """``coordinator,server*2,worker*3`` (or ``c,s,s,w,w,w``) -> one role name per rank."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        name, _, count = item.partition("*")
        kind = ROLE_NAMES.get(name.strip().lower())
        if kind is None:
            raise ConfigError(f"--roles: unknown role {name!r} in {spec!r} (coordinator/c, server/s, worker/w)")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ConfigError(f"--roles: bad count {count!r} in {spec!r}") from None
        if n < 0:
            raise ConfigError(f"--roles: bad count {n} in {spec!r}")
        out += [kind] * n
    if out.count("coordinator") != 1:
        raise ConfigError(f"--roles must name exactly one coordinator, got {out.count('coordinator')} in {spec!r}")
    if "server" not in out or "worker" not in out:
        raise ConfigError(f"--roles needs at least one server and one worker, got {spec!r}")
    return out


def role_of(rank: int, world_size: int, servers: int, workers: int, coordinator_rank: int = 0,
            roles: Sequence[str] | None = None, source: str = "the launcher") -> Role:
    """The role of ``rank``: the coordinator at ``coordinator_rank``, then S servers, then W workers.

    With ``roles`` (one name per rank) the list decides.  ConfigError when
    the world size does not match 1 + S + W, naming both.
    """
    if roles is not None:
        if len(roles) != world_size:
            raise ConfigError(f"--roles lists {len(roles)} ranks but the world size is {world_size} ({source})")
        kind = roles[rank]
        return Role(kind, sum(1 for r in roles[:rank] if r == kind))
    if servers < 1 or workers < 1:
        raise ConfigError(f"--servers and --workers must be at least 1, got {servers} and {workers}")
    need = 1 + servers + workers
    if world_size != need:
        raise ConfigError(f"world size {world_size} ({source}) does not match 1 coordinator + {servers} servers + "
                          f"{workers} workers = {need}: start {need} processes (e.g. torchrun --nproc-per-node "
                          f"{need}, srun --ntasks {need}) or change --servers/--workers")
    if not 0 <= coordinator_rank < world_size:
        raise ConfigError(f"--coordinator-rank {coordinator_rank} is outside [0, {world_size})")
    if rank == coordinator_rank:
        return Role("coordinator", 0)
    idx = rank if rank < coordinator_rank else rank - 1
    return Role("server", idx) if idx < servers else Role("worker", idx - servers)


# ------------------------------------------------------------------ addresses
@dataclasses.dataclass(frozen=True)
class Lookups:
    """The address functions a plan uses (injected by tests)."""

    interface: Callable[[str], str] = netaddr.interface_address
    route: Callable[[str], str] = netaddr.route_address
    resolve: Callable[[str], str] = netaddr.resolve_host
    is_local: Callable[[str], bool] = netaddr.is_local_address


def coordinator_bind(host: str, port: int, bind: str = "", interface: str = "", all_local: bool | None = None,
                     lookups: Lookups = Lookups()) -> str:
    """What rank 0's coordinator binds: --bind, else --interface's address, else the coordinator
    host's address when it is on this host, else every address (a service VIP or NAT name)."""
    if bind:  # the port is the one every other rank derives; port 0 means "that one"
        bhost, bport = netaddr.split_endpoint(bind)
        if bport not in (0, port):
            raise ConfigError(f"--bind {bind}: the coordinator must listen on port {port}, where the other ranks "
                              "look for it (set that port with --port)")
        return netaddr.join_endpoint(bhost, port)
    if interface:
        return netaddr.join_endpoint(lookups.interface(interface), port)
    try:
        addr = lookups.resolve(host)
    except OSError:
        addr = ""
    if addr and netaddr.is_loopback_host(addr, resolver=lambda h: h):
        # loopback is right only when every rank is here; a name that resolves to
        # 127.0.1.1 here (Debian's /etc/hosts) but to a real address elsewhere needs all addresses
        return netaddr.join_endpoint(addr if all_local is not False else "0.0.0.0", port)
    if addr and lookups.is_local(addr):
        return netaddr.join_endpoint(addr, port)
    return netaddr.join_endpoint("0.0.0.0", port)


def server_addresses(coordinator_host_: str, remote: bool, port: int = 0, bind: str = "", advertise: str = "",
                     interface: str = "", lookups: Lookups = Lookups()) -> tuple[str, str]:
    """(bind endpoint, advertised host) of a server; AddressError when it would advertise
    loopback or the wildcard to remote peers."""
    if interface:
        bind, advertise = netaddr.apply_interface(bind or netaddr.join_endpoint("127.0.0.1", port), advertise,
                                                  interface, lookup=lookups.interface)
    if not bind:
        if not remote:
            bind = netaddr.join_endpoint("127.0.0.1", port)
        else:
            bind = netaddr.join_endpoint(_outward(coordinator_host_, lookups), port)
    host, bport = netaddr.split_endpoint(bind)
    if not advertise:
        advertise = _outward(coordinator_host_, lookups) if netaddr.is_unspecified(host) and remote else host
    netaddr.check_advertisable(netaddr.join_endpoint(advertise, bport or 1), remote, role="server")
    return bind, advertise


#: Where "the default route" points; a route lookup sends no packet (TEST-NET-1, RFC 5737).
DEFAULT_ROUTE_PROBE = "192.0.2.1"


def _outward(host: str, lookups: Lookups) -> str:
    """This host's address towards the coordinator host, never loopback.

    When that host is this one and its name resolves to loopback here (Debian's
    ``127.0.1.1 hostname`` line), the address of the default route stands in.
    """
    try:
        addr = lookups.route(host)
    except OSError as exc:
        raise netaddr.AddressError(f"cannot find this host's address towards the coordinator host {host!r} "
                                   f"({exc}): pass --interface NAME or --bind tcp://ADDRESS:0") from None
    if not netaddr.is_loopback_host(addr, resolver=lambda h: h):
        return addr
    try:
        addr = lookups.route(DEFAULT_ROUTE_PROBE)
    except OSError:
        addr = "127.0.0.1"
    if netaddr.is_loopback_host(addr, resolver=lambda h: h):
        raise netaddr.AddressError(
            f"the coordinator host {host!r} resolves to this host's loopback and there is no default route, "
            "so no address other hosts can reach was found: pass --interface NAME (e.g. eth0) or --advertise "
            "ADDRESS, or make the name resolve to the host's network address (/etc/hosts)")
    log.info("coordinator host %r is loopback here; advertising the default route's address %s", host, addr)
    return addr


# ------------------------------------------------------------------ the plan
@dataclasses.dataclass(frozen=True)
class NodePlan:
    """Everything this process will do, decided before anything starts."""

    placement: Placement
    role: Role
    coordinator: str          # URL every rank uses
    remote: bool              # peers on other hosts?
    bind: str                 # coordinator or server bind ('' for a worker)
    advertise: str            # server's advertised host ('' otherwise)
    servers: int
    workers: int
    argv: tuple[str, ...]     # the role main's arguments

    def describe(self) -> str:
        p = self.placement
        where = f"bind {self.bind}" + (f", advertise {self.advertise}" if self.advertise else "") if self.bind else ""
        return (f"rank {p.rank}/{p.world_size} ({p.launcher}) -> {self.role.kind} {self.role.index}; "
                f"coordinator {self.coordinator}" + (f"; {where}" if where else ""))


_ROLE_OWN = frozenset({"coordinator", "rank", "bind", "advertise", "interface", "out", "save", "progress",
                       "num_servers", "num_workers", "log_level", "curve_keys", "staleness_lr"})


@dataclasses.dataclass(frozen=True)
class Location:
    """Who this process is and where the coordinator is (no address lookups needed)."""

    placement: Placement
    role: Role
    coordinator: str
    host: str
    port: int
    servers: int
    workers: int


def locate(args: argparse.Namespace, env: Mapping[str, str]) -> Location:
    """Rank -> role and the coordinator URL, from the flags and the launcher's environment."""
    p = detect_placement(env, args.launcher, args.rank, args.world_size)
    roles = parse_roles(args.roles) if args.roles else None
    servers = roles.count("server") if roles else args.servers
    workers = roles.count("worker") if roles else args.workers
    role = role_of(p.rank, p.world_size, servers, workers, args.coordinator_rank, roles, p.source)
    if args.coordinator:
        host, port = netaddr.split_endpoint(args.coordinator)
        url = args.coordinator
    else:
        host = coordinator_host(p, env, args.coordinator_host)
        port = coordinator_port(p, env, args.port)
        url = netaddr.join_endpoint(host, port)
    return Location(p, role, url, host, port, servers, workers)


def plan_node(args: argparse.Namespace, env: Mapping[str, str], lookups: Lookups = Lookups()) -> NodePlan:
    """The pure decision: role, coordinator URL, addresses, and the role's arguments."""
    from common.config import ServerSettings, WorkerSettings

    loc = locate(args, env)
    p, role, url, host, port = loc.placement, loc.role, loc.coordinator, loc.host, loc.port
    servers, workers = loc.servers, loc.workers
    interface = args.interface or env.get("ZPS_INTERFACE", "")
    remote = (not p.all_local) if p.all_local is not None else netaddr.peers_are_remote(url, lookups.resolve)
    common = ["--log-level", args.log_level] + (["--job", args.job] if args.job else [])
    curve = ["--curve-keys", args.curve_keys] if args.curve_keys else []
    bind = advertise = ""
    if role.kind == "coordinator":
        bind = coordinator_bind(host, port, args.bind, interface, p.all_local, lookups)
        argv = ["--bind", bind, *job_args(args, servers, workers), *common, *curve]
    elif role.kind == "server":
        sport = args.server_port + p.local_rank if args.server_port else 0
        bind, advertise = server_addresses(host, remote, sport, args.bind, args.advertise, interface, lookups)
        argv = ["--coordinator", url, "--rank", str(role.index), "--bind", bind, "--advertise", advertise,
                *role_flags(args, ServerSettings, _ROLE_OWN), *common, *curve]
    else:
        argv = ["--coordinator", url, "--rank", str(role.index), "--progress",
                "lines" if role.index == 0 else "off", *role_flags(args, WorkerSettings, _ROLE_OWN),
                *common, *curve]
        if args.out:
            argv += ["--out", args.out]
        if args.save and role.index == 0:
            argv += ["--save", args.save]
    return NodePlan(p, role, url, remote, bind, advertise, servers, workers, tuple(argv))


def job_args(args: argparse.Namespace, servers: int, workers: int) -> list[str]:
    """The coordinator's job flags, as ps-launch passes them."""
    from zpscluster.launch import JOB_FLAGS

    out = ["--num-servers", str(servers), "--num-workers", str(workers)]
    for name in JOB_FLAGS:
        v = getattr(args, name, None)
        if v is not None and v != "":
            out += ["--" + name.replace("_", "-"), str(v)]
    if args.staleness_lr:
        out.append("--staleness-lr")
    return out


# ------------------------------------------------------------------ running
def wait_for_coordinator(url: str, timeout: float, role: str = "worker",
                         monotonic: Callable[[], float] = time.monotonic, curve_keys: str = "") -> dict:
    """Retry until the coordinator answers STATUS; its status.  DeadlineExceeded naming the
    last error after ``timeout`` seconds.  ``curve_keys``: the job's key folder (CURVE on)."""
    from common.control import CoordinatorLink
    from common.security import CurveKeys

    keys = CurveKeys.from_setting(curve_keys, connect=True) if curve_keys else None

    deadline = monotonic() + timeout
    last = "not tried"
    pause = threading.Event()
    while True:
        left = deadline - monotonic()
        ok, _, err = netaddr.probe(url, max(0.05, min(2.0, left)))
        if ok:
            link = CoordinatorLink(url, role, timeout=max(0.5, min(5.0, left)), keys=keys)
            try:
                return link.status()
            except ZPSError as exc:
                last = str(exc)
            finally:
                link.close()
        else:
            last = err
        if monotonic() >= deadline:
            raise DeadlineExceeded(f"coordinator {url} did not answer within {timeout:g}s ({last}); is rank 0 "
                                   f"running? check from this host with: bin/ps-doctor --coordinator {url}")
        pause.wait(0.5)


#: ps-launch flags that steer the launcher itself; a launcher running ps-node has its own.
#: (curve_keys: ps-node declares its own --curve-keys, below.)
LAUNCHER_ONLY = frozenset({"restarts", "timeout", "quiet", "help", "curve_keys"})


def add_launch_flags(group) -> None:
    """Every job flag of ``ps-launch`` (same names, defaults, help), so the two never drift apart."""
    from zpscluster.launch import launch_parser

    for a in launch_parser()._actions:
        if not a.option_strings or a.dest in LAUNCHER_ONLY:
            continue
        kw = {"dest": a.dest, "default": a.default, "help": a.help}
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            kw["action"] = "store_true" if isinstance(a, argparse._StoreTrueAction) else "store_false"
        elif isinstance(a, argparse._StoreAction):
            kw.update(type=a.type, choices=a.choices, metavar=a.metavar, nargs=a.nargs)
        else:
            kw["action"] = type(a)
        group.add_argument(*a.option_strings, **kw)


def role_flags(args: argparse.Namespace, settings_cls, skip: frozenset) -> list[str]:
    """Launch flags that are settings of ``settings_cls`` (and not job flags), given other than default."""
    import dataclasses as dc

    from zpscluster.launch import JOB_FLAGS

    fields = {f.name for f in dc.fields(settings_cls)} - set(JOB_FLAGS) - skip
    defaults = vars(node_parser().parse_args([]))
    out = []
    for name in sorted(fields):
        if name not in defaults:
            continue
        v = getattr(args, name)
        if v == defaults[name] or v is None:
            continue
        flag = "--" + name.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def node_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-node",
        description="One process of a zps job started by any launcher (torchrun, srun, mpirun, a Kubeflow "
                    "PyTorchJob): rank 0 runs the coordinator, the next S ranks servers, the rest workers. "
                    "Takes ps-launch's job flags; world size must be 1 + S + W.")
    job = p.add_argument_group("job (bin/ps-launch's flags, taken from its parser)")
    add_launch_flags(job)
    job.add_argument("--job", default=None, metavar="FILE", help="TOML job file passed to every role")
    place = p.add_argument_group("placement (rank -> role)")
    place.add_argument("--launcher", default="auto", choices=LAUNCHERS,
                       help="whose environment to read [auto: torchrun/Kubeflow, Open MPI, PMI, Slurm]")
    place.add_argument("--rank", type=int, default=None, help="this process's rank (overrides the environment)")
    place.add_argument("--world-size", type=int, default=None, help="number of processes (overrides the environment)")
    place.add_argument("--coordinator-rank", type=int, default=0, help="rank that runs the coordinator [0]")
    place.add_argument("--roles", default="", metavar="SPEC",
                       help="one role per rank, e.g. 'c,s*2,w*3' (overrides --servers/--workers/--coordinator-rank)")
    net = p.add_argument_group("addresses")
    net.add_argument("--coordinator", default="", metavar="URL",
                     help="the coordinator's URL (skips the host/port rules)")
    net.add_argument("--coordinator-host", default="", metavar="HOST",
                     help="host of the coordinator rank [MASTER_ADDR, first Slurm node, env ZPS_COORDINATOR_HOST]")
    net.add_argument("--port", type=int, default=None,
                     help="coordinator port [env ZPS_COORDINATOR_PORT, MASTER_PORT+1, Slurm: from the job id, 29600]")
    net.add_argument("--interface", default="", metavar="NAME",
                     help="network card whose address the coordinator/servers bind and advertise [env ZPS_INTERFACE]")
    net.add_argument("--bind", default="", metavar="URL", help="endpoint this rank's coordinator or server binds")
    net.add_argument("--advertise", default="", metavar="HOST", help="address this rank's server advertises")
    net.add_argument("--server-port", type=int, default=0,
                     help="servers bind PORT + local rank (0: any free port) [0]")
    net.add_argument("--connect-timeout", type=float, default=300.0,
                     help="seconds servers and workers wait for the coordinator [300]")
    net.add_argument("--curve-keys", default=None, metavar="DIR",
                     help="CURVE key folder, for the doctor and every role (needs the roles' --curve-keys)")
    p.add_argument("--doctor", action="store_true",
                   help="run ps-doctor's checks from this host before the role starts; exit 1 if one fails")
    return p


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = node_parser().parse_args(argv)
    env = os.environ if env is None else env
    try:
        loc = locate(args, env)
    except (ConfigError, ValueError) as exc:
        sys.stderr.write(f"error: ps-node: {exc}\n")
        return 2
    kind, rank = loc.role.kind, loc.placement.rank
    if kind != "coordinator":
        # first the coordinator: its host name may resolve only once its pod/node is up,
        # and this host's address is the one it uses to reach that host
        try:
            wait_for_coordinator(loc.coordinator, args.connect_timeout, kind, curve_keys=args.curve_keys or "")
        except DeadlineExceeded as exc:
            sys.stderr.write(f"error: ps-node rank {rank}: {exc}\n")
            return 1
    try:
        plan = plan_node(args, env)
    except (ConfigError, ValueError) as exc:
        sys.stderr.write(f"error: ps-node rank {rank}: {exc}\n")
        return 2
    sys.stderr.write(f"ps-node: {plan.describe()}\n")
    sys.stderr.flush()
    if args.doctor and not _doctor(plan, args):
        return 1
    if kind == "coordinator":
        return run_coordinator(plan, args)
    if kind == "server":
        from ps.cli import server_main
        return server_main(list(plan.argv))
    from worker.cli import worker_main
    return worker_main(list(plan.argv))


def _doctor(plan: NodePlan, args: argparse.Namespace) -> bool:
    """ps-doctor's checks from this host; prints the table; True when none failed."""
    from zpscluster.doctor import Doctor, render, verdict

    kind = plan.role.kind
    servers: list[str] = []
    if kind == "worker":
        from common.control import CoordinatorLink
        from common.security import CurveKeys
        keys = CurveKeys.from_setting(args.curve_keys, connect=True) if args.curve_keys else None
        link = CoordinatorLink(plan.coordinator, "worker", timeout=args.connect_timeout, keys=keys)
        try:
            servers = link.addresses(args.connect_timeout)
        except ZPSError as exc:
            sys.stderr.write(f"error: ps-node doctor: the servers did not register: {exc}\n")
            return False
        finally:
            link.close()
    doctor = Doctor("" if kind == "coordinator" else plan.coordinator, servers=servers,
                    binds=[plan.bind] if plan.bind else [], advertise=plan.advertise,
                    curve_keys=args.curve_keys)
    checks = doctor.run()
    print(render(checks, f"ps-node --doctor: rank {plan.placement.rank} ({kind} {plan.role.index})"), flush=True)
    return verdict(checks)[0]


def run_coordinator(plan: NodePlan, args: argparse.Namespace) -> int:
    """Rank 0: the coordinator in this process, then the summary when OUT holds the workers' files."""
    from ps.cli import coordinator_main

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for f in os.listdir(args.out):
            if f.startswith(("metrics-w", "result-w")) or f in ("final.json", "summary.json", "metrics.jsonl"):
                os.remove(os.path.join(args.out, f))
    t0 = time.time()
    code = coordinator_main(list(plan.argv))
    if code == 0 and args.out:
        write_job_summary(plan, args, time.time() - t0)
    return code


def write_job_summary(plan: NodePlan, args: argparse.Namespace, wall: float, wait: float = 15.0) -> dict | None:
    """OUT/summary.json as ps-launch writes it, once worker 0's final.json and every result are there."""
    from common.cli import load_job, settings_from_args
    from common.config import CoordinatorSettings
    from ps.cli import coordinator_parser, resolve_job_defaults
    from zpscluster.launch import write_summary

    out = args.out
    wanted = ["final.json"] + [f"result-w{r}.json" for r in range(plan.workers)]
    deadline = time.monotonic() + wait
    pause = threading.Event()
    while not all(os.path.exists(os.path.join(out, f)) for f in wanted):
        if time.monotonic() > deadline:
            missing = [f for f in wanted if not os.path.exists(os.path.join(out, f))]
            log.info("no summary: %s lacks %s (the workers' OUT is on other hosts?)", out, ", ".join(missing))
            return None
        pause.wait(0.1)
    try:
        ns = coordinator_parser().parse_args(list(plan.argv))
        job = resolve_job_defaults(settings_from_args(CoordinatorSettings, ns, load_job(args.job),
                                                      "coordinator").job)
        run_args = types.SimpleNamespace(out=out, servers=plan.servers, workers=plan.workers,
                                         staleness=args.staleness, workload=args.workload, steps=args.steps,
                                         seed=args.seed, straggler=args.straggler)
        summary = write_summary(run_args, types.SimpleNamespace(job=job.to_wire(), lost=[], restarts={}), wall)
    except (OSError, ValueError, KeyError, ZPSError) as exc:
        log.warning("could not write the summary: %s", exc)
        return None
    ev = summary["eval_metric"]
    print(f"ps-node: job done in {wall:.1f}s: {ev['name']} = {ev['value']:.4f}; summary "
          f"{os.path.join(out, 'summary.json')}", flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(main())
