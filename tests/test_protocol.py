"""Pure tests of the wire codec (common.protocol): no sockets, no clocks.

The codec must be an exact inverse pair on good messages, byte-exact against
the written specification (docs/PROTOCOL.md), and defensive on bad input: a
bad message raises :class:`ProtocolError` with the right ``code`` and nothing
else, whatever the bytes.
"""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import ErrorCode, PlanMismatchError, ProtocolError
from common.plan import PartitionPlan, frame_slices
from common.protocol import (
    DATA_TYPES,
    ELEM_BYTES,
    OPTIONAL,
    REPLY_TO,
    REQUEST_TYPES,
    SCHEMA,
    _SIGNED,
    VERSION,
    WIRE_DTYPE,
    Limits,
    Message,
    MsgType,
    check_layout,
    check_plan,
    decode,
    encode,
    error_frames,
    payload,
)

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

PLAN = PartitionPlan.build(
    [("emb.weight", (50, 8), "float32"), ("fc.weight", (8, 8), "float32"),
     ("fc.bias", (8,), "float32")],
    num_servers=2, align=64, frame_elems=128)
PH = PLAN.hash
N = PLAN.size_of(0)  # elements in server 0's range; several frames of 128

#: One realistic header per message type (without v and t).
HEADERS: dict[MsgType, dict] = {
    MsgType.HELLO: {"rid": 1, "w": 3, "inc": 1_700_000_000_123, "plan": PLAN.to_wire(), "ph": PH},
    MsgType.HELLO_OK: {"rid": 1, "rank": 0, "lo": 0, "hi": N, "ph": PH, "step": 0,
                       "min_clock": -1, "start_clock": 0, "initialized": False,
                       "sinc": 42, "staleness": -1},
    MsgType.INIT: {"rid": 2, "w": 3, "inc": 1_700_000_000_123, "ph": PH, "n": N},
    MsgType.INIT_OK: {"rid": 2, "accepted": True},
    MsgType.PUSH: {"rid": 3, "w": 3, "inc": 1_700_000_000_123, "seq": 17, "clk": 5,
                   "ph": PH, "n": N, "tick": True},
    MsgType.PUSH_OK: {"rid": 3, "step": 88, "dup": False},
    MsgType.PULL: {"rid": 4, "w": 3, "clk": 6, "ph": PH, "dl": 30_000},
    MsgType.PULL_OK: {"rid": 4, "min_clock": 4, "step": 88, "n": N},
    MsgType.CLOCK: {"rid": 5, "w": 3, "inc": 1_700_000_000_123, "clk": 6},
    MsgType.CLOCK_OK: {"rid": 5, "min_clock": 5},
    MsgType.STATS: {"rid": 6},
    MsgType.STATS_OK: {"rid": 6, "stats": {"pushes": 120, "pulls": 31, "parked": 0,
                                            "staleness_hist": [10, 4, 1], "lr": 0.01}},
    MsgType.SHUTDOWN: {"rid": 7},
    MsgType.SHUTDOWN_OK: {"rid": 7},
    MsgType.HEARTBEAT: {"rid": 8, "w": 3, "inc": 1_700_000_000_123},
    MsgType.HEARTBEAT_OK: {"rid": 8, "min_clock": 5, "sinc": 42},
    MsgType.REGISTER: {"rid": 9, "role": "worker", "want": -1, "inc": 5, "endpoint": "",
                       "host": "hostA", "pid": 4242, "version": "0.1.0"},
    MsgType.REGISTER_OK: {"rid": 9, "rank": 2, "job": {"num_servers": 2, "staleness": -1}},
    MsgType.ADDRESSES: {"rid": 10, "dl": 5000},
    MsgType.ADDRESSES_OK: {"rid": 10, "servers": ["tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"]},
    MsgType.BARRIER: {"rid": 11, "name": "finished", "role": "worker", "rank": 1, "dl": 60000},
    MsgType.BARRIER_OK: {"rid": 11, "members": [0, 1, 2]},
    MsgType.BEAT: {"rid": 12, "role": "server", "rank": 0, "inc": 9},
    MsgType.BEAT_OK: {"rid": 12, "state": "running", "dead_workers": []},
    MsgType.DONE: {"rid": 13, "role": "worker", "rank": 1, "inc": 5, "result": {"clock": 100}},
    MsgType.DONE_OK: {"rid": 13},
    MsgType.STATUS: {"rid": 14},
    MsgType.STATUS_OK: {"rid": 14, "status": {"state": "running"}},
    MsgType.ECHO: {"rid": 15, "n": N},
    MsgType.ECHO_OK: {"rid": 15, "n": N, "time": 1_790_000_000.25},
    MsgType.CHECKPOINT: {"rid": 16},
    MsgType.CHECKPOINT_OK: {"rid": 16, "path": "/ckpt/server-0/ckpt-000000000120-000003", "step": 120},
    MsgType.LEAVE: {"rid": 17, "role": "worker", "rank": 1, "inc": 5, "why": "DeadlineExceeded: no server"},
    MsgType.LEAVE_OK: {"rid": 17, "left": True},
    MsgType.ERROR: {"rid": 4, "code": int(ErrorCode.STALE_TIMEOUT),
                    "msg": "read at clock 6 not served within 30000 ms",
                    "detail": {"blockers": [0, 2]}},
}


