"""``ps-bench``: zps measured beside its baselines, in one run, on one machine.

Sections (each figure is the median of ``reps`` repetitions after a warm-up,
with min and max; a repetition runs the operation enough times to last at
least ``min_rep_s`` seconds and reports its mean rate)::

    bulk      dense push / pull / push+pull of N fp32 elements through PSClient
              to 1 and 2 ps-server processes (plain SGD, staleness inf),
              against bare pyzmq DEALER->ROUTER(s) in separate processes moving
              the same bytes zero-copy, chunked and pipelined (best variant)
    small     round trips per second of 4 KiB pushes and pulls, 1 and 8 in
              flight, zps (PSClient futures) against bare pyzmq
    update    ps.optim.ShardOptimizer (SGD-momentum, Adam) in elements/s and
              memory traffic, against torch ``copy_`` of a 1-D fp32 buffer
    peers     a torch.distributed.rpc parameter server (PyTorch tutorial
              pattern) and gloo all_reduce between two processes
    memory    peak RSS of a server (Adam) and of a PSWorker over their floors
    train     iterations/s of local training against training through zps
              (1 server, 1 worker, staleness 1 and inf), compute- and
              communication-heavy models

Every helper process (server, bare ROUTER, rpc and gloo peers, trainers) is a
child started through ``zpscluster.procs.RoleProcess``; it prints a READY
line and, for measuring peers, one ``RESULT {json}`` line.  All of them are
ended in ``finally`` (SIGTERM, then SIGKILL), and each asks the kernel to
SIGTERM it if the benchmark process dies (``PR_SET_PDEATHSIG``).  Every
blocking call has a timeout.

Units: sizes are counted in elements of 2**20 (``1M`` = 1,048,576 fp32
elements = 4 MiB); GB/s is 10**9 bytes of payload per second.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
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
from typing import Any, Callable, Sequence

from zpscluster.procs import ROOT, RoleFailed, RoleProcess, bin_cmd

MI = 1 << 20
KIB4 = 1024  # elements of a 4 KiB tensor
DEFAULT_SIZES = (1 * MI, 16 * MI, 64 * MI)
QUICK_SIZES = (1 * MI,)
SECTIONS = ("bulk", "small", "update", "peers", "memory", "train")
LR = 0.01
#: Seconds any single request / wait of the benchmark may take.
OP_TIMEOUT = 120.0
#: Seconds a helper process may take to print READY.
READY_TIMEOUT = 60.0

#: bytes of memory traffic per element (read + write) of each update
TRAFFIC = {"copy": 8, "sgd_momentum": 20, "adam": 28}

#: target of each headline ratio: (comparison, value)
TARGETS = {
    "push_vs_bare": 0.8, "pull_vs_bare": 0.8,
    "push_vs_rpc": 1.5, "pull_vs_rpc": 1.5,
    "small_op_vs_bare_depth1": 0.6, "small_op_vs_bare_depth8": 0.6,
    "small_op_vs_rpc": 3.0,
    "adam_vs_copy_traffic": 0.5,
    "server_memory_vs_floor": 1.3,  # at most
    "train_vs_local_s1": 0.85,
}
AT_MOST = {"server_memory_vs_floor"}
REQUIRED_RATIOS = tuple(TARGETS)


# =================================================================== figures
def summarize(values: Sequence[float], unit: str) -> dict:
    """Median, min and max of per-repetition values."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals), "unit": unit, "samples": vals}


def timed_reps(op: Callable[[], Any], reps: int, warmup: int, min_rep_s: float,
               max_inner: int = 1 << 20) -> list[float]:
    """Seconds per call of ``op``: one value per repetition, after ``warmup`` calls.

    The warm-up also calibrates how many calls one repetition makes so that it
    lasts at least ``min_rep_s``.
    """
    t_one = None
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        op()
        t_one = time.perf_counter() - t0
    inner = max(1, min(max_inner, math.ceil(min_rep_s / max(t_one, 1e-9))))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            op()
        out.append((time.perf_counter() - t0) / inner)
    return out


def rates(seconds: Sequence[float], work: float) -> list[float]:
    return [work / s for s in seconds]


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
    if n < 64:
        raise argparse.ArgumentTypeError(f"size {text!r} is below 64 elements")
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
# Run a command so that the kernel SIGTERMs it if the benchmark dies (prctl
# PR_SET_PDEATHSIG survives execve); refuse to start if the parent is gone.
_GUARD = ("import ctypes, os, signal, sys\n"
          "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))\n"
          "if os.getppid() != int(sys.argv[1]): os._exit(3)\n"
          "os.execv(sys.argv[2], sys.argv[2:])\n")


def guarded(cmd: Sequence[str]) -> list[str]:
    return [sys.executable, "-c", _GUARD, str(os.getpid()), *cmd]


