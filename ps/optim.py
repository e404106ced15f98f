"""Server-side optimizers: torch's functional optimizers over one flat shard.

A server holds its range of the model as one flat, contiguous fp32 tensor (the
*shard*).  :class:`ShardOptimizer` updates it in place with torch's own
functional optimizer implementations (``torch.optim.sgd.sgd``,
``torch.optim.adam.adam``, ``torch.optim.adamw.adamw``,
``torch.optim.adagrad.adagrad``) -- the functions a ``torch.optim`` class's
``step()`` calls, given the same arguments it passes with default settings --
so the update math is torch's, never reimplemented here.  No
``torch.optim.Optimizer`` object is built: constructing one imports
``torch._dynamo`` (about 70 MiB of resident memory per process), and its
``step()`` adds tens of microseconds of bookkeeping per call; calling the
functions directly needs neither.

Layout::

    shard            [0 ............................................ n)
    chunks (params)  [0, c) [c, 2c) [2c, 3c) ...              [kc, n)
    exp_avg          [0 ............................................ n)  flat
    exp_avg_sq       [0 ............................................ n)  flat
    step counters    [s0, s1, ..., sk]                                  flat

- The shard is cut into chunks ``[lo, hi)`` of ``chunk_elems`` elements (the
  last one shorter) by :func:`common.plan.frame_slices`, the same cut the wire
  uses, so the gradient frames of a push are the gradients of the chunks.
  Each chunk is a view of the shard and is one "parameter" of the functional
  call.
- Every kind of optimizer state (``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, ``momentum_buffer``, ``sum``) is one flat buffer of the
  shard's length; the functions get per-chunk views of it, so torch never
  allocates its own state and a checkpoint is a handful of flat tensors.
  Per-chunk ``step`` counters (adam, adamw, adagrad) are 0-d views into one
  small flat fp32 buffer, exactly the tensors torch keeps as ``state["step"]``.
- SGD creates a chunk's ``momentum_buffer`` lazily as a copy of its first
  gradient (with no dampening on that step).  To keep exactly that behaviour
  a chunk whose momentum was never initialized is passed as ``None``; the
  buffer torch creates is then copied into the flat buffer, and the chunk is
  marked initialized (tracked per chunk, and saved in checkpoints).
- The functions run with ``fused=True`` where torch supports it for the
  device and options (all four optimizers on CPU since torch 2.4), else with
  ``foreach=True``, else torch's per-tensor loop; a step is then a few
  vectorized kernels over the whole shard.

Segment steps: the state is per chunk, so one optimizer step may be applied
as several calls, each over a run of consecutive chunks
(``step(grads, first=k, count=False)``, ..., the last with ``count=True``);
every chunk updates only its own weights, state and step counter, so the
result equals one full-shard step bit for bit, in any order of the segments.
:attr:`ShardOptimizer.steps` counts completed steps (calls with
``count=True``).  A checkpoint taken between segments records per-chunk step
counters (and momentum flags) and restores them exactly.

Gradients are only read during :meth:`ShardOptimizer.step`, never written to
or kept, so they may be read-only views of received network buffers.

An :class:`OptimizerSpec` describes the optimizer as a frozen value that
travels in configs and checkpoints as a plain dict (:meth:`OptimizerSpec.to_dict`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch.optim.adagrad import adagrad as _adagrad
from torch.optim.adam import adam as _adam
from torch.optim.adamw import adamw as _adamw
from torch.optim.sgd import sgd as _sgd

from common.config import OPTIMIZER_NAMES
from common.errors import ConfigError
from common.plan import frame_slices

__all__ = ["OPTIMIZER_NAMES", "OptimizerSpec", "ShardOptimizer", "Implementation"]

#: optimizer names an :class:`OptimizerSpec` accepts: ``common.config.OPTIMIZER_NAMES``

#: how torch runs the update; ``"auto"`` picks the first that works of
#: ``fused``, ``foreach``, ``forloop`` (torch's per-tensor loop).
Implementation = Literal["auto", "fused", "foreach", "forloop"]

# Fields that apply to each optimizer, besides ``name`` and ``lr``.
_FIELDS_OF = {
    "sgd": ("momentum", "dampening", "nesterov", "weight_decay"),
    "adam": ("betas", "eps", "weight_decay", "amsgrad"),
    "adamw": ("betas", "eps", "weight_decay", "amsgrad"),
    "adagrad": ("lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
}
# torch's defaults for the fields whose default depends on the optimizer.
_DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 1e-2, "adagrad": 0.0}
_DEFAULT_EPS = {"adam": 1e-8, "adamw": 1e-8, "adagrad": 1e-10}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """What optimizer a server runs and with which hyperparameters.

    Defaults are torch's.  ``weight_decay`` and ``eps`` default to ``None``,
    meaning torch's default for ``name`` (``weight_decay`` 0.01 for adamw and 0
    otherwise; ``eps`` 1e-8 for adam/adamw, 1e-10 for adagrad); they are
    resolved at construction, so the stored value is always concrete (``eps``
    stays ``None`` for sgd, which has none).  A field that does not apply to
    ``name`` must keep its default: ``OptimizerSpec("adam", 1e-3,
    momentum=0.9)`` is a :class:`ConfigError`, not a silently ignored setting.
    """

    name: str
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float | None = None
    amsgrad: bool = False
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ConfigError(
                f"OptimizerSpec.name: unknown optimizer {self.name!r}; "
                f"known: {', '.join(OPTIMIZER_NAMES)}")
        applies = _FIELDS_OF[self.name]
        for f in dataclasses.fields(self):
            if f.name in ("name", "lr") or f.name in applies:
                continue
            value = getattr(self, f.name)
            if value != f.default:
                raise ConfigError(
                    f"OptimizerSpec.{f.name}={value!r} does not apply to optimizer "
                    f"{self.name!r} (its settings: lr, {', '.join(applies)})")

        self._set("lr", _number("lr", self.lr))
        if not self.lr > 0:
            raise ConfigError(f"OptimizerSpec.lr must be > 0, got {self.lr!r}")
        wd = _DEFAULT_WEIGHT_DECAY[self.name] if self.weight_decay is None else self.weight_decay
        self._set("weight_decay", _nonnegative("weight_decay", wd))
        if self.name == "sgd":
            self._set("momentum", _nonnegative("momentum", self.momentum))
            self._set("dampening", _number("dampening", self.dampening))
            if not 0.0 <= self.dampening <= 1.0:
                raise ConfigError(
                    f"OptimizerSpec.dampening must be in [0, 1], got {self.dampening!r}")
            _boolean("nesterov", self.nesterov)
            if self.nesterov and (self.momentum == 0 or self.dampening != 0):
                raise ConfigError(
                    f"OptimizerSpec.nesterov=True needs momentum > 0 and dampening == 0, "
                    f"got momentum={self.momentum!r}, dampening={self.dampening!r}")
            return
        eps = _DEFAULT_EPS[self.name] if self.eps is None else self.eps
        self._set("eps", _nonnegative("eps", eps))
        if self.name == "adagrad":
            self._set("lr_decay", _nonnegative("lr_decay", self.lr_decay))
            self._set("initial_accumulator_value",
                      _nonnegative("initial_accumulator_value", self.initial_accumulator_value))
            return
        _boolean("amsgrad", self.amsgrad)
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise ConfigError(f"OptimizerSpec.betas must be a pair of numbers, got {betas!r}")
        betas = (_number("betas[0]", betas[0]), _number("betas[1]", betas[1]))
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"OptimizerSpec.betas must be in [0, 1), got {self.betas!r}")
        self._set("betas", betas)

    def _set(self, field: str, value: Any) -> None:
        object.__setattr__(self, field, value)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (str, float, bool, list) with ``name``, ``lr`` and the
        fields that apply to ``name``; :meth:`from_dict` inverts it."""
        d: dict[str, Any] = {"name": self.name, "lr": self.lr}
        for field in _FIELDS_OF[self.name]:
            value = getattr(self, field)
            d[field] = list(value) if isinstance(value, tuple) else value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OptimizerSpec":
        """Build a spec from a dict such as :meth:`to_dict` returns.

        Missing fields take their defaults; unknown keys are a
        :class:`ConfigError` naming them.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"optimizer spec must be a mapping, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ConfigError(
                f"optimizer spec has unknown keys {unknown}; known: {', '.join(known)}")
        missing = [k for k in ("name", "lr") if k not in d]
        if missing:
            raise ConfigError(f"optimizer spec lacks required keys {missing}")
        kwargs = dict(d)
        if isinstance(kwargs.get("betas"), list):
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)

    def state_kinds(self) -> tuple[str, ...]:
        """Names of the flat state buffers this optimizer keeps, in order."""
        if self.name == "sgd":
            return ("momentum_buffer",) if self.momentum != 0 else ()
        if self.name == "adagrad":
            return ("sum",)
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    @property
    def has_step_counter(self) -> bool:
        """Whether torch keeps a per-parameter ``step`` tensor (all but sgd)."""
        return self.name != "sgd"

    def torch_class(self) -> type[torch.optim.Optimizer]:
        """The torch.optim class that implements this spec."""
        return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}[self.name]

    def torch_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`torch_class` (``lr`` included)."""
        d = self.to_dict()
        del d["name"]
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return d


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"OptimizerSpec.{field} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"OptimizerSpec.{field} must be finite, got {value!r}")
    return value


