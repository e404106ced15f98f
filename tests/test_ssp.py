"""SSPGate as pure logic: clock table, liveness and parked reads.

No sockets and no sleeping: time is the ``now`` argument, so every case is a
row of a table and runs instantly.  The rules under test (DESIGN.md,
"Consistency (SSP), precisely"):

* a read at worker clock ``c`` qualifies when ``min_clock >= c - s``;
* a read that does not qualify is parked and released the moment
  ``min_clock`` advances far enough, or expires at its deadline naming the live
  workers whose clock is below what it needs;
* workers that never said HELLO are live at clock 0 and never time out,
  until the coordinator declares them dead (``declare_dead``);
* a worker that joined and then stays silent past ``worker_timeout`` is dead
  and leaves ``min_clock``; one that rejoins starts at the others' min_clock.
"""
from __future__ import annotations

import math
import re

import pytest

from common.errors import ConfigError
from ps.ssp import Expired, SSPGate

TIMEOUT = 10.0      # worker_timeout used unless a test says otherwise
FAR = 1_000.0       # a deadline no test reaches by accident


def gate_with_clocks(staleness, clocks, *, timeout=TIMEOUT, now=0.0) -> SSPGate:
    """A gate whose workers (none of which said HELLO) have the given clocks."""
    gate = SSPGate(staleness, len(clocks), timeout, now=now)
    for w, c in enumerate(clocks):
        gate.advance(w, c)
    return gate


def joined_gate(staleness, num_workers, *, timeout=TIMEOUT, now=0.0) -> SSPGate:
    """A gate where every worker said HELLO (incarnation 1) at ``now``."""
    gate = SSPGate(staleness, num_workers, timeout, now=now)
    for w in range(num_workers):
        gate.join(w, 1, now)
    return gate


# ---------------------------------------------------------------- qualifies
# (staleness, worker clocks, reader clock, qualifies, min_clock)
QUALIFY_TABLE = [
    # s = 0 (BSP): a read at clock c needs every worker to have completed c clocks
    pytest.param(0, [0, 0, 0], 0, True, 0, id="bsp-first-read-qualifies-at-start"),
    pytest.param(0, [0, 0, 0], 1, False, 0, id="bsp-clock-1-waits-for-everyone"),
    pytest.param(0, [1, 1, 0], 1, False, 0, id="bsp-one-laggard-holds-back-clock-1"),
    pytest.param(0, [1, 1, 1], 1, True, 1, id="bsp-clock-1-qualifies-once-all-at-1"),
    pytest.param(0, [2, 1, 3], 1, True, 1, id="bsp-min-is-the-slowest-worker"),
    pytest.param(0, [2, 1, 3], 2, False, 1, id="bsp-read-ahead-of-slowest-waits"),
    # s = 1
    pytest.param(1, [0, 0, 0], 1, True, 0, id="s1-one-clock-ahead-qualifies"),
    pytest.param(1, [0, 0, 0], 2, False, 0, id="s1-two-clocks-ahead-waits"),
    pytest.param(1, [2, 1, 3], 2, True, 1, id="s1-exactly-s-ahead-of-min-qualifies"),
    pytest.param(1, [2, 1, 3], 3, False, 1, id="s1-s-plus-1-ahead-of-min-waits"),
    # s = 3
    pytest.param(3, [0, 0, 0], 3, True, 0, id="s3-three-ahead-of-start-qualifies"),
    pytest.param(3, [0, 0, 0], 4, False, 0, id="s3-four-ahead-of-start-waits"),
    pytest.param(3, [5, 2, 7], 5, True, 2, id="s3-exactly-s-ahead-of-min-qualifies"),
    pytest.param(3, [5, 2, 7], 6, False, 2, id="s3-s-plus-1-ahead-of-min-waits"),
    pytest.param(3, [5, 2, 7], 0, True, 2, id="s3-old-read-always-qualifies"),
    # s = infinity (ASP): every read qualifies, min_clock is still tracked
    pytest.param(math.inf, [0, 0, 0], 10**9, True, 0, id="asp-math-inf-any-clock-qualifies"),
    pytest.param("inf", [0, 0, 0], 10**9, True, 0, id="asp-string-inf-any-clock-qualifies"),
    pytest.param("inf", [4, 9, 6], 5, True, 4, id="asp-min-clock-still-tracked"),
]


