"""``ps-bench``: zps measured beside its baselines, in one run, on one machine.

Sections::

    bulk      dense push / pull / push+pull of N fp32 elements through PSClient
              to 1 and 2 ps-server processes (plain SGD, staleness inf),
              against bare pyzmq DEALER->ROUTER(s) in other processes moving
              the same bytes zero-copy, chunked and pipelined (best variant),
              a torch.distributed.rpc parameter server and gloo all_reduce
    small     round trips per second of 4 KiB pushes and pulls, 1 and 8 in
              flight: zps (PSClient futures), bare pyzmq, torch rpc
    update    ps.optim.ShardOptimizer (SGD-momentum, Adam) in elements/s and
              memory traffic, against torch ``copy_`` of a 1-D fp32 buffer
    memory    peak RSS of a server (Adam) and of a PSWorker over their floors
    train     iterations/s of local training against training through zps
              (1 server, 1 worker, staleness 1 and inf), compute- and
              communication-heavy models

How a figure is measured: the candidates of one comparison (zps and its
baselines) are *interleaved*: after a warm-up that also calibrates how many
calls make one repetition last ``min_rep_s``, every repetition runs each
candidate once, in a rotating order, so a change of load on a shared machine
hits all of them alike.  A figure is the median of the repetitions' mean
rates, with min and max.  Candidates in other processes (rpc, gloo,
trainers) are driven over a REQ/REP control socket and time themselves.

Every helper process (server, bare ROUTER, rpc and gloo peers, trainers) is
started through ``zpscluster.procs.RoleProcess``; it prints a READY line
(measuring peers: with their control endpoint).  All of them are ended in
``finally`` (SIGTERM, then SIGKILL), each asks the kernel to SIGTERM it if
the benchmark process dies (``PR_SET_PDEATHSIG``), and every blocking call
has a timeout.

Besides moving bytes (``bare``), the bare ROUTER can also apply a plain SGD
step to each frame it receives (``bare_sgd``: torch ``add_`` on one thread,
as the frames arrive, no checks): the least work any parameter server must
do for a push, and so the ceiling of a push on this machine.

Units: sizes are counted in elements of 2**20 (``1M`` = 1,048,576 fp32
elements = 4 MiB); GB/s is 10**9 bytes of payload per second.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import itertools
import json
import math
import os
import platform
import signal
import socket
import statistics
import struct
import sys
import threading
import time
import traceback
from typing import Any, Callable, Sequence

from zpscluster.procs import ROOT, RoleFailed, RoleProcess, bin_cmd

MI = 1 << 20
KIB4 = 1024  # elements of a 4 KiB tensor
DEFAULT_SIZES = (1 * MI, 16 * MI, 64 * MI)
QUICK_SIZES = (1 * MI,)
#: Memory a run needs, for the check before it starts (measured on this kind of machine as the
#: peak of MemTotal - MemAvailable over the run): about 3 GiB of processes whatever the size
#: (servers, bare pyzmq, rpc and gloo peers, trainers), plus about 72 bytes per element of the
#: largest bulk size (the model held by the client, 1 and 2 servers with their snapshots, the
#: bare ROUTERs, and rpc's server and client): 7.4 GiB at 64M.
RUN_BASE_BYTES = 3 << 30
BULK_BYTES_PER_ELEM = 72
SECTIONS = ("bulk", "small", "update", "memory", "train")
LR = 0.01
#: Seconds any single request, command or wait of the benchmark may take.
OP_TIMEOUT = 120.0
#: Liveness and retry timers of the zps roles the benchmark starts (default 10 s each): a loaded
#: machine should measure speed, not time-outs (docs/BENCHMARKS.md: a 64M push to a server that
#: runs torch on 2 threads took longer than 10 s here, and the server then fenced its own client).
LIVENESS_TIMEOUT = 60.0
#: Seconds a helper process may take to print READY.
READY_TIMEOUT = 90.0
#: Small operations per timed call (a call pipelines them at the given depth).
SMALL_BATCH = 64
#: Elements of the shard (and of the worker's model) the memory section measures.
MEMORY_ELEMS = 16 * MI

#: bytes of memory traffic per element (reads + writes) of each update
TRAFFIC = {"copy": 8, "sgd_momentum": 20, "adam": 28, "adam_torch_flat": 28, "sgd_plain": 12,
           "finite_check": 4}

#: target of each headline ratio
TARGETS = {
    "push_vs_bare": 0.8, "pull_vs_bare": 0.8,
    "push_vs_rpc": 1.5, "pull_vs_rpc": 1.5,
    "small_op_vs_bare_depth1": 0.6, "small_op_vs_bare_depth8": 0.6,
    "small_op_vs_rpc": 3.0,
    "adam_vs_copy_traffic": 0.5,
    "server_memory_vs_floor": 1.3,  # at most
    "train_vs_local_s1": 0.85,
}
AT_MOST = frozenset({"server_memory_vs_floor"})
REQUIRED_RATIOS = tuple(TARGETS)
REQUIRED_SECTIONS = ("meta", "bulk", "small", "update", "peers", "memory", "train", "ratios", "targets")


# =================================================================== figures
def summarize(values: Sequence[float], unit: str) -> dict:
    """Median, min and max of per-repetition values."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals), "unit": unit, "samples": [round(v, 6) for v in vals]}


class Cand:
    """One candidate of a comparison: ``run(inner)`` makes ``inner`` calls, returns seconds per call."""

    def __init__(self, run: Callable[[int], float], work: float, unit: str):
        self.run = run
        self.work = work    # units of ``unit`` done by one call (bytes/1e9, ops, elements)
        self.unit = unit


def local(op: Callable[[], Any], work: float, unit: str) -> Cand:
    def run(inner: int) -> float:
        t0 = time.perf_counter()
        for _ in range(inner):
            op()
        return (time.perf_counter() - t0) / inner
    return Cand(run, work, unit)


def interleaved(cands: dict[str, Cand], reps: int, warmup: int, min_rep_s: float,
                progress: Callable[[str], None] | None = None, label: str = "") -> dict[str, dict]:
    """Warm up and calibrate every candidate, then ``reps`` rounds of one repetition each."""
    inner = {}
    for name, c in cands.items():
        t_one = 1.0
        for _ in range(max(1, warmup)):
            t_one = c.run(1)
        inner[name] = max(1, math.ceil(min_rep_s / max(t_one, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in cands}
    names = list(cands)
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(cands[name].run(inner[name]))
    out = {}
    for name, c in cands.items():
        out[name] = summarize([c.work / s for s in samples[name]], c.unit)
        out[name]["calls_per_rep"] = inner[name]
    if progress:
        progress(f"{label}: " + ", ".join(f"{n} {_fmt(f['median'], f['unit'])}" for n, f in out.items())
                 + f" {next(iter(out.values()))['unit']}")
    return out


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = 1
    if t.endswith("K"):
        mult, t = 1 << 10, t[:-1]
    elif t.endswith("M"):
        mult, t = MI, t[:-1]
    elif t.endswith("G"):
        mult, t = 1 << 30, t[:-1]
    try:
        n = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a number of elements (e.g. 1M, 16M)") from None
    if n < 4096:
        raise argparse.ArgumentTypeError(f"size {text!r} is below 4096 elements")
    return n - n % 64


def size_name(n: int) -> str:
    if n % MI == 0:
        return f"{n // MI}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (bytes) from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =================================================================== processes
class PeerControl:
    """REQ side of a measuring peer's control socket."""

    def __init__(self, ctx, endpoint: str, name: str):
        import zmq
        self.name = name
        self.sock = ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, cmd: dict) -> None:
        self.sock.send_json(cmd)

    def recv(self, timeout: float = OP_TIMEOUT) -> dict:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"{self.name} did not answer within {timeout:.0f}s")
        reply = self.sock.recv_json()
        if "error" in reply:
            raise RoleFailed(f"{self.name}: {reply['error']}")
        return reply

    def call(self, timeout: float = OP_TIMEOUT, **cmd) -> dict:
        self.send(cmd)
        return self.recv(timeout)

    def close(self) -> None:
        self.sock.close(0)


def remote(ctls: Sequence[PeerControl], cmd: dict, work: float, unit: str,
           frozen: Sequence[RoleProcess] = ()) -> Cand:
    """A candidate run by peers (all get the command; the first one's timing counts).

    ``frozen`` peers are kept stopped (SIGSTOP) outside their own turns: torch
    rpc's TensorPipe polls busily even when idle, and would otherwise take a
    core from every other candidate.
    """
    def run(inner: int) -> float:
        for p in frozen:
            p.signal(signal.SIGCONT)
        try:
            for c in ctls:
                c.send(dict(cmd, op="run", inner=inner))
            replies = [c.recv() for c in ctls]
        finally:
            for p in frozen:
                p.signal(signal.SIGSTOP)
        return replies[0]["seconds"]
    return Cand(run, work, unit)


