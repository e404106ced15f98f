"""Pure tests of the partition plan (common.plan).

What ``PartitionPlan.build`` guarantees, with N elements, S servers, alignment
a and U = ceil(N / a) alignment units:

* ``bounds[k] = floor(U * k / S) * a`` for k < S and ``bounds[S] = N``: the
  ranges are contiguous, cover [0, N) exactly, and every boundary except the
  last is a multiple of a;
* range k < S-1 holds floor(U/S) or ceil(U/S) whole units, the last range
  holds ceil(U/S) units less the padding U*a - N (0 <= padding < a);
* hence any two range sizes differ by at most a, and every size lies strictly
  within a of the mean N/S  (|size - N/S| < a);
* the plan and its hash are a pure function of the ordered
  (name, shape, dtype) list, S, a and frame_elems.
"""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError
from common.plan import (
    DEFAULT_ALIGN,
    DEFAULT_FRAME_ELEMS,
    PARAM_DTYPES,
    PartitionPlan,
    frame_slices,
    specs_of_module,
)

MANY = settings(max_examples=120, deadline=None)

SPECS = [("fc1.weight", (4, 3), "float32"), ("fc1.bias", (4,), "float32"),
         ("fc2.weight", (2, 5), "float32")]


@st.composite
def models(draw, max_tensors: int = 10, max_dim: int = 70):
    """An ordered (name, shape, dtype) list of a random model."""
    count = draw(st.integers(1, max_tensors))
    specs = []
    for i in range(count):
        shape = tuple(draw(st.lists(st.integers(0, max_dim), max_size=3)))
        specs.append((f"layer{i}.p", shape, draw(st.sampled_from(PARAM_DTYPES))))
    return specs


@st.composite
def plans(draw):
    align = draw(st.sampled_from([1, 3, 4, 16, 64]))
    frame_elems = align * draw(st.integers(1, 8))
    return PartitionPlan.build(draw(models()), draw(st.integers(1, 8)), align, frame_elems)


def sizes(plan: PartitionPlan) -> list[int]:
    return [plan.size_of(k) for k in range(plan.num_servers)]


# -------------------------------------------------------------- determinism
def test_the_same_specs_give_the_same_plan_and_hash():
    a = PartitionPlan.build(SPECS, 3, 4, 8)
    b = PartitionPlan.build([(n, list(s), d) for n, s, d in SPECS], 3, 4, 8)
    assert a == b and a.bounds == b.bounds and a.hash == b.hash


def test_the_hash_matches_the_documented_worked_example():
    # docs/PROTOCOL.md, "Plan hash": a client in another language must get this.
    plan = PartitionPlan.build(SPECS, 3, align=4, frame_elems=8)
    assert plan.bounds == (0, 8, 16, 26)
    assert plan.hash == 0x4FB8748D61AF0827 == 5744469475289139239


def test_torch_dtypes_are_named_like_their_strings():
    a = PartitionPlan.build([("w", (3,), torch.bfloat16)], 1)
    assert a == PartitionPlan.build([("w", (3,), "bfloat16")], 1)


@pytest.mark.parametrize("change", [
    lambda s, k: (list(reversed(s)), k),                                          # order
    lambda s, k: ([("fc1.weight", (3, 4), "float32"), *s[1:]], k),               # shape, same numel
    lambda s, k: ([("fc1.weight", (12,), "float32"), *s[1:]], k),                # rank
    lambda s, k: ([("fc1.weight", (4, 3), "float16"), *s[1:]], k),               # dtype
    lambda s, k: ([("fc1.w", (4, 3), "float32"), *s[1:]], k),                    # name
    lambda s, k: (s[:-1], k),                                                     # one tensor fewer
    lambda s, k: (s, {**k, "num_servers": 2}),                                    # server count
    lambda s, k: (s, {**k, "align": 2}),                                          # alignment
    lambda s, k: (s, {**k, "frame_elems": 16}),                                   # frame size
], ids=["order", "shape", "rank", "dtype", "name", "tensors", "servers", "align", "frame"])
def test_any_change_of_the_inputs_changes_the_hash(change):
    base = {"num_servers": 3, "align": 4, "frame_elems": 8}
    specs, kwargs = change(SPECS, base)
    assert PartitionPlan.build(specs, **kwargs).hash != PartitionPlan.build(SPECS, **base).hash


