"""The zps wire protocol: version, message types, frame layout and codec.

Every message is one ZeroMQ multipart message::

    frame 0      msgpack map (the header)  {"v": VERSION, "t": MsgType, "rid": u64, ...}
    frame 1..n   raw little-endian buffers described by the header

Only PUSH and INIT (worker -> server) and PULL_OK (server -> worker) carry
data frames.  Their payload is the fp32 vector of the server's whole range,
``n`` elements, cut into frames of exactly ``plan.frame_elems`` elements, the
last one shorter; zero elements travel as zero frames::

    PUSH   [header{w, inc, seq, clk, ph, n, tick}] [f32 * F] [f32 * F] ... [f32 * r]

Requests and their replies (every request gets its reply or an ERROR):

    type        dir  header keys (besides v, t, rid)          data
    HELLO       w->s w, inc, plan, ph, [clk]                   -
    HELLO_OK    s->w rank, lo, hi, ph, step, min_clock,        -
                     start_clock, initialized, sinc, staleness
    INIT        w->s w, inc, ph, n                             range
    INIT_OK     s->w accepted                                  -
    PUSH        w->s w, inc, seq, clk, ph, n, tick, [rs]       range
    PUSH_OK     s->w step, dup                                 -
    PULL        w->s w, clk, ph, [dl]                          -
    PULL_OK     s->w min_clock, step, n                        range
    CLOCK       w->s w, inc, clk                               -
    CLOCK_OK    s->w min_clock                                 -
    HEARTBEAT   w->s w, inc                                    -
    HEARTBEAT_OK s->w min_clock, sinc                          -
    STATS       any  -                                         -
    STATS_OK    s->  stats                                     -
    SHUTDOWN    any  -                                         -
    SHUTDOWN_OK s->  -                                         -
    ERROR       s->  code, msg, [detail]                       -

Coordinator requests (control plane, same framing, no data frames):
REGISTER{role, want, inc, endpoint, host, pid, version} -> REGISTER_OK{rank, job};
ADDRESSES{[dl]} -> ADDRESSES_OK{servers} once every server registered;
BARRIER{name, role, rank, [dl]} -> BARRIER_OK{members} once every live member arrived;
BEAT{role, rank, inc} -> BEAT_OK{state, dead_workers}; DONE{role, rank, inc, result}
-> DONE_OK; STATUS -> STATUS_OK{status}; LEAVE{role, rank, inc, why} -> LEAVE_OK{left}
(a worker whose start failed gives its rank back).  ECHO{n} + n fp32 elements -> ECHO_OK{n, time}
+ the same elements (servers and the coordinator; for round-trip, bandwidth and
clock-skew checks; ``time`` is the answering host's Unix time).

docs/PROTOCOL.md is the full specification.  This module is pure: no
sockets, no clocks; ``encode``/``decode`` are an exact inverse pair.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Sequence

import msgpack
import numpy as np
import zmq

from common.errors import ErrorCode, PlanMismatchError, ProtocolError

VERSION = 1

#: The only element type on the wire: little-endian IEEE-754 binary32.
WIRE_DTYPE = np.dtype("<f4")
ELEM_BYTES = WIRE_DTYPE.itemsize


class MsgType(enum.IntEnum):
    HELLO = 1
    HELLO_OK = 2
    INIT = 3
    INIT_OK = 4
    PUSH = 5
    PUSH_OK = 6
    PULL = 7
    PULL_OK = 8
    CLOCK = 9
    CLOCK_OK = 10
    STATS = 11
    STATS_OK = 12
    SHUTDOWN = 13
    SHUTDOWN_OK = 14
    HEARTBEAT = 15
    HEARTBEAT_OK = 16
    # coordinator (control plane; never on the data path)
    REGISTER = 20
    REGISTER_OK = 21
    ADDRESSES = 22
    ADDRESSES_OK = 23
    BARRIER = 24
    BARRIER_OK = 25
    BEAT = 26
    BEAT_OK = 27
    DONE = 28
    DONE_OK = 29
    STATUS = 30
    STATUS_OK = 31
    ECHO = 32
    ECHO_OK = 33
    CHECKPOINT = 34
    CHECKPOINT_OK = 35
    LEAVE = 36
    LEAVE_OK = 37
    ERROR = 127


#: Message types whose frames 1..n hold a parameter range.
DATA_TYPES = frozenset({MsgType.INIT, MsgType.PUSH, MsgType.PULL_OK, MsgType.ECHO, MsgType.ECHO_OK})
REQUEST_TYPES = frozenset({
    MsgType.HELLO, MsgType.INIT, MsgType.PUSH, MsgType.PULL, MsgType.CLOCK,
    MsgType.STATS, MsgType.SHUTDOWN, MsgType.HEARTBEAT, MsgType.REGISTER,
    MsgType.ADDRESSES, MsgType.BARRIER, MsgType.BEAT, MsgType.DONE, MsgType.STATUS, MsgType.ECHO,
    MsgType.CHECKPOINT, MsgType.LEAVE,
})
REPLY_TO = {
    MsgType.HELLO: MsgType.HELLO_OK, MsgType.INIT: MsgType.INIT_OK,
    MsgType.PUSH: MsgType.PUSH_OK, MsgType.PULL: MsgType.PULL_OK,
    MsgType.CLOCK: MsgType.CLOCK_OK, MsgType.STATS: MsgType.STATS_OK,
    MsgType.SHUTDOWN: MsgType.SHUTDOWN_OK, MsgType.HEARTBEAT: MsgType.HEARTBEAT_OK,
    MsgType.REGISTER: MsgType.REGISTER_OK, MsgType.ADDRESSES: MsgType.ADDRESSES_OK,
    MsgType.BARRIER: MsgType.BARRIER_OK, MsgType.BEAT: MsgType.BEAT_OK,
    MsgType.DONE: MsgType.DONE_OK, MsgType.STATUS: MsgType.STATUS_OK, MsgType.ECHO: MsgType.ECHO_OK,
    MsgType.CHECKPOINT: MsgType.CHECKPOINT_OK, MsgType.LEAVE: MsgType.LEAVE_OK,
}

_U64 = (0, (1 << 64) - 1)
_I64 = (-(1 << 63), (1 << 63) - 1)

# Required header keys per type, with the Python type each must have.
# (int keys are range-checked: ids, counts and sequence numbers are >= 0.)
SCHEMA: dict[MsgType, dict[str, type]] = {
    MsgType.HELLO: {"w": int, "inc": int, "plan": dict, "ph": int},
    MsgType.HELLO_OK: {"rank": int, "lo": int, "hi": int, "ph": int, "step": int,
                       "min_clock": int, "start_clock": int, "initialized": bool,
                       "sinc": int, "staleness": int},
    MsgType.INIT: {"w": int, "inc": int, "ph": int, "n": int},
    MsgType.INIT_OK: {"accepted": bool},
    MsgType.PUSH: {"w": int, "inc": int, "seq": int, "clk": int, "ph": int, "n": int,
                   "tick": bool},
    MsgType.PUSH_OK: {"step": int, "dup": bool},
    MsgType.PULL: {"w": int, "clk": int, "ph": int},
    MsgType.PULL_OK: {"min_clock": int, "step": int, "n": int},
    MsgType.CLOCK: {"w": int, "inc": int, "clk": int},
    MsgType.CLOCK_OK: {"min_clock": int},
    MsgType.STATS: {},
    MsgType.STATS_OK: {"stats": dict},
    MsgType.SHUTDOWN: {},
    MsgType.SHUTDOWN_OK: {},
    MsgType.HEARTBEAT: {"w": int, "inc": int},
    MsgType.HEARTBEAT_OK: {"min_clock": int, "sinc": int},
    MsgType.REGISTER: {"role": str, "want": int, "inc": int, "endpoint": str, "host": str,
                       "pid": int, "version": str},
    MsgType.REGISTER_OK: {"rank": int, "job": dict},
    MsgType.ADDRESSES: {},
    MsgType.ADDRESSES_OK: {"servers": list},
    MsgType.BARRIER: {"name": str, "role": str, "rank": int},
    MsgType.BARRIER_OK: {"members": list},
    MsgType.BEAT: {"role": str, "rank": int, "inc": int},
    MsgType.BEAT_OK: {"state": str, "dead_workers": list},
    MsgType.DONE: {"role": str, "rank": int, "inc": int, "result": dict},
    MsgType.DONE_OK: {},
    MsgType.STATUS: {},
    MsgType.STATUS_OK: {"status": dict},
    MsgType.ECHO: {"n": int},
    MsgType.ECHO_OK: {"n": int, "time": float},
    MsgType.CHECKPOINT: {},
    MsgType.CHECKPOINT_OK: {"path": str, "step": int},
    MsgType.LEAVE: {"role": str, "rank": int, "inc": int, "why": str},
    MsgType.LEAVE_OK: {"left": bool},
    MsgType.ERROR: {"code": int, "msg": str},
}
#: Optional keys, checked like the required ones when present (docs/PROTOCOL.md).
OPTIONAL: dict[MsgType, dict[str, type]] = {
    MsgType.PULL: {"dl": int, "obs": bool},
    MsgType.PUSH: {"rs": int, "to": int, "off": int, "segs": int},
    MsgType.HELLO: {"clk": int},
    MsgType.INIT: {"to": int},
    MsgType.CLOCK: {"to": int},
    MsgType.ADDRESSES: {"dl": int},
    MsgType.BARRIER: {"dl": int},
    MsgType.ERROR: {"detail": dict},
}
# Signed fields (a staleness of "infinity" travels as -1, min_clock of an
# empty job as -1); every other int is a non-negative u64.
_SIGNED = frozenset({"staleness", "min_clock", "clk", "start_clock", "want"})

#: Message type by wire code: a dict lookup costs less than ``MsgType(code)``.
_TYPE_OF_CODE = {int(t): t for t in MsgType}


def _key_rules(keys: dict[str, type]) -> tuple[tuple[str, type, int | None, int | None], ...]:
    """``(key, type, lo, hi)`` per key; ``lo``/``hi`` bound an integer key, None otherwise."""
    return tuple((key, typ, *((_I64 if key in _SIGNED else _U64) if typ is int else (None, None)))
                 for key, typ in keys.items())


# SCHEMA and OPTIONAL turned once into the tuples ``decode`` walks on every message.
_REQUIRED_RULES = {t: _key_rules(SCHEMA[t]) for t in MsgType}
_OPTIONAL_RULES = {t: _key_rules(OPTIONAL.get(t, {})) for t in MsgType}


def _quick_check(msg_type: MsgType) -> Any:
    """A function ``head -> bool``: True if every key of ``msg_type`` is present (the
    optional ones where given) with a value of exactly its type and range.

    The rules unrolled into straight-line code, generated once per type: it
    answers a good header in about a third of the time of walking the rules.
    False (or a KeyError) says only "not certain": ``decode`` then walks the
    rules, which accept the header or say what is wrong with it.
    """
    lines = ["def check(head):"]
    for i, (key, typ, lo, hi) in enumerate(_REQUIRED_RULES[msg_type]):
        lines.append(f"    v = head[{key!r}]")
        lines.append(f"    if type(v) is not T{i}" + (f" or not {lo} <= v <= {hi}" if lo is not None else "")
                     + ": return False")
    for i, (key, typ, lo, hi) in enumerate(_OPTIONAL_RULES[msg_type]):
        lines.append(f"    v = head.get({key!r}, absent)")
        lines.append(f"    if v is not absent and (type(v) is not O{i}"
                     + (f" or not {lo} <= v <= {hi}" if lo is not None else "") + "): return False")
    lines.append("    return True")
    scope: dict[str, Any] = {"absent": object()}
    scope.update({f"T{i}": r[1] for i, r in enumerate(_REQUIRED_RULES[msg_type])})
    scope.update({f"O{i}": r[1] for i, r in enumerate(_OPTIONAL_RULES[msg_type])})
    exec("\n".join(lines), scope)  # noqa: S102 -- built from the constant schema above only
    return scope["check"]


_QUICK_CHECK = {t: _quick_check(t) for t in MsgType}


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds the decoder enforces before it trusts anything."""

    max_header_bytes: int = 1 << 20
    max_frames: int = 1 << 14
    max_frame_bytes: int = 64 << 20
    max_str_len: int = 1 << 16
    max_container_len: int = 1 << 16


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass
class Message:
    """A decoded message: its type, its header (without v and t), its data frames."""

    type: MsgType
    header: dict[str, Any]
    frames: list = dataclasses.field(default_factory=list)

    @property
    def rid(self) -> int:
        return self.header.get("rid", 0)

    def __getitem__(self, key: str) -> Any:
        return self.header[key]