class Bench:
    """Options, progress output and every child process of one benchmark run."""

    def __init__(self, opts: argparse.Namespace):
        import zmq
        self.opts = opts
        self.t0 = time.perf_counter()
        self.procs: list[RoleProcess] = []
        self.ctls: list[PeerControl] = []
        self.ctx = zmq.Context()
        self._lock = threading.Lock()

    def progress(self, msg: str) -> None:
        print(f"[ps-bench {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- children ------------------------------------------------------
    def spawn(self, cmd: Sequence[str], name: str, env: dict | None = None) -> RoleProcess:
        full = {"PYTHONPATH": ROOT, "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo", **(env or {})}
        p = RoleProcess(cmd, name, env=full, cwd=ROOT, guard=True)
        with self._lock:
            self.procs.append(p)
        return p

    def server(self, num_servers: int, staleness: str, optimizer: str = "sgd", num_workers: int = 1,
               name: str = "server") -> list[RoleProcess]:
        """Start the ``num_servers`` servers of one job (READY not awaited)."""
        out = []
        for k in range(num_servers):
            cmd = bin_cmd("ps-server", "--rank", str(k), "--num-servers", str(num_servers),
                          "--num-workers", str(num_workers), "--staleness", staleness,
                          "--bind", "tcp://127.0.0.1:0", "--optimizer", optimizer, "--lr", str(LR),
                          "--worker-timeout", str(LIVENESS_TIMEOUT), "--log-level", "WARNING")
            out.append(self.spawn(cmd, f"{name}.{k}"))
        return out

    def peer(self, kind: str, cfg: dict, name: str, env: dict | None = None) -> RoleProcess:
        return self.spawn(bin_cmd("ps-bench", "--peer", kind, "--peer-config", json.dumps(cfg)), name, env)

    def ready(self, *ps: RoleProcess) -> list[str]:
        return [p.wait_ready(READY_TIMEOUT).get("endpoint", "") for p in ps]

    def control(self, p: RoleProcess) -> PeerControl:
        info = p.wait_ready(READY_TIMEOUT)
        c = PeerControl(self.ctx, info["control"], p.name)
        self.ctls.append(c)
        return c

    def end(self, *ps: RoleProcess) -> None:
        for p in ps:
            try:
                p.signal(signal.SIGCONT)  # a frozen peer (see remote) must run to end
                p.stop(timeout=10)
            finally:
                with self._lock:
                    if p in self.procs:
                        self.procs.remove(p)

    def quit_peers(self, ctls: Sequence[PeerControl], ps: Sequence[RoleProcess], timeout: float = 60) -> None:
        """Ask measuring peers to finish cleanly, then end them whatever happened."""
        try:
            for c in ctls:
                c.send({"op": "quit"})
            for c in ctls:
                c.recv(timeout)
            for p in ps:
                p.wait(timeout)
        except Exception as exc:
            self.progress(f"a peer did not quit cleanly ({exc}); ending it")
        finally:
            for c in ctls:
                c.close()
                if c in self.ctls:
                    self.ctls.remove(c)
            self.end(*ps)

    def close(self) -> None:
        with self._lock:
            ps, self.procs = list(self.procs), []
        for c in self.ctls:
            c.close()
        self.ctls = []
        for p in ps:
            try:
                p.signal(signal.SIGCONT)
                p.stop(timeout=10)
            except Exception as exc:  # keep ending the others
                print(f"ps-bench: could not stop {p.name}: {exc}", file=sys.stderr)
        self.ctx.destroy(linger=0)


def wait_result(p: RoleProcess, timeout: float) -> dict:
    """The JSON of the child's ``RESULT`` line; RoleFailed if it exits without one."""
    deadline = time.monotonic() + timeout
    while True:
        exited = p.poll() is not None
        if exited:
            time.sleep(0.2)  # let the reader threads drain
        for line in reversed(list(p.lines)):
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        if exited:
            raise RoleFailed(f"{p.name} exited with code {p.poll()} without a result; "
                             f"last output: {p.tail(15)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{p.name} gave no result within {timeout:.0f}s; last output: {p.tail(10)}")
        time.sleep(0.05)


def _emit(kind: str, obj: dict) -> None:
    sys.stdout.write(f"{kind} {json.dumps(obj)}\n")
    sys.stdout.flush()


def serve_commands(handlers: dict[str, Callable[..., dict]], ready: dict,
                   on_quit: Callable[[], None] | None = None, idle_timeout: float = 1800) -> None:
    """A peer's control loop: REP socket, one JSON command at a time, until ``quit``."""
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.bind("tcp://127.0.0.1:0")
    _emit("READY", dict(ready, control=sock.getsockopt_string(zmq.LAST_ENDPOINT)))
    try:
        while sock.poll(int(idle_timeout * 1000)):
            cmd = sock.recv_json()
            op = cmd.pop("op", None)
            if op == "quit":
                if on_quit is not None:
                    on_quit()
                sock.send_json({})
                return
            try:
                reply = handlers[op](**cmd)
            except Exception as exc:  # reported to the benchmark, which stops
                traceback.print_exc()
                reply = {"error": f"{op}: {type(exc).__name__}: {exc}"}
            sock.send_json(reply)
        print("peer: no command within the idle timeout; exiting", file=sys.stderr)
    finally:
        sock.close()
        ctx.term()


def _timed(op: Callable[[], Any], inner: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(inner):
        op()
    return {"seconds": (time.perf_counter() - t0) / inner}


# =================================================================== bare pyzmq
# Bare protocol between a DEALER (this process) and a ROUTER (a peer process):
#   [b"P", data...]                     -> [b"k"]            push; data dropped
#   [b"U" <u64 offset>, data...]        -> [b"k"]            push; SGD applied at byte offset
#   [b"G" <u64 nbytes> <u64 frame>]     -> [b"d", data...]   pull nbytes in frames of `frame`
# b"p" and b"g" are b"P" and b"G" after which the ROUTER polls without sleeping for up to
# BARE_SPIN_S before it sleeps again: the busy polling of a ps-server (spin_us) given to bare
# pyzmq too (small operations' bare_spin)
BARE_SPIN_S = 200e-6

def peer_router(cfg: dict) -> None:
    import numpy as np
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.bind("tcp://127.0.0.1:0")
    _emit("READY", {"role": "bare-router", "endpoint": sock.getsockopt_string(zmq.LAST_ENDPOINT)})
    buf = np.zeros(0, dtype=np.uint8)
    weights = None
    idle_ms = int(cfg.get("idle_timeout", 1800) * 1000)

    def spin() -> bool:
        end = time.monotonic() + BARE_SPIN_S
        while time.monotonic() < end:
            if sock.poll(0):
                return True
        return False

    spinning = False
    try:
        while (spinning and spin()) or sock.poll(idle_ms):
            frames = sock.recv_multipart(copy=False)
            ident, head = frames[0], frames[1].bytes
            spinning = head[:1] in (b"p", b"g")
            if spinning:
                head = head.upper()
            if head[:1] == b"P":
                sock.send_multipart([ident, b"k"])
            elif head[:1] == b"U":
                if weights is None:
                    import torch
                    torch.set_num_threads(1)  # as a ps-server
                    weights = torch.zeros(0)
                (pos,) = struct.unpack("<Q", head[1:9])
                pos //= 4
                for f in frames[2:]:
                    g = torch.frombuffer(f.buffer, dtype=torch.float32)
                    if weights.numel() < pos + g.numel():
                        grown = torch.zeros(max(pos + g.numel(), 2 * weights.numel()))
                        grown[:weights.numel()] = weights
                        weights = grown
                    weights[pos:pos + g.numel()].add_(g, alpha=-LR)
                    pos += g.numel()
                sock.send_multipart([ident, b"k"])
            elif head[:1] == b"G":
                nbytes, frame = struct.unpack("<QQ", head[1:17])
                if buf.nbytes < nbytes:
                    buf = np.ones(nbytes, dtype=np.uint8)
                mv = memoryview(buf)[:nbytes]
                sock.send_multipart([ident, b"d", *(mv[a:a + frame] for a in range(0, nbytes, frame))],
                                    copy=False)
    finally:
        sock.close(0)
        ctx.term()


def bare_transfer(socks: list, op: str, nbytes: int, chunk: int, depth: int, multipart: bool,
                  data, timeout: float = OP_TIMEOUT) -> None:
    """Move ``nbytes`` over ``socks`` (split evenly, contiguous parts) and wait for every answer.

    ``op`` "push" sends data (``data`` is a buffer of at least ``nbytes``),
    "push_sgd" too, and the ROUTER applies it as a plain SGD step; "pull"
    asks for it; "push_spin" and "pull_spin" are "push" and "pull" with the
    ROUTER busy-polling between requests (BARE_SPIN_S).  ``multipart``: each
    socket's part is one message of ``chunk``-byte frames; else each chunk is
    one message, ``depth`` in flight per socket.
    """
    import zmq
    mv = memoryview(data).cast("B") if data is not None else None
    n = len(socks)
    bounds = [nbytes * k // n // 64 * 64 for k in range(n)] + [nbytes]
    plans = []
    for k in range(n):
        lo, hi = bounds[k], bounds[k + 1]
        plans.append([(lo, hi)] if multipart else [(a, min(hi, a + chunk)) for a in range(lo, hi, chunk)])

    def send(s, a, b):
        if op in ("push", "push_spin"):
            s.send_multipart([b"P" if op == "push" else b"p", *(mv[x:min(b, x + chunk)] for x in range(a, b, chunk))],
                             copy=False)
        elif op == "push_sgd":
            s.send_multipart([b"U" + struct.pack("<Q", a), *(mv[x:min(b, x + chunk)] for x in range(a, b, chunk))],
                             copy=False)
        else:
            s.send((b"G" if op == "pull" else b"g") + struct.pack("<QQ", b - a, chunk))

    copy_rx = chunk < (1 << 16)
    if n == 1:
        s, msgs = socks[0], plans[0]
        sent = 0
        for a, b in msgs[:depth]:
            send(s, a, b)
            sent += 1
        for _ in range(len(msgs)):
            if not s.poll(int(timeout * 1000)):
                raise TimeoutError(f"bare {op}: no answer within {timeout:.0f}s")
            s.recv_multipart(copy=copy_rx)
            if sent < len(msgs):
                send(s, *msgs[sent])
                sent += 1
        return
    poller = zmq.Poller()
    state = {}
    for s, msgs in zip(socks, plans):
        poller.register(s, zmq.POLLIN)
        for a, b in msgs[:depth]:
            send(s, a, b)
        state[s] = [min(depth, len(msgs)), len(msgs), msgs]  # sent, unanswered, messages
    left = sum(len(m) for m in plans)
    deadline = time.monotonic() + timeout
    while left:
        events = poller.poll(max(1, int((deadline - time.monotonic()) * 1000)))
        if not events:
            raise TimeoutError(f"bare {op}: no answer within {timeout:.0f}s")
        for s, _ in events:
            st = state[s]
            while st[1]:
                try:
                    s.recv_multipart(zmq.NOBLOCK, copy=copy_rx)
                except zmq.Again:
                    break
                st[1] -= 1
                left -= 1
                if st[0] < len(st[2]):
                    send(s, *st[2][st[0]])
                    st[0] += 1


class BareClient:
    """DEALER sockets to bare ROUTER peers."""

    def __init__(self, ctx, endpoints: Sequence[str]):
        import zmq
        self.socks = []
        for ep in endpoints:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 1000)
            s.setsockopt(zmq.RCVHWM, 1000)
            s.connect(ep)
            self.socks.append(s)

    def cand(self, op: str, nbytes: int, chunk: int, depth: int, multipart: bool, data,
             work: float, unit: str) -> Cand:
        return local(lambda: bare_transfer(self.socks, op, nbytes, chunk, depth, multipart, data), work, unit)

    def close(self) -> None:
        for s in self.socks:
            s.close(0)


# =================================================================== zps client
def client_settings():
    """PSClient/PSWorker settings of the benchmark: long request, read and retry timers."""
    from common.config import ClientSettings
    return ClientSettings(request_timeout=OP_TIMEOUT, read_timeout=OP_TIMEOUT, attempt_timeout=LIVENESS_TIMEOUT)


class ZpsClient:
    """A PSClient registered with a job whose plan is one tensor of ``n`` elements (or ``specs``)."""

    def __init__(self, endpoints: Sequence[str], n: int, worker_id: int = 0,
                 specs: list | None = None, init=None):
        import numpy as np
        from common.plan import PartitionPlan
        from worker.client import PSClient
        self.n = n
        self.plan = PartitionPlan.build(specs or [("w", (n,), "float32")], len(endpoints))
        settings = client_settings()
        self.client = PSClient(list(endpoints), worker_id, settings=settings).start()
        try:
            self.client.hello(self.plan, OP_TIMEOUT)
            self.client.init(init if init is not None else np.zeros(n, dtype=np.float32), OP_TIMEOUT)
        except BaseException:
            self.client.close()
            raise
        self.grad = np.full(n, 1e-7, dtype=np.float32)
        self.dst = None
        self._clock = itertools.count(0)

    def push_futures(self) -> list:
        return self.client.push(self.grad, next(self._clock)).futures

    def pull_futures(self) -> list:
        return self.client.pull(0, OP_TIMEOUT).futures

    def push(self) -> None:
        for f in self.push_futures():
            f.result(OP_TIMEOUT)

    def pull(self) -> list:
        return [f.result(OP_TIMEOUT) for f in self.pull_futures()]

    def pull_install(self) -> None:
        """A pull whose reply is copied into a flat buffer (what a worker does)."""
        import numpy as np
        from common import protocol as proto
        if self.dst is None:
            self.dst = np.empty(self.n, dtype=np.float32)
        for k, msg in enumerate(self.pull()):
            pos = self.plan.range_of(k)[0]
            for chunk in proto.payload(msg):
                self.dst[pos:pos + chunk.size] = chunk
                pos += chunk.size

    def exchange(self) -> None:
        self.push()
        self.pull()

    def close(self) -> None:
        self.client.close()


class MinimalProtocolClient:
    """zps's protocol and nothing else, on a DEALER of its own.

    Encode, send, a blocking receive, decode: none of what ``PSClient`` adds
    (futures, retry timers, the map of requests in flight, counters,
    argument checks). Against the same server it shows how fast the server
    answers small requests, apart from the client. It speaks as the
    ``ZpsClient``'s worker (its id, incarnation and push sequence numbers),
    so its pushes are applied like the client's own; they complete no clock.
    """

    def __init__(self, ctx, endpoint: str, zc: ZpsClient):
        import zmq
        cl = zc.client
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._seq = cl._seq[0]
        self._rid = itertools.count(1 << 40)
        self._data = [bytes(memoryview(f)) for f in cl._data_frames(zc.grad, 0, zc.n, zc.plan.frame_elems)]
        self._push = {"w": cl.worker_id, "inc": cl.incarnation, "clk": 0, "ph": zc.plan.hash, "n": zc.n,
                      "tick": False, **cl._to(0)}
        self._pull = {"w": cl.worker_id, "clk": 0, "ph": zc.plan.hash, "dl": int(OP_TIMEOUT * 1000)}

    def run(self, op: str, count: int, depth: int) -> None:
        """``count`` pushes or pulls, at most ``depth`` unanswered at a time (answered in order)."""
        pipelined(lambda: self._send(op), count, depth, lambda _: self._answer())

    def _send(self, op: str) -> list:
        from common import protocol as proto
        from common.protocol import MsgType
        if op == "push":
            frames = proto.encode(MsgType.PUSH, {"rid": next(self._rid), "seq": next(self._seq), **self._push},
                                  self._data)
        else:
            frames = proto.encode(MsgType.PULL, {"rid": next(self._rid), **self._pull})
        self.sock.send_multipart(frames, copy=False)
        return [None]   # the answer is the next one to arrive: nothing to tell it by

    def _answer(self) -> None:
        from common import protocol as proto
        from common.protocol import MsgType
        if not self.sock.poll(int(OP_TIMEOUT * 1000)):
            raise TimeoutError(f"minimal client: no answer within {OP_TIMEOUT:.0f}s")
        msg = proto.decode(self.sock.recv_multipart(copy=False))
        if msg.type == MsgType.ERROR:
            raise RuntimeError(f"minimal client: the server answered {msg['msg']}")

    def close(self) -> None:
        self.sock.close(0)


def pipelined(issue: Callable[[], list], count: int, depth: int, wait: Callable[[Any], Any]) -> None:
    """``count`` requests, at most ``depth`` unanswered at a time."""
    q: collections.deque = collections.deque()
    for _ in range(count):
        if len(q) >= depth:
            for f in q.popleft():
                wait(f)
        q.append(issue())
    while q:
        for f in q.popleft():
            wait(f)


def _result(f):
    return f.result(OP_TIMEOUT)


# =================================================================== rpc and gloo peers
class RpcParameterServer:
    """The server-owned object of PyTorch's RPC parameter-server tutorial, on one flat tensor."""

    def __init__(self, n: int, lr: float):
        import torch
        self.weights = torch.zeros(n)
        self.lr = lr
        self.lock = threading.Lock()

    def apply_gradient(self, grad) -> None:
        with self.lock:
            self.weights.add_(grad, alpha=-self.lr)

    def get_weights(self):
        with self.lock:
            return self.weights  # serialized by rpc after the call returns, as in the tutorial


def _rpc_apply(rref, grad) -> None:
    rref.local_value().apply_gradient(grad)


def _rpc_get(rref):
    return rref.local_value().get_weights()


def _rpc_options(port: int):
    from torch.distributed import rpc
    return rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=16,
                                           rpc_timeout=OP_TIMEOUT)


def peer_rpc_server(cfg: dict) -> None:
    from torch.distributed import rpc
    _emit("READY", {"role": "rpc-server"})
    rpc.init_rpc("ps", rank=0, world_size=2, rpc_backend_options=_rpc_options(cfg["port"]))
    rpc.shutdown(graceful=True, timeout=3600)  # returns once the trainer shuts down too


def peer_rpc_client(cfg: dict) -> None:
    import torch
    from torch.distributed import rpc
    rpc.init_rpc("trainer", rank=1, world_size=2, rpc_backend_options=_rpc_options(cfg["port"]))
    objs: dict[int, tuple] = {}

    def obj(n: int):
        if n not in objs:
            if n > KIB4:
                for k in [k for k in objs if k > KIB4]:
                    del objs[k]  # one large object at a time
            objs[n] = (rpc.remote("ps", RpcParameterServer, args=(n, LR)), torch.full((n,), 1e-7))
        return objs[n]

    def run(what: str, inner: int, n: int, depth: int = 1, count: int = 1) -> dict:
        rref, grad = obj(n)
        if what == "push":
            return _timed(lambda: rpc.rpc_sync("ps", _rpc_apply, args=(rref, grad)), inner)
        if what == "pull":
            return _timed(lambda: rpc.rpc_sync("ps", _rpc_get, args=(rref,)), inner)
        call = {"push_async": lambda: [rpc.rpc_async("ps", _rpc_apply, args=(rref, grad))],
                "pull_async": lambda: [rpc.rpc_async("ps", _rpc_get, args=(rref,))]}[what]
        return _timed(lambda: pipelined(call, count, depth, lambda f: f.wait()), inner)

    def on_quit():
        objs.clear()
        rpc.shutdown(graceful=True, timeout=OP_TIMEOUT)

    serve_commands({"run": run}, {"role": "rpc-client"}, on_quit)


def peer_gloo(cfg: dict) -> None:
    import torch
    import torch.distributed as dist
    rank = cfg["rank"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=OP_TIMEOUT))
    tensors: dict[int, Any] = {}

    def run(what: str, inner: int, n: int) -> dict:
        if n not in tensors:
            tensors.clear()
            tensors[n] = torch.full((n,), 1e-7)
        t = tensors[n]
        dist.barrier()
        return _timed(lambda: dist.all_reduce(t), inner)

    serve_commands({"run": run}, {"role": "gloo", "rank": rank}, dist.destroy_process_group)