@pytest.mark.parametrize("staleness, clocks, reader_clock, qualifies, min_clock", QUALIFY_TABLE)
def test_read_qualifies_exactly_when_min_clock_is_within_staleness(
        staleness, clocks, reader_clock, qualifies, min_clock):
    gate = gate_with_clocks(staleness, clocks)
    assert gate.min_clock == min_clock
    assert gate.qualifies(reader_clock) is qualifies


@pytest.mark.parametrize("staleness, expected", [
    pytest.param(0, 0, id="int-0"),
    pytest.param(3, 3, id="int-3"),
    pytest.param("3", 3, id="string-3"),
    pytest.param(math.inf, math.inf, id="math-inf"),
    pytest.param("inf", math.inf, id="string-inf"),
])
def test_staleness_is_parsed_from_int_string_or_infinity(staleness, expected):
    assert SSPGate(staleness, 1, TIMEOUT).staleness == expected


def test_advancing_a_clock_never_moves_it_back():
    gate = gate_with_clocks(0, [5, 5])
    gate.advance(0, 3)
    assert gate.workers[0].clock == 5
    gate.advance(0, 6)
    assert gate.workers[0].clock == 6


# ---------------------------------------------------------------- release
@pytest.mark.parametrize("staleness", [0, 1, 3], ids=["s0", "s1", "s3"])
def test_parked_read_is_released_exactly_when_min_clock_reaches_its_need(staleness):
    gate = gate_with_clocks(staleness, [0, 0, 0])
    reader_clock = staleness + 2          # needs min_clock >= 2
    assert not gate.qualifies(reader_clock)
    gate.park("read", reader_clock, deadline=FAR)
    assert gate.parked == 1

    steps = [(0, 2), (1, 2), (2, 1)]      # min_clock stays 1 or lower
    for t, (w, clk) in enumerate(steps, start=1):
        gate.advance(w, clk)
        assert gate.poll(now=float(t)) == ([], [], [])
        assert gate.parked == 1

    gate.advance(2, 2)                    # min_clock becomes 2
    released, expired, died = gate.poll(now=10.0)
    assert released == ["read"]
    assert expired == [] and died == []
    assert gate.parked == 0
    assert gate.poll(now=11.0) == ([], [], [])   # released once only


def test_only_the_reads_whose_need_is_met_are_released():
    gate = gate_with_clocks(0, [0, 0])
    for clk in (3, 1, 2):
        gate.park(f"read@{clk}", clk, deadline=FAR)
    gate.advance(0, 2)
    gate.advance(1, 2)
    released, expired, _ = gate.poll(now=1.0)
    assert released == ["read@1", "read@2"]
    assert expired == []
    assert gate.parked == 1


@pytest.mark.parametrize("staleness", [math.inf, "inf"], ids=["math-inf", "string-inf"])
def test_asp_parked_read_is_released_on_the_next_ready_poll(staleness):
    gate = gate_with_clocks(staleness, [0, 0])
    gate.park("read", 50, deadline=FAR)   # parked while the server had no weights
    released, expired, _ = gate.poll(now=1.0)
    assert released == ["read"] and expired == []


# ---------------------------------------------------------------- expiry
# (staleness, worker clocks, reader clock, blockers)
EXPIRY_TABLE = [
    pytest.param(0, [2, 0, 1], 2, (1, 2), id="bsp-two-workers-below-need"),
    pytest.param(0, [2, 0, 2], 2, (1,), id="bsp-one-laggard"),
    pytest.param(1, [3, 1, 2], 4, (1, 2), id="s1-need-3"),
    pytest.param(3, [9, 4, 6], 9, (1,), id="s3-need-6"),
]