# ----------------------------------------------------------------- encode
def encode(msg_type: MsgType, header: dict[str, Any] | None = None,
           frames: Sequence = (), rid: int | None = None) -> list:
    """Frames of one message: the msgpack header then the data frames as given.

    Data frames may be bytes, memoryviews, numpy arrays or ``zmq.Frame``; they
    are not copied.  ``header`` must not hold ``v`` or ``t``; ``rid``, if
    given, goes in right after them (``header`` then must not hold one).
    """
    head = {"v": VERSION, "t": int(msg_type)}
    if rid is not None:
        head["rid"] = rid
    if header:
        head.update(header)
    return [msgpack.packb(head, use_bin_type=True), *frames]


def error_frames(rid: int, code: ErrorCode, message: str, detail: dict | None = None) -> list:
    header = {"rid": rid, "code": int(code), "msg": message}
    if detail:
        header["detail"] = detail
    return encode(MsgType.ERROR, header)


# ----------------------------------------------------------------- decode
def frame_bytes(frame) -> int:
    """Bytes in one frame: bytes, bytearray, ``zmq.Frame`` or anything with a buffer."""
    if type(frame) in _LEN_IS_BYTES:
        return len(frame)
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is not None:
        return buf.nbytes
    return memoryview(frame).nbytes