def peers_start(b: Bench) -> dict:
    """Start the bare ROUTERs, the rpc pair and the gloo pair; return their handles."""
    rp = {"routers": [b.peer("router", {}, f"bare-router{i}") for i in range(2)]}
    port = free_port()
    rp["rpc_server"] = b.peer("rpc_server", {"port": port}, "rpc-server")
    rp["rpc_client"] = b.peer("rpc_client", {"port": port}, "rpc-client")
    port = free_port()
    rp["gloo"] = [b.peer("gloo", {"port": port, "rank": r}, f"gloo{r}") for r in (0, 1)]
    rp["router_eps"] = b.ready(*rp["routers"])
    rp["rpc"] = b.control(rp["rpc_client"])
    rp["gloo_ctl"] = [b.control(p) for p in rp["gloo"]]
    b.ready(rp["rpc_server"])
    rp["rpc_procs"] = [rp["rpc_server"], rp["rpc_client"]]
    for p in rp["rpc_procs"]:    # idle between its turns (see remote)
        p.signal(signal.SIGSTOP)
    return rp


def peers_stop(b: Bench, rp: dict) -> None:
    for p in rp["rpc_procs"]:
        p.signal(signal.SIGCONT)
    b.quit_peers([rp["rpc"], *rp["gloo_ctl"]], [rp["rpc_client"], rp["rpc_server"], *rp["gloo"]])
    b.end(*rp["routers"])


