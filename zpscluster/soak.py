"""``ps-soak``: repeat mixed faults for a set time and check the invariants.

One server (staleness inf, SGD with lr 1, checkpointing) and W pusher
processes that push gradients of ones through the fault injector (drops and
duplicates).  Every few seconds one fault is done for real, at random
(seeded): SIGKILL a pusher and start a new incarnation; SIGSTOP a pusher past
the heartbeat timeout and SIGCONT it; SIGKILL the server and restore it from
its newest checkpoint.  After every fault, and in between, the invariant is
checked on a pull reply (weights and step come from the same instant):

    every weight == -(optimizer steps applied)        (no partial, no double push)

and the server must answer within its deadline.  Prints a JSON report;
exits non-zero on any violation.  Not part of the default test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time

import numpy as np

from zpscluster.procs import RoleProcess, bin_cmd

N = 100_000
FRAME = 1 << 14


def pusher_main(endpoint: str, rank: int, workers: int) -> int:
    from common.config import ClientSettings
    from common.errors import ZPSError
    from common.plan import PartitionPlan
    from worker.client import PSClient

    plan = PartitionPlan.build([("w", (N,), "float32")], 1, frame_elems=FRAME)
    c = PSClient([endpoint], rank, settings=ClientSettings(
        frame_elems=FRAME, faults="drop=0.05,dup=0.05", fault_seed=os.getpid(), attempt_timeout=0.5,
        backoff_max=0.5, request_timeout=30, heartbeat_interval=0.5)).start()
    ones = np.ones(N, np.float32)
    clk = 0
    print("READY " + json.dumps({"role": "pusher", "rank": rank, "endpoint": "", "pid": os.getpid()}), flush=True)
    while True:
        try:
            reply = c.hello(plan, timeout=30, clock=clk)
            if not reply[0]["initialized"]:
                c.init(np.zeros(N, np.float32), timeout=30)
            while True:
                c.push(ones, clk).wait(30)
                clk += 1
        except ZPSError as exc:  # fenced by a restored server, or it was down: say HELLO again
            print(f"pusher {rank}: {exc}; rejoining", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ps-soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long to run [30]")
    p.add_argument("--workers", type=int, default=3, help="pusher processes [3]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=float, default=6.0, help="seconds between faults [6]")
    p.add_argument("--json", default="", help="write the report here too")
    p.add_argument("--pusher", nargs=3, metavar=("ENDPOINT", "RANK", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pusher:
        return pusher_main(args.pusher[0], int(args.pusher[1]), int(args.pusher[2]))
    if not (args.minutes > 0 and args.every > 0 and args.workers >= 1):
        p.error("--minutes and --every must be above 0 and --workers at least 1")
    if args.json:
        from common.cli import file_problem
        why = file_problem(args.json)
        if why:
            p.error(f"--json: {why}")

    from common.config import ClientSettings
    from common.errors import ZPSError
    from common.plan import PartitionPlan
    from worker.client import PSClient

    rng = random.Random(args.seed)
    d = tempfile.mkdtemp(prefix="zps-soak-")
    sargs = ["--rank", "0", "--num-servers", "1", "--num-workers", str(args.workers), "--staleness", "inf",
             "--optimizer", "sgd", "--lr", "1", "--checkpoint-dir", d, "--checkpoint-every-seconds", "2",
             "--worker-timeout", "2", "--bind", "tcp://127.0.0.1:0"]
    env = {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    procs: dict[str, RoleProcess] = {}
    report = {"checks": 0, "violations": [], "faults": {}, "max_check_seconds": 0.0, "steps": 0}

    def start_server(restore: bool) -> RoleProcess:
        sp = RoleProcess(bin_cmd("ps-server", *sargs, *(["--restore"] if restore else [])), "server", env=env)
        sp.wait_ready(120)
        procs["server"] = sp
        return sp

    def start_pusher(r: int) -> None:
        pp = RoleProcess([sys.executable, "-m", "zpscluster.soak", "--pusher", procs["server"].endpoint, str(r),
                          str(args.workers)], f"pusher{r}", env=env)
        pp.wait_ready(120)
        procs[f"pusher{r}"] = pp

    plan = PartitionPlan.build([("w", (N,), "float32")], 1, frame_elems=FRAME)

    def check() -> None:
        c = PSClient([procs["server"].endpoint], 0, settings=ClientSettings(frame_elems=FRAME)).start()
        c.plan = plan
        t0 = time.monotonic()
        try:
            m = c.pull(0, timeout=20, observer=True).wait(30)[0]
        except ZPSError as exc:
            report["violations"].append(f"read failed: {exc}")
            return
        finally:
            c.close()
        dt = time.monotonic() - t0
        w = np.concatenate([np.frombuffer(f.buffer, dtype="<f4") for f in m.frames])
        report["checks"] += 1
        report["max_check_seconds"] = max(report["max_check_seconds"], dt)
        report["steps"] = m["step"]
        if not np.array_equal(w, np.full(N, -float(m["step"]), np.float32)):
            bad = {float(x) for x in np.unique(w)[:5]}
            report["violations"].append(f"weights {sorted(bad)} != -{m['step']}")

    start = time.monotonic()
    try:
        start_server(False)
        for r in range(args.workers):
            start_pusher(r)
        while time.monotonic() - start < args.minutes * 60:
            threading.Event().wait(args.every)
            fault = rng.choice(["kill_pusher", "pause_pusher", "kill_server", "none"])
            report["faults"][fault] = report["faults"].get(fault, 0) + 1
            if fault == "kill_pusher":
                r = rng.randrange(args.workers)
                procs[f"pusher{r}"].kill()
                start_pusher(r)
            elif fault == "pause_pusher":
                pp = procs[f"pusher{rng.randrange(args.workers)}"]
                pp.signal(signal.SIGSTOP)
                threading.Event().wait(3.0)   # past the 2 s worker timeout
                pp.signal(signal.SIGCONT)
            elif fault == "kill_server":
                procs["server"].kill()
                start_server(True)
            check()
            elapsed = time.monotonic() - start
            print(f"[soak] {elapsed / 60:5.1f} min: {fault:12s} step {report['steps']:7d} "
                  f"checks {report['checks']} violations {len(report['violations'])}", flush=True)
    finally:
        for pp in procs.values():
            pp.stop(10)
    report["minutes"] = round((time.monotonic() - start) / 60, 2)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
