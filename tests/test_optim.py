"""ShardOptimizer runs torch's functional optimizers over a chunked flat shard.

The reference everywhere is the stock torch.optim class with default settings
(what a user gets) on one ordinary tensor, fed the same gradients.
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from ps.optim import OptimizerSpec, ShardOptimizer

N = 1000          # odd shard size
CHUNK = 192       # does not divide N: chunks of 192, ..., last of 40
STEPS = 50

CASES = {
    "sgd_plain": OptimizerSpec("sgd", lr=0.1),
    "sgd_momentum": OptimizerSpec("sgd", lr=0.1, momentum=0.9),
    "sgd_momentum_dampening": OptimizerSpec("sgd", lr=0.1, momentum=0.9, dampening=0.3),
    "sgd_nesterov": OptimizerSpec("sgd", lr=0.1, momentum=0.9, nesterov=True),
    "sgd_weight_decay": OptimizerSpec("sgd", lr=0.1, momentum=0.5, weight_decay=0.01),
    "adam": OptimizerSpec("adam", lr=1e-2),
    "adam_amsgrad": OptimizerSpec("adam", lr=1e-2, amsgrad=True),
    "adam_weight_decay": OptimizerSpec("adam", lr=1e-2, weight_decay=0.1),
    "adamw": OptimizerSpec("adamw", lr=1e-2),
    "adagrad": OptimizerSpec("adagrad", lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
}


def grad_sequence(steps: int, n: int = N, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # varying scales so second moments and accumulators differ per element
    return [torch.randn(n, generator=g) * (1 + k % 3) for k in range(steps)]


def chunked(flat: torch.Tensor, chunk: int = CHUNK) -> list[torch.Tensor]:
    return list(flat.split(chunk))


def initial_weights(n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(42))


def run_reference(spec: OptimizerSpec, grads: list[torch.Tensor],
                  lrs: list[float] | None = None) -> torch.Tensor:
    p = initial_weights().requires_grad_(True)
    opt = spec.torch_class()([p], **spec.torch_kwargs())
    for k, g in enumerate(grads):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[k]
        p.grad = g.clone()
        opt.step()
    return p.detach()


def run_shard(spec: OptimizerSpec, grads: list[torch.Tensor], **kw) -> torch.Tensor:
    shard = initial_weights()
    opt = ShardOptimizer(shard, spec, CHUNK, **kw)
    for g in grads:
        opt.step(chunked(g))
    return shard


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- equivalence with torch.optim -------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_optimizer_matches_torch_over_50_steps(case):
    spec = CASES[case]
    grads = grad_sequence(STEPS)
    assert relative_error(run_shard(spec, grads), run_reference(spec, grads)) <= 1e-6


@pytest.mark.parametrize("case", CASES)
def test_forloop_implementation_is_bit_identical_to_torch(case):
    spec = CASES[case]
    grads = grad_sequence(STEPS)
    assert torch.equal(run_shard(spec, grads, impl="forloop"), run_reference(spec, grads))


@pytest.mark.parametrize("impl", ["auto", "forloop"])
@pytest.mark.parametrize("case", CASES)
def test_step_whole_is_step_without_the_checks(case, impl):
    # the server's request path: gradients checked on arrival, a scaled learning rate
    spec = CASES[case]
    grads = grad_sequence(8)
    shards = []
    for whole in (False, True):
        shard = initial_weights()
        opt = ShardOptimizer(shard, spec, CHUNK, impl=impl)
        for k, g in enumerate(grads):
            (opt.step_whole if whole else opt.step)(chunked(g), 1.0 / (1 + k % 3))
        shards.append((shard, opt.steps, opt.state_dict()["buffers"]))
    (a, steps_a, bufs_a), (b, steps_b, bufs_b) = shards
    assert torch.equal(a, b) and steps_a == steps_b == len(grads)
    assert bufs_a.keys() == bufs_b.keys() and all(torch.equal(bufs_a[k], bufs_b[k]) for k in bufs_a)
    assert not torch.equal(a, initial_weights())


@pytest.mark.parametrize("case", CASES)
def test_cpu_runs_the_fused_implementation(case):
    opt = ShardOptimizer(initial_weights(), CASES[case], CHUNK)
    assert opt.implementation == "fused"


def test_state_lives_in_flat_buffers_viewed_by_torch():
    spec = OptimizerSpec("adam", lr=1e-2, amsgrad=True)
    opt = ShardOptimizer(initial_weights(), spec, CHUNK)
    opt.step(chunked(grad_sequence(1)[0]))
    buffers = opt.state_dict()["buffers"]
    assert sorted(buffers) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    # white box: the per-chunk state torch is given is views of the flat buffers
    for i, (lo, hi) in enumerate(opt.chunks):
        for kind, flat in buffers.items():
            view = opt._views[kind][i]
            assert view.data_ptr() == flat[lo:].data_ptr() and view.numel() == hi - lo
        assert opt._step_views[i].dim() == 0
        assert opt._step_views[i].data_ptr() == opt._step_counts[i:].data_ptr()
    assert opt.state_dict()["param_step"] == 1.0
    assert opt.state_bytes() == 3 * N * 4 + len(opt.chunks) * 4


def test_sgd_momentum_buffer_moves_into_flat_buffer_after_first_step():
    spec = OptimizerSpec("sgd", lr=0.1, momentum=0.9, dampening=0.3)
    opt = ShardOptimizer(initial_weights(), spec, CHUNK)
    g = grad_sequence(1)[0]
    opt.step(chunked(g))
    assert torch.equal(opt.state_dict()["buffers"]["momentum_buffer"], g)  # torch: buf = grad


# -- learning rate scale ----------------------------------------------------


def test_lr_scale_half_of_lr_0_1_equals_lr_0_05():
    grads = grad_sequence(10)
    shard = initial_weights()
    opt = ShardOptimizer(shard, OptimizerSpec("sgd", lr=0.1, momentum=0.9), CHUNK)
    for g in grads:
        opt.step(chunked(g), lr_scale=0.5)
    expected = run_reference(OptimizerSpec("sgd", lr=0.05, momentum=0.9), grads)
    assert torch.equal(shard, expected)


def test_lr_scale_applies_to_one_step_only():
    spec = OptimizerSpec("adam", lr=1e-2)
    grads = grad_sequence(6)
    scales = [1.0, 0.5, 1.0, 0.25, 1 / 3, 1.0]
    shard = initial_weights()
    opt = ShardOptimizer(shard, spec, CHUNK, impl="forloop")
    for g, s in zip(grads, scales):
        opt.step(chunked(g), lr_scale=s)
    expected = run_reference(spec, grads, lrs=[spec.lr * s for s in scales])
    assert torch.equal(shard, expected)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_lr_scale_must_be_finite_and_positive(scale):
    opt = ShardOptimizer(initial_weights(), OptimizerSpec("sgd", lr=0.1), CHUNK)
    with pytest.raises(ValueError, match="lr_scale"):
        opt.step(chunked(grad_sequence(1)[0]), lr_scale=scale)
    assert opt.steps == 0


# -- checkpoints ------------------------------------------------------------


def snapshot(state: dict) -> dict:
    """What a checkpoint does: plain data, buffers copied out as bytes and back."""
    copy = json.loads(json.dumps({k: v for k, v in state.items() if k != "buffers"}))
    copy["buffers"] = {
        k: torch.from_numpy(np.frombuffer(v.numpy().tobytes(), dtype="<f4").copy())
        for k, v in state["buffers"].items()}
    return copy


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stop_at", [0, 1, 20])
def test_state_dict_round_trip_resumes_bit_identically(case, stop_at):
    spec = CASES[case]
    grads = grad_sequence(30)
    uninterrupted = run_shard(spec, grads)

    shard = initial_weights()
    first = ShardOptimizer(shard, spec, CHUNK)
    for g in grads[:stop_at]:
        first.step(chunked(g))
    saved, saved_shard = snapshot(first.state_dict()), shard.clone()
    first.step(chunked(grads[-1]))  # changes the live buffers, not the snapshot

    resumed_shard = saved_shard.clone()
    resumed = ShardOptimizer(resumed_shard, spec, CHUNK)
    resumed.load_state_dict(saved)
    assert resumed.steps == stop_at
    for g in grads[stop_at:]:
        resumed.step(chunked(g))
    assert torch.equal(resumed_shard, uninterrupted)


def test_state_dict_loads_into_an_optimizer_with_another_chunk_size():
    spec = OptimizerSpec("adam", lr=1e-2)
    grads = grad_sequence(10)
    shard = initial_weights()
    first = ShardOptimizer(shard, spec, CHUNK, impl="forloop")
    for g in grads[:4]:
        first.step(chunked(g))
    other = ShardOptimizer(shard, spec, 300, impl="forloop")
    other.load_state_dict(first.state_dict())
    for g in grads[4:]:
        other.step(list(g.split(300)))
    assert torch.equal(shard, run_reference(spec, grads))


def test_loading_state_resets_a_used_optimizer():
    spec = OptimizerSpec("sgd", lr=0.1, momentum=0.9, dampening=0.3)
    grads = grad_sequence(5)
    fresh = ShardOptimizer(initial_weights(), spec, CHUNK)
    saved = snapshot(fresh.state_dict())
    shard = initial_weights()
    used = ShardOptimizer(shard, spec, CHUNK)
    used.step(chunked(grads[0]))
    shard.copy_(initial_weights())
    used.load_state_dict(saved)
    for g in grads:
        used.step(chunked(g))
    assert torch.equal(shard, run_shard(spec, grads))


def test_state_dict_spec_is_plain_data():
    opt = ShardOptimizer(initial_weights(), CASES["adam_amsgrad"], CHUNK)
    state = opt.state_dict()
    assert json.loads(json.dumps(state["spec"])) == state["spec"]
    assert OptimizerSpec.from_dict(state["spec"]) == CASES["adam_amsgrad"]


def test_load_rejects_a_state_saved_with_another_spec():
    saved = ShardOptimizer(initial_weights(), OptimizerSpec("adam", lr=1e-2), CHUNK).state_dict()
    opt = ShardOptimizer(initial_weights(), OptimizerSpec("adam", lr=1e-3), CHUNK)
    with pytest.raises(ConfigError, match=r"lr: saved 0\.01, here 0\.001"):
        opt.load_state_dict(saved)


def test_load_rejects_a_state_for_another_shard_size():
    spec = OptimizerSpec("adam", lr=1e-2)
    saved = ShardOptimizer(torch.zeros(999), spec, CHUNK).state_dict()
    with pytest.raises(ValueError, match="999"):
        ShardOptimizer(initial_weights(), spec, CHUNK).load_state_dict(saved)


def test_load_rejects_a_buffer_of_the_wrong_shape_and_changes_nothing():
    spec = OptimizerSpec("adam", lr=1e-2)
    opt = ShardOptimizer(initial_weights(), spec, CHUNK)
    opt.step(chunked(grad_sequence(1)[0]))
    before = snapshot(opt.state_dict())
    bad = snapshot(opt.state_dict())
    bad["steps"] = 7
    bad["buffers"]["exp_avg_sq"] = torch.zeros(N - 1)
    with pytest.raises(ValueError, match=r"'exp_avg_sq'.*\(999,\)"):
        opt.load_state_dict(bad)
    assert opt.steps == 1
    for kind, b in opt.state_dict()["buffers"].items():
        assert torch.equal(b, before["buffers"][kind])


def test_load_rejects_missing_buffer_kinds():
    spec = OptimizerSpec("adam", lr=1e-2, amsgrad=True)
    saved = ShardOptimizer(initial_weights(), OptimizerSpec("adam", lr=1e-2), CHUNK).state_dict()
    saved["spec"] = spec.to_dict()
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        ShardOptimizer(initial_weights(), spec, CHUNK).load_state_dict(saved)


# -- gradients ----------------------------------------------------------------


def test_wrong_number_of_grads_raises_value_error_naming_counts():
    opt = ShardOptimizer(initial_weights(), OptimizerSpec("sgd", lr=0.1), CHUNK)
    with pytest.raises(ValueError, match="expected 6 gradient chunks.*got 5"):
        opt.step(chunked(grad_sequence(1)[0])[:5])
    assert opt.steps == 0


def test_grad_of_wrong_length_raises_value_error_naming_lengths():
    opt = ShardOptimizer(initial_weights(), OptimizerSpec("sgd", lr=0.1), CHUNK)
    grads = chunked(grad_sequence(1)[0])
    grads[-1] = torch.zeros(41)
    with pytest.raises(ValueError, match=r"chunk 5 \(elements \[960, 1000\)\) has shape \(41,\), expected \(40,\)"):
        opt.step(grads)
    assert opt.steps == 0


def test_grad_of_wrong_dtype_raises_value_error():
    opt = ShardOptimizer(initial_weights(), OptimizerSpec("sgd", lr=0.1), CHUNK)
    grads = [g.double() for g in chunked(grad_sequence(1)[0])]
    with pytest.raises(ValueError, match="float64"):
        opt.step(grads)


def read_only_chunks(flat: torch.Tensor) -> tuple[bytes, list[torch.Tensor]]:
    """Grads as a receiver sees them: non-writable views of one bytes object."""
    payload = flat.numpy().astype("<f4").tobytes()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        whole = torch.from_numpy(np.frombuffer(payload, dtype="<f4"))
    return payload, chunked(whole)


@pytest.mark.parametrize("impl", ["auto", "foreach", "forloop"])
@pytest.mark.parametrize("case", CASES)
def test_read_only_grads_work_and_are_not_modified(case, impl):
    spec = CASES[case]
    grads = grad_sequence(3)
    shard = initial_weights()
    opt = ShardOptimizer(shard, spec, CHUNK, impl=impl)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for g in grads:
            payload, views = read_only_chunks(g)
            original = bytes(payload)
            opt.step(views)
            assert payload == original
            assert torch.equal(torch.cat(views), g)
    assert torch.equal(shard, run_shard(spec, grads, impl=impl))


@pytest.mark.parametrize("case", ["sgd_momentum", "adam"])
def test_grads_are_not_kept_after_a_step(case):
    opt = ShardOptimizer(initial_weights(), CASES[case], CHUNK)
    for g in grad_sequence(2):  # sgd: the first step (buffers created) and a later one
        grads = [c.clone() for c in chunked(g)]
        refs = [weakref.ref(c) for c in grads]
        opt.step(grads)
        del grads
        gc.collect()
        assert all(r() is None for r in refs)
    assert all(p.grad is None for p in opt._params)


# -- the shard ----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_shard_is_updated_in_place(case):
    shard = initial_weights()
    ptr, view = shard.data_ptr(), shard[500:510]
    opt = ShardOptimizer(shard, CASES[case], CHUNK)
    for g in grad_sequence(3):
        opt.step(chunked(g))
    assert shard.data_ptr() == ptr
    assert not torch.equal(view, initial_weights()[500:510])
    assert opt.steps == 3


def test_empty_shard_counts_steps_and_holds_no_state():
    opt = ShardOptimizer(torch.zeros(0), OptimizerSpec("adam", lr=1e-3), CHUNK)
    opt.step([])
    assert opt.steps == 1 and opt.state_bytes() == 0


@pytest.mark.parametrize("shard", [torch.zeros(4, 4), torch.zeros(8, dtype=torch.float64),
                                   torch.zeros(16)[::2]])
def test_shard_must_be_flat_contiguous_fp32(shard):
    with pytest.raises(ValueError, match="1-D contiguous float32"):
        ShardOptimizer(shard, OptimizerSpec("sgd", lr=0.1), CHUNK)


@pytest.mark.parametrize("chunk", [0, -5, 1.5])
def test_chunk_elems_must_be_a_positive_int(chunk):
    with pytest.raises(ConfigError, match="chunk_elems"):
        ShardOptimizer(initial_weights(), OptimizerSpec("sgd", lr=0.1), chunk)


# -- segment steps ------------------------------------------------------------

# N=1000 in chunks of 192: six chunks, 0..5.  Each plan cuts one step into
# segments [a, b) of chunk indices; the order is the order they are applied.
SEGMENT_PLANS = {
    "two": [(0, 2), (2, 6)],
    "three": [(0, 1), (1, 4), (4, 6)],
    "three_shuffled": [(4, 6), (0, 1), (1, 4)],
    "one_chunk_each_reversed": [(k, k + 1) for k in reversed(range(6))],
}


def apply_segments(opt: ShardOptimizer, chunks: list[torch.Tensor],
                   plan: list[tuple[int, int]], lr_scale: float = 1.0) -> None:
    for k, (a, b) in enumerate(plan):
        opt.step(chunks[a:b], lr_scale, first=a, count=k == len(plan) - 1)


def run_segmented(spec: OptimizerSpec, grads: list[torch.Tensor], plan, **kw):
    shard = initial_weights()
    opt = ShardOptimizer(shard, spec, CHUNK, **kw)
    originals = [g.clone() for g in grads]
    for g in grads:
        apply_segments(opt, chunked(g), plan)
    assert all(torch.equal(g, o) for g, o in zip(grads, originals))  # grads only read
    return shard, opt


def run_full(spec: OptimizerSpec, grads: list[torch.Tensor], **kw):
    shard = initial_weights()
    opt = ShardOptimizer(shard, spec, CHUNK, **kw)
    for g in grads:
        opt.step(chunked(g))
    return shard, opt


def assert_same_state(a: ShardOptimizer, b: ShardOptimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key != "buffers":
            assert sa[key] == sb[key], key
    assert sa["buffers"].keys() == sb["buffers"].keys()
    for kind in sa["buffers"]:
        assert torch.equal(sa["buffers"][kind], sb["buffers"][kind]), kind


@pytest.mark.parametrize("impl", ["auto", "foreach", "forloop"])
@pytest.mark.parametrize("plan", ["two", "three"])
@pytest.mark.parametrize("case", CASES)
def test_a_step_in_segments_equals_a_full_step(case, plan, impl):
    spec = CASES[case]
    grads = grad_sequence(20)
    seg_shard, seg = run_segmented(spec, grads, SEGMENT_PLANS[plan], impl=impl)
    full_shard, full = run_full(spec, grads, impl=impl)
    assert torch.equal(seg_shard, full_shard)
    assert_same_state(seg, full)
    assert seg.steps == 20
    reference = run_reference(spec, grads)
    if impl == "forloop":
        assert torch.equal(seg_shard, reference)
    else:
        assert relative_error(seg_shard, reference) <= 1e-6


@pytest.mark.parametrize("plan", ["three_shuffled", "one_chunk_each_reversed"])
@pytest.mark.parametrize("case", CASES)
def test_segments_in_any_order_equal_a_full_step(case, plan):
    spec = CASES[case]
    grads = grad_sequence(10)
    seg_shard, seg = run_segmented(spec, grads, SEGMENT_PLANS[plan])
    full_shard, full = run_full(spec, grads)
    assert torch.equal(seg_shard, full_shard)
    assert_same_state(seg, full)


def test_segments_with_lr_scale_equal_a_scaled_full_step():
    spec = CASES["adam_amsgrad"]
    grads = grad_sequence(6)
    scales = [1.0, 0.5, 0.25, 1.0, 1 / 3, 2.0]
    seg_shard, full_shard = initial_weights(), initial_weights()
    seg = ShardOptimizer(seg_shard, spec, CHUNK)
    full = ShardOptimizer(full_shard, spec, CHUNK)
    for g, s in zip(grads, scales):
        apply_segments(seg, chunked(g), SEGMENT_PLANS["three"], lr_scale=s)
        full.step(chunked(g), lr_scale=s)
    assert torch.equal(seg_shard, full_shard)
    assert_same_state(seg, full)


def test_a_segment_updates_only_its_chunks_and_counts_only_when_asked():
    spec = CASES["adam"]
    shard = initial_weights()
    opt = ShardOptimizer(shard, spec, CHUNK)
    chunks = chunked(grad_sequence(1)[0])
    opt.step(chunks[1:3], first=1, count=False)
    assert opt.steps == 0
    changed = shard != initial_weights()
    assert changed[192:576].all() and not changed[:192].any() and not changed[576:].any()
    assert opt.state_dict()["param_step"] == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    opt.step(chunks[:1], first=0, count=False)
    opt.step(chunks[3:], first=3)
    assert opt.steps == 1
    assert opt.state_dict()["param_step"] == 1.0


def test_a_full_step_passed_as_first_0_counts_like_the_default():
    spec = CASES["sgd_momentum"]
    grads = grad_sequence(3)
    shard = initial_weights()
    opt = ShardOptimizer(shard, spec, CHUNK)
    for g in grads:
        opt.step(chunked(g), first=0)
    assert opt.steps == 3
    assert torch.equal(shard, run_full(spec, grads)[0])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stop_at", [0, 3])
def test_state_dict_taken_mid_step_resumes_bit_identically(case, stop_at):
    """Checkpoint after the first segment of step ``stop_at`` (step 0: SGD's
    momentum is initialized in some chunks only), restore into a fresh
    optimizer, apply the remaining segments and steps."""
    spec = CASES[case]
    plan = SEGMENT_PLANS["three_shuffled"]
    grads = grad_sequence(8)
    uninterrupted_shard, uninterrupted = run_segmented(spec, grads, plan)

    shard = initial_weights()
    first = ShardOptimizer(shard, spec, CHUNK)
    for g in grads[:stop_at]:
        apply_segments(first, chunked(g), plan)
    (a, b), rest = plan[0], plan[1:]
    first.step(chunked(grads[stop_at])[a:b], first=a, count=False)
    state = first.state_dict()
    if spec.has_step_counter:
        assert isinstance(state["param_step"], list) and len(state["param_step"]) == 6
    if spec.momentum and stop_at == 0:
        assert state["momentum_init"] == [False] * 4 + [True] * 2
    saved, saved_shard = snapshot(state), shard.clone()
    first.step(chunked(grads[-1])[:1], first=0, count=False)  # live state moves on

    resumed_shard = saved_shard.clone()
    resumed = ShardOptimizer(resumed_shard, spec, CHUNK)
    resumed.load_state_dict(saved)
    assert resumed.steps == stop_at
    chunks = chunked(grads[stop_at])
    for k, (a, b) in enumerate(rest):
        resumed.step(chunks[a:b], first=a, count=k == len(rest) - 1)
    for g in grads[stop_at + 1:]:
        apply_segments(resumed, chunked(g), plan)
    assert torch.equal(resumed_shard, uninterrupted_shard)
    assert_same_state(resumed, uninterrupted)


@pytest.mark.parametrize("case", ["adam", "sgd_momentum"])
def test_mid_step_state_does_not_load_into_another_chunking(case):
    spec = CASES[case]
    opt = ShardOptimizer(initial_weights(), spec, CHUNK)
    opt.step(chunked(grad_sequence(1)[0])[:2], first=0, count=False)
    saved = snapshot(opt.state_dict())
    other = ShardOptimizer(initial_weights(), spec, 300)
    before = snapshot(other.state_dict())
    with pytest.raises(ValueError, match="mid-step.*another chunking"):
        other.load_state_dict(saved)
    for kind, b in before["buffers"].items():
        assert torch.equal(other.state_dict()["buffers"][kind], b)
    assert other.state_dict()["param_step"] == before["param_step"]
    assert other.state_dict()["momentum_init"] == before["momentum_init"]


def test_state_between_steps_stays_a_single_number_and_flag():
    opt = ShardOptimizer(initial_weights(), CASES["sgd_momentum"], CHUNK)
    assert opt.state_dict()["momentum_init"] is False
    apply_segments(opt, chunked(grad_sequence(1)[0]), SEGMENT_PLANS["three"])
    assert opt.state_dict()["momentum_init"] is True and opt.state_dict()["param_step"] is None
    adam = ShardOptimizer(initial_weights(), CASES["adam"], CHUNK)
    apply_segments(adam, chunked(grad_sequence(1)[0]), SEGMENT_PLANS["three"])
    assert adam.state_dict()["param_step"] == 1.0 and adam.state_dict()["momentum_init"] is None


@pytest.mark.parametrize("stop_at", [0, 2])
def test_state_saved_without_momentum_init_loads_as_initialized_after_a_step(stop_at):
    spec = CASES["sgd_momentum_dampening"]
    grads = grad_sequence(5)
    shard = initial_weights()
    first = ShardOptimizer(shard, spec, CHUNK)
    for g in grads[:stop_at]:
        first.step(chunked(g))
    old = snapshot(first.state_dict())
    del old["momentum_init"]  # a state saved before the key existed
    resumed = ShardOptimizer(shard, spec, CHUNK)
    resumed.load_state_dict(old)
    for g in grads[stop_at:]:
        resumed.step(chunked(g))
    assert torch.equal(shard, run_full(spec, grads)[0])


@pytest.mark.parametrize("bad", [
    dict(param_step=[1.0] * 5),
    dict(param_step=[1.0] * 5 + [-1.0]),
    dict(param_step=[1.0] * 5 + [True]),
    dict(param_step="1"),
])
def test_load_rejects_bad_per_chunk_step_counters_and_changes_nothing(bad):
    opt = ShardOptimizer(initial_weights(), CASES["adam"], CHUNK)
    opt.step(chunked(grad_sequence(1)[0]))
    state = snapshot(opt.state_dict())
    state["buffers"] = {k: torch.zeros(N) for k in state["buffers"]}
    state.update(bad)
    with pytest.raises(ValueError, match="param_step"):
        opt.load_state_dict(state)
    assert opt.state_dict()["param_step"] == 1.0
    assert opt.state_dict()["buffers"]["exp_avg"].abs().sum() > 0


@pytest.mark.parametrize("case, momentum_init", [
    ("sgd_momentum", [True] * 5), ("sgd_momentum", [1] * 6), ("sgd_momentum", "yes"),
    ("sgd_momentum", None), ("sgd_plain", True), ("adam", False),
])
def test_load_rejects_bad_momentum_flags(case, momentum_init):
    opt = ShardOptimizer(initial_weights(), CASES[case], CHUNK)
    state = snapshot(opt.state_dict())
    state["momentum_init"] = momentum_init
    with pytest.raises(ValueError, match="momentum_init"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("first, n_grads, message", [
    (-1, 1, r"first=-1 is out of range: the shard has 6 chunks \(0 \.\. 5\)"),
    (6, 1, r"first=6 is out of range"),
    (True, 1, r"first must be an int chunk index, got True"),
    (1.0, 1, r"first must be an int chunk index, got 1\.0"),
    ("0", 1, r"first must be an int chunk index"),
    (4, 3, r"segment starting at chunk 4 takes 1 to 2 gradient chunks .*got 3"),
    (0, 7, r"segment starting at chunk 0 takes 1 to 6 gradient chunks .*got 7"),
    (2, 0, r"segment starting at chunk 2 takes 1 to 4 gradient chunks .*got 0"),
])
def test_bad_segment_raises_value_error_and_changes_nothing(first, n_grads, message):
    shard = initial_weights()
    opt = ShardOptimizer(shard, CASES["adam"], CHUNK)
    opt.step(chunked(grad_sequence(1)[0]))
    before_shard, before = shard.clone(), snapshot(opt.state_dict())
    g = chunked(grad_sequence(2)[1])
    grads = (g + g)[first:first + n_grads] if isinstance(first, int) else g[:n_grads]
    with pytest.raises(ValueError, match=message):
        opt.step(grads, first=first, count=False)
    assert torch.equal(shard, before_shard) and opt.steps == 1
    after = opt.state_dict()
    assert after["param_step"] == before["param_step"]
    for kind, b in before["buffers"].items():
        assert torch.equal(after["buffers"][kind], b)


def test_segment_gradient_of_wrong_length_names_the_chunk_and_changes_nothing():
    shard = initial_weights()
    opt = ShardOptimizer(shard, CASES["sgd_momentum"], CHUNK)
    grads = chunked(grad_sequence(1)[0])[3:]
    grads[1] = torch.zeros(191)
    with pytest.raises(ValueError, match=r"chunk 4 \(elements \[768, 960\)\) has shape \(191,\)"):
        opt.step(grads, first=3)
    assert torch.equal(shard, initial_weights()) and opt.steps == 0
    assert opt.state_dict()["momentum_init"] is False


def test_count_must_be_a_bool():
    opt = ShardOptimizer(initial_weights(), CASES["sgd_plain"], CHUNK)
    with pytest.raises(ValueError, match="count must be True or False"):
        opt.step(chunked(grad_sequence(1)[0]), count=1)
    assert torch.equal(opt._shard, initial_weights()) and opt.steps == 0


def test_empty_shard_takes_empty_segments():
    opt = ShardOptimizer(torch.zeros(0), CASES["adam"], CHUNK)
    opt.step([], first=0, count=False)
    assert opt.steps == 0
    opt.step([], first=0)
    assert opt.steps == 1
    with pytest.raises(ValueError, match="shard is empty"):
        opt.step([torch.zeros(1)], first=0)
    with pytest.raises(ValueError, match="shard is empty"):
        opt.step([], first=1)


# -- no torch._dynamo -----------------------------------------------------------

_NO_DYNAMO_PROBE = """
import sys
import torch
from ps.optim import OptimizerSpec, ShardOptimizer
specs = [OptimizerSpec("sgd", lr=0.1), OptimizerSpec("sgd", lr=0.1, momentum=0.9),
         OptimizerSpec("adam", lr=1e-3, amsgrad=True), OptimizerSpec("adamw", lr=1e-3),
         OptimizerSpec("adagrad", lr=0.1)]