# =================================================================== 1. bulk
BARE_VARIANTS = [  # (name, frame bytes, depth, multipart)
    ("1MiB-msgs-d1", MI, 1, False), ("1MiB-msgs-d4", MI, 4, False),
    ("4MiB-msgs-d1", 4 * MI, 1, False), ("4MiB-msgs-d4", 4 * MI, 4, False),
    ("1MiB-frames-1msg", MI, 1, True), ("4MiB-frames-1msg", 4 * MI, 1, True),
]


def bench_bulk(b: Bench, sizes: Sequence[int], res: dict, rp: dict) -> None:
    import numpy as np
    o = b.opts
    out = res.setdefault("bulk", {
        "sizes": list(sizes), "unit": "GB/s (1e9 bytes of payload per second)", "figures": {},
        "bare_variants": {},
        "notes": "zps push = PSClient.push of the whole model, waited for its acknowledgement, which the "
                 "server sends after its plain SGD update (staleness inf); pull = PSClient.pull answered "
                 "from the server's snapshot (weights unchanged), reply frames in hand; pull_install also "
                 "copies them into a flat buffer (what PSWorker does); exchange = push then pull (the pull "
                 "then needs a fresh snapshot) against one gloo all_reduce of the same tensor, in "
                 "operations/s. bare = best of the chunking variants (trial run), ROUTER(s) in other "
                 "processes; bare_sgd_r1 = the same push, the ROUTER applying plain SGD to each frame as it "
                 "arrives (the ceiling of a push). rpc = rpc_sync(apply_gradient) / rpc_sync(get_weights)."})
    bc = {r: BareClient(b.ctx, rp["router_eps"][:r]) for r in (1, 2)}
    try:
        for n in sizes:
            nbytes, key = n * 4, size_name(n)
            gb = nbytes / 1e9
            # the gradient zps pushes (1e-7): bytes of 1 would be subnormal floats, which
            # bare_sgd's update would then crawl through
            data = np.full(n, 1e-7, dtype=np.float32).view(np.uint8)
            # -- bare: pick the best chunking per op and router count (interleaved trial)
            best, variants = {}, {}
            for op in ("push", "pull"):
                trial = {}
                for r in (1, 2):
                    for vname, chunk, depth, multi in BARE_VARIANTS:
                        if chunk >= nbytes and vname.startswith("4MiB"):
                            continue  # same as the 1 MiB variant's single message
                        trial[f"r{r}/{vname}"] = bc[r].cand(op, nbytes, chunk, depth, multi, data, gb, "GB/s")
                figs = interleaved(trial, 1 if o.quick else 2, 1, o.min_rep_s)
                for r in (1, 2):
                    mine = {k.split("/", 1)[1]: f["median"] for k, f in figs.items() if k.startswith(f"r{r}/")}
                    v = max(mine, key=mine.get)
                    variants.setdefault(op, {})[f"r{r}"] = {k: round(x, 3) for k, x in mine.items()}
                    best[(op, r)] = v
            out["bare_variants"][key] = variants
            b.progress(f"bulk {key}: best bare variants " +
                       ", ".join(f"{op} x{r}: {v}" for (op, r), v in best.items()))

            def bare(op, r, as_op=None):
                v = next(x for x in BARE_VARIANTS if x[0] == best[(op, r)])
                return bc[r].cand(as_op or op, nbytes, v[1], v[2], v[3], data, gb, "GB/s")

            # -- zps: fresh servers per size (a server adopts one plan)
            jobs = {"s1": b.server(1, "inf", name=f"bulk{key}-s1"),
                    "s2": b.server(2, "inf", name=f"bulk{key}-s2")}
            clients: dict[str, ZpsClient] = {}
            try:
                init = np.zeros(n, dtype=np.float32)
                for j, ps in jobs.items():
                    clients[j] = ZpsClient(b.ready(*ps), n, init=init)
                rpc = rp["rpc"]
                figs: dict[str, dict] = {}
                push = {f"zps_{j}": local(c.push, gb, "GB/s") for j, c in clients.items()}
                push.update(bare_r1=bare("push", 1), bare_r2=bare("push", 2),
                            bare_sgd_r1=bare("push", 1, "push_sgd"),
                            rpc=remote([rpc], {"what": "push", "n": n}, gb, "GB/s", rp["rpc_procs"]))
                figs["push"] = interleaved(push, o.reps, o.warmup, o.min_rep_s, b.progress, f"bulk {key} push")
                pull = {f"zps_{j}": local(c.pull, gb, "GB/s") for j, c in clients.items()}
                pull["zps_s1_install"] = local(clients["s1"].pull_install, gb, "GB/s")
                pull.update(bare_r1=bare("pull", 1), bare_r2=bare("pull", 2),
                            rpc=remote([rpc], {"what": "pull", "n": n}, gb, "GB/s", rp["rpc_procs"]))
                figs["pull"] = interleaved(pull, o.reps, o.warmup, o.min_rep_s, b.progress, f"bulk {key} pull")
                ex = {f"zps_{j}": local(c.exchange, 1, "ops/s") for j, c in clients.items()}
                ex["gloo_all_reduce"] = remote(rp["gloo_ctl"], {"what": "all_reduce", "n": n}, 1, "ops/s")
                figs["exchange"] = interleaved(ex, o.reps, o.warmup, o.min_rep_s, b.progress,
                                               f"bulk {key} push+pull vs all_reduce")
                out["figures"][key] = figs
            finally:
                for c in clients.values():
                    c.close()
                b.end(*itertools.chain.from_iterable(jobs.values()))
    finally:
        for c in bc.values():
            c.close()


