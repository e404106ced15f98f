"""Update rules and the push ledger, with a fake optimizer step and no sockets.

* ``SyncAveraging`` (staleness 0): one step per clock, with the exact average
  of the gradients pushed for that clock, once every live worker completed it.
* ``ApplyOnArrival`` (staleness > 0): one step per push.
* ``PushLedger``: a push (worker, incarnation, seq) is applied at most once.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ErrorCode, ProtocolError
from common.plan import frame_slices
from ps.rules import ApplyOnArrival, PushLedger, SyncAveraging
from ps.ssp import SSPGate

W = 3
N = 10
CHUNK = 4          # frames of 4, 4, 2: N is not a multiple of CHUNK
TIMEOUT = 10.0


class FakeStep:
    """Records every step: the chunks it got (cloned: the rule reuses its buffer) and the lr scale."""

    def __init__(self):
        self.calls: list[tuple[list[torch.Tensor], float]] = []

    def __call__(self, grads, lr_scale):
        self.calls.append(([g.clone() for g in grads], lr_scale))

    @property
    def flat(self) -> list[torch.Tensor]:
        """The gradient of every step so far, as one flat tensor per step."""
        return [torch.cat(chunks) if chunks else torch.zeros(0) for chunks, _ in self.calls]


def grad(seed: int, n: int = N) -> torch.Tensor:
    """An integer-valued float32 gradient: sums are exact, so averages are exactly rounded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-50, 50, (n,), generator=g).to(torch.float32)


def chunks(t: torch.Tensor, chunk_elems: int = CHUNK) -> list[torch.Tensor]:
    return [t[a:b] for a, b in frame_slices(t.numel(), chunk_elems)]


def sync_rule(num_workers=W, n=N, chunk_elems=CHUNK, joined=False):
    gate = SSPGate(0, num_workers, TIMEOUT, now=0.0)
    if joined:
        for w in range(num_workers):
            gate.join(w, 1, now=0.0)
    step = FakeStep()
    return gate, step, SyncAveraging(gate, step, n, chunk_elems)


def clocks(gate: SSPGate) -> list[int]:
    return [st.clock for st in gate.workers]


# ================================================================ SyncAveraging
@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)],
                         ids=lambda o: "push-order-" + "-".join(map(str, o)))
def test_sync_applies_one_step_per_clock_with_the_exact_average_after_every_worker_ticked(order):
    gate, step, rule = sync_rule()
    for clk in range(3):
        g = {w: grad(10 * clk + w) for w in range(W)}
        for w in order:
            assert len(step.calls) == clk, "no step before every live worker ticked"
            assert rule.clock == clk
            rule.on_push(w, clk, chunks(g[w]), tick=True)
        assert len(step.calls) == clk + 1
        assert torch.equal(step.flat[clk], (g[0] + g[1] + g[2]) / 3)
        assert step.calls[clk][1] == 1.0
        assert clocks(gate) == [clk + 1] * W
        assert gate.min_clock == clk + 1
    assert rule.steps_applied == 3


def test_sync_clocks_advance_in_the_gate_only_when_the_step_is_applied():
    gate, step, rule = sync_rule()
    rule.on_push(0, 0, chunks(grad(0)), tick=True)
    rule.on_push(1, 0, chunks(grad(1)), tick=True)
    assert clocks(gate) == [0, 0, 0]
    assert not gate.qualifies(1)
    rule.on_push(2, 0, chunks(grad(2)), tick=True)
    assert clocks(gate) == [1, 1, 1]
    assert gate.qualifies(1)


def test_sync_clock_without_a_push_ticks_but_does_not_count_as_a_contributor():
    gate, step, rule = sync_rule()
    g0, g2 = grad(0), grad(2)
    rule.on_push(0, 0, chunks(g0), tick=True)
    rule.on_clock(1, 0)
    assert step.calls == []
    rule.on_push(2, 0, chunks(g2), tick=True)
    assert len(step.calls) == 1
    assert torch.equal(step.flat[0], (g0 + g2) / 2)
    assert clocks(gate) == [1, 1, 1]


