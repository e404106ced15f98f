"""``ps-launch``: a whole job on one host — coordinator, S servers, W workers.

Log lines are prefixed with the role and rank.  Ctrl-C or the first failure
stops everything; the exit status is non-zero when any role failed.  A worker
killed by a signal is *lost*, not failed: the others go on (that is what the
parameter-server model promises); ``--restarts N`` restarts a lost worker (it
rejoins under its old rank at the servers' current minimum clock).  On
success ``OUT/summary.json`` and ``OUT/metrics.jsonl`` are written.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

from common.errors import EXIT_JOB_STOPPED
from zpscluster.procs import RoleProcess, bin_cmd

JOB_FLAGS = ("staleness", "workload", "steps", "optimizer", "lr", "momentum", "seed", "straggler",
             "batch_size", "eval_every", "worker_timeout", "heartbeat_interval", "read_timeout",
             "weight_decay", "frame_elems", "dc_lambda", "faults")


def launch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-launch",
        description="Run a whole zps job on this host: coordinator, S servers and W workers. "
                    "Writes OUT/summary.json and OUT/metrics.jsonl.")
    p.add_argument("--servers", type=int, default=2, help="number of servers S [2]")
    p.add_argument("--workers", type=int, default=4, help="number of workers W [4]")
    p.add_argument("--staleness", default="2", help="staleness bound: 0 (BSP), K (SSP) or inf (ASP) [2]")
    p.add_argument("--workload", default="digits", help="linreg, digits, mf or charlm [digits]")
    p.add_argument("--steps", type=int, default=None, help="iterations per worker [the workload's]")
    p.add_argument("--optimizer", default=None, help="sgd, adam, adamw, adagrad [the workload's]")
    p.add_argument("--lr", type=float, default=None, help="learning rate [the workload's]")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum [the workload's]")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay [optimizer default]")
    p.add_argument("--batch-size", type=int, default=None, help="per-worker batch size [the workload's]")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data split and stragglers [0]")
    p.add_argument("--straggler", default="none",
                   help="none, RANK:FACTOR (that rank FACTOR times slower), random:P:FACTOR, "
                        "pause:RANK|all:EVERY:SECONDS, dist:exp:MEAN, dist:lognormal:MU:SIGMA, dist:uniform:LO:HI, "
                        "A+B [none]")
    p.add_argument("--staleness-lr", action="store_true",
                   help="servers divide the learning rate by each update's measured staleness")
    p.add_argument("--dc-lambda", type=float, default=None,
                   help="delay-compensated updates (DC-ASGD) with this lambda [off]")
    p.add_argument("--eval-every", type=int, default=None, help="worker 0 evaluates every N clocks")
    p.add_argument("--out", default="out/job", help="output folder [out/job]")
    p.add_argument("--save", default="", help="write the trained model's state_dict here")
    p.add_argument("--restarts", type=int, default=0, help="restart a lost worker up to N times [0]")
    p.add_argument("--worker-timeout", type=float, default=None,
                   help="seconds of silence after which a worker is dropped [10]")
    p.add_argument("--heartbeat-interval", type=float, default=None, help="seconds between heartbeats [1]")
    p.add_argument("--read-timeout", type=float, default=None, help="seconds a read may wait [120]")
    p.add_argument("--frame-elems", type=int, default=None, help="elements per data frame [262144]")
    p.add_argument("--checkpoint-dir", default="", help="servers checkpoint into this folder")
    p.add_argument("--checkpoint-every-steps", type=int, default=0, help="servers checkpoint every N steps")
    p.add_argument("--checkpoint-every-seconds", type=float, default=0.0, help="servers checkpoint every T seconds")
    p.add_argument("--faults", default=None, help="fault injection on workers' sends, e.g. drop=0.1,dup=0.1")
    p.add_argument("--timeout", type=float, default=3600.0, help="stop everything after this many seconds [3600]")
    p.add_argument("--quiet", action="store_true", help="do not stream the roles' log lines")
    p.add_argument("--curve-keys", metavar="DIR", default=os.environ.get("ZPS_CURVE_KEYS", ""),
                   help="CurveZMQ key folder from bin/ps-keygen: every role encrypts and authenticates "
                        "its sockets [off; env ZPS_CURVE_KEYS]")
    p.add_argument("--log-level", default="INFO", help="log level of every role [INFO]")
    return p


class Launch:
    """One job's processes and their fate."""

    def __init__(self, args: argparse.Namespace, out=sys.stdout):
        self.args = args
        self.out = out
        self._lock = threading.Lock()
        self.procs: dict[str, RoleProcess] = {}
        self.worker_state: dict[int, str] = {}
        self.restarts = collections.Counter()
        self.lost: list[dict] = []
        self.failure: str | None = None
        self.coordinator_url = ""
        self.env = {"ZPS_LOG_LEVEL": args.log_level}
        if args.curve_keys:  # every role reads it from its environment
            self.env["ZPS_CURVE_KEYS"] = os.path.abspath(args.curve_keys)
        if "OMP_NUM_THREADS" not in os.environ:
            # S + W processes share this host's cores: without a cap every one starts a
            # thread per core and small models slow down by an order of magnitude
            share = max(1, (os.cpu_count() or 1) // (args.servers + args.workers))
            self.env["OMP_NUM_THREADS"] = str(share)

    def say(self, line: str) -> None:
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()

    def _sink(self, line: str) -> None:
        if not self.args.quiet:
            self.say(line)

    def _start(self, name: str, cmd: list[str]) -> RoleProcess:
        p = RoleProcess(cmd, name, env=self.env, sink=self._sink, guard=True)   # none outlives the launcher
        self.procs[name] = p
        return p

    def job_args(self) -> list[str]:
        a = self.args
        out = ["--num-servers", str(a.servers), "--num-workers", str(a.workers)]
        for name in JOB_FLAGS:
            v = getattr(a, name, None)
            if v is not None and v != "":
                out += ["--" + name.replace("_", "-"), str(v)]
        if a.staleness_lr:
            out.append("--staleness-lr")
        return out

    def start_worker(self, rank: int) -> RoleProcess:
        a = self.args
        cmd = bin_cmd("ps-worker", "--coordinator", self.coordinator_url, "--rank", str(rank),
                      "--out", a.out, "--progress", "lines" if rank == 0 else "off")
        if a.save:   # worker 0 saves, or the lowest live rank if worker 0 was lost
            cmd += ["--save", a.save]
        self.worker_state[rank] = "running"
        return self._start(f"worker{rank}", cmd)

    def run(self) -> int:
        a = self.args
        os.makedirs(a.out, exist_ok=True)
        for f in os.listdir(a.out):
            if f.startswith(("metrics-w", "result-w")) or f in ("final.json", "summary.json", "metrics.jsonl"):
                os.remove(os.path.join(a.out, f))
        t0 = time.time()
        deadline = time.monotonic() + a.timeout
        try:
            coord = self._start("coordinator", bin_cmd("ps-coordinator", "--bind", "tcp://127.0.0.1:0",
                                                       *self.job_args()))
            info = coord.wait_ready(120)
            self.coordinator_url = info["endpoint"]
            self.job = info.get("job", {})
            self.say(f"[launch] coordinator at {self.coordinator_url}; starting {a.servers} servers "
                     f"and {a.workers} workers ({self.job.get('workload')}, staleness {a.staleness})")
            extra = []
            if a.checkpoint_dir:
                extra += ["--checkpoint-dir", a.checkpoint_dir]
            if a.checkpoint_every_steps:
                extra += ["--checkpoint-every-steps", str(a.checkpoint_every_steps)]
            if a.checkpoint_every_seconds:
                extra += ["--checkpoint-every-seconds", str(a.checkpoint_every_seconds)]
            servers = [self._start(f"server{k}", bin_cmd("ps-server", "--coordinator", self.coordinator_url,
                                                         "--rank", str(k), "--bind", "tcp://127.0.0.1:0", *extra))
                       for k in range(a.servers)]
            for s in servers:
                s.wait_ready(120)
            for r in range(a.workers):
                self.start_worker(r)
            code = self._watch(deadline)
        except KeyboardInterrupt:
            self.say("[launch] interrupted: stopping every role")
            self.failure = "interrupted"
            code = 130
        except Exception as exc:  # a role that never became ready, a bad flag
            self.failure = str(exc)
            self.say(f"[launch] failed: {exc}")
            code = 1
        finally:
            self.stop_all()
        wall = time.time() - t0
        if code == 0:
            try:
                summary = write_summary(a, self, wall)
            except (OSError, ValueError, KeyError) as exc:
                self.say(f"[launch] could not write the summary: {exc}")
                return 1
            ev = summary["eval_metric"]
            self.say(f"[launch] done in {wall:.1f}s: {ev['name']} = {ev['value']:.4f}, "
                     f"final loss {summary['final_loss']:.4f}, max read staleness {summary['staleness_max']}"
                     + (f", lost workers {summary['lost_workers']}" if summary["lost_workers"] else ""))
            self.say(f"[launch] summary: {os.path.join(a.out, 'summary.json')}")
        elif code == EXIT_JOB_STOPPED:
            self.say(f"[launch] job {self.failure}; no summary"
                     + (f" (the servers checkpointed into {a.checkpoint_dir})" if a.checkpoint_dir else ""))
        else:
            self.say(f"[launch] job failed ({self.failure})")
        return code

    def _watch(self, deadline: float) -> int:
        a = self.args
        stop = threading.Event()
        while not stop.wait(0.1):
            if time.monotonic() > deadline:
                self.failure = f"job did not finish within {a.timeout:.0f}s"
                return 1
            for name, p in list(self.procs.items()):
                rc = p.poll()
                if rc is None:
                    continue
                if name.startswith("worker") and self.worker_state.get(int(name[6:])) == "running":
                    rank = int(name[6:])
                    if rc == 0:
                        self.worker_state[rank] = "finished"
                    elif rc == EXIT_JOB_STOPPED:   # the job was shut down under it (ps-ctl shutdown)
                        self.worker_state[rank] = "stopped"
                    elif rc < 0:  # killed by a signal: lost, not failed
                        self.lost.append({"rank": rank, "signal": -rc, "time": time.time()})
                        self.say(f"[launch] worker {rank} was killed by signal {-rc}")
                        if self.restarts[rank] < a.restarts:
                            self.restarts[rank] += 1
                            self.say(f"[launch] restarting worker {rank} "
                                     f"({self.restarts[rank]}/{a.restarts})")
                            self.start_worker(rank)
                        else:
                            self.worker_state[rank] = "lost"
                    else:
                        self.worker_state[rank] = "failed"
                        self.failure = f"worker {rank} exited with code {rc}: {p.tail(3)}"
                        return 1
                elif not name.startswith("worker") and rc != 0 and not self._workers_over():
                    self.failure = f"{name} exited with code {rc}: {p.tail(3)}"
                    return 1
            if self._workers_over():
                if all(s == "lost" for s in self.worker_state.values()):
                    self.failure = "every worker was lost"
                    return 1
                code = 0
                if "stopped" in self.worker_state.values():
                    self.failure = "shut down (ps-ctl shutdown) before every worker finished its steps"
                    code = EXIT_JOB_STOPPED
                # servers and the coordinator stop on their own once every worker is done
                end = time.monotonic() + 30
                for name, p in self.procs.items():
                    if not name.startswith("worker"):
                        try:
                            p.wait(max(0.1, end - time.monotonic()))
                        except Exception:
                            self.say(f"[launch] {name} did not stop on its own; stopping it")
                return code
        return 1

    def _workers_over(self) -> bool:
        return all(s in ("finished", "lost", "stopped") for s in self.worker_state.values()) and \
            len(self.worker_state) == self.args.workers

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop the workers, then the servers, then the coordinator: each group at once.

        Every member of a group gets SIGTERM together and the group gets
        ``timeout`` seconds in all before SIGKILL. Further stop signals are
        ignored meanwhile: the stop is bounded, and a second Ctrl-C would only
        break it half way.
        """
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
        groups = [[p for n, p in self.procs.items() if n.startswith("worker")],
                  [p for n, p in self.procs.items() if n.startswith("server")],
                  [p for n, p in self.procs.items() if n == "coordinator"]]
        for group in groups:
            running = [p for p in group if p.poll() is None]
            for p in running:
                p.signal(signal.SIGTERM)
            end = time.monotonic() + timeout
            for p in running:
                try:
                    p.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say(f"[launch] {p.name} did not stop within {timeout:.0f}s after SIGTERM; killing it")
                    p.kill()


def write_summary(args, launch: Launch, wall: float) -> dict:
    out = args.out
    rows = []
    for f in sorted(os.listdir(out)):
        if f.startswith("metrics-w") and f.endswith(".jsonl"):
            with open(os.path.join(out, f)) as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
    if not rows:
        raise ValueError("no worker wrote any metrics")
    t_min = min(r["time"] for r in rows)
    rows.sort(key=lambda r: r["time"])
    with open(os.path.join(out, "metrics.jsonl"), "w") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "elapsed": round(r["time"] - t_min, 6)}) + "\n")
    results = []
    for f in sorted(os.listdir(out)):
        if f.startswith("result-w") and f.endswith(".json"):
            with open(os.path.join(out, f)) as fh:
                results.append(json.load(fh))
    with open(os.path.join(out, "final.json")) as fh:
        final = json.load(fh)
    hist = collections.Counter(int(r["read_staleness"]) for r in rows)
    servers = final.get("servers", [])
    job = launch.job
    staleness = job.get("staleness", args.staleness)
    summary = {
        "workload": job.get("workload", args.workload),
        "servers": args.servers,
        "workers": args.workers,
        "staleness": "inf" if staleness in (-1, "inf") else staleness,
        "steps": job.get("steps", args.steps),
        "optimizer": job.get("optimizer"),
        "lr": job.get("lr"),
        "momentum": job.get("momentum"),
        "weight_decay": job.get("weight_decay"),
        "batch_size": job.get("batch_size"),
        "staleness_lr": job.get("staleness_lr"),
        "dc_lambda": job.get("dc_lambda"),
        "seed": args.seed,
        "straggler": args.straggler,
        "wall_seconds": round(wall, 3),
        "iterations": len(rows),
        "final_loss": final["eval_loss"],
        "train_loss_last": sum(r["loss"] for r in rows[-args.workers:]) / min(len(rows), args.workers),
        "eval_metric": {"name": final["metric"], "value": final["value"]},
        "staleness_max": max(hist),
        "staleness_mean": sum(k * v for k, v in hist.items()) / len(rows),
        "staleness_histogram": {str(k): hist[k] for k in sorted(hist)},
        "wait_seconds_total": sum(r["wait_seconds"] for r in rows),
        "compute_seconds_total": sum(r["compute_seconds"] for r in rows),
        "delay_seconds_total": sum(r.get("delay_seconds", 0.0) for r in rows),
        "pushes": sum(s.get("pushes", 0) for s in servers),
        "pulls": sum(s.get("pulls", 0) for s in servers),
        "dup_pushes": sum(s.get("dup_pushes", 0) for s in servers),
        "bytes_sent": sum(r.get("client", {}).get("bytes_sent", 0) for r in results),
        "bytes_received": sum(r.get("client", {}).get("bytes_received", 0) for r in results),
        "server_steps": [s.get("step", 0) for s in servers],
        "lost_workers": launch.lost,
        "restarts": dict((str(k), v) for k, v in launch.restarts.items()),
        "rejoins": sum(r.get("rejoins", 0) for r in results),
        "saved": final.get("saved", ""),
    }
    if summary["staleness_max"] is None or math.isnan(summary["final_loss"]):
        raise ValueError("summary holds no usable loss")
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def job_problem(args: argparse.Namespace) -> str:
    """What is wrong with the job the flags describe ("" if nothing): found before any role starts."""
    from common.config import JobSettings
    from common.errors import ConfigError
    from worker.stragglers import StragglerProfile
    from worker.workloads import WORKLOADS

    kw = {name: getattr(args, name) for name in JOB_FLAGS if getattr(args, name, None) not in (None, "")}
    try:
        job = JobSettings(num_servers=args.servers, num_workers=args.workers, staleness_lr=args.staleness_lr,
                          **kw)
        if job.workload and job.workload not in WORKLOADS:
            return f"--workload: unknown workload {job.workload!r}; known: {', '.join(sorted(WORKLOADS))}"
        ranks = [r for r in StragglerProfile.parse(job.straggler).ranks if r >= job.num_workers]
        if ranks:
            return (f"--straggler {job.straggler!r} names worker rank {ranks[0]}, but the job's "
                    f"{job.num_workers} workers have ranks 0..{job.num_workers - 1}")
        optimizer = job.optimizer or (WORKLOADS[job.workload].defaults.optimizer if job.workload else "sgd")
        if job.momentum is not None and optimizer != "sgd":
            return f"--momentum applies to sgd only; the job's optimizer is {optimizer}"
    except ConfigError as exc:
        return str(exc)
    return ""


def main(argv: list[str] | None = None) -> int:
    args = launch_parser().parse_args(argv)
    if args.servers < 1 or args.workers < 1:
        sys.stderr.write("error: --servers and --workers must be at least 1\n")
        return 2
    why = job_problem(args)
    if why:
        sys.stderr.write(f"error: {why}\n")
        return 2
    from common.cli import file_problem, folder_problem, on_stop_signal, raise_interrupt
    for flag, why in (("--out", folder_problem(args.out)),
                      ("--checkpoint-dir", args.checkpoint_dir and folder_problem(args.checkpoint_dir)),
                      ("--save", args.save and file_problem(args.save))):
        if why:   # found now, not after the job ran
            sys.stderr.write(f"error: {flag}: {why}\n")
            return 2
    if args.curve_keys:  # one host runs every role: it needs the whole folder
        from common.errors import ConfigError
        from common.security import CurveKeys

        try:
            CurveKeys.from_setting(args.curve_keys, serve=True, connect=True)
        except ConfigError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
    launch = Launch(args)
    on_stop_signal(raise_interrupt)   # the first one stops every role; a second must not cut that short
    return launch.run()


if __name__ == "__main__":
    sys.exit(main())