# =================================================================== 2. small ops
def bench_small(b: Bench, res: dict, rp: dict) -> None:
    import numpy as np
    o = b.opts
    count = SMALL_BATCH
    out = res.setdefault("small", {
        "elements": KIB4, "bytes": KIB4 * 4, "unit": "round trips/s", "figures": {},
        "notes": f"each timed call makes {count} requests with at most `depth` unanswered; zps = PSClient "
                 "push (plain SGD at staleness inf) / pull futures; bare = pyzmq DEALER to a ROUTER process "
                 "(4 KiB request / 1-byte ack, 1-byte request / 4 KiB reply); bare_sgd = the same push, the "
                 "ROUTER applying plain SGD to it; bare_spin = bare with the ROUTER polling up to "
                 f"{BARE_SPIN_S * 1e6:.0f} us for the next request before it sleeps (what a ps-server does "
                 "while requests come one at a time: spin_us); rpc = rpc_async of the "
                 "tutorial object's methods, waited in order; zps_minimal_client = the same server asked by "
                 "a DEALER speaking zps's protocol and nothing else (encode, send, blocking receive, decode: "
                 "no futures, timers or retries), how fast the server answers apart from PSClient; "
                 "exchange_d1 = zps push then pull against one gloo all_reduce of 4 KiB"})
    jobs = {"s1": b.server(1, "inf", name="small-s1")}
    clients: dict[str, ZpsClient] = {}
    minimal: MinimalProtocolClient | None = None
    bc = BareClient(b.ctx, rp["router_eps"][:1])
    try:
        for j, ps in jobs.items():
            clients[j] = ZpsClient(b.ready(*ps), KIB4)
        minimal = MinimalProtocolClient(b.ctx, b.ready(*jobs["s1"])[0], clients["s1"])
        data = np.full(KIB4 * count, 1e-7, dtype=np.float32).view(np.uint8)
        for op in ("push", "pull"):
            for depth in (1, 8):
                cands = {}
                for j, c in clients.items():
                    issue = c.push_futures if op == "push" else c.pull_futures
                    cands[f"zps_{j}"] = local(lambda issue=issue: pipelined(issue, count, depth, _result),
                                              count, "ops/s")
                cands["zps_minimal_client"] = local(lambda op=op, depth=depth: minimal.run(op, count, depth),
                                                    count, "ops/s")
                cands["bare"] = bc.cand(op, KIB4 * 4 * count, KIB4 * 4, depth, False, data, count, "ops/s")
                cands["bare_spin"] = bc.cand(f"{op}_spin", KIB4 * 4 * count, KIB4 * 4, depth, False, data,
                                             count, "ops/s")
                if op == "push":
                    cands["bare_sgd"] = bc.cand("push_sgd", KIB4 * 4 * count, KIB4 * 4, depth, False, data,
                                                count, "ops/s")
                cands["rpc"] = remote([rp["rpc"]], {"what": f"{op}_async", "n": KIB4, "depth": depth,
                                                    "count": count}, count, "ops/s", rp["rpc_procs"])
                out["figures"][f"{op}_d{depth}"] = interleaved(cands, o.reps, o.warmup, o.min_rep_s,
                                                               b.progress, f"small {op} depth {depth}")
        ex = {f"zps_{j}": local(c.exchange, 1, "ops/s") for j, c in clients.items()}
        ex["gloo_all_reduce"] = remote(rp["gloo_ctl"], {"what": "all_reduce", "n": KIB4}, 1, "ops/s")
        out["figures"]["exchange_d1"] = interleaved(ex, o.reps, o.warmup, o.min_rep_s, b.progress,
                                                    "small push+pull vs all_reduce")
    finally:
        bc.close()
        if minimal is not None:
            minimal.close()
        for c in clients.values():
            c.close()
        b.end(*itertools.chain.from_iterable(jobs.values()))


# =================================================================== 3. update
def bench_update(b: Bench, sizes: Sequence[int], res: dict) -> None:
    import torch
    from common.plan import DEFAULT_FRAME_ELEMS, frame_slices
    from ps.optim import OptimizerSpec, ShardOptimizer
    from ps.server import all_finite
    o = b.opts
    usizes = [n for n in sizes if n <= 16 * MI] or [min(sizes)]
    default_threads = torch.get_num_threads()
    out = res.setdefault("update", {
        "sizes": usizes, "default_threads": default_threads, "unit": "elements/s",
        "traffic_bytes_per_element": TRAFFIC, "chunk_elems": DEFAULT_FRAME_ELEMS,
        "figures": {},
        "notes": "in this process; threads = torch intra-op threads (a ps-server runs torch's default, "
                 f"{default_threads} here). copy = dst.copy_(src) of 1-D fp32; sgd_momentum / adam = "
                 "ShardOptimizer.step over the shard cut in wire chunks; adam_torch_flat = fused "
                 "torch.optim.Adam on one flat parameter. Traffic counts reads + writes: copy 8 B, "
                 "SGD-momentum 20 B (read w, g, buf; write w, buf), Adam 28 B (read w, g, m, v; write w, m, v). "
                 "Diagnostics of the bulk push path: sgd_plain = the plain SGD step a push applies (12 B), "
                 "finite_check = the server's NaN/inf test of a push's frames, ps.server.all_finite (4 B)."})
    thread_counts = [default_threads] + ([1] if default_threads != 1 else [])
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for n in usizes:
                key = size_name(n)
                src = torch.full((n,), 1e-3)
                dst = torch.empty(n)
                chunks = [src[a:b] for a, b in frame_slices(n, DEFAULT_FRAME_ELEMS)]
                arrays = [c.numpy() for c in chunks]
                sgd = ShardOptimizer(torch.zeros(n), OptimizerSpec("sgd", LR, momentum=0.9), DEFAULT_FRAME_ELEMS)
                plain = ShardOptimizer(torch.zeros(n), OptimizerSpec("sgd", LR), DEFAULT_FRAME_ELEMS)
                adam = ShardOptimizer(torch.zeros(n), OptimizerSpec("adam", 1e-3), DEFAULT_FRAME_ELEMS)
                flat_p = torch.zeros(n, requires_grad=True)
                flat_p.grad = src
                raw = torch.optim.Adam([flat_p], lr=1e-3, fused=True)
                cands = {"copy": local(lambda: dst.copy_(src), n, "elements/s"),
                         "sgd_momentum": local(lambda: sgd.step(chunks), n, "elements/s"),
                         "adam": local(lambda: adam.step(chunks), n, "elements/s"),
                         "adam_torch_flat": local(raw.step, n, "elements/s"),
                         "sgd_plain": local(lambda: plain.step(chunks), n, "elements/s"),
                         "finite_check": local(lambda: all_finite(arrays), n, "elements/s")}
                figs = interleaved(cands, o.reps, o.warmup, o.min_rep_s)
                for name, f in figs.items():
                    f["traffic_GBps"] = f["median"] * TRAFFIC[name] / 1e9
                out["figures"].setdefault(f"threads{threads}", {})[key] = figs   # kept before it is told
                b.progress(f"update {key}, {threads} thread(s): " + ", ".join(
                    f"{name} {f['median'] / 1e9:.2f} G el/s = {f['traffic_GBps']:.1f} GB/s"
                    for name, f in figs.items()))
    finally:
        torch.set_num_threads(default_threads)


