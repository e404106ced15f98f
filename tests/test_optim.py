"""ShardOptimizer runs stock torch.optim over a chunked flat shard.

The reference everywhere is the stock torch.optim class with default settings
(what a user gets) on one ordinary tensor, fed the same gradients.
"""
from __future__ import annotations

import json
import warnings

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
    torch_state = opt._optimizer.state  # white box: no state outside the flat buffers
    for (lo, hi), p in zip(opt.chunks, opt._params):
        for kind, flat in buffers.items():
            assert torch_state[p][kind].data_ptr() == flat[lo:].data_ptr()
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


@pytest.mark.parametrize("case", ["sgd_momentum_dampening", "adam_amsgrad", "adamw", "adagrad"])
def test_read_only_grads_work_and_are_not_modified(case):
    spec = CASES[case]
    grads = grad_sequence(3)
    shard = initial_weights()
    opt = ShardOptimizer(shard, spec, CHUNK)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for g in grads:
            payload, views = read_only_chunks(g)
            original = bytes(payload)
            opt.step(views)
            assert payload == original
            assert torch.equal(torch.cat(views), g)
    assert torch.equal(shard, run_shard(spec, grads))


def test_grads_are_not_kept_after_a_step():
    opt = ShardOptimizer(initial_weights(), CASES["adam"], CHUNK)
    opt.step(chunked(grad_sequence(1)[0]))
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
