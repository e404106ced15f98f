#!/usr/bin/env python3
"""The Python cost of one small request, on each side, without the network.

    client   PSClient.push / pull of a 4 KiB tensor against an in-memory stand-in
             for its socket (the stand-in answers at once): what the client's own
             code costs per request, apart from ZeroMQ and the server
    server   ShardServer handling pre-built 4 KiB PUSH / PULL messages in this
             process (replies dropped): what the server's handler costs per request

Wall time on a shared machine swings; instruction counts do not. With
``--instructions`` the script runs itself twice under ``valgrind --tool=callgrind``
(once with no timed requests) and reports the difference per request::

    python benchmarks/request_cost.py client push            # microseconds per request
    python benchmarks/request_cost.py server push --instructions
    python benchmarks/request_cost.py client push --root OTHER_CHECKOUT   # A/B
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import itertools
import os
import subprocess
import sys
import time

N = 1024   # elements: 4 KiB


def client_case(op: str, depth: int):
    import msgpack
    import numpy as np
    import zmq

    from common.plan import PartitionPlan
    from worker.client import PSClient

    class Socket:   # answers each request at once, as a server with nothing else to do would
        def __init__(self):
            self.out, self.cur = collections.deque(), []

        def send(self, frame, flags=0, copy=True, track=False):
            self.cur.append(frame)
            if flags & 2:   # SNDMORE
                return
            frames, self.cur = self.cur, []
            h = msgpack.unpackb(frames[0])
            t, rid = h["t"], h["rid"]
            if t == 5:
                rep = [{"v": 1, "t": 6, "rid": rid, "step": 1, "dup": False}]
            elif t == 7:
                rep = [{"v": 1, "t": 8, "rid": rid, "min_clock": 0, "step": 1, "n": N}, b"\0" * (4 * N)]
            elif t == 1:
                rep = [{"v": 1, "t": 2, "rid": rid, "rank": 0, "lo": 0, "hi": N, "ph": h["ph"], "step": 0,
                        "min_clock": 0, "start_clock": 0, "initialized": True, "sinc": 7, "staleness": -1}]
            elif t == 3:
                rep = [{"v": 1, "t": 4, "rid": rid, "accepted": True}]
            else:
                return
            reply = [zmq.Frame(msgpack.packb(x) if isinstance(x, dict) else x) for x in rep]
            for f in reply[:-1]:
                f.more = True
            self.out.append(reply)

        def recv(self, flags=0, copy=True):
            if not self.out:
                raise zmq.Again()
            msg = self.out[0]
            frame = msg.pop(0)
            if not msg:
                self.out.popleft()
            return frame

        def send_multipart(self, *a, **k):
            pass

    class Poller:
        def __init__(self, socks):
            self.socks = socks

        def poll(self, timeout=None):
            return [(s, zmq.POLLIN) for s in self.socks if s.out]

    c = PSClient(["tcp://127.0.0.1:9"], 0).start()
    sock = Socket()
    with c._io:
        real = c._socks
        c._socks, c._poller, c._queued = [sock], Poller([sock]), [Poller([sock])]
    plan = PartitionPlan.build([("w", (N,), "float32")], 1)
    c.hello(plan, 5)
    c.init(np.zeros(N, np.float32), 5)
    c._heartbeat_on = False
    g = np.full(N, 1e-7, np.float32)
    issue = (lambda: c.push(g, 0).futures) if op == "push" else (lambda: c.pull(0, 10).futures)

    def run(count: int) -> None:
        q: collections.deque = collections.deque()
        for _ in range(count):
            if len(q) >= depth:
                for f in q.popleft():
                    f.result(10)
            q.append(issue())
        while q:
            for f in q.popleft():
                f.result(10)

    def close() -> None:
        with c._io:
            c._socks = real
        c.close(2)
    return run, close


def server_case(op: str, depth: int):
    import numpy as np
    import torch
    import zmq

    from common import protocol as proto
    from common.config import ServerSettings
    from common.plan import PartitionPlan
    from common.protocol import MsgType
    from ps.server import ShardServer
    torch.set_num_threads(1)   # as bin/ps-server
    s = ShardServer(ServerSettings(bind="tcp://127.0.0.1:0", staleness=float("inf"), num_workers=1, lr=0.01))
    s._send_now = lambda ident, frames, nbytes: True   # replies are dropped
    s._outbox = None
    plan = PartitionPlan.build([("w", (N,), "float32")], 1)
    ident = zmq.Frame(b"\0\x80\0\0\x29")

    def handle(frames):
        s._handle([ident, *(zmq.Frame(f) for f in frames)])
    handle(proto.encode(MsgType.HELLO, {"rid": 1, "w": 0, "inc": 7, "plan": plan.to_wire(), "ph": plan.hash}))
    handle(proto.encode(MsgType.INIT, {"rid": 2, "w": 0, "inc": 7, "ph": plan.hash, "n": N},
                        [np.zeros(N, np.float32).tobytes()]))
    g = np.full(N, 1e-7, np.float32).tobytes()
    seq = itertools.count(0)
    if op == "push":
        def make():
            return proto.encode(MsgType.PUSH, {"rid": 5, "w": 0, "inc": 7, "seq": next(seq), "clk": 0,
                                               "ph": plan.hash, "n": N, "tick": False}, [g])
    else:
        def make():
            return proto.encode(MsgType.PULL, {"rid": 6, "w": 0, "clk": 0, "ph": plan.hash, "dl": 60000})

    def run(count: int) -> None:
        msgs = [make() for _ in range(count)]
        for m in msgs:
            handle(m)
        if s.stats["errors"]:
            raise RuntimeError(f"the server refused requests: {s.stats['errors']}")

    def close() -> None:
        s._close()
    return run, close


def measure(side: str, op: str, depth: int, count: int) -> float:
    run, close = (client_case if side == "client" else server_case)(op, depth)
    try:
        run(200)                          # warm-up
        if count == 0:
            return 0.0
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            run(count)
            best = min(best, (time.perf_counter() - t0) / count)
        return best
    finally:
        close()


def instructions(args) -> float:
    """Instructions per request: two callgrind runs, with and without ``args.count`` requests."""
    def one(count: int) -> cf.Future:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
               os.path.abspath(__file__), args.side, args.op, "--depth", str(args.depth), "--root", args.root,
               "--count", str(count), "--reps-once"]
        return pool.submit(subprocess.run, cmd, capture_output=True, text=True, check=True)

    def total(fut: cf.Future) -> int:
        lines = [line for line in fut.result().stderr.splitlines() if "Collected" in line]
        if not lines:
            raise RuntimeError("valgrind printed no instruction count (is valgrind installed?)")
        return int(lines[-1].split()[-1])
    with cf.ThreadPoolExecutor(2) as pool:
        base, timed = one(0), one(args.count)
        return (total(timed) - total(base)) / args.count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("side", choices=("client", "server"))
    p.add_argument("op", choices=("push", "pull"))
    p.add_argument("--depth", type=int, default=1, help="client requests in flight (default 1)")
    p.add_argument("--count", type=int, default=2000, help="requests per timed run (default 2000)")
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="checkout whose code is measured (default: this one)")
    p.add_argument("--instructions", action="store_true", help="count instructions under valgrind instead")
    p.add_argument("--reps-once", action="store_true", help=argparse.SUPPRESS)   # one run, for valgrind
    args = p.parse_args()
    if args.depth < 1 or args.count < 0:
        p.error("--depth must be >= 1 and --count >= 0")
    sys.path.insert(0, os.path.abspath(args.root))
    if args.instructions:
        print(f"{args.side} {args.op} depth {args.depth}: {instructions(args) / 1000:.1f}k instructions/request")
        return 0
    if args.reps_once:
        run, close = (client_case if args.side == "client" else server_case)(args.op, args.depth)
        try:
            run(50)
            if args.count:
                run(args.count)
        finally:
            close()
        return 0
    us = measure(args.side, args.op, args.depth, args.count) * 1e6
    print(f"{args.side} {args.op} depth {args.depth}: {us:.1f} us/request (best of 5 runs of {args.count})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
