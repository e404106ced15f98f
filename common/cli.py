"""Shared command-line plumbing for the bin/ executables.

Settings classes (``common.config``) become argparse flags with their help
texts; ``settings_from_args`` applies the one precedence rule (flag >
``ZPS_*`` environment > TOML job file > default).  ``print_ready`` writes the
machine-readable READY line launchers and tests wait on.  Only the CLIs
configure logging.
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore

from common.config import JobSettings, TransportSettings, env_name, resolve
from common.errors import ConfigError

NESTED = {"transport": TransportSettings, "job": JobSettings}


def _fields(cls, skip: Iterable[str] = ()):
    skip = set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        if f.name in NESTED:
            yield from _fields(NESTED[f.name], skip)
            continue
        yield f


def add_settings(parser: argparse.ArgumentParser, cls, skip: Iterable[str] = (), title: str | None = None) -> None:
    """One ``--flag`` per setting of ``cls`` (nested transport settings included)."""
    group = parser.add_argument_group(title or f"{cls.__name__} (flag > {env_name('<name>')} env > job file > default)")
    for f in _fields(cls, skip):
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} [default: {default}; env {env_name(f.name)}]"
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", metavar="FILE", default=os.environ.get("ZPS_JOB"),
                        help="TOML job file (top-level keys for every role, [server]/[worker]/... per role)")
    parser.add_argument("--log-level", default=os.environ.get("ZPS_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR [default: INFO; env ZPS_LOG_LEVEL]")


def load_job(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"job file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"job file {path!r} is not valid TOML: {exc}") from None


def settings_from_args(cls, ns: argparse.Namespace, job: dict, section: str,
                       overrides: dict | None = None, env=None):
    """Resolve ``cls`` (and its nested settings) from flags, the environment and the job file.

    Unknown keys in the job file's ``[section]`` table are an error naming them.
    """
    sect = job.get(section)
    if isinstance(sect, dict):
        known = {f.name for f in _fields(cls)} | {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(sect) - known)
        if unknown:
            raise ConfigError(f"job file [{section}] has unknown settings {unknown}")
    values = {}
    for f in dataclasses.fields(cls):
        sub = NESTED.get(f.name)
        if sub is not None:
            sub_flags = {g.name: getattr(ns, g.name, None) for g in dataclasses.fields(sub)}
            sub_flags.update({k: v for k, v in (overrides or {}).items() if k in sub_flags})
            values[f.name] = resolve(sub, sub_flags, env, job, section)
    flags = {f.name: getattr(ns, f.name, None) for f in dataclasses.fields(cls) if f.name not in NESTED}
    flags.update({k: v for k, v in (overrides or {}).items() if k in flags})
    return resolve(cls, flags, env, job, section, fixed=values)


def setup_logging(level: str, prefix: str) -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format=f"%(asctime)s {prefix} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def print_ready(role: str, rank: int, endpoint: str, **extra: Any) -> None:
    """The READY line: the word READY, a space, one JSON object."""
    sys.stdout.write("READY " + json.dumps({"role": role, "rank": rank, "endpoint": endpoint, **extra}) + "\n")
    sys.stdout.flush()


def on_stop_signal(callback: Callable[[int], None], grace: float | None = None,
                   stacks_file: Callable[[], str] | None = None) -> threading.Event:
    """Call ``callback(signum)`` on the first SIGTERM/SIGINT (from the main thread); return an Event set then.

    Later signals are ignored: a handler runs on top of whatever the main
    thread was doing, the first handler included, and a second one taking
    the locks the interrupted first one holds (``Event.set``, the server's
    wake-up lock) would wait for itself forever.

    ``grace``: the seconds the process may take to stop after that signal.
    A process still running then writes every thread's stack to stderr (and
    to the file ``stacks_file()`` names, if it names one) and exits with
    128 + the signal's number: a stop signal ends the process even when its
    clean-up waits on something that never comes (a process whose launcher
    died has nobody left to escalate to SIGKILL).
    """
    event = threading.Event()
    fired: list[int] = []

    def handler(signum, _frame):
        if fired:   # plain list: no lock in the way of a handler interrupting a handler
            return
        fired.append(signum)
        if grace is not None:   # the backstop, from a C thread: works even if no Python thread runs again
            faulthandler.dump_traceback_later(grace + _BACKSTOP_SECONDS, exit=True)
        event.set()
        callback(signum)

    if grace is not None:   # started now: starting a thread from inside a handler could wait on a lock it holds
        threading.Thread(target=_exit_if_stuck, args=(event, fired, grace, stacks_file),
                         name="zps-stop-watchdog", daemon=True).start()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return event


_BACKSTOP_SECONDS = 5.0

# The stop a role's clean-up is allowed: each of its waits is bounded well below this (a worker:
# 2 s for pushes in flight, its sockets' linger; a server: 5 s for its loop, 5 s for the coordinator)
STOP_GRACE_SECONDS = 20.0


def _exit_if_stuck(event: threading.Event, fired: list[int], grace: float,
                   stacks_file: Callable[[], str] | None) -> None:
    event.wait()
    time.sleep(grace)   # a process that stops in time takes this daemon thread with it
    signum = fired[0]
    prog = os.path.basename(sys.argv[0]) or "zps"
    try:
        path = stacks_file() if stacks_file is not None else ""
    except Exception:   # the path is a courtesy; the exit below is the point
        path = ""
    say = (f"{prog} (pid {os.getpid()}): still running {grace:.0f}s after {signal.Signals(signum).name}; "
           f"exiting without finishing its clean-up. The stacks of its threads follow"
           + (f" (also in {path})" if path else "") + ".\n")
    targets = []   # the file first: a write to a stderr pipe nobody reads may block (the backstop ends that)
    try:
        if path:
            targets.append(open(path, "w"))
    except OSError:
        pass
    for out in targets + [sys.stderr]:
        try:
            out.write(say)
            out.flush()
            faulthandler.dump_traceback(out, all_threads=True)
            out.flush()
        except (OSError, ValueError):   # stderr may be a pipe whose reader is gone
            pass
    os._exit(128 + signum)


def raise_interrupt(_signum: int) -> None:
    """An ``on_stop_signal`` callback for a program that stops as on Ctrl-C (KeyboardInterrupt)."""
    raise KeyboardInterrupt


def folder_problem(folder: str) -> str | None:
    """Why files cannot be written into ``folder`` (created here if missing), or None.

    Checked when a daemon starts, so that a bad path fails at once rather than
    at the first checkpoint or at the end of a training run.
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        return f"cannot create folder {folder}: {exc.strerror or exc}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    return None


def file_problem(path: str) -> str | None:
    """Why a file could not be written at ``path`` (its folder is created if missing), or None."""
    if os.path.isdir(path):
        return f"{path} is a folder; give a file name"
    return folder_problem(os.path.dirname(os.path.abspath(path)))


def fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"error: {message}\n")
    return code