def _nonnegative(field: str, value: Any) -> float:
    value = _number(field, value)
    if value < 0:
        raise ConfigError(f"OptimizerSpec.{field} must be >= 0, got {value!r}")
    return value


def _boolean(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"OptimizerSpec.{field} must be True or False, got {value!r}")


#: keys of a :meth:`ShardOptimizer.state_dict`; ``momentum_init`` may be
#: missing from states saved before it existed.
_STATE_KEYS = ("spec", "steps", "numel", "param_step", "momentum_init", "buffers")
_OPTIONAL_STATE_KEYS = ("momentum_init",)

#: keyword flags of the functional call for each implementation.
_FLAGS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True, "foreach": False},
    "foreach": {"fused": False, "foreach": True},
    "forloop": {"fused": False, "foreach": False},
}


class ShardOptimizer:
    """Runs torch's functional optimizer over a flat shard, updating it in place.

    ``shard`` is a 1-D contiguous fp32 tensor; it keeps its storage (other code
    holds views into it).  ``chunk_elems`` fixes the chunks the gradients of
    :meth:`step` come in.  ``impl`` forces one torch implementation; the
    default picks the fastest that works (see the module docstring).
    Not thread-safe: the caller serializes :meth:`step`, :meth:`state_dict`
    and :meth:`load_state_dict`.
    """

    def __init__(self, shard: torch.Tensor, spec: OptimizerSpec, chunk_elems: int,
                 *, impl: Implementation = "auto", direct: bool | None = None):
        if not isinstance(shard, torch.Tensor):
            raise ValueError(f"shard must be a torch.Tensor, got {type(shard).__name__}")
        if shard.dim() != 1 or shard.dtype != torch.float32 or not shard.is_contiguous():
            raise ValueError(
                f"shard must be a 1-D contiguous float32 tensor, got shape "
                f"{tuple(shard.shape)}, dtype {shard.dtype}, contiguous={shard.is_contiguous()}")
        if shard.requires_grad:
            raise ValueError("shard must not require grad (the server updates it directly)")
        if not isinstance(spec, OptimizerSpec):
            raise ValueError(f"spec must be an OptimizerSpec, got {type(spec).__name__}")
        if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems <= 0:
            raise ConfigError(f"chunk_elems must be a positive int, got {chunk_elems!r}")
        if impl not in ("auto", "fused", "foreach", "forloop"):
            raise ConfigError(
                f"impl must be one of auto, fused, foreach, forloop, got {impl!r}")

        self._shard = shard
        self._spec = spec
        self._chunk_elems = chunk_elems
        self._slices = frame_slices(shard.numel(), chunk_elems)
        self._params = [shard[lo:hi] for lo, hi in self._slices]
        self._steps = 0
        zeros = dict(dtype=torch.float32, device=shard.device)
        self._buffers: dict[str, torch.Tensor] = {
            kind: torch.zeros(shard.numel(), **zeros) for kind in spec.state_kinds()}
        if spec.name == "adagrad":
            self._buffers["sum"].fill_(spec.initial_accumulator_value)
        # per-chunk views of the flat buffers: what torch keeps as state[p][kind]
        self._views: dict[str, list[torch.Tensor]] = {
            kind: [buf[lo:hi] for lo, hi in self._slices] for kind, buf in self._buffers.items()}
        self._step_counts: torch.Tensor | None = None
        self._step_views: list[torch.Tensor] = []
        if spec.has_step_counter:
            self._step_counts = torch.zeros(len(self._params), **zeros)
            self._step_views = [self._step_counts[i] for i in range(len(self._params))]
        # SGD momentum: which chunks have their buffer (torch creates it lazily)
        self._momentum_init: list[bool] | None = None
        self._momentum_pending = 0  # chunks not yet initialized
        if "momentum_buffer" in self._buffers:
            self._momentum_init = [False] * len(self._params)
            self._momentum_pending = len(self._params)

        if impl == "auto":
            impl = _fastest_implementation(spec, shard)
        self._impl: Implementation = impl
        self._flags = _FLAGS[impl]
        # the fused kernels called without the functional wrapper (see _direct_works)
        if direct is None:
            direct = impl == "fused" and _direct_works(spec, shard.device)
        self._direct = bool(direct) and impl == "fused" and spec.name in ("sgd", "adam", "adamw")

    # -- properties -------------------------------------------------------

    @property
    def spec(self) -> OptimizerSpec:
        return self._spec

    @property
    def steps(self) -> int:
        """Number of optimizer steps completed (calls of :meth:`step` with
        ``count=True``; restored by :meth:`load_state_dict`)."""
        return self._steps

    @property
    def implementation(self) -> Implementation:
        """The torch implementation in use: ``fused``, ``foreach`` or ``forloop``."""
        return self._impl

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """The ``[lo, hi)`` ranges :meth:`step` expects one gradient for, in order."""
        return list(self._slices)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (flat buffers and step counters)."""
        total = sum(b.numel() * b.element_size() for b in self._buffers.values())
        if self._step_counts is not None:
            total += self._step_counts.numel() * self._step_counts.element_size()
        return total

    # -- update -----------------------------------------------------------

    def step(self, grads: Sequence[torch.Tensor], lr_scale: float = 1.0, *,
             first: int | None = None, count: bool = True) -> None:
        """Update chunks with learning rate ``spec.lr * lr_scale``.

        ``grads`` holds one 1-D fp32 tensor per chunk (see :attr:`chunks`), on
        the shard's device; they are read, never written or kept.

        With ``first=None`` (the default) ``grads`` must cover every chunk: a
        whole optimizer step.  With ``first=k`` they are the gradients of the
        consecutive chunks ``k .. k + len(grads) - 1`` (at least one; none for
        an empty shard) and only those chunks are updated, each advancing its
        own state and step counter -- one *segment* of a step.  Applying every
        chunk exactly once per step, in segments in any order, equals one
        full step bit for bit; the caller keeps that bookkeeping.
        ``count=True`` marks the call that completes a step: :attr:`steps`
        increments (pass ``count=False`` for all segments but the last).

        Bad arguments raise ``ValueError`` before any state changes.
        """
        n = len(self._params)
        if first is None:
            if len(grads) != n:
                raise ValueError(
                    f"expected {n} gradient chunks (shard of "
                    f"{self._shard.numel()} elements in chunks of {self._chunk_elems}), "
                    f"got {len(grads)}")
            first = 0
        elif isinstance(first, bool) or not isinstance(first, int):
            raise ValueError(f"first must be an int chunk index, got {first!r}")
        elif n == 0:
            if first != 0 or len(grads) != 0:
                raise ValueError(
                    f"the shard is empty (no chunks): expected first=0 and no gradients, "
                    f"got first={first} and {len(grads)} gradient chunks")
        elif not 0 <= first < n:
            raise ValueError(
                f"first={first} is out of range: the shard has {n} chunks (0 .. {n - 1})")
        elif not 1 <= len(grads) <= n - first:
            raise ValueError(
                f"a segment starting at chunk {first} takes 1 to {n - first} gradient "
                f"chunks (the shard has {n}), got {len(grads)}")
        if not isinstance(count, bool):
            raise ValueError(f"count must be True or False, got {count!r}")
        device = self._shard.device
        for j, g in enumerate(grads):
            i = first + j
            lo, hi = self._slices[i]
            if not isinstance(g, torch.Tensor):
                raise ValueError(f"gradient chunk {i} is a {type(g).__name__}, not a tensor")
            if g.dim() != 1 or g.numel() != hi - lo:
                raise ValueError(
                    f"gradient chunk {i} (elements [{lo}, {hi})) has shape "
                    f"{tuple(g.shape)}, expected ({hi - lo},)")
            if g.dtype != torch.float32 or g.device != device:
                raise ValueError(
                    f"gradient chunk {i} is {g.dtype} on {g.device}, expected "
                    f"torch.float32 on {device}")
        lr_scale = float(lr_scale)
        if not (math.isfinite(lr_scale) and lr_scale > 0):
            raise ValueError(f"lr_scale must be finite and > 0, got {lr_scale!r}")

        if grads:
            lr = self._spec.lr * lr_scale
            if any(g.requires_grad for g in grads):
                with torch.no_grad():  # as Optimizer.step: the update is not recorded
                    self._update(first, first + len(grads), list(grads), lr)
            else:  # nothing here requires grad (the shard never does): nothing to record
                self._update(first, first + len(grads), list(grads), lr)
        if count:
            self._steps += 1

    def step_whole(self, grads: list[torch.Tensor], lr_scale: float = 1.0) -> None:
        """One whole step from gradients the caller has already checked.

        What ``step(grads, lr_scale)`` does, for a caller (the server's request
        path) that guarantees what ``step`` would check: one 1-D fp32 tensor
        per chunk, of the chunk's length, on the shard's device, none requiring
        grad, and ``lr_scale`` finite and > 0.  The checks cost a small push
        about a fifth of its update.
        """
        if grads:
            self._update(0, len(grads), grads, self._spec.lr * lr_scale)
        self._steps += 1

    # -- checkpoint -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, enough to resume bit-identically.

        ``{"spec": dict, "steps": int, "numel": int, "param_step": ...,
        "momentum_init": ..., "buffers": {kind: flat fp32 tensor}}``.

        ``param_step`` is torch's per-chunk ``step`` counter: one float when
        every chunk's is the same (always, between steps), a list of one float
        per chunk when they differ (a checkpoint taken between the segments of
        a step), ``None`` for sgd.  ``momentum_init`` says which chunks have
        their SGD momentum buffer, in the same form (a bool, or a list of one
        bool per chunk), ``None`` for optimizers without one.  The buffers are
        the live state, not copies: clone them for a snapshot that later steps
        must not change.  The shard itself is not included.
        """
        param_step: float | list[float] | None = None
        if self._step_counts is not None:
            counts = self._step_counts.tolist()
            if not counts:
                param_step = float(self._steps)
            elif all(c == counts[0] for c in counts):
                param_step = float(counts[0])
            else:
                param_step = [float(c) for c in counts]
        momentum_init: bool | list[bool] | None = None
        if self._momentum_init is not None:
            flags = self._momentum_init
            if not flags:
                momentum_init = self._steps > 0
            elif all(f == flags[0] for f in flags):
                momentum_init = flags[0]
            else:
                momentum_init = list(flags)
        return {"spec": self._spec.to_dict(), "steps": self._steps,
                "numel": self._shard.numel(), "param_step": param_step,
                "momentum_init": momentum_init, "buffers": dict(self._buffers)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (possibly saved with another ``chunk_elems``).

        The saved spec must equal this optimizer's (``ConfigError`` naming the
        differing fields otherwise); sizes, buffer kinds and counters are
        checked (``ValueError``) before anything changes.  Buffers are copied
        in.  Per-chunk counters (a state saved between the segments of a step)
        need the chunking they were saved with.  A state without
        ``momentum_init`` (saved before it existed) counts SGD momentum as
        initialized iff ``steps > 0``.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"optimizer state must be a mapping, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in _STATE_KEYS)
        missing = [k for k in _STATE_KEYS if k not in d and k not in _OPTIONAL_STATE_KEYS]
        if unknown or missing:
            raise ValueError(
                f"optimizer state keys: unknown {unknown}, missing {missing}; "
                f"expected {list(_STATE_KEYS)}")
        saved = OptimizerSpec.from_dict(d["spec"])
        if saved != self._spec:
            diff = [f"{f.name}: saved {getattr(saved, f.name)!r}, "
                    f"here {getattr(self._spec, f.name)!r}"
                    for f in dataclasses.fields(OptimizerSpec)
                    if getattr(saved, f.name) != getattr(self._spec, f.name)]
            raise ConfigError(f"optimizer state was saved with another spec ({'; '.join(diff)})")
        steps = d["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"optimizer state steps must be an int >= 0, got {steps!r}")
        if d["numel"] != self._shard.numel():
            raise ValueError(
                f"optimizer state is for a shard of {d['numel']!r} elements, "
                f"this shard has {self._shard.numel()}")
        n = len(self._params)
        param_step = d["param_step"]
        if self._step_counts is not None:
            if isinstance(param_step, (list, tuple)):
                self._check_per_chunk("param_step", param_step)
                if not all(_is_count(c) for c in param_step):
                    raise ValueError(
                        f"optimizer state param_step must hold numbers >= 0, got {param_step!r}")
            elif not _is_count(param_step):
                raise ValueError(
                    f"optimizer state param_step must be a number >= 0 (or a list of one "
                    f"per chunk) for {self._spec.name}, got {param_step!r}")
        elif param_step is not None:
            raise ValueError(f"optimizer state param_step must be None for sgd, got {param_step!r}")
        momentum_init = d.get("momentum_init", _MISSING)
        if self._momentum_init is not None:
            if momentum_init is _MISSING:
                momentum_init = steps > 0
            elif isinstance(momentum_init, (list, tuple)):
                self._check_per_chunk("momentum_init", momentum_init)
                if not all(isinstance(f, bool) for f in momentum_init):
                    raise ValueError(
                        f"optimizer state momentum_init must hold True/False, "
                        f"got {momentum_init!r}")
            elif not isinstance(momentum_init, bool):
                raise ValueError(
                    f"optimizer state momentum_init must be True/False (or a list of one "
                    f"per chunk) for sgd with momentum, got {momentum_init!r}")
        elif momentum_init is not _MISSING and momentum_init is not None:
            raise ValueError(
                f"optimizer state momentum_init must be None for {self._spec.name} "
                f"without momentum, got {momentum_init!r}")
        buffers = d["buffers"]
        if not isinstance(buffers, Mapping) or set(buffers) != set(self._buffers):
            got = sorted(buffers) if isinstance(buffers, Mapping) else type(buffers).__name__
            raise ValueError(
                f"optimizer state buffers are {got}, expected {sorted(self._buffers)}")
        for kind, b in buffers.items():
            if (not isinstance(b, torch.Tensor) or b.dtype != torch.float32
                    or tuple(b.shape) != (self._shard.numel(),)):
                what = (f"{b.dtype} of shape {tuple(b.shape)}" if isinstance(b, torch.Tensor)
                        else type(b).__name__)
                raise ValueError(
                    f"optimizer state buffer {kind!r} is {what}, expected "
                    f"torch.float32 of shape ({self._shard.numel()},)")

        for kind, b in buffers.items():
            if b is not self._buffers[kind]:
                self._buffers[kind].copy_(b)
        if self._step_counts is not None:
            if isinstance(param_step, (list, tuple)):
                self._step_counts.copy_(torch.tensor([float(c) for c in param_step],
                                                     dtype=torch.float32))
            else:
                self._step_counts.fill_(float(param_step))
        if self._momentum_init is not None:
            flags = (list(momentum_init) if isinstance(momentum_init, (list, tuple))
                     else [momentum_init] * n)
            self._momentum_init = flags
            self._momentum_pending = flags.count(False)
        self._steps = steps

    # -- internals --------------------------------------------------------

    def _check_per_chunk(self, key: str, values: Sequence[Any]) -> None:
        n = len(self._params)
        if len(values) != n:
            raise ValueError(
                f"optimizer state {key} holds {len(values)} per-chunk values but this "
                f"shard has {n} chunks of {self._chunk_elems} elements: the checkpoint "
                f"was taken mid-step (between segments) with another chunking")

    def _update(self, lo: int, hi: int, grads: list[torch.Tensor], lr: float) -> None:
        """Run torch's functional optimizer on chunks ``lo .. hi - 1``."""
        spec, flags, views = self._spec, self._flags, self._views
        params = self._params[lo:hi]
        if self._direct and self._update_direct(lo, hi, params, grads, lr):
            return
        if spec.name == "adam" or spec.name == "adamw":
            kwargs = dict(
                capturable=False, differentiable=False, grad_scale=None, found_inf=None,
                has_complex=False, amsgrad=spec.amsgrad, beta1=spec.betas[0],
                beta2=spec.betas[1], lr=lr, weight_decay=spec.weight_decay, eps=spec.eps,
                maximize=False, **flags)
            if spec.name == "adam":
                kwargs["decoupled_weight_decay"] = False
            (_adam if spec.name == "adam" else _adamw)(
                params, grads, views["exp_avg"][lo:hi], views["exp_avg_sq"][lo:hi],
                views["max_exp_avg_sq"][lo:hi] if spec.amsgrad else [],
                self._step_views[lo:hi], **kwargs)
        elif spec.name == "adagrad":
            _adagrad(
                params, grads, views["sum"][lo:hi], self._step_views[lo:hi],
                grad_scale=None, found_inf=None, has_sparse_grad=False,
                differentiable=False, has_complex=False, lr=lr,
                weight_decay=spec.weight_decay, lr_decay=spec.lr_decay, eps=spec.eps,
                maximize=False, **flags)
        elif self._momentum_init is None:  # sgd without momentum: no state
            self._sgd(params, grads, [], lr)
        elif self._momentum_pending == 0:
            self._sgd(params, grads, views["momentum_buffer"][lo:hi], lr)
        else:
            self._sgd_first_steps(lo, hi, grads, lr)

    def _update_direct(self, lo: int, hi: int, params: list[torch.Tensor],
                       grads: list[torch.Tensor], lr: float) -> bool:
        """The fused kernel itself, as torch's functional wrapper would call it; False: not here.

        The wrapper first groups the tensors by device and dtype, which for one
        flat shard is a single group in the same order; skipping it saves
        7-10 µs of Python per step, a third of a small push's update.
        Whether this gives exactly the wrapper's result on the installed
        torch is checked once per spec and device (:func:`_direct_works`).
        """
        spec, views = self._spec, self._views
        if spec.name == "sgd":
            if self._momentum_init is not None and self._momentum_pending:
                return False                      # torch's first-step rule: the wrapper
            torch._fused_sgd_(
                params, grads, [] if self._momentum_init is None else views["momentum_buffer"][lo:hi],
                weight_decay=spec.weight_decay, momentum=spec.momentum, lr=lr,
                dampening=spec.dampening, nesterov=spec.nesterov, maximize=False,
                is_first_step=False, grad_scale=None, found_inf=None)
            return True
        steps = self._step_views[lo:hi]
        torch._foreach_add_(steps, 1)
        (torch._fused_adam_ if spec.name == "adam" else torch._fused_adamw_)(
            params, grads, views["exp_avg"][lo:hi], views["exp_avg_sq"][lo:hi],
            views["max_exp_avg_sq"][lo:hi] if spec.amsgrad else [], steps,
            amsgrad=spec.amsgrad, lr=lr, beta1=spec.betas[0], beta2=spec.betas[1],
            weight_decay=spec.weight_decay, eps=spec.eps, maximize=False,
            grad_scale=None, found_inf=None)
        return True

    def _sgd(self, params: list[torch.Tensor], grads: list[torch.Tensor],
             bufs: list[torch.Tensor | None], lr: float) -> None:
        spec = self._spec
        if spec.nesterov and spec.weight_decay == 0 and self._impl == "foreach":
            # torch's foreach nesterov adds the momentum into the gradients in
            # place (it owns p.grad); give it scratch copies, ours are read-only
            grads = [g.clone() for g in grads]
        _sgd(params, grads, bufs, has_sparse_grad=False, grad_scale=None, found_inf=None,
             weight_decay=spec.weight_decay, momentum=spec.momentum, lr=lr,
             dampening=spec.dampening, nesterov=spec.nesterov, maximize=False,
             **self._flags)

    def _sgd_first_steps(self, lo: int, hi: int, grads: list[torch.Tensor],
                         lr: float) -> None:
        """SGD with momentum where some chunks have no momentum buffer yet.

        Chunks that have one run as usual; the others run as torch's first
        step (``buf = grad``, given ``None``), and the buffers torch created
        are copied into the flat buffer.
        """
        assert self._momentum_init is not None
        flat_views = self._views["momentum_buffer"]
        ready = [i for i in range(lo, hi) if self._momentum_init[i]]
        fresh = [i for i in range(lo, hi) if not self._momentum_init[i]]
        if ready:
            self._sgd([self._params[i] for i in ready], [grads[i - lo] for i in ready],
                      [flat_views[i] for i in ready], lr)
        if not fresh:
            return
        created: list[torch.Tensor | None] = [None] * len(fresh)
        self._sgd([self._params[i] for i in fresh], [grads[i - lo] for i in fresh],
                  created, lr)
        for i, buf in zip(fresh, created):
            assert buf is not None
            flat_views[i].copy_(buf)
            self._momentum_init[i] = True
        self._momentum_pending -= len(fresh)


_MISSING = object()


def _is_count(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and value >= 0 and math.isfinite(value))


_DIRECT_WORKS: dict[tuple[OptimizerSpec, str], bool] = {}


def _direct_works(spec: OptimizerSpec, device: torch.device) -> bool:
    """Whether calling the fused kernel directly gives bit for bit what torch's wrapper gives.

    Checked once per spec and device type on a small shard over a few steps
    (segments, a changed learning rate and SGD's first step included); any
    error, such as a changed signature in another torch release, means no.
    """
    key = (spec, device.type)
    if key not in _DIRECT_WORKS:
        ok = False
        if spec.name in ("sgd", "adam", "adamw"):
            try:
                gen = torch.Generator().manual_seed(7)
                w0 = torch.randn(300, generator=gen)
                grads = [torch.randn(300, generator=gen) for _ in range(4)]
                runs = []
                for direct in (False, True):
                    shard = w0.clone().to(device)
                    opt = ShardOptimizer(shard, spec, 128, impl="fused", direct=direct)
                    for k, g in enumerate(grads):
                        chunks = list(g.to(device).split(128))
                        opt.step(chunks[:1], 1.0 + k, first=0, count=False)
                        opt.step(chunks[1:], 1.0 + k, first=1)
                    runs.append([shard, *opt.state_dict()["buffers"].values()])
                ok = all(torch.equal(a, b) for a, b in zip(*runs))
            except (RuntimeError, ValueError, TypeError, AttributeError, NotImplementedError):
                ok = False
        _DIRECT_WORKS[key] = ok
    return _DIRECT_WORKS[key]


def _fastest_implementation(spec: OptimizerSpec, shard: torch.Tensor) -> Implementation:
    """The first of fused, foreach that runs ``spec`` on ``shard``'s device, else forloop.

    Probed with two steps (SGD's first step is special) of the functional call
    on a two-element shard, so it reflects the installed torch, the device and
    the options (torch raises for unsupported combinations).
    """
    for impl in ("fused", "foreach"):
        probe = torch.zeros(2, dtype=torch.float32, device=shard.device)
        grad = torch.ones_like(probe)
        try:
            opt = ShardOptimizer(probe, spec, 2, impl=impl)  # type: ignore[arg-type]
            opt.step([grad])
            opt.step([grad])
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            continue
        return impl  # type: ignore[return-value]
    return "forloop"