def test_sync_clock_with_no_push_at_all_applies_no_step_but_advances_clocks():
    gate, step, rule = sync_rule()
    for w in range(W):
        rule.on_clock(w, 0)
    assert step.calls == [] and rule.steps_applied == 0
    assert clocks(gate) == [1, 1, 1]
    # the next clock's average is not polluted by the previous clock's buffer
    g = [grad(w) for w in range(W)]
    for w in range(W):
        rule.on_push(w, 1, chunks(g[w]), tick=True)
    assert torch.equal(step.flat[0], (g[0] + g[1] + g[2]) / 3)


def test_sync_push_without_tick_contributes_but_waits_for_the_tick():
    gate, step, rule = sync_rule(num_workers=2)
    g0, g1 = grad(0), grad(1)
    rule.on_push(0, 0, chunks(g0), tick=False)
    rule.on_push(1, 0, chunks(g1), tick=True)
    assert step.calls == []
    rule.on_clock(0, 0)
    assert torch.equal(step.flat[0], (g0 + g1) / 2)


def test_sync_dead_worker_no_longer_holds_the_clock_back_after_on_membership():
    gate, step, rule = sync_rule(joined=True)
    g0, g2 = grad(0), grad(2)
    rule.on_push(0, 0, chunks(g0), tick=True)
    rule.on_push(2, 0, chunks(g2), tick=True)
    assert step.calls == []

    gate.seen(0, TIMEOUT)
    gate.seen(2, TIMEOUT)
    _, _, died = gate.poll(now=TIMEOUT + 0.5)        # worker 1 stayed silent
    assert died == [1]
    assert step.calls == [], "the rule acts on membership only when told"

    rule.on_membership()
    assert len(step.calls) == 1
    assert torch.equal(step.flat[0], (g0 + g2) / 2)
    assert clocks(gate)[0] == clocks(gate)[2] == 1
    assert gate.min_clock == 1

    g0, g2 = grad(10), grad(12)
    rule.on_push(0, 1, chunks(g0), tick=True)
    rule.on_push(2, 1, chunks(g2), tick=True)
    assert len(step.calls) == 2
    assert torch.equal(step.flat[1], (g0 + g2) / 2)
    assert gate.min_clock == 2


def test_sync_on_membership_applies_nothing_while_a_live_worker_has_not_ticked():
    gate, step, rule = sync_rule()
    rule.on_push(0, 0, chunks(grad(0)), tick=True)
    rule.on_membership()
    assert step.calls == [] and clocks(gate) == [0, 0, 0]


def _push(rule, w, clk, g):
    rule.on_push(w, clk, chunks(g), tick=True)


def _clock(rule, w, clk, g):
    rule.on_clock(w, clk)


@pytest.mark.parametrize("send, bad_clk, prepare", [
    pytest.param(_push, 1, [], id="push-future-clock"),
    pytest.param(_push, -1, [], id="push-negative-clock"),
    pytest.param(_push, 0, [0], id="push-clock-already-completed"),
    pytest.param(_clock, 1, [], id="clock-message-future-clock"),
    pytest.param(_clock, -1, [], id="clock-message-negative-clock"),
    # a repeated CLOCK is a retry and is acknowledged: see the idempotence test below
])
def test_sync_message_for_the_wrong_clock_raises_bad_clock_and_changes_nothing(send, bad_clk, prepare):
    gate, step, rule = sync_rule()
    g = [grad(w) for w in range(W)]
    for w in prepare:
        rule.on_push(w, 0, chunks(g[w]), tick=True)
    state = (clocks(gate), set(rule._ticked), set(rule._contributors),
             None if rule._sum is None else rule._sum.clone())

    with pytest.raises(ProtocolError) as info:
        send(rule, 0, bad_clk, grad(99) * 1000)
    assert info.value.code == ErrorCode.BAD_CLOCK
    assert str(bad_clk) in str(info.value)

    assert step.calls == []
    assert (clocks(gate), rule._ticked, rule._contributors) == state[:3]
    if state[3] is not None:
        assert torch.equal(rule._sum, state[3])
    for w in range(W):
        if w not in prepare:
            rule.on_push(w, 0, chunks(g[w]), tick=True)
    assert len(step.calls) == 1
    assert torch.equal(step.flat[0], (g[0] + g[1] + g[2]) / 3)