class Bench:
    """Options, progress output and every child process of one benchmark run."""

    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        self.t0 = time.perf_counter()
        self.procs: list[RoleProcess] = []
        self._lock = threading.Lock()

    def progress(self, msg: str) -> None:
        print(f"[ps-bench {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- children ------------------------------------------------------
    def spawn(self, cmd: Sequence[str], name: str) -> RoleProcess:
        env = {"PYTHONPATH": ROOT, "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo"}
        p = RoleProcess(guarded(cmd), name, env=env, cwd=ROOT)
        with self._lock:
            self.procs.append(p)
        return p

    def server(self, rank: int, num_servers: int, num_workers: int, staleness: str,
               optimizer: str = "sgd", name: str | None = None) -> RoleProcess:
        cmd = bin_cmd("ps-server", "--rank", str(rank), "--num-servers", str(num_servers),
                      "--num-workers", str(num_workers), "--staleness", staleness,
                      "--bind", "tcp://127.0.0.1:0", "--optimizer", optimizer, "--lr", str(LR),
                      "--log-level", "WARNING")
        return self.spawn(cmd, name or f"server{rank}of{num_servers}")

    def peer(self, kind: str, cfg: dict, name: str) -> RoleProcess:
        return self.spawn(bin_cmd("ps-bench", "--peer", kind, "--peer-config", json.dumps(cfg)), name)

    def ready(self, *ps: RoleProcess) -> list[str]:
        return [p.wait_ready(READY_TIMEOUT).get("endpoint", "") for p in ps]

    def end(self, *ps: RoleProcess) -> None:
        for p in ps:
            try:
                p.stop(timeout=10)
            finally:
                with self._lock:
                    if p in self.procs:
                        self.procs.remove(p)

    def end_all(self) -> None:
        with self._lock:
            ps, self.procs = list(self.procs), []
        for p in ps:
            try:
                p.stop(timeout=10)
            except Exception as exc:  # keep ending the others
                print(f"ps-bench: could not stop {p.name}: {exc}", file=sys.stderr)


def wait_result(p: RoleProcess, timeout: float) -> dict:
    """The JSON of the child's ``RESULT`` line; RoleFailed if it exits without one."""
    deadline = time.monotonic() + timeout
    while True:
        for line in reversed(list(p.lines)):
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        if p.poll() is not None:
            time.sleep(0.2)  # let the reader threads drain
            for line in reversed(list(p.lines)):
                if line.startswith("RESULT "):
                    return json.loads(line[7:])
            raise RoleFailed(f"{p.name} exited with code {p.poll()} without a result; "
                             f"last output: {p.tail(15)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{p.name} gave no result within {timeout:.0f}s; last output: {p.tail(10)}")
        time.sleep(0.05)


def _emit(kind: str, obj: dict) -> None:
    sys.stdout.write(f"{kind} {json.dumps(obj)}\n")
    sys.stdout.flush()


# =================================================================== bare pyzmq
# Bare protocol between a DEALER (this process) and a ROUTER (a peer process):
#   [b"P", data...]             -> [b"k"]            push; data dropped
#   [b"G" <u64 nbytes> <u64 frame>] -> [b"d", data...]  pull: nbytes in frames of `frame`
#   [b"Q"]                      -> [b"q"]            quit

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
    idle_ms = int(cfg.get("idle_timeout", 1800) * 1000)
    try:
        while sock.poll(idle_ms):
            frames = sock.recv_multipart(copy=False)
            ident, head = frames[0], frames[1].bytes
            op = head[:1]
            if op == b"P":
                sock.send_multipart([ident, b"k"])
            elif op == b"G":
                nbytes, frame = struct.unpack("<QQ", head[1:17])
                if buf.nbytes < nbytes:
                    buf = np.ones(nbytes, dtype=np.uint8)
                mv = memoryview(buf)[:nbytes]
                sock.send_multipart([ident, b"d", *(mv[a:a + frame] for a in range(0, nbytes, frame))],
                                    copy=False)
            elif op == b"Q":
                sock.send_multipart([ident, b"q"])
                break
    finally:
        sock.close(0)
        ctx.term()


def bare_transfer(socks: list, op: str, nbytes: int, chunk: int, depth: int, multipart: bool,
                  data, timeout: float = OP_TIMEOUT) -> None:
    """Move ``nbytes`` over ``socks`` (split evenly, contiguous parts) and wait for every answer.

    ``op`` "push" sends data (``data`` is a buffer of at least ``nbytes``);
    "pull" asks for it.  ``multipart``: each socket's part is one message of
    ``chunk``-byte frames; else each chunk is one message, ``depth`` in
    flight per socket.
    """
    import zmq
    mv = memoryview(data).cast("B") if data is not None else None
    plans = []
    n = len(socks)
    bounds = [nbytes * k // n // 64 * 64 for k in range(n)] + [nbytes]
    for k in range(n):
        lo, hi = bounds[k], bounds[k + 1]
        if multipart:
            msgs = [(lo, hi)]
        else:
            msgs = [(a, min(hi, a + chunk)) for a in range(lo, hi, chunk)]
        plans.append(msgs)

    def send(s, a, b):
        if op == "push":
            s.send_multipart([b"P", *(mv[x:min(b, x + chunk)] for x in range(a, b, chunk))], copy=False)
        else:
            s.send(b"G" + struct.pack("<QQ", b - a, chunk))

    copy_rx = chunk < (1 << 16)
    if n == 1:
        s, msgs = socks[0], plans[0]
        s.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        sent = 0
        for a, b in msgs[:depth]:
            send(s, a, b)
            sent += 1
        for _ in range(len(msgs)):
            s.recv_multipart(copy=copy_rx)  # raises zmq.Again after the timeout
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
        state[s] = [min(depth, len(msgs)), len(msgs)]  # sent, outstanding answers
    left = sum(len(m) for m in plans)
    deadline = time.monotonic() + timeout
    while left:
        events = poller.poll(max(1, int((deadline - time.monotonic()) * 1000)))
        if not events:
            raise TimeoutError(f"bare {op}: no answer within {timeout:.0f}s")
        for s, _ in events:
            msgs = plans[socks.index(s)]
            st = state[s]
            while st[1]:
                try:
                    s.recv_multipart(zmq.NOBLOCK, copy=copy_rx)
                except zmq.Again:
                    break
                st[1] -= 1
                left -= 1
                if st[0] < len(msgs):
                    send(s, *msgs[st[0]])
                    st[0] += 1


class BareClient:
    """DEALER sockets to bare ROUTER peers."""

    def __init__(self, endpoints: Sequence[str]):
        import zmq
        self.ctx = zmq.Context()
        self.socks = []
        for ep in endpoints:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 1000)
            s.setsockopt(zmq.RCVHWM, 1000)
            s.connect(ep)
            self.socks.append(s)

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.ctx.term()


# =================================================================== zps helpers
class ZpsClient:
    """A PSClient registered with a job whose plan is one tensor of ``n`` elements."""

    def __init__(self, endpoints: Sequence[str], n: int, worker_id: int = 0,
                 specs: list | None = None, init=None):
        import numpy as np
        from common.config import ClientSettings
        from common.plan import PartitionPlan
        from worker.client import PSClient
        self.n = n
        self.plan = PartitionPlan.build(specs or [("w", (n,), "float32")], len(endpoints))
        settings = ClientSettings(request_timeout=OP_TIMEOUT, read_timeout=OP_TIMEOUT)
        self.client = PSClient(list(endpoints), worker_id, settings=settings).start()
        try:
            self.client.hello(self.plan, OP_TIMEOUT)
            flat = init if init is not None else np.zeros(n, dtype=np.float32)
            self.client.init(flat, OP_TIMEOUT)
        except BaseException:
            self.client.close()
            raise
        self.grad = np.full(n, 1e-7, dtype=np.float32)
        self.dst = None
        self._clock = itertools.count(0)

    def push_future(self):
        return self.client.push(self.grad, next(self._clock)).futures

    def pull_future(self):
        return self.client.pull(0, OP_TIMEOUT).futures

    def push(self) -> None:
        for f in self.push_future():
            f.result(OP_TIMEOUT)

    def pull(self) -> list:
        return [f.result(OP_TIMEOUT) for f in self.pull_future()]

    def pull_install(self) -> None:
        """A pull whose reply is copied into a flat buffer (what a worker does)."""
        import numpy as np
        from common import protocol as proto
        if self.dst is None:
            self.dst = np.empty(self.n, dtype=np.float32)
        for k, msg in enumerate(self.pull()):
            lo, _ = self.plan.range_of(k)
            pos = lo
            for chunk in proto.payload(msg):
                self.dst[pos:pos + chunk.size] = chunk
                pos += chunk.size

    def exchange(self) -> None:
        self.push()
        self.pull()

    def close(self) -> None:
        self.client.close()


def pipelined(issue: Callable[[], list], count: int, depth: int) -> None:
    """``count`` requests, at most ``depth`` unanswered at a time."""
    q: collections.deque = collections.deque()
    for _ in range(count):
        if len(q) >= depth:
            for f in q.popleft():
                f.result(OP_TIMEOUT)
        q.append(issue())
    while q:
        for f in q.popleft():
            f.result(OP_TIMEOUT)


# =================================================================== 1. bulk
BARE_VARIANTS = [  # (name, frame bytes, depth, multipart)
    ("1MiB-msgs-d1", MI, 1, False), ("1MiB-msgs-d4", MI, 4, False),
    ("4MiB-msgs-d1", 4 * MI, 1, False), ("4MiB-msgs-d4", 4 * MI, 4, False),
    ("1MiB-frames-1msg", MI, 1, True), ("4MiB-frames-1msg", 4 * MI, 1, True),
]


def bench_bulk(b: Bench, sizes: Sequence[int], res: dict, routers: list[str]) -> None:
    import numpy as np
    o = b.opts
    out = res.setdefault("bulk", {"sizes": list(sizes), "zps": {}, "bare": {},
                                  "notes": "zps push = PSClient.push of the whole model, waited for its "
                                           "acknowledgement, which follows the server's plain SGD update "
                                           "(staleness inf); pull = PSClient.pull answered from the "
                                           "server's snapshot (weights unchanged), reply frames in hand; "
                                           "pull_install also copies them into a flat buffer; exchange = "
                                           "push then pull (the pull then needs a fresh snapshot). bare = "
                                           "best of the variants, ROUTER(s) in other processes."})
    server_counts = (1, 2)
    for n in sizes:
        nbytes = n * 4
        key = size_name(n)
        # ---- zps: fresh servers per size (a server adopts one plan)
        servers = {s: [b.server(k, s, 1, "inf", name=f"bulk-s{s}r{k}") for k in range(s)]
                   for s in server_counts}
        try:
            eps = {s: b.ready(*ps) for s, ps in servers.items()}
            init = np.zeros(n, dtype=np.float32)
            for s in server_counts:
                zc = ZpsClient(eps[s], n, init=init)
                try:
                    fig = {}
                    for name, fn in (("push", zc.push), ("pull", zc.pull), ("pull_install", zc.pull_install),
                                     ("exchange", zc.exchange)):
                        secs = timed_reps(fn, o.reps, o.warmup, o.min_rep_s)
                        work = 2 * nbytes if name == "exchange" else nbytes
                        fig[name] = summarize(rates(secs, work / 1e9), "GB/s")
                        b.progress(f"bulk {key}: zps {name:12s} {s} server(s): "
                                   f"{fig[name]['median']:.2f} GB/s")
                    out["zps"].setdefault(f"s{s}", {})[key] = fig
                finally:
                    zc.close()
        finally:
            b.end(*itertools.chain.from_iterable(servers.values()))
        # ---- bare pyzmq
        data = np.ones(nbytes, dtype=np.uint8)
        for r in server_counts:
            bc = BareClient(routers[:r])
            try:
                fig = {}
                for op in ("push", "pull"):
                    variants = {}
                    for vname, chunk, depth, multi in BARE_VARIANTS:
                        if chunk > nbytes and vname.startswith("4MiB") and nbytes <= MI:
                            continue
                        secs = timed_reps(lambda: bare_transfer(bc.socks, op, nbytes, chunk, depth, multi, data),
                                          o.reps, o.warmup, o.min_rep_s)
                        variants[vname] = summarize(rates(secs, nbytes / 1e9), "GB/s")
                    best = max(variants, key=lambda v: variants[v]["median"])
                    fig[op] = dict(variants[best], variant=best,
                                   variants={v: round(f["median"], 3) for v, f in variants.items()})
                    b.progress(f"bulk {key}: bare {op:4s} {r} router(s): {fig[op]['median']:.2f} GB/s "
                               f"(best: {best})")
                out["bare"].setdefault(f"r{r}", {})[key] = fig
            finally:
                bc.close()


# =================================================================== 2. small ops
def bench_small(b: Bench, res: dict, routers: list[str]) -> None:
    import numpy as np
    o = b.opts
    out = res.setdefault("small", {"elements": KIB4, "bytes": KIB4 * 4, "zps": {}, "bare": {},
                                   "unit": "round trips/s"})
    srv = b.server(0, 1, 1, "inf", name="small-server")
    try:
        ep = b.ready(srv)
        zc = ZpsClient(ep, KIB4)
        try:
            for op, issue in (("push", zc.push_future), ("pull", zc.pull_future)):
                for depth in (1, 8):
                    count = 200
                    secs = timed_reps(lambda: pipelined(issue, count, depth), o.reps, o.warmup, o.min_rep_s)
                    fig = summarize(rates(secs, count), "ops/s")
                    out["zps"][f"{op}_d{depth}"] = fig
                    b.progress(f"small: zps  {op} depth {depth}: {fig['median']:,.0f} ops/s")
        finally:
            zc.close()
    finally:
        b.end(srv)
    count = 200
    data = np.ones(KIB4 * 4 * count, dtype=np.uint8)
    bc = BareClient(routers[:1])
    try:
        for op in ("push", "pull"):
            for depth in (1, 8):
                secs = timed_reps(lambda: bare_transfer(bc.socks, op, KIB4 * 4 * count, KIB4 * 4, depth,
                                                        False, data),
                                  o.reps, o.warmup, o.min_rep_s)
                fig = summarize(rates(secs, count), "ops/s")
                out["bare"][f"{op}_d{depth}"] = fig
                b.progress(f"small: bare {op} depth {depth}: {fig['median']:,.0f} ops/s")
    finally:
        bc.close()


# =================================================================== 3. update
def bench_update(b: Bench, sizes: Sequence[int], res: dict) -> None:
    import torch
    from common.plan import DEFAULT_FRAME_ELEMS, frame_slices
    from ps.optim import OptimizerSpec, ShardOptimizer
    o = b.opts
    usizes = [n for n in sizes if n <= 16 * MI] or [min(sizes)]
    out = res.setdefault("update", {"sizes": usizes, "torch_threads": torch.get_num_threads(),
                                    "traffic_bytes_per_element": dict(TRAFFIC, sgd_plain=12),
                                    "chunk_elems": DEFAULT_FRAME_ELEMS, "figures": {}})
    for n in usizes:
        key = size_name(n)
        fig = {}
        src = torch.full((n,), 1e-3)
        dst = torch.empty(n)
        shard = torch.zeros(n)
        chunks = [src[a:b] for a, b in frame_slices(n, DEFAULT_FRAME_ELEMS)]
        cases = {
            "copy": lambda: dst.copy_(src),
            "sgd_momentum": ShardOptimizer(shard, OptimizerSpec("sgd", LR, momentum=0.9), DEFAULT_FRAME_ELEMS),
            "adam": ShardOptimizer(shard, OptimizerSpec("adam", 1e-3), DEFAULT_FRAME_ELEMS),
        }
        # the same fused torch Adam on one flat parameter (no chunks): the ceiling ShardOptimizer can reach
        flat_p = torch.zeros(n, requires_grad=True)
        flat_p.grad = src
        raw = torch.optim.Adam([flat_p], lr=1e-3, fused=True)
        for name in ("copy", "sgd_momentum", "adam", "adam_torch_flat"):
            if name == "adam_torch_flat":
                fn = raw.step
            elif name == "copy":
                fn = cases["copy"]
            else:
                opt = cases[name]
                fn = (lambda opt=opt: opt.step(chunks))
            secs = timed_reps(fn, o.reps, o.warmup, o.min_rep_s)
            eps = summarize(rates(secs, n), "elements/s")
            tb = TRAFFIC["adam" if name.startswith("adam") else name]
            eps["traffic_GBps"] = eps["median"] * tb / 1e9
            fig[name] = eps
            b.progress(f"update {key}: {name:16s} {eps['median'] / 1e9:.2f} G elements/s "
                       f"({eps['traffic_GBps']:.1f} GB/s of traffic)")
        del raw, flat_p
        out["figures"][key] = fig


# =================================================================== 4. peers
class RpcParameterServer:
    """The server-owned object of PyTorch's RPC parameter-server tutorial, reduced to one flat tensor."""

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
    rpc.shutdown(graceful=True, timeout=OP_TIMEOUT)


def peer_rpc_client(cfg: dict) -> None:
    import torch
    from torch.distributed import rpc
    _emit("READY", {"role": "rpc-client"})
    rpc.init_rpc("trainer", rank=1, world_size=2, rpc_backend_options=_rpc_options(cfg["port"]))
    reps, warmup, min_rep_s = cfg["reps"], cfg["warmup"], cfg["min_rep_s"]
    result: dict = {"bulk": {}, "small": {}}
    for n in cfg["sizes"]:
        rref = rpc.remote("ps", RpcParameterServer, args=(n, LR))
        grad = torch.full((n,), 1e-7)
        fig = {}
        for name, fn in (("push", lambda: rpc.rpc_sync("ps", _rpc_apply, args=(rref, grad))),
                         ("pull", lambda: rpc.rpc_sync("ps", _rpc_get, args=(rref,)))):
            fig[name] = summarize(rates(timed_reps(fn, reps, warmup, min_rep_s), n * 4 / 1e9), "GB/s")
        result["bulk"][size_name(n)] = fig
        del rref
    rref = rpc.remote("ps", RpcParameterServer, args=(KIB4, LR))
    grad = torch.full((KIB4,), 1e-7)
    count = 200
    for op, call in (("push", lambda: rpc.rpc_async("ps", _rpc_apply, args=(rref, grad))),
                     ("pull", lambda: rpc.rpc_async("ps", _rpc_get, args=(rref,)))):
        for depth in (1, 8):
            def run():
                q: collections.deque = collections.deque()
                for _ in range(count):
                    if len(q) >= depth:
                        q.popleft().wait()
                    q.append(call())
                while q:
                    q.popleft().wait()
            result["small"][f"{op}_d{depth}"] = summarize(
                rates(timed_reps(run, reps, warmup, min_rep_s), count), "ops/s")
        sync = (lambda: rpc.rpc_sync("ps", _rpc_apply, args=(rref, grad))) if op == "push" else \
            (lambda: rpc.rpc_sync("ps", _rpc_get, args=(rref,)))
        result["small"][f"{op}_sync"] = summarize(
            rates(timed_reps(sync, reps, warmup, min_rep_s), 1), "ops/s")
    del rref
    _emit("RESULT", result)
    rpc.shutdown(graceful=True, timeout=OP_TIMEOUT)


def peer_gloo(cfg: dict) -> None:
    import torch
    import torch.distributed as dist
    rank = cfg["rank"]
    _emit("READY", {"role": "gloo", "rank": rank})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=OP_TIMEOUT))
    reps, warmup, min_rep_s = cfg["reps"], cfg["warmup"], cfg["min_rep_s"]
    result: dict = {"all_reduce": {}}

    def measure(t, work):
        # rank 0 calibrates the calls per repetition; both ranks then make the same calls
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            dist.all_reduce(t)
        one = (time.perf_counter() - t0) / max(1, warmup)
        inner = torch.tensor([max(1, math.ceil(min_rep_s / max(one, 1e-9)))])
        dist.broadcast(inner, 0)
        out = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(int(inner)):
                dist.all_reduce(t)
            out.append((time.perf_counter() - t0) / int(inner))
        return out

    for n in cfg["sizes"]:
        t = torch.full((n,), 1e-7)
        result["all_reduce"][size_name(n)] = summarize(rates(measure(t, n), n * 4 / 1e9), "GB/s")
    result["all_reduce_small"] = summarize(rates(measure(torch.ones(KIB4), 1), 1), "ops/s")
    if rank == 0:
        _emit("RESULT", result)
    dist.barrier()
    dist.destroy_process_group()


