"""Shared fixtures: real server processes on 127.0.0.1 with readiness handshakes.

Every process a test starts is registered with ``procs`` and stopped (SIGTERM,
then SIGKILL) at teardown, whether the test passed or not.
"""
import os
import sys
import threading
import time

import pytest
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from zpscluster.procs import RoleProcess, bin_cmd  # noqa: E402


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll observable state until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        pause.wait(0.05)   # polling, bounded by the deadline


class Procs:
    def __init__(self):
        self.all: list[RoleProcess] = []

    def start(self, cmd, name, env=None) -> RoleProcess:
        env = {"PYTHONPATH": ROOT, **(env or {})}
        p = RoleProcess(cmd, name, env=env, cwd=ROOT, guard=True)   # none outlives a crashed test run
        self.all.append(p)
        return p

    def server(self, rank, num_servers, num_workers, staleness, *extra, ready_timeout=60):
        p = self.start(bin_cmd("ps-server", "--rank", str(rank), "--num-servers", str(num_servers),
                               "--num-workers", str(num_workers), "--staleness", str(staleness),
                               "--bind", "tcp://127.0.0.1:0", *extra), f"server{rank}")
        p.wait_ready(ready_timeout)
        return p

    def python(self, module, *args, name, env=None):
        return self.start([sys.executable, "-m", module, *args], name, env=env)

    def stop_all(self):
        for p in self.all:
            p.stop(timeout=10)


@pytest.fixture
def procs():
    ps = Procs()
    try:
        yield ps
    finally:
        ps.stop_all()


@pytest.fixture
def shard_servers():
    """Make ``ShardServer``s in this process (real sockets on 127.0.0.1); all shut down at teardown."""
    from common.config import ServerSettings
    from ps.server import ShardServer
    made = []

    def make(**settings):
        s = ShardServer(ServerSettings(**{"num_servers": 1, **settings}))
        s.run_in_background()
        made.append(s)
        return s
    yield make
    for s in made:
        assert s.shutdown(5)


@pytest.fixture
def ps_clients():
    """Make started ``PSClient``s of one server each (64-element frames by default); closed at teardown."""
    from common.config import ClientSettings
    from worker.client import PSClient
    made = []

    def make(server, w=0, frame_elems=64, **settings):
        c = PSClient([server.endpoint], w, settings=ClientSettings(frame_elems=frame_elems, **settings)).start()
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


@pytest.fixture
def zctx():
    """A ZeroMQ context whose sockets must all be closed by the test (term would hang otherwise)."""
    ctx = zmq.Context()
    yield ctx
    leaked = [s for s in list(getattr(ctx, "_sockets", ())) if not s.closed]
    ctx.destroy(linger=0)
    assert not leaked, f"test left {len(leaked)} ZeroMQ sockets open"
