"""``ps-server`` and ``ps-coordinator``: the server-side daemons."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from common.cli import (STOP_GRACE_SECONDS, add_common, add_settings, fail, folder_problem, load_job,
                        on_stop_signal, print_ready, settings_from_args, setup_logging)
from common.config import CoordinatorSettings, JobSettings, ServerSettings
from common.errors import ConfigError, ZPSError

log = logging.getLogger("zps.server")


def server_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-server",
        description="Run one zps shard server: holds a contiguous range of the model's flat "
                    "parameters and its optimizer state, applies pushes, answers pulls under the "
                    "staleness bound. With --coordinator it registers there and takes the job's "
                    "settings; alone it takes them from its flags. Prints 'READY {json}' on stdout "
                    "once serving.")
    add_common(p)
    add_settings(p, ServerSettings)
    return p


def _rank_given(ns: argparse.Namespace, job_file: dict) -> bool:
    """Whether the rank was chosen (flag, environment or job file) rather than left to the default."""
    section = job_file.get("server")
    return ns.rank is not None or "ZPS_RANK" in os.environ or (isinstance(section, dict) and "rank" in section)


def server_main(argv: list[str] | None = None) -> int:
    ns = server_parser().parse_args(argv)
    try:
        job_file = load_job(ns.job)
        settings = settings_from_args(ServerSettings, ns, job_file, "server")
    except ConfigError as exc:
        return fail(str(exc))
    rank_given = _rank_given(ns, job_file)
    if settings.restore and settings.coordinator and not rank_given:
        # the coordinator would hand out a rank only after the address to take over was chosen
        return fail("--restore with --coordinator needs --rank: pass the rank of the server being restored "
                    "(its checkpoints are in CHECKPOINT_DIR/server-<rank>), so it takes over that server's "
                    "address and state")
    if settings.checkpoint_dir:
        why = folder_problem(settings.checkpoint_dir)
        if why:
            return fail(f"--checkpoint-dir: {why}")
    setup_logging(ns.log_level, f"server[{settings.rank if not settings.coordinator else '?'}]")
    from common.netaddr import apply_interface, check_advertisable, peers_are_remote

    try:
        bind, advertise = apply_interface(settings.bind, settings.advertise, settings.interface)
    except ConfigError as exc:
        return fail(str(exc))
    settings = dataclasses.replace(settings, bind=bind, advertise=advertise)
    import zmq

    from common.control import CoordinatorLink
    from common.security import Authenticator, CurveKeys
    from common.transport import advertised_endpoint, bound_endpoint, make_router, port_of, warn_if_exposed
    from ps.server import ShardServer, check_restorable  # torch import is slow: after argument errors
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)

    try:  # a server serves workers and is a client of its coordinator
        keys = CurveKeys.from_setting(settings.curve_keys, serve=True, connect=bool(settings.coordinator))
    except ConfigError as exc:
        return fail(str(exc))
    prev, prev_rank = None, settings.rank   # the checkpoint read here is handed to the server
    if settings.restore and port_of(settings.bind) == 0:
        # take over the previous incarnation's address so workers reconnect by themselves
        # (the checkpoint the server will restore: the same choice, corrupt ones skipped)
        from ps import checkpoint as ckpt

        try:
            prev = ckpt.read_latest(settings.checkpoint_dir, settings.rank, check=check_restorable)
        except ckpt.CheckpointError as exc:
            return fail(f"--restore: {exc}", 1)
        if prev is not None:
            meta = prev[1]
            saved = meta.get("settings")
            bind = saved.get("bind_endpoint") if isinstance(saved, dict) else None
            bind = bind or meta.get("endpoint")
            if isinstance(bind, str) and bind:
                settings = dataclasses.replace(settings, bind=bind)
    ctx = zmq.Context()
    link = None
    auth = None
    try:
        if keys is not None:
            auth = Authenticator(ctx, keys).start()  # before the bind: no client unchecked
        try:
            sock = make_router(ctx, settings.bind, settings.transport, keys)
        except OSError as exc:
            return fail(str(exc), 1)
        bound = bound_endpoint(sock)
        endpoint = advertised_endpoint(bound, settings.advertise)
        try:
            check_advertisable(endpoint, peers_are_remote(settings.coordinator))
        except ConfigError as exc:
            sock.close(linger=0)
            return fail(str(exc))
        warn_if_exposed(bound, curve=keys is not None)
        if settings.coordinator:
            link = CoordinatorLink(settings.coordinator, "server", ctx, timeout=120, keys=keys)
            try:
                rank, job = link.register(settings.rank if rank_given else -1, endpoint)
            except ZPSError as exc:
                sock.close(linger=0)
                return fail(f"cannot register with coordinator {settings.coordinator}: {exc}", 1)
            settings = _coordinated(settings, rank, job)
            logging.getLogger().handlers[0].setFormatter(logging.Formatter(
                f"%(asctime)s server[{rank}] %(levelname)s %(name)s: %(message)s"))
        try:
            server = ShardServer(settings, ctx, sock=sock, authenticator=auth,
                                 restore_from=prev if settings.rank == prev_rank else None)
        except (ZPSError, OSError) as exc:   # ConfigError, CheckpointError (--restore)
            sock.close(linger=0)
            return fail(str(exc), 1)
        # bounded unless a final checkpoint is to be written (as long as the model takes)
        stop = on_stop_signal(lambda signum: server.request_stop(), grace=None if settings.checkpoint_dir
                              else STOP_GRACE_SECONDS + 2 * settings.transport.linger)
        server.run_in_background(spin=True)   # this thread only waits for it
        if link is not None:
            reported = [()]   # the list last handed over: the loop is woken only when it changes

            def on_beat(state: str, dead_workers: list) -> None:   # the heartbeat thread: hand over, never touch
                if state in ("done", "stopped"):
                    server.request_stop()
                    return
                listed, reported[0] = reported[0], tuple(dead_workers)
                if dead_workers and reported[0] != listed:
                    server.report_dead(dead_workers)
            link.start_heartbeats(settings.worker_timeout / 4 if settings.worker_timeout < 4 else 1.0, on_beat)
        print_ready("server", settings.rank, endpoint, bound=bound, pid=os.getpid())
        server.wait()
        ok = server.shutdown(timeout=max(5.0, settings.transport.linger + 2))
        if stop.is_set():
            log.info("server %d stopped by signal", settings.rank)
        if link is not None:
            try:
                link.done({"stats": _brief(server.snapshot_stats())}, timeout=5)
            except ZPSError:
                pass
        return 0 if ok else 1
    finally:
        if link is not None:
            link.close()
        if auth is not None:
            auth.stop(timeout=5.0)
        ctx.destroy(linger=1000)


def _brief(stats: dict) -> dict:
    keys = ("step", "pushes", "pulls", "dup_pushes", "nonfinite", "bytes_in", "bytes_out",
            "expired_reads", "dead_workers", "errors", "min_clock")
    return {k: stats[k] for k in keys if k in stats}


def _coordinated(settings: ServerSettings, rank: int, job: JobSettings) -> ServerSettings:
    """This server's settings once the coordinator assigned its rank and sent the job."""
    opts = dict(rank=rank, num_servers=job.num_servers, num_workers=job.num_workers,
                staleness=job.staleness, optimizer=job.optimizer or "sgd", nesterov=job.nesterov,
                weight_decay=job.weight_decay, staleness_lr=job.staleness_lr, dc_lambda=job.dc_lambda,
                worker_timeout=job.worker_timeout, read_timeout=max(job.read_timeout, settings.read_timeout))
    if job.lr is not None:
        opts["lr"] = job.lr
    if job.momentum is not None and (job.optimizer or "sgd") == "sgd":
        opts["momentum"] = job.momentum
    return dataclasses.replace(settings, **opts)


