"""Role processes: start one, wait for its READY line, stream its output, stop it.

``RoleProcess`` wraps a ``subprocess.Popen`` of a bin/ executable.  A reader
thread per stream forwards each output line (prefixed with the role and
rank) to a sink, and picks out the ``READY {json}`` line, so launchers and
tests wait on readiness, never on sleeps.  ``stop`` asks with SIGTERM, waits,
then kills, and always reaps the process.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Callable, Sequence

from common.errors import DeadlineExceeded, ZPSError

log = logging.getLogger("zps.procs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")


def bin_cmd(name: str, *args: str) -> list[str]:
    """Command line running bin/NAME with this interpreter."""
    return [sys.executable, os.path.join(BIN, name), *args]


# Run a command so that the kernel SIGTERMs it if its parent dies, even by SIGKILL or a crash
# (prctl PR_SET_PDEATHSIG survives execve; strictly, it fires when the *thread* that started
# the child ends, so start guarded children from a thread that lives as long as they should);
# refuse to start if the parent is already gone.
_GUARD = ("import ctypes, os, signal, sys\n"
          "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))\n"
          "if os.getppid() != int(sys.argv[1]): os._exit(3)\n"
          "os.execvp(sys.argv[2], sys.argv[2:])\n")


def guarded(cmd: Sequence[str]) -> list[str]:
    """``cmd`` run so that it gets SIGTERM when this process dies."""
    return [sys.executable, "-c", _GUARD, str(os.getpid()), *cmd]


class RoleFailed(ZPSError):
    """A role process exited before it was ready, or with an error."""


class RoleProcess:
    """One started role process."""

    def __init__(self, cmd: Sequence[str], name: str, env: dict | None = None,
                 sink: Callable[[str], None] | None = None, cwd: str | None = None, guard: bool = False):
        """``guard``: the process gets SIGTERM if this one dies (see :func:`guarded`)."""
        self.name = name
        self.cmd = list(cmd)
        self._sink = sink
        self.ready_info: dict | None = None
        self._ready = threading.Event()
        self.lines: list[str] = []
        self._lock = threading.Lock()
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(guarded(self.cmd) if guard else self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=full_env, cwd=cwd, text=True,
                                     bufsize=1, start_new_session=True)
        self.pid = self.proc.pid
        self._readers = [threading.Thread(target=self._read, args=(s, tag), daemon=True)
                         for s, tag in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for t in self._readers:
            t.start()

    def _read(self, stream, tag: str) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if tag == "out" and line.startswith("READY ") and self.ready_info is None:
                try:
                    self.ready_info = json.loads(line[6:])
                except ValueError:
                    self.ready_info = {"raw": line[6:]}
                self._ready.set()
            with self._lock:
                self.lines.append(line)
                if len(self.lines) > 5000:
                    del self.lines[:1000]
            if self._sink is not None:
                self._sink(f"[{self.name}] {line}")
        stream.close()
        if tag == "out":
            self._ready.set()  # EOF: wake waiters so they see the exit

    def wait_ready(self, timeout: float) -> dict:
        """The READY JSON object; RoleFailed if the process exits first."""
        if not self._ready.wait(timeout):
            raise DeadlineExceeded(f"{self.name} printed no READY line within {timeout:.0f}s; "
                                   f"last output: {self.tail(5)}")
        if self.ready_info is None:
            code = self.proc.wait(5)
            raise RoleFailed(f"{self.name} exited with code {code} before it was ready; "
                             f"last output: {self.tail(10)}")
        return self.ready_info

    @property
    def endpoint(self) -> str:
        return (self.ready_info or {}).get("endpoint", "")

    def tail(self, n: int = 10) -> str:
        with self._lock:
            return " | ".join(self.lines[-n:])

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return code

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs after SIGTERM; killing", self.name, timeout)
                self.kill()
        return self.wait(10)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