@pytest.mark.parametrize("staleness, clocks, reader_clock, blockers", EXPIRY_TABLE)
def test_parked_read_expires_at_its_deadline_naming_the_workers_below_its_need(
        staleness, clocks, reader_clock, blockers):
    gate = gate_with_clocks(staleness, clocks)
    gate.park("read", reader_clock, deadline=5.0)
    assert gate.next_deadline() == 5.0

    assert gate.poll(now=4.999) == ([], [], [])
    assert gate.parked == 1

    released, expired, died = gate.poll(now=5.0)
    assert released == [] and died == []
    assert expired == [Expired("read", reader_clock - staleness, blockers)]
    assert gate.parked == 0
    assert gate.poll(now=6.0) == ([], [], [])     # expired once only


def test_dead_workers_are_not_named_as_blockers():
    gate = joined_gate(0, 3, timeout=TIMEOUT)
    gate.advance(0, 1)
    gate.seen(0, 10.0)                        # 1 and 2 stay silent
    gate.seen(2, 10.0)
    gate.park("read", 1, deadline=12.0)
    _, _, died = gate.poll(now=10.5)          # worker 1 dies, worker 2 still holds the read
    assert died == [1]
    released, expired, _ = gate.poll(now=12.0)
    assert released == []
    assert expired == [Expired("read", 1, (2,))]


def test_a_read_whose_need_is_met_is_released_even_at_its_deadline():
    gate = gate_with_clocks(0, [0, 0])
    gate.park("read", 1, deadline=5.0)
    gate.advance(0, 1)
    gate.advance(1, 1)
    released, expired, _ = gate.poll(now=7.0)
    assert released == ["read"] and expired == []


# ---------------------------------------------------------------- liveness
def test_workers_that_never_said_hello_are_live_at_clock_0_and_never_time_out():
    gate = SSPGate(0, 3, worker_timeout=1.0, now=0.0)
    gate.join(0, 1, now=0.0)
    gate.advance(0, 5)
    gate.seen(0, 1_000_000.0)
    gate.park("read", 1, deadline=2 * 1_000_000.0)
    released, expired, died = gate.poll(now=1_000_000.0)
    assert died == [] and released == [] and expired == []
    assert gate.live_workers() == [0, 1, 2]
    assert gate.min_clock == 0
    assert gate.blockers(1) == (1, 2)


def test_a_gate_with_no_hello_and_no_parked_read_has_no_deadline():
    gate = SSPGate(1, 4, TIMEOUT)
    assert gate.next_deadline() is None


def test_a_joined_worker_silent_past_the_timeout_is_declared_dead_exactly_once():
    gate = SSPGate(0, 2, worker_timeout=TIMEOUT, now=0.0)
    gate.join(1, 7, now=2.0)
    assert gate.poll(now=2.0 + TIMEOUT)[2] == []          # exactly at the timeout: not yet
    assert gate.poll(now=2.0 + TIMEOUT + 0.001)[2] == [1]   # past it: dead
    assert gate.poll(now=100.0)[2] == []                  # reported once
    assert gate.live_workers() == [0]
    assert gate.dead_workers() == [1]


def test_a_worker_seen_recently_is_not_declared_dead():
    gate = joined_gate(0, 2, timeout=TIMEOUT, now=0.0)
    gate.seen(0, 8.0)
    gate.seen(1, 8.0)
    assert gate.poll(now=15.0)[2] == []
    gate.join(1, 1, now=14.0)                              # a HELLO retry is also a sign of life
    assert gate.poll(now=18.5)[2] == [0]
    assert gate.live_workers() == [1]


def test_a_dead_worker_leaves_min_clock_and_its_held_read_is_released_in_the_same_poll():
    gate = joined_gate(0, 3, timeout=TIMEOUT, now=0.0)
    for w, clk in [(0, 3), (1, 1), (2, 3)]:
        gate.advance(w, clk)
    gate.seen(0, 9.0)
    gate.seen(2, 9.0)
    gate.park("read", 3, deadline=FAR)
    assert gate.poll(now=5.0) == ([], [], [])
    assert gate.min_clock == 1

    released, expired, died = gate.poll(now=TIMEOUT + 0.5)
    assert died == [1]
    assert released == ["read"] and expired == []
    assert gate.min_clock == 3