def vector(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(WIRE_DTYPE)


def data_frames(vec: np.ndarray, frame_elems: int = PLAN.frame_elems) -> list[np.ndarray]:
    """The plan's frame cut of ``vec``: numpy views, as a sender passes them to encode."""
    return [vec[lo:hi] for lo, hi in frame_slices(len(vec), frame_elems)]


def on_the_wire(frames: list) -> list[bytes]:
    """What a receiver gets: every frame as its own bytes object."""
    return [bytes(memoryview(f)) for f in frames]


def good(msg_type: MsgType) -> list[bytes]:
    """A valid encoded message of ``msg_type`` as it arrives from a socket."""
    frames = data_frames(vector(N)) if msg_type in DATA_TYPES else []
    return on_the_wire(encode(msg_type, HEADERS[msg_type], frames))


def raw(header: dict, *frames) -> list[bytes]:
    """A message whose frame 0 is ``header`` packed as is (v and t included)."""
    return [msgpack.packb(header, use_bin_type=True), *frames]


def rejected(frames, limits: Limits | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames) if limits is None else decode(frames, limits)
    return info.value


# ------------------------------------------------------------------ tables
def test_every_message_type_has_a_schema_and_a_sample_header():
    assert set(SCHEMA) == set(MsgType) == set(HEADERS)


def test_every_request_type_has_a_reply_type():
    assert set(REPLY_TO) == REQUEST_TYPES
    assert all(REPLY_TO[t] == MsgType(t + 1) for t in REQUEST_TYPES)


def test_only_init_push_pull_ok_and_echo_carry_data():
    assert DATA_TYPES == {MsgType.INIT, MsgType.PUSH, MsgType.PULL_OK, MsgType.ECHO, MsgType.ECHO_OK}
    assert all("n" in SCHEMA[t] for t in DATA_TYPES)


def test_wire_elements_are_little_endian_binary32():
    assert WIRE_DTYPE == np.dtype("<f4") and ELEM_BYTES == 4
    assert np.array([1.0], WIRE_DTYPE).tobytes() == b"\x00\x00\x80\x3f"


# ------------------------------------------------------------- round trips
@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
def test_decode_inverts_encode_for_every_message_type(msg_type):
    vec = vector(N, seed=int(msg_type))
    frames = data_frames(vec) if msg_type in DATA_TYPES else []
    msg = decode(on_the_wire(encode(msg_type, HEADERS[msg_type], frames)))
    assert isinstance(msg, Message)
    assert msg.type is msg_type
    assert msg.header == HEADERS[msg_type]
    assert msg.rid == HEADERS[msg_type]["rid"]
    if "ph" in SCHEMA[msg_type]:
        check_plan(msg, PH)
    if msg_type in DATA_TYPES:
        check_layout(msg, N, PLAN.frame_elems)
        views = payload(msg)
        assert [len(v) for v in views] == [hi - lo for lo, hi in PLAN.frames_of(0)]
        np.testing.assert_array_equal(np.concatenate(views), vec)
    else:
        assert msg.frames == []


@pytest.mark.parametrize("msg_type", sorted(DATA_TYPES), ids=lambda t: t.name)
def test_decode_accepts_numpy_and_memoryview_frames_as_given_by_the_sender(msg_type):
    vec = vector(N)
    frames = [memoryview(f) if i % 2 else f for i, f in enumerate(data_frames(vec))]
    msg = decode(encode(msg_type, HEADERS[msg_type], frames))
    np.testing.assert_array_equal(np.concatenate(payload(msg)), vec)


@pytest.mark.parametrize("msg_type", sorted(DATA_TYPES), ids=lambda t: t.name)
def test_zero_elements_travel_as_zero_frames(msg_type):
    header = {**HEADERS[msg_type], "n": 0}
    frames = encode(msg_type, header, data_frames(vector(0)))
    assert len(frames) == 1
    msg = decode(frames)
    check_layout(msg, 0, PLAN.frame_elems)
    assert payload(msg) == []


def test_encode_puts_version_and_type_first_and_keeps_data_frames_uncopied():
    vec = vector(N)
    frames = data_frames(vec)
    out = encode(MsgType.PUSH, HEADERS[MsgType.PUSH], frames)
    assert list(msgpack.unpackb(out[0]))[:2] == ["v", "t"]
    assert all(a is b for a, b in zip(out[1:], frames))


def test_error_frames_builds_a_decodable_error_with_optional_detail():
    msg = decode(error_frames(9, ErrorCode.STALE_TIMEOUT, "too stale", {"blockers": [1]}))
    assert msg.type is MsgType.ERROR
    assert msg.header == {"rid": 9, "code": 7, "msg": "too stale", "detail": {"blockers": [1]}}
    bare = decode(error_frames(10, ErrorCode.NO_PLAN, "send HELLO first"))
    assert "detail" not in bare.header


def test_rid_is_optional_and_defaults_to_zero():
    msg = decode(raw({"v": VERSION, "t": int(MsgType.STATS)}))
    assert msg.rid == 0 and msg.header == {}


def test_decode_keeps_unknown_keys_for_forward_compatibility():
    msg = decode(encode(MsgType.HEARTBEAT, {**HEADERS[MsgType.HEARTBEAT], "x-trace": "abc"}))
    assert msg["x-trace"] == "abc"


def test_signed_fields_accept_minus_one_and_the_i64_extremes():
    msg = decode(encode(MsgType.HELLO_OK, {**HEADERS[MsgType.HELLO_OK], "staleness": -1,
                                           "min_clock": -(1 << 63), "start_clock": (1 << 63) - 1}))
    assert msg["staleness"] == -1 and msg["min_clock"] == -(1 << 63)


def test_unsigned_fields_accept_the_whole_u64_range():
    top = (1 << 64) - 1
    msg = decode(encode(MsgType.PUSH, {**HEADERS[MsgType.PUSH], "rid": top, "seq": top,
                                       "inc": top, "w": 0, "n": 0}))
    assert msg.rid == top and msg["seq"] == top


# -------------------------------------------------------------- golden bytes
# PULL {rid: 7, w: 3, clk: 12, ph: 0x1122334455667788, dl: 500}, checked by
# hand against the msgpack spec (https://github.com/msgpack/msgpack/blob/master/spec.md).
GOLDEN_PULL = bytes.fromhex(
    "87"                        # fixmap (0x80 | 7): seven key/value pairs follow
    "a1 76" "01"                # fixstr(1) "v"   -> positive fixint 1  (VERSION)
    "a1 74" "07"                # fixstr(1) "t"   -> positive fixint 7  (MsgType.PULL)
    "a3 726964" "07"            # fixstr(3) "rid" -> positive fixint 7
    "a1 77" "03"                # fixstr(1) "w"   -> positive fixint 3
    "a3 636c6b" "0c"            # fixstr(3) "clk" -> positive fixint 12
    "a2 7068" "cf 1122334455667788"  # fixstr(2) "ph" -> uint64, big-endian
    "a2 646c" "cd 01f4"         # fixstr(2) "dl"  -> uint16 500, big-endian
)


def test_encode_matches_the_golden_bytes_of_a_pull():
    frames = encode(MsgType.PULL, {"rid": 7, "w": 3, "clk": 12, "ph": 0x1122334455667788, "dl": 500})
    assert frames == [GOLDEN_PULL]


def test_decode_reads_the_golden_bytes_of_a_pull():
    msg = decode([GOLDEN_PULL])
    assert msg.type is MsgType.PULL
    assert msg.header == {"rid": 7, "w": 3, "clk": 12, "ph": 0x1122334455667788, "dl": 500}


def test_decode_accepts_keys_in_any_order_and_non_minimal_int_encodings():
    # Another implementation may order keys differently and use wider ints:
    # "t" first, then v as uint32 (ce 00000001), w as int64 (d3 ...03).
    other = bytes.fromhex(
        "86"                          # fixmap, six pairs
        "a174 07"                     # "t" -> 7 (PULL), before "v"
        "a176 ce00000001"             # "v" -> uint32 1
        "a3726964 07"                 # "rid" -> 7
        "a177 d30000000000000003"     # "w" -> int64 3
        "a3636c6b 0c"                 # "clk" -> 12
        "a27068 cf1122334455667788"   # "ph" -> uint64
    )
    msg = decode([other])
    assert msg.header == {"rid": 7, "w": 3, "clk": 12, "ph": 0x1122334455667788}


# ------------------------------------------------------------- rejections
def test_decode_rejects_an_empty_message():
    assert rejected([]).code is ErrorCode.MALFORMED


@pytest.mark.parametrize("frame0", [
    b"",                               # nothing at all
    GOLDEN_PULL[:-1],                  # truncated in the last value
    GOLDEN_PULL[:20],                  # truncated in the middle of a key
    GOLDEN_PULL + b"\x00",             # trailing bytes after the map
    b"\xc1",                           # the one byte msgpack never uses
    b"\x81\xa1v",                      # map announced, value missing
    b"\x81\xa2\xff\xfe\x01",           # str key that is not UTF-8
    b"\x81\x01\x01",                   # integer map key
    b"\x81\xd4\x01\x00\x01",           # ext map key
    b"\xd6\xff\x00\x00\x00\x00",       # timestamp ext, no ext types allowed
    b"\x91" * 2000 + b"\x01",          # nesting deeper than any decoder stack
], ids=["empty", "truncated-value", "truncated-key", "trailing", "c1", "missing-value",
        "bad-utf8", "int-key", "ext-key", "ext", "deep"])
def test_decode_rejects_a_truncated_or_garbage_header_as_malformed(frame0):
    assert rejected([frame0]).code is ErrorCode.MALFORMED


@pytest.mark.parametrize("head", [[1, 7], 1, "hello", None, True, 1.5, b"\x87"],
                         ids=["array", "int", "str", "nil", "bool", "float", "bin"])
def test_decode_rejects_a_header_that_is_not_a_map(head):
    assert rejected(raw(head)).code is ErrorCode.MALFORMED


def test_decode_rejects_a_header_over_the_size_limit_before_parsing_it():
    frame0 = good(MsgType.PULL)[0]
    assert decode([frame0], Limits(max_header_bytes=len(frame0))).type is MsgType.PULL
    assert rejected([frame0], Limits(max_header_bytes=len(frame0) - 1)).code is ErrorCode.MALFORMED
    # Garbage beyond the limit is refused on its size alone.
    assert "exceeds" in str(rejected([b"\xc1" * 65], Limits(max_header_bytes=64)))


def test_decode_rejects_strings_and_containers_over_their_limits():
    long_msg = {"v": 1, "t": int(MsgType.ERROR), "code": 1, "msg": "x" * 101}
    assert rejected(raw(long_msg), Limits(max_str_len=100)).code is ErrorCode.MALFORMED
    long_bin = {"v": 1, "t": int(MsgType.STATS), "blob": b"x" * 101}
    assert rejected(raw(long_bin), Limits(max_str_len=100)).code is ErrorCode.MALFORMED
    many = {"v": 1, "t": int(MsgType.STATS_OK), "stats": {"h": list(range(101))}}
    assert rejected(raw(many), Limits(max_container_len=100)).code is ErrorCode.MALFORMED
    wide = {"v": 1, "t": int(MsgType.STATS_OK), "stats": {str(i): i for i in range(101)}}
    assert rejected(raw(wide), Limits(max_container_len=100)).code is ErrorCode.MALFORMED


def test_decode_rejects_more_data_frames_than_the_limit():
    limits = Limits(max_frames=4)
    ok = encode(MsgType.PUSH, {**HEADERS[MsgType.PUSH], "n": 4}, [b"\0" * 4] * 4)
    assert len(decode(ok, limits).frames) == 4
    too_many = encode(MsgType.PUSH, {**HEADERS[MsgType.PUSH], "n": 5}, [b"\0" * 4] * 5)
    assert rejected(too_many, limits).code is ErrorCode.MALFORMED
    # The count is checked first, even on a message with no valid header.
    assert rejected([b"\xc1"] * 6, limits).code is ErrorCode.MALFORMED


def test_decode_rejects_a_data_frame_over_the_frame_size_limit():
    limits = Limits(max_frame_bytes=16)
    ok = encode(MsgType.PULL_OK, {**HEADERS[MsgType.PULL_OK], "n": 4}, [b"\0" * 16])
    assert decode(ok, limits).type is MsgType.PULL_OK
    big = encode(MsgType.PULL_OK, {**HEADERS[MsgType.PULL_OK], "n": 5}, [b"\0" * 20])
    assert rejected(big, limits).code is ErrorCode.MALFORMED


@pytest.mark.parametrize("version", [0, 2, 255, -1, "1", b"\x01", None, [1]])
def test_decode_rejects_wrong_version(version):
    assert rejected(raw({"v": version, "t": int(MsgType.STATS)})).code is ErrorCode.BAD_VERSION


def test_decode_rejects_a_header_without_version():
    assert rejected(raw({"t": int(MsgType.STATS)})).code is ErrorCode.BAD_VERSION


def test_decode_checks_the_version_before_the_type():
    assert rejected(raw({"v": 2, "t": 999})).code is ErrorCode.BAD_VERSION


@pytest.mark.parametrize("version", [True, 1.0])
def test_decode_rejects_a_version_that_is_only_equal_to_one(version):
    assert rejected(raw({"v": version, "t": int(MsgType.STATS)})).code is ErrorCode.BAD_VERSION


@pytest.mark.parametrize("t", [0, 17, 126, 128, 2**64 - 1, -1, True, 7.0, "PULL", None, [7]])
def test_decode_rejects_unknown_type(t):
    assert rejected(raw({"v": VERSION, "t": t})).code is ErrorCode.UNKNOWN_TYPE


def test_decode_rejects_a_header_without_type():
    assert rejected(raw({"v": VERSION})).code is ErrorCode.UNKNOWN_TYPE


REQUIRED = [(t, k) for t in MsgType for k in SCHEMA[t]]


@pytest.mark.parametrize("msg_type,key", REQUIRED, ids=[f"{t.name}.{k}" for t, k in REQUIRED])
def test_decode_rejects_a_missing_required_key(msg_type, key):
    header = {k: v for k, v in HEADERS[msg_type].items() if k != key}
    frames = data_frames(vector(N)) if msg_type in DATA_TYPES else []
    err = rejected(on_the_wire(encode(msg_type, header, frames)))
    assert err.code is ErrorCode.MALFORMED and repr(key) in str(err)


#: Values of the wrong type for each declared type (bool is not an int here).
WRONG = {int: [True, False, "3", 3.0, None, [3], b"3"], bool: [1, 0, "true", None],
         float: [True, "3", None, [3]],
         dict: [[], "x", 1, None], str: [1, b"x", None, []], list: [{}, "x", 1, None]}
TYPED = [(t, k, bad) for t in MsgType
         for k, typ in {**SCHEMA[t], **OPTIONAL.get(t, {})}.items() for bad in WRONG[typ]]


@pytest.mark.parametrize("msg_type,key,bad", TYPED,
                         ids=[f"{t.name}.{k}={b!r}" for t, k, b in TYPED])
def test_decode_rejects_a_key_of_the_wrong_type(msg_type, key, bad):
    frames = data_frames(vector(N)) if msg_type in DATA_TYPES else []
    header = {**HEADERS[msg_type], key: bad}
    assert rejected(on_the_wire(encode(msg_type, header, frames))).code is ErrorCode.MALFORMED


@pytest.mark.parametrize("bad", [-1, True, "1", 1.0, None])
def test_decode_rejects_a_rid_that_is_not_a_u64(bad):
    assert rejected(raw({"v": VERSION, "t": int(MsgType.STATS), "rid": bad})).code is ErrorCode.MALFORMED


UNSIGNED = [(t, k) for t in MsgType for k, typ in {**SCHEMA[t], **OPTIONAL.get(t, {})}.items()
            if typ is int and k not in _SIGNED]


@pytest.mark.parametrize("msg_type,key", UNSIGNED, ids=[f"{t.name}.{k}" for t, k in UNSIGNED])
def test_decode_rejects_a_negative_unsigned_field(msg_type, key):
    frames = data_frames(vector(N)) if msg_type in DATA_TYPES else []
    header = {**HEADERS[msg_type], key: -1}
    err = rejected(on_the_wire(encode(msg_type, header, frames)))
    assert err.code is ErrorCode.MALFORMED and "out of range" in str(err)


@pytest.mark.parametrize("msg_type,key", [(MsgType.PULL, "clk"), (MsgType.CLOCK, "clk"),
                                          (MsgType.PUSH, "clk"), (MsgType.HELLO_OK, "staleness"),
                                          (MsgType.HELLO_OK, "min_clock"),
                                          (MsgType.HELLO_OK, "start_clock"),
                                          (MsgType.PULL_OK, "min_clock")])
def test_decode_rejects_a_signed_field_above_i64(msg_type, key):
    frames = data_frames(vector(N)) if msg_type in DATA_TYPES else []
    header = {**HEADERS[msg_type], key: 1 << 63}  # msgpack uint64, valid bytes
    assert rejected(on_the_wire(encode(msg_type, header, frames))).code is ErrorCode.MALFORMED


def test_integers_beyond_u64_cannot_be_encoded_at_all():
    # msgpack has no encoding for them, so the decoder can never see one; the
    # encoder does not validate and lets msgpack's OverflowError through.
    with pytest.raises(OverflowError):
        encode(MsgType.STATS, {"rid": 1 << 64})
    with pytest.raises(OverflowError):
        encode(MsgType.PULL, {**HEADERS[MsgType.PULL], "clk": -(1 << 63) - 1})


def test_decode_rejects_a_zero_pull_deadline():
    assert rejected(encode(MsgType.PULL, {**HEADERS[MsgType.PULL], "dl": 0})).code is ErrorCode.MALFORMED


@pytest.mark.parametrize("msg_type", sorted(DATA_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("sizes", [[6, 2], [4, 4, 3, 1], [1]], ids=str)
def test_decode_rejects_a_data_frame_that_is_not_whole_fp32_elements(msg_type, sizes):
    header = {**HEADERS[msg_type], "n": sum(sizes) // ELEM_BYTES}
    frames = [b"\0" * s for s in sizes]
    err = rejected(encode(msg_type, header, frames))
    assert err.code is ErrorCode.MALFORMED and "whole number" in str(err)


@pytest.mark.parametrize("msg_type", sorted(DATA_TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("n,sizes", [(3, [8]), (1, [8]), (2, []), (0, [4]), (2**64 - 1, [8])],
                         ids=["short", "long", "no-frames", "zero-n", "huge-n"])
def test_decode_rejects_data_that_does_not_add_up_to_n_elements(msg_type, n, sizes):
    header = {**HEADERS[msg_type], "n": n}
    err = rejected(encode(msg_type, header, [b"\0" * s for s in sizes]))
    assert err.code is ErrorCode.MALFORMED and "announces" in str(err)


@pytest.mark.parametrize("msg_type", sorted(set(MsgType) - DATA_TYPES), ids=lambda t: t.name)
def test_decode_rejects_data_frames_on_a_type_without_data(msg_type):
    err = rejected(encode(msg_type, HEADERS[msg_type], [b"\0" * 4]))
    assert err.code is ErrorCode.MALFORMED
    assert rejected(encode(msg_type, HEADERS[msg_type], [b""])).code is ErrorCode.MALFORMED


# -------------------------------------------------------------- plan checks
def test_check_plan_accepts_the_right_hash():
    check_plan(decode(good(MsgType.PUSH)), PH)


def test_check_plan_rejects_a_wrong_hash():
    with pytest.raises(PlanMismatchError) as info:
        check_plan(decode(good(MsgType.PUSH)), PH ^ 1)
    assert isinstance(info.value, ProtocolError)
    assert info.value.code is ErrorCode.PLAN_MISMATCH
    assert f"{PH:#x}" in str(info.value) and f"{PH ^ 1:#x}" in str(info.value)


def test_check_plan_rejects_a_message_without_a_hash():
    msg = decode(good(MsgType.CLOCK))  # CLOCK carries no ph
    with pytest.raises(PlanMismatchError) as info:
        check_plan(msg, PH)
    assert info.value.code is ErrorCode.PLAN_MISMATCH and "lacks" in str(info.value)


def layout_msg(sizes_in_elems: list[int], n: int | None = None) -> Message:
    n = sum(sizes_in_elems) if n is None else n
    frames = [b"\0" * (s * ELEM_BYTES) for s in sizes_in_elems]
    return decode(encode(MsgType.PUSH, {**HEADERS[MsgType.PUSH], "n": n}, frames))


def test_check_layout_accepts_full_frames_and_a_shorter_last_one():
    check_layout(layout_msg([4, 4, 2]), 10, 4)
    check_layout(layout_msg([4, 4]), 8, 4)
    check_layout(layout_msg([3]), 3, 4)
    check_layout(layout_msg([]), 0, 4)


def test_check_layout_rejects_a_wrong_element_count():
    err = pytest.raises(ProtocolError, check_layout, layout_msg([4, 4, 2]), 11, 4).value
    assert err.code is ErrorCode.MALFORMED and "10" in str(err) and "11" in str(err)


@pytest.mark.parametrize("sizes", [[4, 4, 1, 1], [4, 6], [10], [2, 2, 2, 2, 2]], ids=str)
def test_check_layout_rejects_a_wrong_frame_count(sizes):
    err = pytest.raises(ProtocolError, check_layout, layout_msg(sizes), 10, 4).value
    assert err.code is ErrorCode.MALFORMED and "data frames" in str(err)


@pytest.mark.parametrize("sizes", [[2, 4, 4], [4, 2, 4], [4, 5, 1], [3, 3, 4]], ids=str)
def test_check_layout_rejects_wrong_frame_sizes(sizes):
    err = pytest.raises(ProtocolError, check_layout, layout_msg(sizes), 10, 4).value
    assert err.code is ErrorCode.MALFORMED and "the plan says" in str(err)


def test_check_layout_rejects_an_empty_frame_for_an_empty_range():
    with pytest.raises(ProtocolError):
        check_layout(layout_msg([0]), 0, 4)


# ------------------------------------------------------------------ payload
def test_payload_views_a_bytearray_without_copying():
    vec = vector(300)
    src = [bytearray(f.tobytes()) for f in data_frames(vec, 128)]
    msg = decode(encode(MsgType.PULL_OK, {**HEADERS[MsgType.PULL_OK], "n": 300}, src))
    views = payload(msg)
    for view, buf in zip(views, src):
        assert np.shares_memory(view, np.frombuffer(buf, dtype=np.uint8))
        assert view.dtype == WIRE_DTYPE
    src[2][:4] = np.float32(7.5).tobytes()  # a write to the source shows in the view
    assert views[2][0] == np.float32(7.5)


def test_payload_views_numpy_frames_without_copying():
    vec = vector(300)
    msg = decode(encode(MsgType.PUSH, {**HEADERS[MsgType.PUSH], "n": 300}, data_frames(vec, 128)))
    assert all(np.shares_memory(v, vec) for v in payload(msg))


def test_payload_of_bytes_frames_is_read_only():
    views = payload(decode(good(MsgType.PULL_OK)))
    assert not any(v.flags.writeable for v in views)


# ---------------------------------------------------------------- fuzzing
def _holds_its_schema(msg: Message) -> bool:
    """An accepted message always satisfies its type's schema."""
    for key, typ in SCHEMA[msg.type].items():
        value = msg.header[key]
        if typ is int and isinstance(value, bool):
            return False
        if not isinstance(value, typ):
            return False
    if msg.type in DATA_TYPES:
        return sum(memoryview(f).nbytes for f in msg.frames) == msg["n"] * ELEM_BYTES
    return not msg.frames


@FUZZ
@given(st.lists(st.binary(max_size=80), max_size=5))
def test_decode_of_random_frames_raises_only_protocol_error(frames):
    try:
        msg = decode(frames)
    except ProtocolError:
        return
    assert isinstance(msg.type, MsgType) and _holds_its_schema(msg)


KEYS = sorted({k for t in MsgType for k in SCHEMA[t]} | {"rid", "dl", "detail", "zz"})
scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=True) | st.text(max_size=8) | st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)


@st.composite
def random_headers(draw):
    head = {"v": draw(st.sampled_from([VERSION] * 12 + [0, 2, True, None]))}
    head["t"] = draw(st.sampled_from([int(t) for t in MsgType] + [0, 99, -1, True]))
    msg_type = MsgType(head["t"]) if head["t"] in set(MsgType) and head["t"] is not True else None
    # Mostly the right keys, with a chance of a wrong value for each.
    for key in (SCHEMA[msg_type] if msg_type is not None else {}):
        if draw(st.integers(0, 9)):
            good_value = HEADERS[msg_type][key]
            head[key] = draw(st.sampled_from([good_value] * 3) | values)
    head.update(draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=3)))
    return head


@FUZZ
@given(random_headers(), st.lists(st.binary(max_size=24), max_size=4))
def test_decode_of_random_headers_raises_only_protocol_error(head, frames):
    try:
        msg = decode([msgpack.packb(head, use_bin_type=True), *frames])
    except ProtocolError:
        return
    assert isinstance(msg.type, MsgType) and _holds_its_schema(msg)


def _decoded(frames) -> tuple:
    try:
        msg = decode(frames)
    except ProtocolError as exc:
        return ("error", exc.code, str(exc))
    return ("message", msg.type, msg.header, len(msg.frames))


@FUZZ
@given(random_headers())
def test_the_unrolled_header_check_decides_exactly_as_the_rules(head):
    # decode's straight-line check per type may only shortcut the walk over the rules:
    # decode's verdict (the message, or the error and its text) is the same without it
    from common import protocol
    msg_type = protocol._TYPE_OF_CODE.get(head["t"]) if type(head["t"]) is int else None
    frames = [msgpack.packb(head, use_bin_type=True)]
    if msg_type in DATA_TYPES and type(head.get("n")) is int and 0 <= head["n"] <= 64:
        frames.append(bytes(4 * head["n"]))
    with_quick = _decoded(frames)
    saved = dict(protocol._QUICK_CHECK)
    try:
        protocol._QUICK_CHECK.update({t: (lambda h: False) for t in MsgType})
        by_rules = _decoded(frames)
    finally:
        protocol._QUICK_CHECK.update(saved)
    assert with_quick == by_rules   # a field the quick check passed that the rules refuse shows here


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
def test_the_unrolled_header_check_takes_every_sample_header_and_refuses_each_wrong_value(msg_type):
    from common import protocol
    quick = protocol._QUICK_CHECK[msg_type]
    assert quick(dict(HEADERS[msg_type])) is True
    for key, typ in {**SCHEMA[msg_type], **OPTIONAL.get(msg_type, {})}.items():
        for wrong in [w for w in (None, "x", True, 1.5, 7, [1], {}) if type(w) is not typ]:
            assert quick({**HEADERS[msg_type], key: wrong}) is False, (key, wrong)
        if typ is int:
            low = -(1 << 63) - 1 if key in _SIGNED else -1
            assert quick({**HEADERS[msg_type], key: low}) is False, key
    for key in SCHEMA[msg_type]:
        with pytest.raises(KeyError):
            quick({k: v for k, v in HEADERS[msg_type].items() if k != key})


GOOD_MESSAGES = {t: good(t) for t in MsgType}


@FUZZ
@given(st.sampled_from(list(MsgType)), st.integers(min_value=0), st.integers(0, 255))
def test_decode_of_a_header_with_one_byte_changed_raises_protocol_error_or_gives_a_message(
        msg_type, where, byte):
    frames = GOOD_MESSAGES[msg_type]
    head = bytearray(frames[0])
    head[where % len(head)] = byte
    try:
        msg = decode([bytes(head), *frames[1:]])
    except ProtocolError:
        return
    assert isinstance(msg.type, MsgType) and _holds_its_schema(msg)