def test_sync_worker_cannot_push_the_next_clock_before_the_current_one_is_applied():
    gate, step, rule = sync_rule(num_workers=2)
    rule.on_push(0, 0, chunks(grad(0)), tick=True)
    with pytest.raises(ProtocolError) as info:
        rule.on_push(0, 1, chunks(grad(1)), tick=True)
    assert info.value.code == ErrorCode.BAD_CLOCK


@pytest.mark.parametrize("n, chunk_elems", [(10, 3), (7, 2), (1000, 64), (5, 1)],
                         ids=lambda v: str(v))
def test_sync_gradients_in_chunks_are_summed_chunk_by_chunk(n, chunk_elems):
    assert n % chunk_elems or chunk_elems == 1
    gate, step, rule = sync_rule(n=n, chunk_elems=chunk_elems)
    g = [grad(w, n) for w in range(W)]
    for w in range(W):
        rule.on_push(w, 0, chunks(g[w], chunk_elems), tick=True)
    (got, _), = step.calls
    assert [c.numel() for c in got] == [b - a for a, b in frame_slices(n, chunk_elems)]
    assert torch.equal(torch.cat(got), (g[0] + g[1] + g[2]) / 3)


def test_sync_rejoin_after_completing_the_clock_starts_at_the_next_clock_and_counts_once():
    gate, step, rule = sync_rule(joined=True)
    g = [grad(w) for w in range(W)]
    rule.on_push(1, 0, chunks(g[1]), tick=True)      # old incarnation completed clock 0
    start = gate.join(1, 2, now=1.0)                 # ... then restarted quickly
    assert start == 0
    start = rule.rejoin_clock(1, start)
    assert start == 1
    assert gate.workers[1].clock == 1

    with pytest.raises(ProtocolError) as info:       # its push for clock 0 would count twice
        rule.on_push(1, 0, chunks(g[1]), tick=True)
    assert info.value.code == ErrorCode.BAD_CLOCK

    rule.on_push(0, 0, chunks(g[0]), tick=True)
    rule.on_push(2, 0, chunks(g[2]), tick=True)
    assert len(step.calls) == 1
    assert torch.equal(step.flat[0], (g[0] + g[1] + g[2]) / 3)
    assert clocks(gate) == [1, 1, 1]

    h = [grad(10 + w) for w in range(W)]
    for w in range(W):
        rule.on_push(w, 1, chunks(h[w]), tick=True)
    assert torch.equal(step.flat[1], (h[0] + h[1] + h[2]) / 3)


def test_sync_rejoin_before_completing_the_clock_starts_at_the_clock_being_accumulated():
    gate, step, rule = sync_rule(joined=True)
    rule.on_push(0, 0, chunks(grad(0)), tick=True)
    start = rule.rejoin_clock(1, gate.join(1, 2, now=1.0))
    assert start == 0
    assert clocks(gate) == [0, 0, 0]


def test_sync_dead_worker_rejoins_at_the_clock_the_others_reached():
    gate, step, rule = sync_rule(joined=True)
    gate.seen(0, TIMEOUT)
    gate.seen(2, TIMEOUT)
    assert gate.poll(now=TIMEOUT + 1)[2] == [1]
    rule.on_membership()
    for clk in range(2):
        for w in (0, 2):
            rule.on_push(w, clk, chunks(grad(w)), tick=True)
    assert gate.min_clock == 2
    start = rule.rejoin_clock(1, gate.join(1, 2, now=TIMEOUT + 2))
    assert start == 2
    g = [grad(20 + w) for w in range(W)]
    for w in (0, 1):
        rule.on_push(w, 2, chunks(g[w]), tick=True)
    assert len(step.calls) == 2, "the rejoined worker is waited for again"
    rule.on_push(2, 2, chunks(g[2]), tick=True)
    assert torch.equal(step.flat[2], (g[0] + g[1] + g[2]) / 3)