def test_liveness_is_still_detected_when_the_server_is_not_ready():
    gate = joined_gate(0, 2, timeout=TIMEOUT)
    gate.seen(0, 20.0)
    assert gate.poll(now=20.0, ready=False)[2] == [1]


def test_min_clock_is_minus_1_when_every_worker_is_dead():
    gate = joined_gate(0, 2, timeout=TIMEOUT)
    gate.advance(0, 4)
    gate.advance(1, 4)
    assert sorted(gate.poll(now=TIMEOUT + 1)[2]) == [0, 1]
    assert gate.min_clock == -1
    assert gate.live_workers() == []


# ---------------------------------------------------------------- (re)join
@pytest.mark.parametrize("incarnation", [1, 2], ids=["same-incarnation", "new-incarnation"])
def test_a_dead_worker_that_rejoins_starts_at_the_min_clock_of_the_others(incarnation):
    gate = joined_gate(1, 3, timeout=TIMEOUT)
    for w, clk in [(0, 4), (1, 1), (2, 3)]:
        gate.advance(w, clk)
    gate.seen(0, 10.0)
    gate.seen(2, 10.0)
    assert gate.poll(now=10.5)[2] == [1]

    start = gate.join(1, incarnation, now=11.0)
    assert start == 3
    assert gate.workers[1].clock == 3
    assert gate.workers[1].incarnation == incarnation
    assert gate.live_workers() == [0, 1, 2]
    assert gate.min_clock == 3
    gate.seen(0, 20.0)
    gate.seen(2, 20.0)
    assert gate.poll(now=11.0 + TIMEOUT)[2] == []          # its silence timer restarted
    assert gate.poll(now=11.0 + TIMEOUT + 0.5)[2] == [1]


def test_a_live_worker_restarting_with_a_new_incarnation_starts_at_the_others_min_clock():
    gate = joined_gate(2, 3)
    for w, clk in [(0, 5), (1, 7), (2, 6)]:
        gate.advance(w, clk)
    assert gate.join(1, 2, now=1.0) == 5
    assert gate.workers[1].clock == 5
    assert gate.workers[1].incarnation == 2


def test_the_same_incarnation_saying_hello_twice_changes_nothing():
    gate = joined_gate(2, 3)
    for w, clk in [(0, 2), (1, 4), (2, 3)]:
        gate.advance(w, clk)
    before = [(st.clock, st.incarnation, st.live) for st in gate.workers]
    assert gate.join(1, 1, now=3.0) == 4
    assert [(st.clock, st.incarnation, st.live) for st in gate.workers] == before
    assert gate.min_clock == 2


def test_first_hello_keeps_the_clock_the_worker_already_has():
    gate = gate_with_clocks(0, [0, 0])
    assert gate.join(1, 9, now=0.0) == 0
    assert gate.workers[1].incarnation == 9
    assert gate.live_workers() == [0, 1]


def test_a_dead_worker_rejoining_when_nobody_else_is_live_keeps_its_clock():
    gate = joined_gate(0, 2)
    gate.advance(0, 3)
    gate.advance(1, 4)
    gate.poll(now=TIMEOUT + 1)
    assert gate.join(1, 2, now=TIMEOUT + 2) == 4


# ---------------------------------------------------------------- declared dead by the coordinator
def coordinator_gate() -> SSPGate:
    """s = 1, 3 workers: 0 said HELLO at 0 (clock 4), 1 never did (clock 0), 2 said HELLO and was seen at 8 (clock 3)."""
    gate = SSPGate(1, 3, worker_timeout=TIMEOUT, now=0.0)
    gate.join(0, 1, now=0.0)
    gate.join(2, 1, now=0.0)
    gate.seen(2, 8.0)
    gate.advance(0, 4)
    gate.advance(2, 3)
    return gate