def bench_peers(b: Bench, sizes: Sequence[int], res: dict) -> None:
    o = b.opts
    out = res.setdefault("peers", {"notes": "rpc: TensorPipe backend, a RpcParameterServer object owned "
                                            "by another process (PyTorch parameter-server tutorial pattern); "
                                            "push = rpc_sync(apply_gradient) (SGD), pull = rpc_sync(get_weights). "
                                            "gloo: all_reduce between two processes."})
    cfg = {"sizes": list(sizes), "reps": o.reps, "warmup": o.warmup, "min_rep_s": o.min_rep_s}
    limit = 120 + 60 * len(sizes) * (2 if not o.quick else 1)
    port = free_port()
    srv = b.peer("rpc_server", dict(cfg, port=port), "rpc-server")
    cli = b.peer("rpc_client", dict(cfg, port=port), "rpc-client")
    try:
        b.ready(srv, cli)
        out["rpc"] = wait_result(cli, limit)
        for key, fig in out["rpc"]["bulk"].items():
            b.progress(f"peers {key}: rpc push {fig['push']['median']:.2f} GB/s, "
                       f"pull {fig['pull']['median']:.2f} GB/s")
        for key, fig in out["rpc"]["small"].items():
            b.progress(f"peers small: rpc {key} {fig['median']:,.0f} ops/s")
        cli.wait(30)
    finally:
        b.end(cli, srv)
    port = free_port()
    ranks = [b.peer("gloo", dict(cfg, port=port, rank=r), f"gloo{r}") for r in (0, 1)]
    try:
        b.ready(*ranks)
        out["gloo"] = wait_result(ranks[0], limit)
        for key, fig in out["gloo"]["all_reduce"].items():
            b.progress(f"peers {key}: gloo all_reduce {fig['median']:.2f} GB/s")
        ranks[0].wait(30)
    finally:
        b.end(*ranks)