# =================================================================== 5. memory
def peer_worker_memory(cfg: dict) -> None:
    """A PSWorker training a d x d linear layer; reports its own RSS figures."""
    import torch
    from worker.session import PSWorker
    base = proc_status()
    _emit("READY", {"role": "worker-memory", "baseline_rss": base["VmRSS"]})
    d = cfg["d"]
    torch.manual_seed(0)
    model = torch.nn.Linear(d, d, bias=False)
    settings = client_settings()
    w = PSWorker(model, cfg["endpoints"], cfg["worker"], settings=settings).start(OP_TIMEOUT)
    x = torch.randn(8, d)
    try:
        for _ in range(cfg["iters"]):
            w.read(OP_TIMEOUT)
            w.zero_grad()
            model(x).square().mean().backward()
            w.push()
        w.flush(OP_TIMEOUT)
        w.read(OP_TIMEOUT)
    finally:
        w.close(OP_TIMEOUT)
    st = proc_status()
    _emit("RESULT", {"baseline_rss": base["VmRSS"], "hwm": st["VmHWM"], "rss": st["VmRSS"], "params": d * d})


def bench_memory(b: Bench, res: dict) -> None:
    import numpy as np
    o = b.opts
    d = math.isqrt(MEMORY_ELEMS)
    n = d * d
    out = res.setdefault("memory", {"elements": n, "notes": (
        "server: peak RSS (VmHWM) minus the RSS read right after its READY line (torch imported, no "
        "shard yet), after serial push+pull rounds (8; --quick 4) under Adam from one PSClient; floor "
        "16 B/element (weights, exp_avg, exp_avg_sq, one gradient). fixed_overhead: the same rise for a "
        "64-element shard (what the first HELLO costs whatever the size). worker: PSWorker in a "
        "subprocess training a d x d Linear (6 iterations; --quick 2); VmHWM minus its RSS after "
        "imports; floor 12 B/parameter (the model's own parameters as built, the flat weights, the "
        "flat gradients). Each is one measurement.")})
    srv = b.server(1, "inf", optimizer="adam", num_workers=2, name="memory-adam")[0]
    tiny = b.server(1, "inf", optimizer="adam", name="memory-adam-tiny")[0]
    try:
        ep, tiny_ep = b.ready(srv), b.ready(tiny)
        base, tiny_base = proc_status(srv.pid)["VmRSS"], proc_status(tiny.pid)["VmRSS"]
        zt = ZpsClient(tiny_ep, 64)
        try:
            for _ in range(8):
                zt.push()
                zt.pull()
            fixed = proc_status(tiny.pid)["VmHWM"] - tiny_base
        finally:
            zt.close()
            b.end(tiny)
        rng = np.random.default_rng(0)
        zc = ZpsClient(ep, n, specs=[("weight", (d, d), "float32")], init=rng.standard_normal(n, dtype=np.float32))
        try:
            for _ in range(o.memory_rounds):
                zc.push()
                zc.pull()
            st = proc_status(srv.pid)
        finally:
            zc.close()
        floor, peak = 16 * n, st["VmHWM"] - base
        out["server"] = {"baseline_rss": base, "hwm": st["VmHWM"], "rss": st["VmRSS"],
                         "peak_over_baseline": peak, "floor": floor, "ratio": peak / floor,
                         "fixed_overhead": fixed, "ratio_without_fixed_overhead": (peak - fixed) / floor}
        b.progress(f"memory {size_name(n)}: server peak {peak / MI:.0f} MiB over a baseline of {base / MI:.0f} "
                   f"MiB; floor {floor / MI:.0f} MiB -> {peak / floor:.2f}x (size-independent part: "
                   f"{fixed / MI:.0f} MiB)")
        wk = b.peer("worker_memory", {"endpoints": ep, "d": d, "iters": o.memory_rounds - 2, "worker": 1},
                    "worker-memory")
        try:
            r = wait_result(wk, 300)
            wk.wait(30)
        finally:
            b.end(wk)
        wfloor, wpeak = 12 * r["params"], r["hwm"] - r["baseline_rss"]
        out["worker"] = dict(r, peak_over_baseline=wpeak, floor=wfloor, ratio=wpeak / wfloor)
        st2 = proc_status(srv.pid)
        out["server_after_training_worker"] = {"hwm": st2["VmHWM"], "peak_over_baseline": st2["VmHWM"] - base,
                                               "ratio": (st2["VmHWM"] - base) / floor}
        b.progress(f"memory {size_name(n)}: worker peak {wpeak / MI:.0f} MiB, floor {wfloor / MI:.0f} MiB "
                   f"-> {wpeak / wfloor:.2f}x; server after a training PSWorker "
                   f"{(st2['VmHWM'] - base) / floor:.2f}x")
    finally:
        b.end(srv, tiny)


# =================================================================== 6. train
def build_model(kind: str):
    import torch
    from torch import nn
    torch.manual_seed(0)
    if kind == "conv":  # compute-heavy, ~66K parameters
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(1024, 10))
        x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    elif kind == "mlp":  # communication-heavy, ~6.3M parameters, batch of 4
        model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                              nn.Linear(2048, 10))
        x, y = torch.randn(4, 1024), torch.randint(0, 10, (4,))
    else:
        raise ValueError(f"unknown model {kind!r}")
    return model, x, y, nn.functional.cross_entropy


def peer_train(cfg: dict) -> None:
    import torch
    model, x, y, loss_fn = build_model(cfg["model"])
    worker = None
    if cfg["mode"] == "local":
        opt = torch.optim.SGD(model.parameters(), lr=LR)

        def step():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        def finish():
            pass
    else:
        from worker.session import PSWorker
        settings = client_settings()
        worker = PSWorker(model, cfg["endpoints"], 0, settings=settings).start(OP_TIMEOUT)

        def step():
            worker.read(OP_TIMEOUT)
            worker.zero_grad()
            loss_fn(model(x), y).backward()
            worker.push()

        def finish():  # pushes of this repetition are acknowledged inside its time
            worker.flush(OP_TIMEOUT)

    def run(inner: int) -> dict:
        t0 = time.perf_counter()
        for _ in range(inner):
            step()
        finish()
        return {"seconds": (time.perf_counter() - t0) / inner}

    def info() -> dict:
        with torch.no_grad():
            d = {"params": sum(p.numel() for p in model.parameters()), "loss": float(loss_fn(model(x), y))}
        if worker is not None:
            recs = worker.records
            k = max(1, len(recs))
            d.update(reads=len(recs), pulled_fraction=sum(r.pulled for r in recs) / k,
                     mean_read_wait_ms=1000 * sum(r.wait_seconds for r in recs) / k,
                     mean_staleness=sum(r.staleness for r in recs) / k)
        return d

    def on_quit():
        if worker is not None:
            worker.close(OP_TIMEOUT)

    serve_commands({"run": run, "info": info}, {"role": "trainer", "mode": cfg["mode"]}, on_quit)


def bench_train(b: Bench, res: dict) -> None:
    o = b.opts
    out = res.setdefault("train", {
        "unit": "iterations/s", "notes": "local = one process, torch.optim.SGD (lr 0.01); zps = 1 ps-server "
        "(SGD, lr 0.01) + 1 PSWorker process (read, zero_grad, backward, push; eager refresh); every "
        "repetition ends with PSWorker.flush inside its time. Trainers run one at a time, interleaved, "
        "each with --train-threads torch threads."})
    for kind in ("conv", "mlp"):
        jobs = {"s1": b.server(1, "1", name=f"train-{kind}-s1")[0],
                "sinf": b.server(1, "inf", name=f"train-{kind}-sinf")[0]}
        trainers: dict[str, RoleProcess] = {}
        ctls: dict[str, PeerControl] = {}
        try:
            eps = {j: b.ready(p)[0] for j, p in jobs.items()}
            env = None
            if o.train_threads:
                env = {"OMP_NUM_THREADS": str(o.train_threads), "MKL_NUM_THREADS": str(o.train_threads)}
            trainers["local"] = b.peer("train", {"model": kind, "mode": "local"}, f"train-{kind}-local", env)
            for j, ep in eps.items():
                trainers[f"zps_{j}"] = b.peer("train", {"model": kind, "mode": "zps", "endpoints": [ep]},
                                              f"train-{kind}-{j}", env)
            for name, p in trainers.items():
                ctls[name] = b.control(p)
            cands = {name: remote([c], {}, 1, "it/s") for name, c in ctls.items()}
            figs = interleaved(cands, o.reps, max(2 if o.quick else 3, o.warmup), o.train_rep_s, b.progress,
                               f"train {kind}")
            info = {name: c.call(op="info") for name, c in ctls.items()}
            out[kind] = {"params": info["local"]["params"], "figures": figs, "details": info}
        finally:
            b.quit_peers(list(ctls.values()), list(trainers.values()))
            b.end(*jobs.values())


