"""``ps-server``: run one shard server as a process."""
from __future__ import annotations

import argparse
import logging
import sys

from common.cli import (add_common, add_settings, fail, load_job, on_stop_signal, print_ready,
                        settings_from_args, setup_logging)
from common.config import ServerSettings
from common.errors import ConfigError

log = logging.getLogger("zps.server")


def server_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-server",
        description="Run one zps shard server: holds a contiguous range of the model's flat "
                    "parameters and its optimizer state, applies pushes, answers pulls under the "
                    "staleness bound. Prints 'READY {json}' on stdout once bound.")
    add_common(p)
    add_settings(p, ServerSettings)
    return p


def server_main(argv: list[str] | None = None) -> int:
    ns = server_parser().parse_args(argv)
    try:
        settings = settings_from_args(ServerSettings, ns, load_job(ns.job), "server")
    except ConfigError as exc:
        return fail(str(exc))
    setup_logging(ns.log_level, f"server[{settings.rank}]")
    from ps.server import ShardServer  # torch import is slow: after argument errors

    try:
        server = ShardServer(settings)
    except Exception as exc:  # bind errors: address in use, bad endpoint
        return fail(f"cannot start server on {settings.bind}: {exc}", 1)
    stop = on_stop_signal(lambda signum: server.request_stop())
    server.run_in_background()
    print_ready("server", settings.rank, server.endpoint)
    server.wait()
    ok = server.shutdown(timeout=max(5.0, settings.transport.linger + 2))
    if stop.is_set():
        log.info("server %d stopped by signal", settings.rank)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(server_main())