# =================================================================== 5. memory
def peer_worker_memory(cfg: dict) -> None:
    """A PSWorker training a d x d linear layer; reports its own RSS figures."""
    import torch
    from common.config import ClientSettings
    from worker.session import PSWorker
    base = proc_status()
    _emit("READY", {"role": "worker-memory", "baseline_rss": base["VmRSS"]})
    d = cfg["d"]
    torch.manual_seed(0)
    model = torch.nn.Linear(d, d, bias=False)
    settings = ClientSettings(request_timeout=OP_TIMEOUT, read_timeout=OP_TIMEOUT)
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
    _emit("RESULT", {"baseline_rss": base["VmRSS"], "hwm": st["VmHWM"], "rss": st["VmRSS"],
                     "params": d * d})


def bench_memory(b: Bench, sizes: Sequence[int], res: dict) -> None:
    import numpy as np
    n_target = min(16 * MI, max(sizes))
    d = math.isqrt(n_target)
    n = d * d
    out = res.setdefault("memory", {"elements": n, "notes": (
        "server: peak RSS (VmHWM) minus the RSS read right after READY (torch imported, no shard "
        "yet), after 8 serial push+pull rounds under Adam; floor 16 B/element (weights, exp_avg, "
        "exp_avg_sq, one gradient). worker: PSWorker in a subprocess training a d x d Linear; "
        "VmHWM minus its RSS after imports; floor 12 B/parameter (the model's own parameters as "
        "built, then the flat weight and flat gradient buffers)")})
    srv = b.server(0, 1, 2, "inf", optimizer="adam", name="memory-server")
    try:
        ep = b.ready(srv)
        base = proc_status(srv.pid)["VmRSS"]
        rng = np.random.default_rng(0)
        zc = ZpsClient(ep, n, specs=[("weight", (d, d), "float32")],
                       init=rng.standard_normal(n, dtype=np.float32))
        try:
            for _ in range(8):
                zc.push()
                zc.pull()
            st = proc_status(srv.pid)
        finally:
            zc.close()
        floor = 16 * n
        peak = st["VmHWM"] - base
        out["server"] = {"baseline_rss": base, "hwm": st["VmHWM"], "rss": st["VmRSS"], "peak_over_baseline": peak,
                         "floor": floor, "ratio": peak / floor}
        b.progress(f"memory {size_name(n)}: server peak {peak / MI:.0f} MiB over baseline {base / MI:.0f} MiB, "
                   f"floor {floor / MI:.0f} MiB -> {peak / floor:.2f}x")
        wk = b.peer("worker_memory", {"endpoints": ep, "d": d, "iters": 6, "worker": 1}, "worker-memory")
        try:
            r = wait_result(wk, 300)
            wk.wait(30)
        finally:
            b.end(wk)
        wfloor = 12 * r["params"]
        wpeak = r["hwm"] - r["baseline_rss"]
        out["worker"] = dict(r, peak_over_baseline=wpeak, floor=wfloor, ratio=wpeak / wfloor)
        st2 = proc_status(srv.pid)
        out["server_after_training_worker"] = {"hwm": st2["VmHWM"], "peak_over_baseline": st2["VmHWM"] - base,
                                               "ratio": (st2["VmHWM"] - base) / floor}
        b.progress(f"memory {size_name(n)}: worker peak {wpeak / MI:.0f} MiB, floor {wfloor / MI:.0f} MiB "
                   f"-> {wpeak / wfloor:.2f}x; server after a training worker {(st2['VmHWM'] - base) / floor:.2f}x")
    finally:
        b.end(srv)


