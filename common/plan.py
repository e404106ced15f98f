"""Partition plan: how the model's dense parameters are cut across servers.

All dense parameters, in ``state_dict`` order, form one flat fp32 vector of
``total`` elements.  The plan cuts it into ``num_servers`` contiguous ranges
of near-equal size whose boundaries are multiples of ``align`` elements (the
last range ends at ``total``).  A tensor may straddle two or more servers.

The plan is a pure function of the ordered ``(name, shape, dtype)`` list,
``num_servers``, ``align`` and ``frame_elems``.  Its :attr:`PartitionPlan.hash`
(a 63-bit integer) is carried by every message that touches parameters, so a
peer built from another model or server count is refused instead of
corrupting weights.

``frame_elems`` fixes how a range travels on the wire: a range of n elements
is sent as ``ceil(n / frame_elems)`` frames of ``frame_elems`` elements, the
last one shorter (see docs/PROTOCOL.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Iterable, Sequence

from common.errors import ConfigError

DEFAULT_ALIGN = 64
DEFAULT_FRAME_ELEMS = 1 << 18  # 1 MiB of fp32 per frame
#: dtypes a model parameter may have; the servers keep fp32 master weights.
PARAM_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One dense parameter: its name, shape, dtype and place in the flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # first element in the flat vector

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclasses.dataclass(frozen=True)
class Piece:
    """The part of one tensor that lies in one server's range."""

    name: str
    tensor_lo: int  # element range within the flattened tensor
    tensor_hi: int
    flat_lo: int    # the same elements in the flat vector
    flat_hi: int