#: Frame types whose ``len`` is their size in bytes (a ``zmq.Frame``'s ``buffer`` costs a memoryview).
_LEN_IS_BYTES = {bytes, bytearray, zmq.Frame}


def _as_bytes(frame) -> bytes | memoryview:
    if isinstance(frame, (bytes, bytearray)):
        return frame
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else memoryview(frame)


def decode(frames: Sequence, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Check and decode one message; raise :class:`ProtocolError` if it is bad.

    Checks, in order: frame count, header size, msgpack well-formedness and
    limits, version, type, required keys and their types, integer ranges,
    then (for data types) that the data frames add up to ``n`` fp32 elements
    with every frame a whole number of elements.  Data frames are returned
    untouched; :func:`payload` views them after the plan check.
    """
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > limits.max_frames + 1:
        raise ProtocolError(f"{len(frames)} frames exceed the limit of {limits.max_frames + 1}")
    first = frames[0]
    kind = type(first)
    hlen = frame_bytes(first)
    if hlen > limits.max_header_bytes:
        raise ProtocolError(f"header of {hlen} bytes exceeds the limit of {limits.max_header_bytes}")
    try:
        # a header is short: its bytes cost less than a view of a zmq.Frame
        head = msgpack.unpackb(
            first if kind is bytes else first.bytes if kind is zmq.Frame else _as_bytes(first),
            raw=False, strict_map_key=True, use_list=True,
            max_str_len=limits.max_str_len, max_bin_len=limits.max_str_len,
            max_array_len=limits.max_container_len, max_map_len=limits.max_container_len,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if type(head) is not dict:   # msgpack makes plain dicts, lists, ints and bools only
        raise ProtocolError(f"header must be a map, got {type(head).__name__}")
    version = head.pop("v", None)
    if type(version) is not int or version != VERSION:   # a bool is not an int here
        raise ProtocolError(f"protocol version {version!r} is not supported (this side speaks {VERSION})",
                            ErrorCode.BAD_VERSION)
    raw_type = head.pop("t", None)
    # True would find HELLO: only a plain int is a type code
    msg_type = _TYPE_OF_CODE.get(raw_type) if type(raw_type) is int else None
    if msg_type is None:
        raise ProtocolError(f"unknown message type {raw_type!r}", ErrorCode.UNKNOWN_TYPE)
    rid = head.get("rid", 0)
    if type(rid) is not int or not _U64[0] <= rid <= _U64[1]:
        raise ProtocolError(f"rid must be an unsigned 64-bit integer, got {rid!r}")
    try:
        certain = _QUICK_CHECK[msg_type](head)
    except KeyError:
        certain = False
    if not certain:
        # A value of exactly its key's type (and range) is good; any other value gets
        # the full check of _check_field, which accepts it or says what is wrong.
        for key, typ, lo, hi in _REQUIRED_RULES[msg_type]:
            if key not in head:
                raise ProtocolError(f"{msg_type.name} lacks the key {key!r}")
            value = head[key]
            if type(value) is not typ or (lo is not None and not lo <= value <= hi):
                _check_field(msg_type, key, value, typ)
        for key, typ, lo, hi in _OPTIONAL_RULES[msg_type]:
            if key in head:
                value = head[key]
                if type(value) is not typ or (lo is not None and not lo <= value <= hi):
                    _check_field(msg_type, key, value, typ)
    if msg_type == MsgType.PULL and head.get("dl", 1) == 0:
        raise ProtocolError("PULL.dl must be > 0 milliseconds (leave it out for the server's default)")
    data = list(frames[1:])
    if msg_type in DATA_TYPES:
        n = head["n"]
        total = 0
        for i, f in enumerate(data):
            size = frame_bytes(f)
            if size > limits.max_frame_bytes:
                raise ProtocolError(f"data frame {i} of {size} bytes exceeds the limit of {limits.max_frame_bytes}")
            if size % ELEM_BYTES:
                raise ProtocolError(f"data frame {i} holds {size} bytes, not a whole number of fp32 elements")
            total += size
        if total != n * ELEM_BYTES:
            raise ProtocolError(f"{msg_type.name} announces {n} elements but its frames hold {total} bytes")
    elif data:
        raise ProtocolError(f"{msg_type.name} carries no data frames, got {len(data)}")
    return Message(msg_type, head, data)


def _check_field(msg_type: MsgType, key: str, value: Any, typ: type) -> None:
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{msg_type.name}.{key} must be a number, got {type(value).__name__}")
        return
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{msg_type.name}.{key} must be an integer, got {type(value).__name__}")
        lo, hi = _I64 if key in _SIGNED else _U64
        if not lo <= value <= hi:
            raise ProtocolError(f"{msg_type.name}.{key}={value} is out of range")
    elif not isinstance(value, typ):
        raise ProtocolError(f"{msg_type.name}.{key} must be {typ.__name__}, got {type(value).__name__}")


# ----------------------------------------------------------------- payload
def check_plan(msg: Message, plan_hash: int) -> None:
    """Refuse a message built for another partition plan."""
    ph = msg.header.get("ph")
    if ph != plan_hash:
        raise PlanMismatchError(
            f"message plan hash {ph:#x} differs from this server's plan {plan_hash:#x}: "
            "the sender was built for another model or server count"
            if isinstance(ph, int) else f"message lacks a plan hash (expected {plan_hash:#x})")


def check_layout(msg: Message, n_expected: int, frame_elems: int, off: int = 0) -> None:
    """Check that a data message holds exactly ``n_expected`` elements in plan frames.

    ``off`` is the element offset of the message's first element within its
    range (a segment of a segmented ``PUSH``); frames are cut from there.
    """
    n = msg.header["n"]
    if n != n_expected:
        raise ProtocolError(f"{msg.type.name} carries {n} elements; "
                            + (f"this range holds {n_expected}" if off == 0 and msg.header.get("segs", 1) == 1
                               else f"its segment at offset {off} should hold {n_expected}"))
    want = -(-n_expected // frame_elems) if n_expected else 0
    if len(msg.frames) != want:
        raise ProtocolError(f"{msg.type.name} has {len(msg.frames)} data frames; the plan cuts "
                            f"{n_expected} elements into {want}")
    for i, f in enumerate(msg.frames):
        expect = min(frame_elems, n_expected - i * frame_elems) * ELEM_BYTES
        if frame_bytes(f) != expect:
            raise ProtocolError(f"data frame {i} holds {frame_bytes(f)} bytes; the plan says {expect}")


def payload(msg: Message) -> list[np.ndarray]:
    """fp32 views of a checked message's data frames (no copy; as writable as the frames)."""
    return [np.frombuffer(_as_bytes(f), dtype=WIRE_DTYPE) for f in msg.frames]