@MANY
@given(plans())
def test_the_hash_is_a_non_negative_63_bit_integer(plan):
    assert 0 <= plan.hash < 1 << 63


# ------------------------------------------------------------------ balance
@MANY
@given(plans())
def test_bounds_cover_the_vector_and_are_aligned_except_the_last(plan):
    b = plan.bounds
    assert len(b) == plan.num_servers + 1
    assert b[0] == 0 and b[-1] == plan.total == sum(t.numel for t in plan.tensors)
    assert all(x <= y for x, y in zip(b, b[1:]))
    assert all(x % plan.align == 0 for x in b[:-1])


@MANY
@given(plans())
def test_range_sizes_differ_by_at_most_one_alignment_unit(plan):
    s = sizes(plan)
    assert sum(s) == plan.total
    assert max(s) - min(s) <= plan.align
    # ... so each lies strictly within one unit of the mean total / S.
    assert all(abs(size * plan.num_servers - plan.total) < plan.align * plan.num_servers
               for size in s)


@MANY
@given(plans())
def test_range_sizes_follow_the_documented_arithmetic(plan):
    n, S, a = plan.total, plan.num_servers, plan.align
    units = math.ceil(n / a)
    assert list(plan.bounds) == [units * k // S * a for k in range(S)] + [n]
    small, big = units // S, -(-units // S)
    for size in sizes(plan)[:-1]:
        assert size in (small * a, big * a)
    assert big * a - a < sizes(plan)[-1] <= big * a or n == 0


@pytest.mark.parametrize("numels,S,align,expected", [
    ([26], 3, 4, [8, 8, 10]),            # last range holds the padding remainder
    ([256], 4, 64, [64, 64, 64, 64]),    # exact fit
    ([10], 4, 64, [0, 0, 0, 10]),        # fewer units than servers: early ranges empty
    ([0, 0], 3, 64, [0, 0, 0]),          # no elements at all
    ([193], 2, 64, [128, 65]),           # 4 units, 2 each; the last loses 63 to padding
    ([192], 2, 64, [64, 128]),           # 3 units: 1 + 2, the bound max - min <= align is tight
    ([1000], 1, 64, [1000]),             # one server holds everything
])
def test_range_sizes_of_small_cases(numels, S, align, expected):
    specs = [(f"t{i}", (n,), "float32") for i, n in enumerate(numels)]
    assert sizes(PartitionPlan.build(specs, S, align, align)) == expected


# -------------------------------------------------------- straddling tensors
def flatten(plan: PartitionPlan, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    tensors = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in plan.tensors}
    flat = np.concatenate([tensors[t.name].ravel() for t in plan.tensors] + [np.empty(0, np.float32)])
    return tensors, flat


@MANY
@given(plans(), st.integers(0, 2**32 - 1))
def test_every_tensor_reassembles_exactly_from_the_pieces_of_all_servers(plan, seed):
    tensors, flat = flatten(plan, np.random.default_rng(seed))
    shards = [flat[lo:hi].copy() for lo, hi in (plan.range_of(k) for k in range(plan.num_servers))]
    rebuilt = {t.name: np.full(t.numel, np.nan, np.float32) for t in plan.tensors}
    written = {t.name: np.zeros(t.numel, int) for t in plan.tensors}
    for k, shard in enumerate(shards):
        lo, _ = plan.range_of(k)
        for p in plan.pieces_of(k):
            assert p.tensor_hi - p.tensor_lo == p.flat_hi - p.flat_lo > 0
            rebuilt[p.name][p.tensor_lo:p.tensor_hi] = shard[p.flat_lo - lo:p.flat_hi - lo]
            written[p.name][p.tensor_lo:p.tensor_hi] += 1
    for t in plan.tensors:
        assert (written[t.name] == 1).all(), f"{t.name} not covered exactly once"
        np.testing.assert_array_equal(rebuilt[t.name].reshape(t.shape), tensors[t.name])


def test_a_large_tensor_straddles_several_servers():
    plan = PartitionPlan.build([("a", (10,), "float32"), ("big", (100, 10), "float32"),
                                ("c", (7,), "float32")], 4, 64, 64)
    holders = [k for k in range(4) if any(p.name == "big" for p in plan.pieces_of(k))]
    assert holders == [0, 1, 2, 3]
    pieces = [p for k in holders for p in plan.pieces_of(k) if p.name == "big"]
    assert [(p.tensor_lo, p.tensor_hi) for p in pieces] == [(0, 246), (246, 502), (502, 758),
                                                           (758, 1000)]


def test_tensor_offsets_follow_the_given_order():
    plan = PartitionPlan.build(SPECS, 1)
    assert [(t.offset, t.end) for t in plan.tensors] == [(0, 12), (12, 16), (16, 26)]


# ------------------------------------------------------------------- frames
@MANY
@given(plans())
def test_frames_of_cover_each_range_exactly(plan):
    for k in range(plan.num_servers):
        frames, n = plan.frames_of(k), plan.size_of(k)
        assert len(frames) == math.ceil(n / plan.frame_elems)
        assert [lo for lo, _ in frames] == list(range(0, n, plan.frame_elems))
        assert all(b == c for (_, b), (c, _) in zip(frames, frames[1:]))
        assert all(hi - lo == plan.frame_elems for lo, hi in frames[:-1])
        if frames:
            assert frames[-1][1] == n and 0 < frames[-1][1] - frames[-1][0] <= plan.frame_elems


def test_zero_elements_are_zero_frames():
    assert frame_slices(0, 64) == []
    assert frame_slices(130, 64) == [(0, 64), (64, 128), (128, 130)]
    assert frame_slices(128, 64) == [(0, 64), (64, 128)]


def test_range_of_rejects_a_rank_outside_the_plan():
    plan = PartitionPlan.build(SPECS, 3)
    for rank in (-1, 3):
        with pytest.raises(ConfigError, match=repr(rank)):
            plan.range_of(rank)


# --------------------------------------------------------------------- wire
@MANY
@given(plans())
def test_to_wire_and_from_wire_round_trip_through_msgpack(plan):
    wire = msgpack.unpackb(msgpack.packb(plan.to_wire(), use_bin_type=True), raw=False)
    assert PartitionPlan.from_wire(wire) == plan


def test_from_wire_rejects_a_tampered_hash():
    wire = PartitionPlan.build(SPECS, 3).to_wire()
    wire["hash"] ^= 1
    with pytest.raises(ConfigError, match="does not match"):
        PartitionPlan.from_wire(wire)


def test_from_wire_rejects_tampered_contents_under_the_old_hash():
    wire = PartitionPlan.build(SPECS, 3).to_wire()
    wire["tensors"][0][1] = [3, 4]
    with pytest.raises(ConfigError, match="does not match"):
        PartitionPlan.from_wire(wire)


@pytest.mark.parametrize("mangle", [
    lambda w: w.pop("hash"),
    lambda w: w.pop("tensors"),
    lambda w: w.update(tensors=[["a", [3]]]),
    lambda w: w.update(tensors=7),
    lambda w: w.update(servers="three"),
    lambda w: w.update(hash=None),
], ids=["no-hash", "no-tensors", "short-spec", "tensors-not-list", "servers-not-int", "hash-nil"])
def test_from_wire_rejects_a_malformed_description(mangle):
    wire = PartitionPlan.build(SPECS, 3).to_wire()
    mangle(wire)
    with pytest.raises(ConfigError):
        PartitionPlan.from_wire(wire)


@pytest.mark.parametrize("not_a_dict", [None, [], "plan", 3])
def test_from_wire_rejects_something_that_is_not_a_description(not_a_dict):
    with pytest.raises(ConfigError):
        PartitionPlan.from_wire(not_a_dict)


# --------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("specs,kwargs,named", [
    (SPECS, {"num_servers": 0}, "0"),
    (SPECS, {"num_servers": -2}, "-2"),
    (SPECS, {"num_servers": 2.0}, "2.0"),
    ([("a", (3,), "float32"), ("a", (4,), "float32")], {"num_servers": 1}, "'a'"),
    ([("a", (3, -3), "float32")], {"num_servers": 1}, "-3"),
    ([("a", (3, 2.0), "float32")], {"num_servers": 1}, "2.0"),
    ([("a", (3,), "int8")], {"num_servers": 1}, "'int8'"),
    ([("a", (3,), "torch.int64")], {"num_servers": 1}, "'int64'"),
    ([("", (3,), "float32")], {"num_servers": 1}, "''"),
    ([("a", (3,))], {"num_servers": 1}, "('a', (3,))"),
    ([], {"num_servers": 1}, "at least one tensor"),
    (SPECS, {"num_servers": 1, "align": 0}, "0"),
    (SPECS, {"num_servers": 1, "align": 64, "frame_elems": 100}, "100"),
    (SPECS, {"num_servers": 1, "align": 64, "frame_elems": 0}, "0"),
], ids=["zero-servers", "negative-servers", "float-servers", "duplicate-name", "negative-dim",
        "float-dim", "unknown-dtype", "integer-torch-dtype", "empty-name", "short-spec",
        "no-tensors", "zero-align", "unaligned-frame", "zero-frame"])
