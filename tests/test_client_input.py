"""PSClient refuses bad arguments before it sends anything, and reports the real failure.

One server in this process on 127.0.0.1 (real sockets). Every refusal is
checked twice: the error says what was given, and no request left the client.
"""
import concurrent.futures as cf
import math
import socket
import time

import numpy as np
import pytest
import torch

from common.config import ClientSettings
from common.errors import ConfigError, DeadlineExceeded
from common.plan import PartitionPlan
from common.protocol import MsgType
from worker.client import PSClient, PushHandle

N = 256
BAD_TIMEOUTS = [math.nan, math.inf, -math.inf, 0, 0.0, -1, "5", True]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(shard_servers):
    return shard_servers(num_workers=1, staleness="inf", lr=1.0)


def plan_of(n=N, servers=1):
    return PartitionPlan.build([("w", (n,), "float32")], servers, frame_elems=64)


@pytest.fixture
def joined(server, ps_clients):
    c = ps_clients(server)
    c.hello(plan_of())
    c.init(np.zeros(N, np.float32))
    return c


def weights(c):
    m = c.pull(0, timeout=10, observer=True).wait(10)[0]
    return np.concatenate([np.frombuffer(f.buffer, dtype="<f4") for f in m.frames])


def nothing_sent(c, server, before):
    """The client sent no request since its count was ``before``; the server applied no push."""
    assert c.stats["requests"] == before
    assert not c._pending and c._cmds.empty()
    assert server.snapshot_stats()["pushes"] == 0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ timeouts
@pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=repr)
def test_every_request_refuses_a_timeout_that_is_not_a_finite_positive_number(joined, server, bad):
    c = joined
    before = c.stats["requests"]
    g = np.ones(N, np.float32)
    calls = {
        "request": lambda: c.request(0, MsgType.STATS, timeout=bad),
        "server_stats": lambda: c.server_stats(0, bad),
        "push": lambda: c.push(g, 0, timeout=bad),
        "pull": lambda: c.pull(0, bad),
        "clock": lambda: c.clock(0, bad),
        "hello": lambda: c.hello(c.plan, bad),
        "init": lambda: c.init(g, bad),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="timeout") as err:
            call()
        assert repr(bad) in str(err.value), name
    nothing_sent(c, server, before)


def test_a_nan_timeout_does_not_stall_the_requests_after_it(joined):
    with pytest.raises(ValueError, match="nan"):
        joined.server_stats(0, math.nan)
    t0 = time.monotonic()
    assert joined.server_stats(0, 5)["pushes"] == 0
    assert time.monotonic() - t0 < 5


def test_a_push_refused_for_its_timeout_is_not_applied(joined, server):
    with pytest.raises(ValueError):
        joined.push(np.ones(N, np.float32), 0, timeout=-1)
    joined.push(np.ones(N, np.float32), 0, timeout=5).wait(5)
    assert np.allclose(weights(joined), -1.0)          # applied once: the retry only
    assert server.snapshot_stats()["pushes"] == 1


def test_a_huge_finite_read_timeout_still_fits_the_wire(joined):
    assert joined.pull(0, 1e300).wait(10)[0]["step"] == 0    # the server caps it at its own read_timeout


@pytest.mark.parametrize("field", ["request_timeout", "read_timeout", "attempt_timeout", "heartbeat_interval",
                                   "backoff_max"])
def test_the_client_refuses_settings_with_an_infinite_timeout(field):
    with pytest.raises(ConfigError, match=field):      # refused where the settings are made
        PSClient(["tcp://127.0.0.1:1"], 0, settings=ClientSettings(**{field: math.inf}))


@pytest.mark.parametrize("bad", [math.nan, math.inf, "5"], ids=repr)
def test_waiting_on_a_handle_refuses_a_timeout_that_is_not_a_finite_number(joined, bad):
    h = joined.push(np.ones(N, np.float32), 0)
    for call in (h.wait, h.wait_released, h.futures[0].result, h.futures[0].exception):
        with pytest.raises(ValueError, match="timeout"):
            call(bad)
    assert h.wait(10)[0]["step"] == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, None, 0, -1.0, "5"], ids=repr)
def test_close_refuses_a_timeout_that_is_not_a_finite_number_and_stays_usable(joined, bad):
    with pytest.raises(ValueError, match="close"):
        joined.close(bad)
    assert joined.server_stats(0, 5)["pushes"] == 0
    joined.close(5)


# ------------------------------------------------------------------ flat arrays
def torch_grad():
    return torch.ones(N)


@pytest.mark.parametrize("make, error, says", [
    (lambda: np.ones(N, np.int32), TypeError, "int32"),
    (lambda: np.ones(N, np.float64), TypeError, "float64"),
    (lambda: np.ones(N, ">f4"), TypeError, ">f4"),
    (lambda: np.ones(N + 1, np.float32), ValueError, f"{N + 1} elements"),
    (lambda: np.ones(N - 1, np.float32), ValueError, f"{N - 1} elements"),
    (lambda: np.ones((N, 1), np.float32), ValueError, "shape"),
    (lambda: np.ones(2 * N, np.float32)[::2], ValueError, "contiguous"),
    (lambda: [1.0] * N, TypeError, "list"),
    (torch_grad, TypeError, "numpy()"),
], ids=["int32", "float64", "big-endian", "too-long", "too-short", "2-D", "strided", "list", "torch"])
def test_push_and_init_refuse_anything_but_the_plans_flat_float32_array(joined, server, make, error, says):
    c = joined
    before = c.stats["requests"]
    for call in (lambda a: c.push(a, 0), c.init):
        with pytest.raises(error) as err:
            call(make())
        assert says in str(err.value) and str(N) in str(err.value)
    nothing_sent(c, server, before)
    assert np.allclose(weights(c), 0.0)