# =================================================================== 4. peers (a view)
def collect_peers(res: dict) -> None:
    """Gather the torch rpc and gloo figures (measured inside bulk and small) into ``res["peers"]``."""
    peers: dict = {"notes": "measured side by side inside bulk and small (same figures): rpc = TensorPipe "
                            "backend, a RpcParameterServer object owned by another process (PyTorch's "
                            "parameter-server tutorial pattern), push = rpc_sync(apply_gradient) with SGD, "
                            "pull = rpc_sync(get_weights), small calls = rpc_async at depth 1 and 8; gloo = "
                            "all_reduce between two processes",
                   "rpc": {"bulk": {}, "small": {}}, "gloo": {"all_reduce": {}}}
    for key, figs in res.get("bulk", {}).get("figures", {}).items():
        peers["rpc"]["bulk"][key] = {op: figs[op]["rpc"] for op in ("push", "pull")}
        peers["gloo"]["all_reduce"][key] = figs["exchange"]["gloo_all_reduce"]
    for group, figs in res.get("small", {}).get("figures", {}).items():
        if "rpc" in figs:
            peers["rpc"]["small"][group] = figs["rpc"]
        if "gloo_all_reduce" in figs:
            peers["gloo"]["all_reduce_small"] = figs["gloo_all_reduce"]
    res["peers"] = peers


# =================================================================== ratios & report
def _med(fig: dict | None) -> float | None:
    return None if fig is None else fig.get("median")


def _ratio(a, b) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def compute_ratios(res: dict) -> dict:
    r: dict[str, float | None] = {}
    bulk = res.get("bulk")
    if bulk and bulk["figures"]:
        key = size_name(max(bulk["sizes"]))
        f = bulk["figures"][key]
        for op in ("push", "pull"):
            g = f[op]
            r[f"{op}_vs_bare"] = _ratio(_med(g["zps_s1"]), _med(g["bare_r1"]))
            r[f"{op}_vs_rpc"] = _ratio(_med(g["zps_s1"]), _med(g["rpc"]))
            r[f"{op}_vs_bare_2servers"] = _ratio(_med(g["zps_s2"]), _med(g["bare_r2"]))
        r["push_vs_bare_sgd"] = _ratio(_med(f["push"]["zps_s1"]), _med(f["push"].get("bare_sgd_r1")))
        r["bare_sgd_vs_bare"] = _ratio(_med(f["push"].get("bare_sgd_r1")), _med(f["push"]["bare_r1"]))
        # the most push_vs_rpc could be: a push that applies its update, against rpc (which does too)
        r["bare_sgd_vs_rpc"] = _ratio(_med(f["push"].get("bare_sgd_r1")), _med(f["push"]["rpc"]))
        r["pull_install_vs_bare"] = _ratio(_med(f["pull"]["zps_s1_install"]), _med(f["pull"]["bare_r1"]))
        ex = f["exchange"]
        r["exchange_vs_allreduce"] = _ratio(_med(ex["zps_s1"]), _med(ex["gloo_all_reduce"]))
    small = res.get("small")
    if small and small["figures"]:
        f = small["figures"]
        # bare_vs_rpc: the most any server on pyzmq could reach against rpc
        # vs_bare_spin: against bare pyzmq given the busy polling a ps-server does
        # minimal_client_vs_bare: the server asked by a client that adds nothing to the protocol
        for cand, base, name in (("zps_s1", "bare", "vs_bare"), ("zps_s1", "rpc", "vs_rpc"),
                                 ("bare", "rpc", "bare_vs_rpc"), ("zps_s1", "bare_spin", "vs_bare_spin"),
                                 ("bare_spin", "bare", "bare_spin_vs_bare"),
                                 ("zps_minimal_client", "bare", "minimal_client_vs_bare")):
            for d in (1, 8):
                if cand not in f[f"push_d{d}"] or base not in f[f"push_d{d}"]:
                    continue
                pr = _ratio(_med(f[f"push_d{d}"][cand]), _med(f[f"push_d{d}"][base]))
                pl = _ratio(_med(f[f"pull_d{d}"][cand]), _med(f[f"pull_d{d}"][base]))
                r[f"small_push_{name}_depth{d}"] = pr
                r[f"small_pull_{name}_depth{d}"] = pl
                r[f"small_op_{name}_depth{d}"] = min(pr, pl) if pr and pl else None
        for d in (1, 8):
            g = f[f"push_d{d}"]
            if "bare_sgd" in g:
                r[f"small_push_vs_bare_sgd_depth{d}"] = _ratio(_med(g["zps_s1"]), _med(g["bare_sgd"]))
        r["small_op_vs_rpc"] = r.get("small_op_vs_rpc_depth1")
        r["small_exchange_vs_allreduce"] = _ratio(_med(f["exchange_d1"]["zps_s1"]),
                                                  _med(f["exchange_d1"]["gloo_all_reduce"]))
    upd = res.get("update")
    if upd and upd["figures"]:
        key = size_name(max(upd["sizes"]))
        for tk, figs in upd["figures"].items():
            f = figs[key]
            suffix = "" if tk == f"threads{upd['default_threads']}" else f"_{tk}"
            r[f"adam_vs_copy_traffic{suffix}"] = _ratio(f["adam"]["traffic_GBps"], f["copy"]["traffic_GBps"])
            r[f"sgd_momentum_vs_copy_traffic{suffix}"] = _ratio(f["sgd_momentum"]["traffic_GBps"],
                                                                f["copy"]["traffic_GBps"])
            r[f"adam_vs_torch_flat{suffix}"] = _ratio(_med(f["adam"]), _med(f["adam_torch_flat"]))
    mem = res.get("memory")
    if mem and "server" in mem:
        r["server_memory_vs_floor"] = mem["server"]["ratio"]
        r["server_memory_vs_floor_without_fixed"] = mem["server"]["ratio_without_fixed_overhead"]
        if "worker" in mem:
            r["worker_memory_vs_floor"] = mem["worker"]["ratio"]
    tr = res.get("train")
    if tr:
        for kind, name in (("conv", ""), ("mlp", "_comm")):
            if kind not in tr:
                continue
            f = tr[kind]["figures"]
            for cand, suffix in (("zps_s1", "s1"), ("zps_sinf", "sinf")):
                if cand in f:
                    r[f"train{name}_vs_local_{suffix}"] = _ratio(_med(f[cand]), _med(f["local"]))
    return {k: v for k, v in r.items() if v is not None}


def target_status(ratios: dict) -> dict:
    out = {}
    for k, t in TARGETS.items():
        v = ratios.get(k)
        if v is None:
            continue
        ok = v <= t if k in AT_MOST else v >= t
        out[k] = {"value": v, "target": f"{'<=' if k in AT_MOST else '>='} {t}", "met": ok}
    return out


def _fmt(v: float, unit: str) -> str:
    if unit == "ops/s":
        return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
    if unit == "elements/s":
        return f"{v / 1e9:.3f}G"
    if unit == "it/s":
        return f"{v:.1f}"
    return f"{v:.2f}"


def _row(name: str, fig: dict, extra: str = "") -> str:
    u = fig["unit"]
    return (f"  {name:40s} {_fmt(fig['median'], u):>10s} {_fmt(fig['min'], u):>10s} "
            f"{_fmt(fig['max'], u):>10s}  {u}{extra}")