def test_build_rejects_bad_input_with_a_config_error_naming_the_value(specs, kwargs, named):
    with pytest.raises(ConfigError) as info:
        PartitionPlan.build(specs, **kwargs)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)


def test_build_rejects_a_shape_that_is_not_a_sequence():
    with pytest.raises(ConfigError):
        PartitionPlan.build([("a", 5, "float32")], 1)


def test_build_rejects_a_boolean_server_count():
    with pytest.raises(ConfigError):
        PartitionPlan.build(SPECS, True)


def test_defaults_are_a_64_element_alignment_and_one_mib_frames():
    plan = PartitionPlan.build(SPECS, 1)
    assert plan.align == DEFAULT_ALIGN == 64
    assert plan.frame_elems == DEFAULT_FRAME_ELEMS == 1 << 18


# ---------------------------------------------------------- torch modules
class TiedLM(torch.nn.Module):
    """A tiny language model whose output layer shares the embedding matrix."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 4)
        self.hidden = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.out = torch.nn.Linear(4, 11, bias=False)
        self.out.weight = self.emb.weight


def test_specs_of_module_lists_a_shared_parameter_once_under_its_first_name():
    specs = specs_of_module(TiedLM())
    assert specs == [("emb.weight", (11, 4), "float32"), ("hidden.weight", (4, 4), "float32"),
                     ("hidden.bias", (4,), "float32"), ("norm.weight", (4,), "float32"),
                     ("norm.bias", (4,), "float32")]


def test_specs_of_module_follow_state_dict_order():
    model = TiedLM()
    names = [n for n, _, _ in specs_of_module(model)]
    assert names == [k for k in model.state_dict() if k in set(names)]
    assert "out.weight" in model.state_dict() and "out.weight" not in names


def test_specs_of_module_name_dtypes_without_the_torch_prefix_and_build_a_plan():
    model = TiedLM().to(torch.bfloat16)
    specs = specs_of_module(model)
    assert {d for _, _, d in specs} == {"bfloat16"}
    plan = PartitionPlan.build(specs, 2)
    assert plan.total == sum(p.numel() for p in model.parameters()) == 44 + 20 + 8