def test_sync_late_push_from_a_dead_worker_is_not_mixed_into_a_later_clock():
    gate, step, rule = sync_rule(joined=True)
    gate.seen(0, TIMEOUT)
    gate.seen(2, TIMEOUT)
    assert gate.poll(now=TIMEOUT + 1)[2] == [1]
    rule.on_membership()
    rule.on_push(0, 0, chunks(grad(0)), tick=True)
    rule.on_push(2, 0, chunks(grad(2)), tick=True)   # clock 0 applied without worker 1
    assert gate.min_clock == 1

    try:                                             # worker 1's delayed clock-0 push arrives
        rule.on_push(1, 0, chunks(grad(1) * 1000), tick=True)
    except ProtocolError:
        pass                                         # rejecting it is fine
    g0, g2 = grad(10), grad(12)
    rule.on_push(0, 1, chunks(g0), tick=True)
    rule.on_push(2, 1, chunks(g2), tick=True)
    assert torch.equal(step.flat[1], (g0 + g2) / 2)


# ================================================================ ApplyOnArrival
def arrival_rule(lr_scale=None, staleness=2):
    gate = SSPGate(staleness, W, TIMEOUT)
    step = FakeStep()
    return gate, step, ApplyOnArrival(gate, step, lr_scale)


def test_arrival_applies_one_step_per_push_with_the_pushed_gradient():
    gate, step, rule = arrival_rule()
    pushes = [(0, 0), (1, 0), (0, 1), (2, 0), (0, 2)]
    for k, (w, clk) in enumerate(pushes):
        rule.on_push(w, clk, chunks(grad(k)), tick=True)
        assert len(step.calls) == k + 1
        assert torch.equal(step.flat[k], grad(k))
        assert step.calls[k][1] == 1.0
    assert clocks(gate) == [3, 1, 1]


def test_arrival_tick_advances_the_gate_clock_to_the_next_clock():
    gate, step, rule = arrival_rule()
    rule.on_push(1, 4, chunks(grad(0)), tick=True)
    assert gate.workers[1].clock == 5
    rule.on_push(1, 5, chunks(grad(1)), tick=False)
    assert gate.workers[1].clock == 5
    assert len(step.calls) == 2


def test_arrival_clock_never_goes_back_for_an_older_clock():
    gate, step, rule = arrival_rule()
    rule.on_push(0, 5, chunks(grad(0)), tick=True)
    rule.on_push(0, 2, chunks(grad(1)), tick=True)   # a late push for an old clock
    assert gate.workers[0].clock == 6
    assert len(step.calls) == 2                      # still applied: one step per push
    rule.on_clock(0, 1)
    assert gate.workers[0].clock == 6


def test_arrival_clock_message_advances_the_gate_without_a_step():
    gate, step, rule = arrival_rule()
    rule.on_clock(2, 0)
    rule.on_clock(2, 1)
    assert gate.workers[2].clock == 2
    assert step.calls == []


def test_arrival_lr_scale_is_called_with_worker_and_clock_and_passed_to_the_step():
    seen = []

    def lr_scale(w, clk):
        seen.append((w, clk))
        return 1.0 / (1 + clk)

    gate, step, rule = arrival_rule(lr_scale)
    rule.on_push(2, 3, chunks(grad(0)), tick=True)
    rule.on_push(0, 1, chunks(grad(1)), tick=False)
    assert seen == [(2, 3), (0, 1)]
    assert [scale for _, scale in step.calls] == [0.25, 0.5]


def test_arrival_membership_changes_nothing_and_rejoin_keeps_the_gate_start():
    gate, step, rule = arrival_rule()
    rule.on_push(0, 0, chunks(grad(0)), tick=True)
    rule.on_membership()
    assert rule.rejoin_clock(0, 7) == 7
    assert len(step.calls) == 1 and clocks(gate) == [1, 0, 0]


# ================================================================ PushLedger
def test_ledger_in_order_sequence_is_applied_up_to_the_last_seq():
    ledger = PushLedger()
    ledger.reset(0, 1)
    for seq in range(5):
        assert not ledger.applied(0, seq)
        ledger.record(0, seq)
        assert ledger.applied(0, seq)
    assert not ledger.applied(0, 5)
    assert ledger.last_seq(0) == 4
    assert ledger.state() == {"0": {"inc": 1, "mark": 4, "extra": []}}