def render_table(res: dict) -> str:
    lines = []
    head = f"  {'figure':40s} {'median':>10s} {'min':>10s} {'max':>10s}  unit"
    bulk = res.get("bulk")
    if bulk and bulk["figures"]:
        lines += ["", "1. Bulk transport (zps push includes the server's plain SGD; exchange = push+pull "
                      "vs one all_reduce)", head]
        for key, figs in bulk["figures"].items():
            for op, group in figs.items():
                for cand, f in group.items():
                    extra = ""
                    if cand.startswith("bare"):
                        r = cand.rsplit("_", 1)[1]
                        extra = f"  ({_best_variant(bulk, key, op, r)})"
                    lines.append(_row(f"{op} {key} {cand}", f, extra))
    small = res.get("small")
    if small and small["figures"]:
        lines += ["", "2. Small operations (4 KiB)", head]
        for g, group in small["figures"].items():
            for cand, f in group.items():
                lines.append(_row(f"{g} {cand}", f))
    upd = res.get("update")
    if upd and upd["figures"]:
        lines += ["", "3. Server update rate (traffic B/element: copy 8, SGD-momentum 20, Adam 28)", head]
        for tk, sizes in upd["figures"].items():
            for key, figs in sizes.items():
                for name, f in figs.items():
                    lines.append(_row(f"{name} {key} {tk}", f, f"  = {f['traffic_GBps']:.1f} GB/s"))
    mem = res.get("memory")
    if mem and "server" in mem:
        lines += ["", f"5. Memory ({size_name(mem['elements'])} elements)"]
        for who in ("server", "worker"):
            m = mem.get(who)
            if m:
                lines.append(f"  {who:8s} peak over baseline {m['peak_over_baseline'] / MI:7.1f} MiB, floor "
                             f"{m['floor'] / MI:7.1f} MiB, ratio {m['ratio']:.2f} "
                             f"(baseline RSS {m['baseline_rss'] / MI:.0f} MiB)")
        m = mem.get("server_after_training_worker")
        if m:
            lines.append(f"  server after a PSWorker trained against it: ratio {m['ratio']:.2f}")
        s = mem["server"]
        lines.append(f"  server size-independent part {s['fixed_overhead'] / MI:.1f} MiB (first HELLO); "
                     f"ratio without it {s['ratio_without_fixed_overhead']:.2f}")
    tr = res.get("train")
    if tr:
        lines += ["", "6. End-to-end training", head]
        for kind in ("conv", "mlp"):
            if kind in tr:
                for cand, f in tr[kind]["figures"].items():
                    lines.append(_row(f"{kind} ({tr[kind]['params']:,} params) {cand}", f))
    ratios = res.get("ratios", {})
    if ratios:
        st = res.get("targets", {})
        lines += ["", "Ratios (zps / baseline, medians measured side by side)",
                  f"  {'ratio':40s} {'value':>10s}  target"]
        for k, v in ratios.items():
            t = st.get(k)
            mark = "" if t is None else f"  {t['target']:8s} {'met' if t['met'] else 'MISSED'}"
            lines.append(f"  {k:40s} {v:10.3f}{mark}")
    return "\n".join(lines)


def _best_variant(bulk: dict, key: str, op: str, r: str) -> str:
    v = bulk["bare_variants"][key][op][r]
    return max(v, key=v.get)


def machine_info() -> dict:
    import numpy
    import torch
    import zmq
    cpu, mem = "", meminfo("MemTotal")
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = []
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu,
            "mem_bytes": mem, "loadavg_at_start": load, "python": platform.python_version(),
            "torch": torch.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "numpy": numpy.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}


# =================================================================== main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-bench",
        description="Benchmark zps beside bare pyzmq, torch.distributed.rpc and gloo on this machine and "
                    "report ratios. Candidates of one comparison are interleaved repetition by repetition; "
                    "each figure is the median (min, max) of --reps repetitions after a warm-up. "
                    "Progress goes to stderr, the table to stdout.")
    p.add_argument("--quick", action="store_true",
                   help="1M elements only, 3 repetitions, shorter repetitions (under 3 minutes on 2 cores)")
    p.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",") if x.strip()],
                   help="comma-separated model sizes in fp32 elements (1M = 2**20), e.g. 1M,16M,64M "
                        "[default 1M,16M,64M; --quick 1M]")
    p.add_argument("--json", metavar="PATH", help="write every figure, the ratios and the targets as JSON")
    p.add_argument("--reps", type=int, help="repetitions per figure [default 7; --quick 3]")
    p.add_argument("--warmup", type=int, help="warm-up calls per candidate [default 2; --quick 1]")
    p.add_argument("--train-threads", type=int, default=1, metavar="N",
                   help="torch threads of the local and zps trainers (OMP_NUM_THREADS; 0: torch's default) "
                        "[default 1: on 2 cores, 2-thread trainers next to a server swing tenfold]")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (the required ratios need all)")
    p.add_argument("--peer", help=argparse.SUPPRESS)
    p.add_argument("--peer-config", help=argparse.SUPPRESS)
    return p


PEERS = {"router": peer_router, "rpc_server": peer_rpc_server, "rpc_client": peer_rpc_client,
         "gloo": peer_gloo, "worker_memory": peer_worker_memory, "train": peer_train}


def _parent_watch(ppid: int) -> None:
    """Exit a peer whose benchmark process is gone (next to PDEATHSIG, which the exec keeps)."""
    def run():
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(4)
    threading.Thread(target=run, daemon=True, name="parent-watch").start()


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    if opts.peer:
        if opts.peer not in PEERS:
            print(f"error: unknown peer {opts.peer!r}", file=sys.stderr)
            return 2
        _parent_watch(os.getppid())
        PEERS[opts.peer](json.loads(opts.peer_config or "{}"))
        return 0
    sections = [s.strip() for s in opts.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: unknown sections {bad}; known: {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    opts.sizes = sorted(set(opts.sizes or (QUICK_SIZES if opts.quick else DEFAULT_SIZES)))
    opts.reps = opts.reps if opts.reps is not None else (3 if opts.quick else 7)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.quick else 2)
    if opts.reps < 1 or opts.warmup < 0:
        print("error: --reps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if opts.train_threads < 0:
        print("error: --train-threads must be >= 0", file=sys.stderr)
        return 2
    if opts.json:
        from common.cli import file_problem
        why = file_problem(opts.json)   # checked before a run of minutes
        if why:
            print(f"error: --json {opts.json}: {why}", file=sys.stderr)
            return 2
    if "bulk" in sections:
        need, have = RUN_BASE_BYTES + BULK_BYTES_PER_ELEM * max(opts.sizes), meminfo("MemAvailable")
        if have and need > have:
            print(f"error: a bulk run at {size_name(max(opts.sizes))} elements needs about {need / (1 << 30):.1f} "
                  f"GiB of memory (3 GiB of processes and {BULK_BYTES_PER_ELEM} bytes per element of the "
                  f"largest size) and {have / (1 << 30):.1f} GiB are available: give smaller --sizes",
                  file=sys.stderr)
            return 2
    opts.min_rep_s = 0.1 if opts.quick else 0.3
    opts.train_rep_s = 0.4 if opts.quick else 2.5
    opts.memory_rounds = 4 if opts.quick else 8

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    b = Bench(opts)
    res: dict = {"meta": {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                          "argv": sys.argv[1:] if argv is None else list(argv),
                          "quick": opts.quick, "sizes": opts.sizes, "reps": opts.reps,
                          "warmup": opts.warmup, "min_rep_s": opts.min_rep_s,
                          "train_rep_s": opts.train_rep_s, "sections": sections,
                          "train_threads": opts.train_threads or "torch default",
                          "units": "sizes in elements (1M = 2**20 fp32); GB/s = 1e9 bytes/s of payload",
                          "method": "candidates of a comparison interleaved per repetition; median (min, max) "
                                    "of the repetitions' mean rates",
                          "machine": machine_info()}}
    b.progress(f"sizes {', '.join(map(size_name, opts.sizes))}; {opts.reps} reps after {opts.warmup} "
               f"warm-up; sections {', '.join(sections)}; trainers on "
               f"{opts.train_threads or 'torch default'} thread(s)")
    code = 0
    try:
        rp = None
        if "bulk" in sections or "small" in sections:
            rp = peers_start(b)
            b.progress("peers ready: 2 bare ROUTERs, torch rpc pair, gloo pair")
        if "bulk" in sections:
            bench_bulk(b, opts.sizes, res, rp)
        if "small" in sections:
            bench_small(b, res, rp)
        if rp is not None:
            peers_stop(b, rp)
            collect_peers(res)
        if "update" in sections:
            bench_update(b, opts.sizes, res)
        if "memory" in sections:
            bench_memory(b, res)
        if "train" in sections:
            bench_train(b, res)
    except KeyboardInterrupt:
        b.progress("interrupted: ending every process")
        code = 130
    except Exception as exc:
        b.progress(f"failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        code = 1
    finally:
        b.close()
        signal.signal(signal.SIGTERM, previous)
    res["meta"]["duration_s"] = round(time.perf_counter() - b.t0, 1)
    res["meta"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    res["meta"]["complete"] = code == 0
    if code != 0:
        # what was measured before the failure is kept: figures only (the ratios need every
        # figure of a section), marked incomplete
        if opts.json and write_json(b, opts.json, res):
            b.progress(f"the figures measured so far are in {opts.json} (meta.complete is false)")
        return code
    res["ratios"] = compute_ratios(res)
    res["targets"] = target_status(res["ratios"])
    print(render_table(res), flush=True)
    if opts.json and not write_json(b, opts.json, res):
        return 1
    return 0


def meminfo(key: str) -> int:
    """``key`` of /proc/meminfo (MemTotal, MemAvailable, ...) in bytes; 0 where it does not say."""
    try:
        with open("/proc/meminfo") as fh:
            return next((int(ln.split()[1]) * 1024 for ln in fh if ln.startswith(key + ":")), 0)
    except OSError:
        return 0


def write_json(b: Bench, path: str, res: dict) -> bool:
    """Write ``res`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        b.progress(f"could not write {path}: {exc}; the table above holds the ratios")
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    b.progress(f"wrote {path}")
    return True