# =================================================================== 6. train
def build_model(kind: str):
    import torch
    from torch import nn
    torch.manual_seed(0)
    if kind == "conv":  # compute-heavy: ~0.1M parameters
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(1024, 10))
        x = torch.randn(32, 3, 32, 32)
        y = torch.randint(0, 10, (32,))
        loss = nn.functional.cross_entropy
    elif kind == "mlp":  # communication-heavy: ~6.3M parameters, batch of 4
        model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                              nn.Linear(2048, 10))
        x = torch.randn(4, 1024)
        y = torch.randint(0, 10, (4,))
        loss = nn.functional.cross_entropy
    else:
        raise ValueError(f"unknown model {kind!r}")
    return model, x, y, loss


def peer_train(cfg: dict) -> None:
    import torch
    _emit("READY", {"role": "trainer", "mode": cfg["mode"]})
    model, x, y, loss_fn = build_model(cfg["model"])
    worker = None
    if cfg["mode"] == "local":
        opt = torch.optim.SGD(model.parameters(), lr=LR)

        def step():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            return loss
    else:
        from common.config import ClientSettings
        from worker.session import PSWorker
        settings = ClientSettings(request_timeout=OP_TIMEOUT, read_timeout=OP_TIMEOUT)
        worker = PSWorker(model, cfg["endpoints"], 0, settings=settings).start(OP_TIMEOUT)

        def step():
            worker.read(OP_TIMEOUT)
            worker.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            worker.push()
            return loss
    try:
        secs = timed_reps(step, cfg["reps"], cfg["warmup"], cfg["min_rep_s"])
        first = float(step())
        result = {"it_per_s": summarize([1 / s for s in secs], "it/s"),
                  "params": sum(p.numel() for p in model.parameters()), "loss": first}
        if worker is not None:
            worker.flush(OP_TIMEOUT)
            recs = worker.records
            result["reads"] = len(recs)
            result["pulled_fraction"] = sum(r.pulled for r in recs) / max(1, len(recs))
            result["mean_read_wait_ms"] = 1000 * sum(r.wait_seconds for r in recs) / max(1, len(recs))
            result["mean_staleness"] = sum(r.staleness for r in recs) / max(1, len(recs))
    finally:
        if worker is not None:
            worker.close(OP_TIMEOUT)
    _emit("RESULT", result)