# (workers the coordinator lists, now, leave min_clock, live after, min_clock after)
DECLARE_DEAD_TABLE = [
    pytest.param([1], 5.0, [1], [0, 2], 3, id="never-said-hello-leaves-at-once"),
    pytest.param([0], 5.0, [], [0, 1, 2], 0, id="heard-here-recently-stays"),
    pytest.param([0], TIMEOUT, [], [0, 1, 2], 0, id="silent-exactly-the-timeout-stays"),
    pytest.param([0], TIMEOUT + 0.5, [0], [1, 2], 0, id="silent-here-past-the-timeout-leaves"),
    pytest.param([0, 1, 2], TIMEOUT + 0.5, [0, 1], [2], 3, id="only-those-not-heard-leave"),
    pytest.param([1, 1], 5.0, [1], [0, 2], 3, id="listed-twice-leaves-once"),
    pytest.param([], 5.0, [], [0, 1, 2], 0, id="empty-list-changes-nothing"),
]


@pytest.mark.parametrize("listed, now, died, live, min_clock", DECLARE_DEAD_TABLE)
def test_a_worker_the_coordinator_declared_dead_leaves_min_clock_unless_this_server_hears_it(
        listed, now, died, live, min_clock):
    gate = coordinator_gate()
    assert gate.declare_dead(listed, now) == died
    assert gate.live_workers() == live
    assert gate.dead_workers() == [w for w in range(3) if w not in live]
    assert gate.min_clock == min_clock


def test_a_worker_declared_dead_twice_is_reported_once():
    gate = coordinator_gate()
    assert gate.declare_dead([1], 5.0) == [1]
    assert gate.declare_dead([1], 6.0) == []
    assert gate.poll(now=6.0)[2] == []          # nor by the timeout rule


def test_a_read_held_back_by_a_worker_that_never_said_hello_is_released_once_it_is_declared_dead():
    gate = coordinator_gate()
    gate.park("read", 3, deadline=FAR)          # needs min_clock >= 2; worker 1 holds it at 0
    assert gate.poll(now=5.0) == ([], [], [])
    assert gate.blockers(2) == (1,)
    gate.declare_dead([1], 5.0)
    released, expired, died = gate.poll(now=5.0)
    assert released == ["read"] and expired == [] and died == []


@pytest.mark.parametrize("incarnation", [7, 8], ids=["late-process", "replacement"])
def test_a_worker_declared_dead_before_its_hello_joins_at_the_others_min_clock(incarnation):
    gate = coordinator_gate()
    gate.declare_dead([1], 5.0)
    assert gate.join(1, incarnation, now=6.0) == 3
    assert gate.workers[1].incarnation == incarnation
    assert gate.live_workers() == [0, 1, 2] and gate.min_clock == 3


def test_declare_dead_refuses_unknown_worker_ids_and_changes_nothing():
    gate = coordinator_gate()
    with pytest.raises(ConfigError, match="3"):
        gate.declare_dead([1, 3], 5.0)
    assert gate.live_workers() == [0, 1, 2]


# ---------------------------------------------------------------- ready=False
def test_poll_when_not_ready_releases_nothing_but_still_expires():
    gate = gate_with_clocks(0, [3, 3])
    gate.park("qualifying", 1, deadline=5.0)
    gate.park("waiting", 9, deadline=FAR)
    assert gate.poll(now=1.0, ready=False) == ([], [], [])
    assert gate.parked == 2

    released, expired, _ = gate.poll(now=5.0, ready=False)
    assert released == []
    assert expired == [Expired("qualifying", 1, ())]       # nobody holds it back: no weights did
    assert gate.parked == 1


@pytest.mark.parametrize("staleness", [math.inf, "inf"], ids=["math-inf", "string-inf"])
def test_asp_read_parked_before_weights_expires_with_no_blockers(staleness):
    gate = gate_with_clocks(staleness, [0, 0])
    gate.park("read", 3, deadline=5.0)
    assert gate.poll(now=4.0, ready=False) == ([], [], [])
    released, expired, _ = gate.poll(now=5.0, ready=False)
    assert released == []
    assert [(e.token, e.blockers) for e in expired] == [("read", ())]
    # the gate reports the need of an ASP read as -inf: whoever puts it on the
    # wire must not call int() on it
    assert expired[0].need == -math.inf