def test_a_large_strided_gradient_is_refused_not_a_buffer_error(server, ps_clients):
    n = 100_000
    c = ps_clients(server)
    c.hello(plan_of(n))
    with pytest.raises(ValueError, match="contiguous"):
        c.push(np.ones(2 * n, np.float32)[::2], 0)


# ------------------------------------------------------------------ clocks and read steps
def test_numpy_integers_are_accepted_as_clocks_and_read_steps(joined, server):
    c = joined
    c.push(np.ones(N, np.float32), np.int64(0), read_steps=[np.int64(0)]).wait(10)
    assert c.clock(np.int32(1), 10) == [2]
    assert c.pull(np.int64(2), 10).wait(10)[0]["step"] == 1
    c.hello(c.plan, 10, clock=np.int64(3))


@pytest.mark.parametrize("bad", [1.5, 1.0, True, "1", None], ids=repr)
def test_a_clock_that_is_not_an_integer_is_refused(joined, server, bad):
    c = joined
    before = c.stats["requests"]
    g = np.ones(N, np.float32)
    for call in (lambda: c.push(g, bad), lambda: c.pull(bad, 5), lambda: c.clock(bad, 5)):
        with pytest.raises(TypeError, match="clock") as err:
            call()
        assert repr(bad) in str(err.value)
    nothing_sent(c, server, before)


@pytest.mark.parametrize("bad, error", [([1.5], TypeError), (["1"], TypeError), ([0, 0], ValueError),
                                        ([], ValueError)], ids=repr)
def test_bad_read_steps_are_refused_before_the_push_is_sent(joined, server, bad, error):
    before = joined.stats["requests"]
    with pytest.raises(error, match="read_steps"):
        joined.push(np.ones(N, np.float32), 0, read_steps=bad)
    nothing_sent(joined, server, before)


# ------------------------------------------------------------------ servers and endpoints
@pytest.mark.parametrize("server_index", [1, 5, -1, 0.0, True], ids=repr)
def test_a_request_to_a_server_the_client_does_not_have_is_refused(joined, server, server_index):
    c = joined
    before = c.stats["requests"]
    with pytest.raises((ValueError, TypeError), match="server") as err:
        c.server_stats(server_index, 5)
    assert repr(server_index) in str(err.value)
    with pytest.raises((ValueError, TypeError), match="server"):
        c.request(server_index, MsgType.STATS, timeout=5)
    nothing_sent(c, server, before)
    assert c.server_stats(0, 5)["pushes"] == 0          # the client still works


@pytest.mark.parametrize("endpoints", ["tcp://127.0.0.1:5555", b"tcp://127.0.0.1:5555"], ids=repr)
def test_a_single_endpoint_string_is_refused(endpoints):
    with pytest.raises(TypeError, match="list"):
        PSClient(endpoints, 0)


# ------------------------------------------------------------------ the real failure
def test_a_requests_own_deadline_is_reported_not_the_wait_that_saw_it():
    f = cf.Future()
    own = DeadlineExceeded("PUSH to server 0 (tcp://x) got no answer within 1.0s")
    f.set_exception(own)
    with pytest.raises(DeadlineExceeded) as err:
        PushHandle([f], [None]).wait(30)
    assert err.value is own


def test_a_push_to_a_stopped_server_fails_with_its_own_deadline(server, ps_clients):
    c = ps_clients(server, request_timeout=30.0)
    c.hello(plan_of())
    c.init(np.zeros(N, np.float32))
    assert server.shutdown(5)
    t0 = time.monotonic()
    h = c.push(np.ones(N, np.float32), 0, timeout=1.0)
    with pytest.raises(DeadlineExceeded, match=r"PUSH to server 0 \(tcp://.*is the server running"):
        h.wait(30)
    assert time.monotonic() - t0 < 10


def test_our_own_wait_running_out_still_says_what_was_waited_for():
    dead = PSClient([f"tcp://127.0.0.1:{closed_port()}"], 0, settings=ClientSettings(frame_elems=64)).start()
    try:
        futs = [dead.request(0, MsgType.STATS, timeout=30)]
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="push: no answer within 0.3s"):
            PushHandle(futs, [None]).wait(0.3)
        assert time.monotonic() - t0 < 5
    finally:
        dead.close()


def test_a_server_whose_range_is_empty_gets_no_data_frames(shard_servers):
    """A model smaller than one alignment unit leaves a server nothing: its INIT, PUSH and
    PULL carry zero frames (docs/PROTOCOL.md), and the job trains as with one server."""
    from common.config import ClientSettings
    from common.plan import PartitionPlan
    from worker.client import PSClient
    servers = [shard_servers(rank=k, num_servers=2, num_workers=1, staleness="inf", lr=1.0) for k in range(2)]
    plan = PartitionPlan.build([("w", (10,), "float32")], 2, frame_elems=64)
    sizes = [plan.size_of(k) for k in range(2)]
    assert sorted(sizes) == [0, 10]                            # one server holds nothing
    c = PSClient([s.endpoint for s in servers], 0, settings=ClientSettings(frame_elems=64)).start()
    try:
        c.hello(plan, 10)
        assert c.init(np.zeros(10, np.float32), 10) == [True, True]
        c.push(np.ones(10, np.float32), 0).wait(10)
        replies = c.pull(1, 10).wait(10)
        assert [len(m.frames) for m in replies] == [1 if n else 0 for n in sizes]
        got = np.frombuffer(replies[sizes.index(10)].frames[0].buffer, "<f4")
        assert np.array_equal(got, -np.ones(10, np.float32))
    finally:
        c.close()