def bench_train(b: Bench, res: dict) -> None:
    o = b.opts
    out = res.setdefault("train", {"notes": "iterations/s; local = one process, torch.optim.SGD; zps = "
                                            "1 ps-server (SGD) + 1 PSWorker process, eager refresh"})
    cfg = {"reps": o.reps, "warmup": max(3, o.warmup), "min_rep_s": o.train_rep_s}
    for kind in ("conv", "mlp"):
        fig = {}
        servers = {s: b.server(0, 1, 1, s, name=f"train-{kind}-s{s}") for s in ("1", "inf")}
        try:
            eps = {s: b.ready(p) for s, p in servers.items()}
            for mode, s in (("local", None), ("zps", "1"), ("zps", "inf")):
                label = "local" if mode == "local" else f"zps_s{s}"
                t = b.peer("train", dict(cfg, model=kind, mode=mode, endpoints=eps.get(s)), f"train-{kind}-{label}")
                try:
                    r = wait_result(t, 300)
                    t.wait(30)
                finally:
                    b.end(t)
                fig[label] = r
                fig.setdefault("params", r["params"])
                b.progress(f"train {kind} ({r['params']:,} params): {label:9s} "
                           f"{r['it_per_s']['median']:.1f} it/s")
        finally:
            b.end(*servers.values())
        out[kind] = fig


# =================================================================== ratios & report
def _med(d: dict | None) -> float | None:
    return None if d is None else d.get("median")