# ---------------------------------------------------------------- next_deadline, drain
def test_next_deadline_is_the_earliest_parked_deadline():
    gate = gate_with_clocks(0, [0, 0])
    for token, deadline in [("a", 7.0), ("b", 3.0), ("c", 5.0)]:
        gate.park(token, 1, deadline)
    assert gate.next_deadline() == 3.0
    gate.poll(now=3.0)
    assert gate.next_deadline() == 5.0


def test_next_deadline_includes_the_liveness_check_of_joined_live_workers():
    gate = SSPGate(0, 3, worker_timeout=2.0, now=0.0)
    gate.join(0, 1, now=1.0)
    gate.join(1, 1, now=4.0)               # worker 2 never says HELLO: no check for it
    assert gate.next_deadline() == 3.0
    gate.park("read", 1, deadline=2.5)
    assert gate.next_deadline() == 2.5
    gate.poll(now=2.5)                     # expires the read
    assert gate.next_deadline() == 3.0
    assert gate.poll(now=3.001)[2] == [0]
    assert gate.next_deadline() == 6.0     # dead workers are no longer checked
    gate.poll(now=6.5)
    assert gate.next_deadline() is None


def test_drain_returns_every_parked_token_and_leaves_none():
    gate = gate_with_clocks(0, [0, 0])
    tokens = [("ident", rid) for rid in range(5)]
    for i, token in enumerate(tokens):
        gate.park(token, i + 1, deadline=FAR + i)
    assert gate.drain() == tokens
    assert gate.parked == 0
    assert gate.drain() == []
    assert gate.poll(now=2 * FAR) == ([], [], [])


# ---------------------------------------------------------------- bad values
@pytest.mark.parametrize("kwargs, bad, name", [
    pytest.param(dict(staleness=-1), -1, "staleness", id="negative-staleness"),
    pytest.param(dict(staleness="abc"), "abc", "staleness", id="staleness-abc"),
    pytest.param(dict(staleness=1.5), 1.5, "staleness", id="fractional-staleness"),
    pytest.param(dict(num_workers=0), 0, "num_workers", id="zero-workers"),
    pytest.param(dict(num_workers=-2), -2, "num_workers", id="negative-workers"),
    pytest.param(dict(num_workers=2.0), 2.0, "num_workers", id="float-workers"),
    pytest.param(dict(worker_timeout=0), 0, "worker_timeout", id="zero-timeout"),
    pytest.param(dict(worker_timeout=-1.0), -1.0, "worker_timeout", id="negative-timeout"),
    pytest.param(dict(worker_timeout=math.nan), math.nan, "worker_timeout", id="nan-timeout"),
])
def test_constructor_rejects_bad_values_with_a_message_naming_them(kwargs, bad, name):
    args = dict(staleness=0, num_workers=2, worker_timeout=TIMEOUT) | kwargs
    with pytest.raises(ConfigError, match=re.escape(repr(bad))) as info:
        SSPGate(**args)
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(num_workers=True), id="bool-workers"),
    pytest.param(dict(worker_timeout="abc"), id="string-timeout"),
    pytest.param(dict(worker_timeout=None), id="none-timeout"),
])
def test_constructor_rejects_values_of_the_wrong_type_with_config_error(kwargs):
    args = dict(staleness=0, num_workers=2, worker_timeout=TIMEOUT) | kwargs
    with pytest.raises(ConfigError):
        SSPGate(**args)


@pytest.mark.parametrize("w", [0, 1, 2], ids=lambda w: f"id-{w}")
def test_check_worker_accepts_ids_in_range(w):
    SSPGate(0, 3, TIMEOUT).check_worker(w)


@pytest.mark.parametrize("w", [-1, 3, 100, True, 1.0, "1", None],
                         ids=["minus-1", "W", "far-above", "bool", "float", "string", "none"])
def test_check_worker_rejects_ids_outside_the_job(w):
    gate = SSPGate(0, 3, TIMEOUT)
    with pytest.raises(ConfigError, match=re.escape(repr(w))):
        gate.check_worker(w)
    with pytest.raises(ConfigError):
        gate.join(w, 1, now=0.0)