def test_ledger_out_of_order_sequence_fills_its_gaps():
    ledger = PushLedger()
    ledger.reset(0, 1)
    for seq in (2, 0, 4):
        ledger.record(0, seq)
    assert [ledger.applied(0, s) for s in range(6)] == [True, False, True, False, True, False]
    assert ledger.last_seq(0) == 4
    assert ledger.state()["0"] == {"inc": 1, "mark": 0, "extra": [2, 4]}
    ledger.record(0, 1)
    ledger.record(0, 3)
    assert ledger.state()["0"] == {"inc": 1, "mark": 4, "extra": []}


def test_ledger_detects_duplicates_and_recording_them_again_changes_nothing():
    ledger = PushLedger()
    ledger.reset(0, 1)
    for seq in (0, 1, 3):
        ledger.record(0, seq)
    before = ledger.state()
    for seq in (0, 1, 3):
        assert ledger.applied(0, seq)
        ledger.record(0, seq)
    assert ledger.state() == before


def test_ledger_keeps_workers_apart():
    ledger = PushLedger()
    ledger.reset(0, 1)
    ledger.reset(1, 1)
    ledger.record(0, 0)
    assert ledger.applied(0, 0)
    assert not ledger.applied(1, 0)


def test_ledger_reset_for_a_new_incarnation_forgets_the_old_seqs():
    ledger = PushLedger()
    ledger.reset(0, 1)
    for seq in (0, 1, 2, 5):
        ledger.record(0, seq)
    ledger.reset(0, 2)
    assert ledger.incarnation(0) == 2
    assert not any(ledger.applied(0, s) for s in range(8))
    assert ledger.last_seq(0) == -1
    assert ledger.incarnation(1) is None


@pytest.mark.parametrize("bound", [8, PushLedger.MAX_OUT_OF_ORDER], ids=["bound-8", "default-bound"])
def test_ledger_out_of_order_set_stays_bounded_and_never_forgets_a_recorded_seq(bound):
    ledger = PushLedger()
    ledger.MAX_OUT_OF_ORDER = bound
    ledger.reset(0, 1)
    recorded = list(range(1, 2 * (bound + 10), 2))      # odd seqs only: a gap before each
    for seq in recorded:
        ledger.record(0, seq)
        assert len(ledger.state()["0"]["extra"]) <= bound
    assert all(ledger.applied(0, s) for s in recorded)
    assert ledger.last_seq(0) == recorded[-1]
    # past the bound the oldest gaps are assumed lost (reported as applied), the newest are not
    assert ledger.applied(0, 0)
    assert not ledger.applied(0, recorded[-1] - 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), max_size=80))
def test_ledger_applied_is_true_exactly_for_the_seqs_recorded_before(seqs):
    ledger = PushLedger()
    ledger.reset(0, 1)
    recorded: set[int] = set()
    for seq in seqs:                               # 41 distinct seqs: the bound is never reached
        assert ledger.applied(0, seq) == (seq in recorded)
        ledger.record(0, seq)
        recorded.add(seq)
    assert [ledger.applied(0, s) for s in range(45)] == [s in recorded for s in range(45)]
    assert ledger.last_seq(0) == (max(recorded) if recorded else -1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=60), max_size=120))
def test_ledger_with_a_small_bound_stays_bounded_and_never_forgets_a_recorded_seq(seqs):
    ledger = PushLedger()
    ledger.MAX_OUT_OF_ORDER = 4
    ledger.reset(0, 1)
    for k, seq in enumerate(seqs):
        ledger.record(0, seq)
        assert len(ledger.state()["0"]["extra"]) <= 4
        assert all(ledger.applied(0, s) for s in seqs[:k + 1])


def test_sync_a_retried_clock_message_is_acknowledged_and_changes_nothing():
    gate, step, rule = sync_rule()
    rule.on_clock(0, 0)
    state = (clocks(gate), set(rule._ticked), set(rule._contributors))
    rule.on_clock(0, 0)
    assert (clocks(gate), set(rule._ticked), set(rule._contributors)) == state
    assert step.calls == []