for spec in specs:
    for impl in ("auto", "fused", "foreach", "forloop"):
        opt = ShardOptimizer(torch.zeros(10), spec, 4, impl=impl)
        g = list(torch.ones(10).split(4))
        opt.step(g)
        opt.step(g[1:], first=1, count=False)
        opt.step(g[:1], 0.5, first=0)
        opt.load_state_dict(opt.state_dict())
print("steps", opt.steps)
print("dynamo", sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
"""


def test_shard_optimizer_does_not_import_torch_dynamo():
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _NO_DYNAMO_PROBE], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["steps 2", "dynamo []"], out.stdout


# -- OptimizerSpec ----------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="rmsprop", lr=0.1), r"'rmsprop'; known: sgd, adam, adamw, adagrad"),
    (dict(name="sgd", lr=-0.1), r"lr must be > 0, got -0\.1"),
    (dict(name="sgd", lr=0), r"lr must be > 0, got 0"),
    (dict(name="adam", lr=float("nan")), r"lr must be finite, got nan"),
    (dict(name="sgd", lr="0.1"), r"lr must be a number, got '0\.1'"),
    (dict(name="sgd", lr=0.1, nesterov=True), r"nesterov=True needs momentum > 0.*momentum=0\.0"),
    (dict(name="sgd", lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), r"dampening=0\.1"),
    (dict(name="sgd", lr=0.1, momentum=-0.5), r"momentum must be >= 0, got -0\.5"),
    (dict(name="sgd", lr=0.1, dampening=2.0), r"dampening must be in \[0, 1\], got 2\.0"),
    (dict(name="sgd", lr=0.1, weight_decay=-1e-4), r"weight_decay must be >= 0, got -0\.0001"),
    (dict(name="adam", lr=1e-3, betas=(0.9, 1.5)), r"betas must be in \[0, 1\), got \(0\.9, 1\.5\)"),
    (dict(name="adam", lr=1e-3, betas=(0.9,)), r"betas must be a pair of numbers, got \(0\.9,\)"),
    (dict(name="adam", lr=1e-3, eps=-1.0), r"eps must be >= 0, got -1\.0"),
    (dict(name="adam", lr=1e-3, amsgrad=1), r"amsgrad must be True or False, got 1"),
    (dict(name="adam", lr=1e-3, momentum=0.9), r"momentum=0\.9 does not apply to optimizer 'adam'"),
    (dict(name="sgd", lr=0.1, eps=1e-8), r"eps=1e-08 does not apply to optimizer 'sgd'"),
    (dict(name="adagrad", lr=0.1, lr_decay=-0.1), r"lr_decay must be >= 0, got -0\.1"),
    (dict(name="adagrad", lr=0.1, initial_accumulator_value=-1), r"initial_accumulator_value must be >= 0, got -1"),
])
def test_bad_spec_raises_config_error_naming_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OptimizerSpec(**kwargs)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        OptimizerSpec("sgd", lr=-1.0)


def test_spec_defaults_are_torchs():
    assert OptimizerSpec("adamw", lr=1e-3).weight_decay == 0.01
    assert OptimizerSpec("adam", lr=1e-3).weight_decay == 0.0
    assert OptimizerSpec("adam", lr=1e-3).eps == 1e-8
    assert OptimizerSpec("adagrad", lr=1e-2).eps == 1e-10
    assert OptimizerSpec("adamw", lr=1e-3) == OptimizerSpec("adamw", lr=1e-3, weight_decay=0.01)
    assert OptimizerSpec("adamw", lr=1e-3, weight_decay=0.0).weight_decay == 0.0


@pytest.mark.parametrize("case", CASES)
def test_spec_round_trips_through_json(case):
    spec = CASES[case]
    assert OptimizerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_spec_dict_holds_only_fields_that_apply():
    assert OptimizerSpec("adagrad", lr=0.1).to_dict() == {
        "name": "adagrad", "lr": 0.1, "lr_decay": 0.0, "weight_decay": 0.0,
        "initial_accumulator_value": 0.0, "eps": 1e-10}


def test_from_dict_rejects_unknown_keys_naming_them():
    with pytest.raises(ConfigError, match=r"unknown keys \['beta', 'foo'\]"):
        OptimizerSpec.from_dict({"name": "adam", "lr": 1e-3, "beta": 0.9, "foo": 1})


def test_from_dict_requires_name_and_lr():
    with pytest.raises(ConfigError, match=r"lacks required keys \['lr'\]"):
        OptimizerSpec.from_dict({"name": "adam"})


# -- the fused kernels called directly ----------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_calling_the_fused_kernel_directly_changes_no_bit(name):
    spec = CASES[name]
    runs = []
    for direct in (False, True):
        w = initial_weights()
        opt = ShardOptimizer(w, spec, CHUNK, impl="fused", direct=direct)
        for k, g in enumerate(grad_sequence(12)):
            chunks = chunked(g)
            if k % 3 == 2:                       # some steps in two segments
                opt.step(chunks[:2], 1.0, first=0, count=False)
                opt.step(chunks[2:], 1.0, first=2)
            else:
                opt.step(chunks, 0.5 if k % 4 == 1 else 1.0)
        runs.append((w, opt.state_dict()))
    (w_a, st_a), (w_b, st_b) = runs
    assert torch.equal(w_a, w_b)
    for kind in st_a["buffers"]:
        assert torch.equal(st_a["buffers"][kind], st_b["buffers"][kind])
    assert st_a["param_step"] == st_b["param_step"]


def test_the_direct_path_is_used_only_where_it_was_checked_to_match(monkeypatch):
    import ps.optim as optim
    spec = OptimizerSpec("sgd", lr=0.1, momentum=0.5)
    monkeypatch.setattr(optim, "_DIRECT_WORKS", {})
    assert ShardOptimizer(torch.zeros(10), spec, 4, impl="fused")._direct
    assert not ShardOptimizer(torch.zeros(10), spec, 4, impl="foreach")._direct
    assert not ShardOptimizer(torch.zeros(10), OptimizerSpec("adagrad", lr=0.1), 4, impl="fused")._direct

    def changed(*args, **kwargs):                # as if another torch release changed the op
        raise TypeError("_fused_sgd_() got an unexpected keyword argument")
    monkeypatch.setattr(optim, "_DIRECT_WORKS", {})
    monkeypatch.setattr(torch, "_fused_sgd_", changed)
    opt = ShardOptimizer(torch.zeros(10), spec, 4, impl="fused")
    assert not opt._direct


def test_a_gradient_that_requires_grad_is_applied_without_recording_anything():
    w = initial_weights()
    opt = ShardOptimizer(w, OptimizerSpec("sgd", lr=0.1), CHUNK)
    g = torch.ones(N, requires_grad=True)
    opt.step([c for c in g.split(CHUNK)])
    assert not w.requires_grad and w.grad_fn is None
    assert torch.allclose(w, initial_weights() - 0.1)
