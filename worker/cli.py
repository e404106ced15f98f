"""``ps-worker``: run one worker: a built-in workload, or the user's own script."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from common.cli import (STOP_GRACE_SECONDS, add_common, add_settings, fail, file_problem, folder_problem, load_job,
                        on_stop_signal, print_ready, raise_interrupt, settings_from_args, setup_logging)
from common.config import WorkerSettings
from common.errors import EXIT_JOB_STOPPED, ClosedError, ConfigError, JobStopped, ZPSError


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-worker",
        usage="ps-worker --coordinator URL [options] [-- COMMAND ...]",
        description="Run one zps worker. Without a COMMAND it trains the job's built-in workload "
                    "(or --workload). With '-- COMMAND ...' it runs your training script, passing the "
                    "connection in the environment (ZPS_COORDINATOR, ZPS_WORKER_RANK, ZPS_OUT); the "
                    "script calls worker.join(model). Prints 'READY {json}' once registered.")
    add_common(p)
    add_settings(p, WorkerSettings)
    return p


def worker_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    ns = worker_parser().parse_args(argv)
    try:
        settings = settings_from_args(WorkerSettings, ns, load_job(ns.job), "worker")
    except ConfigError as exc:
        return fail(str(exc))
    if not settings.coordinator:
        return fail("no coordinator: pass --coordinator tcp://HOST:PORT or set ZPS_COORDINATOR")
    for flag, why in (("--out", settings.out and folder_problem(settings.out)),
                      ("--save", settings.save and file_problem(settings.save))):
        if why:
            return fail(f"{flag}: {why}")
    if command:
        return run_script(settings, command)
    setup_logging(ns.log_level, f"worker[{settings.rank if settings.rank >= 0 else '?'}]")
    try:
        return run_builtin(settings)
    except KeyboardInterrupt:   # a stop signal before training began (what began is closed)
        sys.stderr.write("ps-worker: interrupted before training began\n")
        return 130


def run_script(settings: WorkerSettings, command: list[str]) -> int:
    """Run the user's script with the connection in its environment; forward stop signals."""
    env = dict(os.environ, ZPS_COORDINATOR=settings.coordinator)
    if settings.rank >= 0:
        env["ZPS_WORKER_RANK"] = str(settings.rank)
    if settings.out:
        env["ZPS_OUT"] = settings.out
    if settings.curve_keys:
        env["ZPS_CURVE_KEYS"] = settings.curve_keys
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as exc:
        return fail(f"cannot run {command[0]!r}: {exc}", 127)

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print_ready("worker", settings.rank, "", pid=os.getpid(), script=command)
    return child.wait()


def run_builtin(settings: WorkerSettings) -> int:
    import logging

    import torch

    from worker.api import join
    from worker.trainer import train_workload
    from worker.workloads import get_workload

    log = logging.getLogger("zps.worker")
    # The first stop signal (later ones are ignored: they must not break the clean-up). Before
    # the session exists it raises KeyboardInterrupt wherever the main thread is (an import, a
    # wait for the coordinator). Once it exists, only a watcher thread acts: it interrupts the
    # session, every wait on a server or the coordinator ends, and the loop's next read, push or
    # step raises KeyboardInterrupt. Raised at an arbitrary point of the loop instead, it could
    # land between a lock's acquire and the `with` that releases it (a reply future's condition,
    # the client's wake-up event), and the clean-up then waited on that lock for ever.
    joined: list = []   # the session, once there is one

    def on_stop(signum: int) -> None:
        if not joined:
            raise_interrupt(signum)

    def stacks_file() -> str:
        rank = joined[0].rank if joined else settings.rank
        return os.path.join(settings.out, f"worker{rank}-stop-stacks.txt") if settings.out else ""
    stop = on_stop_signal(on_stop, grace=STOP_GRACE_SECONDS, stacks_file=stacks_file)
    from common.control import CoordinatorLink
    from common.security import CurveKeys

    try:
        keys = CurveKeys.from_setting(settings.curve_keys, connect=True)
    except ZPSError as exc:
        return fail(str(exc))
    # The job (and so the workload and seed) comes from the coordinator; ask it first.
    try:
        probe = CoordinatorLink(settings.coordinator, "worker", timeout=settings.register_timeout, keys=keys)
    except ConfigError as exc:
        return fail(f"--coordinator: {exc}")
    try:
        job = probe.status()["job"]
    except ZPSError as exc:
        probe.close()
        from common.netaddr import probe as reach

        ok, _, why = reach(settings.coordinator, 3.0)
        return fail(f"cannot reach coordinator {settings.coordinator}: {exc}"
                    + ("" if ok else f" ({why})")
                    + f"; check from this host with: bin/ps-doctor --coordinator {settings.coordinator}", 1)
    probe.close()
    name = settings.workload or job.get("workload", "")
    if not name:
        return fail("the job names no workload: pass --workload NAME or run your script after '--'")
    try:
        workload = get_workload(name, seed=job.get("seed", 0))
    except ValueError as exc:
        return fail(str(exc))
    torch.manual_seed(job.get("seed", 0))
    try:
        device = torch.device(settings.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("this torch build or machine has no CUDA device "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        model = workload.build_model().to(device)
    except (RuntimeError, AssertionError) as exc:   # torch asserts on a CPU-only build
        return fail(f"--device {settings.device!r}: {exc}")
    try:
        session = join(model, settings.coordinator, settings.rank, timeout=settings.register_timeout,
                       curve_keys=settings.curve_keys)
    except (ZPSError, OSError) as exc:
        return fail(f"cannot join the job: {exc}", 1)

    joined.append(session)

    def interrupt_when_stopped() -> None:
        stop.wait()
        session.interrupt()
    threading.Thread(target=interrupt_when_stopped, name="zps-stop", daemon=True).start()

    def close_after_failure() -> None:
        # the run is over either way: wait briefly for pushes in flight (a stop signal must
        # end the process within seconds, a dead server never answers), and let nothing
        # raised while closing hide why it ended
        try:
            session.close(timeout=2.0)
        except ClosedError:   # closed already (a stop signal's watcher): nothing left to wait for
            pass
        except (ZPSError, OSError) as exc:
            log.warning("worker %d: closing: %s", session.rank, exc)

    try:
        print_ready("worker", session.rank, "", pid=os.getpid(), servers=session.worker.client.endpoints,
                    clock=session.clock)
        train_workload(session, workload, settings.out, settings.save,
                       settings.progress)
    except (KeyboardInterrupt, ZPSError, OSError) as exc:   # OSError: a metrics file, stdout nobody reads
        # the stop signal's interrupt also ends a flush or the final barrier (with ClosedError)
        if isinstance(exc, KeyboardInterrupt) or session._interrupted:
            log.warning("worker %d interrupted at clock %d", session.rank, session.clock)
            code = 130
        elif isinstance(exc, JobStopped) or session._stopped_at is not None:
            log.warning("worker %d stopped at clock %d: the job was shut down", session.rank, session.clock)
            code = EXIT_JOB_STOPPED
        else:
            log.error("worker %d failed at clock %d: %s", session.rank, session.clock, exc)
            code = 1
        close_after_failure()
        return code
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