def _ratio(a, b) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def compute_ratios(res: dict) -> dict:
    r: dict[str, float | None] = {}
    bulk = res.get("bulk")
    if bulk:
        key = size_name(max(bulk["sizes"]))
        z1, bare1 = bulk["zps"]["s1"][key], bulk["bare"]["r1"][key]
        r["push_vs_bare"] = _ratio(_med(z1["push"]), _med(bare1["push"]))
        r["pull_vs_bare"] = _ratio(_med(z1["pull"]), _med(bare1["pull"]))
        if "s2" in bulk["zps"] and "r2" in bulk["bare"]:
            z2, bare2 = bulk["zps"]["s2"][key], bulk["bare"]["r2"][key]
            r["push_vs_bare_2servers"] = _ratio(_med(z2["push"]), _med(bare2["push"]))
            r["pull_vs_bare_2servers"] = _ratio(_med(z2["pull"]), _med(bare2["pull"]))
        r["pull_install_vs_bare"] = _ratio(_med(z1["pull_install"]), _med(bare1["pull"]))
    peers = res.get("peers")
    if bulk and peers and "rpc" in peers:
        key = size_name(max(bulk["sizes"]))
        rpc = peers["rpc"]["bulk"].get(key)
        if rpc:
            z1 = bulk["zps"]["s1"][key]
            r["push_vs_rpc"] = _ratio(_med(z1["push"]), _med(rpc["push"]))
            r["pull_vs_rpc"] = _ratio(_med(z1["pull"]), _med(rpc["pull"]))
    if bulk and peers and "gloo" in peers:
        key = size_name(max(bulk["sizes"]))
        ar = peers["gloo"]["all_reduce"].get(key)
        if ar:
            # both in GB/s of one model's size per operation: an exchange moves the model twice
            ex = _med(bulk["zps"]["s1"][key]["exchange"]) / 2
            r["exchange_vs_allreduce"] = _ratio(ex, _med(ar))
    small = res.get("small")
    if small:
        for d in (1, 8):
            pr = _ratio(_med(small["zps"][f"push_d{d}"]), _med(small["bare"][f"push_d{d}"]))
            pl = _ratio(_med(small["zps"][f"pull_d{d}"]), _med(small["bare"][f"pull_d{d}"]))
            r[f"small_push_vs_bare_depth{d}"] = pr
            r[f"small_pull_vs_bare_depth{d}"] = pl
            r[f"small_op_vs_bare_depth{d}"] = min(pr, pl) if pr and pl else None
    if small and peers and "rpc" in peers:
        rs = peers["rpc"]["small"]
        pr = _ratio(_med(small["zps"]["push_d1"]), _med(rs["push_d1"]))
        pl = _ratio(_med(small["zps"]["pull_d1"]), _med(rs["pull_d1"]))
        r["small_op_vs_rpc"] = min(pr, pl) if pr and pl else None
        pr8 = _ratio(_med(small["zps"]["push_d8"]), _med(rs["push_d8"]))
        pl8 = _ratio(_med(small["zps"]["pull_d8"]), _med(rs["pull_d8"]))
        r["small_op_vs_rpc_depth8"] = min(pr8, pl8) if pr8 and pl8 else None
    upd = res.get("update")
    if upd:
        key = size_name(max(upd["sizes"]))
        f = upd["figures"][key]
        r["adam_vs_copy_traffic"] = _ratio(f["adam"]["traffic_GBps"], f["copy"]["traffic_GBps"])
        r["sgd_momentum_vs_copy_traffic"] = _ratio(f["sgd_momentum"]["traffic_GBps"], f["copy"]["traffic_GBps"])
        r["adam_vs_torch_flat"] = _ratio(_med(f["adam"]), _med(f["adam_torch_flat"]))
    mem = res.get("memory")
    if mem:
        r["server_memory_vs_floor"] = mem["server"]["ratio"]
        r["worker_memory_vs_floor"] = mem["worker"]["ratio"]
    tr = res.get("train")
    if tr:
        for kind, name in (("conv", ""), ("mlp", "_comm")):
            if kind in tr:
                loc = _med(tr[kind]["local"]["it_per_s"])
                r[f"train{name}_vs_local_s1"] = _ratio(_med(tr[kind]["zps_s1"]["it_per_s"]), loc)
                r[f"train{name}_vs_local_sinf"] = _ratio(_med(tr[kind]["zps_sinf"]["it_per_s"]), loc)
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
    if unit in ("ops/s",):
        return f"{v:,.0f}"
    if unit == "elements/s":
        return f"{v / 1e9:.3f}G"
    return f"{v:.2f}"


def _row(name: str, fig: dict) -> str:
    u = fig["unit"]
    return (f"  {name:38s} {_fmt(fig['median'], u):>10s} {_fmt(fig['min'], u):>10s} "
            f"{_fmt(fig['max'], u):>10s}  {u}")