def coordinator_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-coordinator",
        description="Run the coordinator of one zps job: assigns ranks, hands out the job's settings "
                    "and the servers' addresses, runs barriers, tracks liveness. It is the one address "
                    "every other role needs. Prints 'READY {json}' on stdout once bound.")
    add_common(p)
    add_settings(p, CoordinatorSettings)
    return p


def resolve_job_defaults(job: JobSettings) -> JobSettings:
    """Fill the settings left to the workload (optimizer, lr, momentum, steps, batch size)."""
    if not job.workload:
        return dataclasses.replace(job, optimizer=job.optimizer or "sgd")
    from worker.workloads import get_workload

    try:
        d = get_workload(job.workload, seed=job.seed).defaults
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return dataclasses.replace(
        job,
        optimizer=job.optimizer or d.optimizer,
        lr=job.lr if job.lr is not None else d.lr,
        momentum=job.momentum if job.momentum is not None else d.momentum,
        steps=job.steps or d.steps,
        batch_size=job.batch_size or d.batch_size,
    )


def coordinator_main(argv: list[str] | None = None) -> int:
    ns = coordinator_parser().parse_args(argv)
    try:
        settings = settings_from_args(CoordinatorSettings, ns, load_job(ns.job), "coordinator")
        settings = dataclasses.replace(settings, job=resolve_job_defaults(settings.job))
    except ConfigError as exc:
        return fail(str(exc))
    setup_logging(ns.log_level, "coordinator")
    from common.netaddr import apply_interface, check_advertisable, is_loopback_host, split_endpoint
    from common.transport import advertised_endpoint, warn_if_exposed
    from ps.coordinator import Coordinator

    try:
        bind, advertise = apply_interface(settings.bind, settings.advertise, settings.interface)
    except ConfigError as exc:
        return fail(str(exc))
    settings = dataclasses.replace(settings, bind=bind)
    try:
        coord = Coordinator(settings)
    except ConfigError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(str(exc), 1)
    endpoint = advertised_endpoint(coord.endpoint, advertise)
    try:  # bound beyond loopback: its peers may be on other hosts
        check_advertisable(endpoint, not is_loopback_host(split_endpoint(coord.endpoint)[0]), role="coordinator")
    except ConfigError as exc:
        coord.shutdown(1)
        return fail(str(exc))
    stop = on_stop_signal(lambda signum: coord.request_stop(), grace=STOP_GRACE_SECONDS)
    coord.run_in_background()
    warn_if_exposed(coord.endpoint, curve=coord.keys is not None)
    print_ready("coordinator", 0, endpoint, bound=coord.endpoint, pid=os.getpid(),
                job=settings.job.to_wire())
    while not coord.wait(0.5):
        pass
    coord.shutdown(5)
    if stop.is_set():
        logging.getLogger("zps.coordinator").info("coordinator stopped by signal")
    return 0


if __name__ == "__main__":
    sys.exit(server_main())