@dataclasses.dataclass(frozen=True)
class PartitionPlan:
    """The cut of the flat parameter vector into one range per server."""

    tensors: tuple[TensorSpec, ...]
    num_servers: int
    align: int
    frame_elems: int
    bounds: tuple[int, ...]  # num_servers + 1 offsets; range k = [bounds[k], bounds[k+1])
    hash: int

    # -- construction -------------------------------------------------
    @classmethod
    def build(
        cls,
        specs: Iterable[tuple[str, Sequence[int], str]],
        num_servers: int,
        align: int = DEFAULT_ALIGN,
        frame_elems: int = DEFAULT_FRAME_ELEMS,
    ) -> "PartitionPlan":
        """Cut ``specs`` (ordered ``(name, shape, dtype)``) across ``num_servers``."""
        if isinstance(num_servers, bool) or not isinstance(num_servers, int) or num_servers < 1:
            raise ConfigError(f"num_servers must be a positive integer, got {num_servers!r}")
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise ConfigError(f"align must be a positive integer, got {align!r}")
        if (isinstance(frame_elems, bool) or not isinstance(frame_elems, int) or frame_elems < 1
                or frame_elems % align):
            raise ConfigError(
                f"frame_elems must be a positive multiple of align={align}, got {frame_elems!r}"
            )
        tensors: list[TensorSpec] = []
        seen: set[str] = set()
        offset = 0
        for item in specs:
            try:
                name, shape, dtype = item
            except (TypeError, ValueError):
                raise ConfigError(f"a tensor spec must be (name, shape, dtype), got {item!r}") from None
            if not isinstance(name, str) or not name:
                raise ConfigError(f"tensor name must be a non-empty string, got {name!r}")
            if name in seen:
                raise ConfigError(f"tensor name {name!r} appears twice")
            seen.add(name)
            try:
                shape = tuple(shape)
            except TypeError:
                raise ConfigError(f"shape of {name!r} must be a sequence of integers, got {shape!r}") from None
            if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
                raise ConfigError(f"shape of {name!r} must be non-negative integers, got {shape!r}")
            dtype = str(dtype).removeprefix("torch.")
            if dtype not in PARAM_DTYPES:
                raise ConfigError(f"dtype of {name!r} must be one of {PARAM_DTYPES}, got {dtype!r}")
            spec = TensorSpec(name, shape, dtype, offset)
            tensors.append(spec)
            offset = spec.end
        if not tensors:
            raise ConfigError("a plan needs at least one tensor")
        total = offset
        units = math.ceil(total / align)
        bounds = [min(total, (units * k // num_servers) * align) for k in range(num_servers)]
        bounds.append(total)
        digest = hashlib.sha256(
            json.dumps(
                {
                    "tensors": [[t.name, list(t.shape), t.dtype] for t in tensors],
                    "servers": num_servers,
                    "align": align,
                    "frame": frame_elems,
                },
                separators=(",", ":"),
            ).encode()
        ).digest()
        h = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
        return cls(tuple(tensors), num_servers, align, frame_elems, tuple(bounds), h)

    @classmethod
    def from_wire(cls, d: dict) -> "PartitionPlan":
        """Rebuild a plan from :meth:`to_wire` output, checking its hash."""
        try:
            specs = [(n, tuple(s), dt) for n, s, dt in d["tensors"]]
            plan = cls.build(specs, d["servers"], d["align"], d["frame"])
            claimed = d["hash"]
            if isinstance(claimed, bool) or not isinstance(claimed, int):
                raise ValueError(f"hash must be an integer, got {claimed!r}")
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed plan description: {exc}") from None
        if plan.hash != claimed:
            raise ConfigError(f"plan hash {claimed:#x} does not match its contents ({plan.hash:#x})")
        return plan

    def to_wire(self) -> dict:
        """A msgpack/JSON-friendly description, enough to rebuild the plan."""
        return {
            "tensors": [[t.name, list(t.shape), t.dtype] for t in self.tensors],
            "servers": self.num_servers,
            "align": self.align,
            "frame": self.frame_elems,
            "hash": self.hash,
        }

    # -- queries --------------------------------------------------------
    @property
    def total(self) -> int:
        return self.bounds[-1]

    def range_of(self, server: int) -> tuple[int, int]:
        """``[lo, hi)`` of the flat vector held by ``server``."""
        if not 0 <= server < self.num_servers:
            raise ConfigError(f"server rank must be in [0, {self.num_servers}), got {server!r}")
        return self.bounds[server], self.bounds[server + 1]

    def size_of(self, server: int) -> int:
        lo, hi = self.range_of(server)
        return hi - lo

    def frames_of(self, server: int) -> list[tuple[int, int]]:
        """Element ranges, relative to the server's range, of its wire frames."""
        return frame_slices(self.size_of(server), self.frame_elems)

    def pieces_of(self, server: int) -> list[Piece]:
        """Which parts of which tensors lie in ``server``'s range."""
        lo, hi = self.range_of(server)
        out = []
        for t in self.tensors:
            a, b = max(lo, t.offset), min(hi, t.end)
            if a < b:
                out.append(Piece(t.name, a - t.offset, b - t.offset, a, b))
        return out

    def describe(self) -> str:
        sizes = ", ".join(str(self.size_of(k)) for k in range(self.num_servers))
        return (f"plan {self.hash:#018x}: {len(self.tensors)} tensors, {self.total} elements, "
                f"{self.num_servers} servers [{sizes}]")


def frame_slices(n: int, frame_elems: int) -> list[tuple[int, int]]:
    """Cut ``n`` elements into ``[lo, hi)`` frames of ``frame_elems`` (last shorter).

    Zero elements travel as zero frames.
    """
    return [(lo, min(n, lo + frame_elems)) for lo in range(0, n, frame_elems)]


def specs_of_module(module) -> list[tuple[str, tuple[int, ...], str]]:
    """The ordered ``(name, shape, dtype)`` list of a module's parameters.

    Parameters are taken in ``state_dict`` order; a parameter shared under two
    names appears once, under its first name.
    """
    return [(n, tuple(p.shape), str(p.dtype).removeprefix("torch."))
            for n, p in module.named_parameters()]