def render_table(res: dict) -> str:
    lines = []
    head = f"  {'figure':38s} {'median':>10s} {'min':>10s} {'max':>10s}  unit"
    bulk = res.get("bulk")
    if bulk:
        lines += ["", "1. Bulk transport (GB/s of payload; zps push includes the server's SGD update)", head]
        for n in bulk["sizes"]:
            key = size_name(n)
            for s, figs in bulk["zps"].items():
                f = figs.get(key)
                if f:
                    for op in ("push", "pull", "pull_install", "exchange"):
                        lines.append(_row(f"zps {op} {key} x{s[1:]} server", f[op]))
            for r, figs in bulk["bare"].items():
                f = figs.get(key)
                if f:
                    for op in ("push", "pull"):
                        lines.append(_row(f"bare {op} {key} x{r[1:]} ({f[op]['variant']})", f[op]))
            rpc = res.get("peers", {}).get("rpc", {}).get("bulk", {}).get(key)
            if rpc:
                lines.append(_row(f"torch rpc push {key}", rpc["push"]))
                lines.append(_row(f"torch rpc pull {key}", rpc["pull"]))
            ar = res.get("peers", {}).get("gloo", {}).get("all_reduce", {}).get(key)
            if ar:
                lines.append(_row(f"gloo all_reduce {key}", ar))
    small = res.get("small")
    if small:
        lines += ["", "2. Small operations (4 KiB, round trips/s)", head]
        for side in ("zps", "bare"):
            for k, f in small[side].items():
                lines.append(_row(f"{side} {k}", f))
        rs = res.get("peers", {}).get("rpc", {}).get("small", {})
        for k, f in rs.items():
            lines.append(_row(f"torch rpc {k}", f))
        ars = res.get("peers", {}).get("gloo", {}).get("all_reduce_small")
        if ars:
            lines.append(_row("gloo all_reduce 4KiB", ars))
    upd = res.get("update")
    if upd:
        lines += ["", f"3. Server update rate ({upd['torch_threads']} torch threads; traffic B/elt: "
                      f"copy 8, SGD-momentum 20, Adam 28)", head]
        for key, figs in upd["figures"].items():
            for name, f in figs.items():
                lines.append(_row(f"{name} {key}", f) + f"  = {f['traffic_GBps']:.1f} GB/s traffic")
    mem = res.get("memory")
    if mem:
        lines += ["", f"5. Memory ({size_name(mem['elements'])} elements)"]
        for who in ("server", "worker"):
            m = mem[who]
            lines.append(f"  {who:10s} peak over baseline {m['peak_over_baseline'] / MI:8.1f} MiB, floor "
                         f"{m['floor'] / MI:8.1f} MiB, ratio {m['ratio']:.2f} (baseline RSS "
                         f"{m['baseline_rss'] / MI:.0f} MiB)")
        m = mem["server_after_training_worker"]
        lines.append(f"  server after a PSWorker trained against it: ratio {m['ratio']:.2f}")
    tr = res.get("train")
    if tr:
        lines += ["", "6. End-to-end training (iterations/s)", head]
        for kind in ("conv", "mlp"):
            if kind in tr:
                for label in ("local", "zps_s1", "zps_sinf"):
                    lines.append(_row(f"{kind} ({tr[kind]['params']:,} p) {label}", tr[kind][label]["it_per_s"]))
    ratios = res.get("ratios", {})
    if ratios:
        lines += ["", "Ratios (zps / baseline, medians)", f"  {'ratio':38s} {'value':>10s}  target"]
        st = res.get("targets", {})
        for k, v in ratios.items():
            t = st.get(k)
            mark = "" if t is None else f"  {t['target']:8s} {'met' if t['met'] else 'MISSED'}"
            lines.append(f"  {k:38s} {v:10.3f}{mark}")
    return "\n".join(lines)


def machine_info() -> dict:
    import numpy
    import torch
    import zmq
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu,
            "mem_bytes": mem, "python": platform.python_version(), "torch": torch.__version__,
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "numpy": numpy.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


# =================================================================== main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-bench",
        description="Benchmark zps beside bare pyzmq, torch.distributed.rpc and gloo on this machine "
                    "and report ratios (each figure: median of --reps repetitions after a warm-up).")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (1M only), fewer repetitions; finishes in under 3 minutes on 2 cores")
    p.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",") if x.strip()],
                   help="comma-separated model sizes in fp32 elements, e.g. 1M,16M,64M "
                        "(default: 1M,16M,64M; --quick: 1M)")
    p.add_argument("--json", metavar="PATH", help="write every figure, the ratios and the targets as JSON")
    p.add_argument("--reps", type=int, help="repetitions per figure (default 7; --quick 3)")
    p.add_argument("--warmup", type=int, help="warm-up calls before each figure (default 2; --quick 1)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (the required ratios need all)")
    p.add_argument("--peer", help=argparse.SUPPRESS)
    p.add_argument("--peer-config", help=argparse.SUPPRESS)
    return p


PEERS = {"router": peer_router, "rpc_server": peer_rpc_server, "rpc_client": peer_rpc_client,
         "gloo": peer_gloo, "worker_memory": peer_worker_memory, "train": peer_train}


def _parent_watch(ppid: int) -> None:
    """Exit a peer whose benchmark process is gone (belt and braces next to PDEATHSIG)."""
    def run():
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(4)
    threading.Thread(target=run, daemon=True).start()


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
    opts.reps = opts.reps or (3 if opts.quick else 7)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.quick else 2)
    if opts.reps < 1 or opts.warmup < 0:
        print("error: --reps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    opts.min_rep_s = 0.1 if opts.quick else 0.3
    opts.train_rep_s = 0.5 if opts.quick else 1.5

    signal.signal(signal.SIGTERM, _raise_interrupt)
    b = Bench(opts)
    res: dict = {"meta": {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                          "quick": opts.quick, "sizes": opts.sizes, "reps": opts.reps,
                          "warmup": opts.warmup, "min_rep_s": opts.min_rep_s, "sections": sections,
                          "units": "sizes in elements (1M = 2**20 fp32); GB/s = 1e9 bytes/s of payload",
                          "machine": machine_info()}}
    b.progress(f"sizes {', '.join(map(size_name, opts.sizes))}; {opts.reps} reps after {opts.warmup} "
               f"warm-up; sections {', '.join(sections)}")
    code = 0
    try:
        routers = []
        if "bulk" in sections or "small" in sections:
            rps = [b.peer("router", {}, f"bare-router{i}") for i in range(2)]
            routers = b.ready(*rps)
        if "bulk" in sections:
            bench_bulk(b, opts.sizes, res, routers)
        if "small" in sections:
            bench_small(b, res, routers)
        if routers:
            b.end(*[p for p in list(b.procs) if p.name.startswith("bare-router")])
        if "update" in sections:
            bench_update(b, opts.sizes, res)
        if "peers" in sections:
            bench_peers(b, opts.sizes, res)
        if "memory" in sections:
            bench_memory(b, opts.sizes, res)
        if "train" in sections:
            bench_train(b, res)
    except KeyboardInterrupt:
        b.progress("interrupted: ending every process")
        code = 130
    except Exception as exc:
        b.progress(f"failed: {type(exc).__name__}: {exc}")
        code = 1
        raise
    finally:
        b.end_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        res["meta"]["duration_s"] = round(time.perf_counter() - b.t0, 1)
        res["ratios"] = compute_ratios(res) if code == 0 else {}
        res["targets"] = target_status(res["ratios"])
        if code == 0:
            print(render_table(res))
        if opts.json and code == 0:
            with open(opts.json, "w") as fh:
                json.dump(res, fh, indent=1)
            b.progress(f"wrote {opts.json}")
    return code
