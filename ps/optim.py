"""Server-side optimizers: one torch.optim optimizer over one flat shard.

A server holds its range of the model as one flat, contiguous fp32 tensor (the
*shard*).  :class:`ShardOptimizer` updates it in place with a stock
``torch.optim`` optimizer (SGD, Adam, AdamW, Adagrad); the update math is
torch's own, never reimplemented here.

Layout::

    shard            [0 ............................................ n)
    chunks (params)  [0, c) [c, 2c) [2c, 3c) ...              [kc, n)
    exp_avg          [0 ............................................ n)  flat
    exp_avg_sq       [0 ............................................ n)  flat
    step counters    [s0, s1, ..., sk]                                  flat

- The shard is cut into chunks ``[lo, hi)`` of ``chunk_elems`` elements (the
  last one shorter) by :func:`common.plan.frame_slices`, the same cut the wire
  uses, so the gradient frames of a push are the gradients of the chunks.
  Each chunk is a view of the shard and is one "parameter" of the optimizer.
- Every kind of optimizer state (``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, ``momentum_buffer``, ``sum``) is one flat buffer of the
  shard's length; ``optimizer.state[chunk]`` holds views into those buffers,
  in the exact form torch.optim expects, so torch never allocates its own
  state and a checkpoint is a handful of flat tensors.  Per-chunk ``step``
  counters are 0-d views into one small flat fp32 buffer.
- SGD creates ``momentum_buffer`` lazily as a copy of the first gradient
  (with no dampening on that step).  To keep exactly that behaviour the state
  stays empty until the first step; right after it the buffers torch created
  are copied into the flat buffer and the state is re-pointed at its views.
- The optimizer runs with ``fused=True`` where torch supports it for the
  device and options (all four optimizers on CPU since torch 2.4), else with
  ``foreach=True``, else torch's per-tensor loop; a step is then a few
  vectorized kernels over the whole shard.

Gradients are borrowed for the duration of :meth:`ShardOptimizer.step` only
(``chunk.grad`` is reset to ``None`` afterwards) and never written to, so they
may be read-only views of received network buffers.

An :class:`OptimizerSpec` describes the optimizer as a frozen value that
travels in configs and checkpoints as a plain dict (:meth:`OptimizerSpec.to_dict`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from common.errors import ConfigError
from common.plan import frame_slices

__all__ = ["OPTIMIZER_NAMES", "OptimizerSpec", "ShardOptimizer", "Implementation"]

#: optimizer names an :class:`OptimizerSpec` accepts.
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "adagrad")

#: how torch.optim runs the update; ``"auto"`` picks the first that works of
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


_STATE_KEYS = ("spec", "steps", "numel", "param_step", "buffers")


class ShardOptimizer:
    """Runs one torch.optim optimizer over a flat shard, updating it in place.

    ``shard`` is a 1-D contiguous fp32 tensor; it keeps its storage (other code
    holds views into it).  ``chunk_elems`` fixes the chunks the gradients of
    :meth:`step` come in.  ``impl`` forces one torch implementation; the
    default picks the fastest that works (see the module docstring).
    Not thread-safe: the caller serializes :meth:`step`, :meth:`state_dict`
    and :meth:`load_state_dict`.
    """

    def __init__(self, shard: torch.Tensor, spec: OptimizerSpec, chunk_elems: int,
                 *, impl: Implementation = "auto"):
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
        self._step_counts = (torch.zeros(len(self._params), **zeros)
                             if spec.has_step_counter else None)

        if impl == "auto":
            impl = _fastest_implementation(spec, shard)
        self._impl: Implementation = impl
        self._optimizer: torch.optim.Optimizer | None = None
        if self._params:
            flags = {"fused": {"fused": True}, "foreach": {"foreach": True},
                     "forloop": {"foreach": False}}[impl]
            self._optimizer = spec.torch_class()(self._params, **spec.torch_kwargs(), **flags)
            self._point_state()

    # -- properties -------------------------------------------------------

    @property
    def spec(self) -> OptimizerSpec:
        return self._spec

    @property
    def steps(self) -> int:
        """Number of optimizer steps applied (restored by :meth:`load_state_dict`)."""
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

    def step(self, grads: Sequence[torch.Tensor], lr_scale: float = 1.0) -> None:
        """Apply one optimizer step with learning rate ``spec.lr * lr_scale``.

        ``grads`` holds one 1-D fp32 tensor per chunk (see :attr:`chunks`), on
        the shard's device; they are read, never written.  Bad arguments raise
        ``ValueError`` before any state changes.
        """
        if len(grads) != len(self._params):
            raise ValueError(
                f"expected {len(self._params)} gradient chunks (shard of "
                f"{self._shard.numel()} elements in chunks of {self._chunk_elems}), "
                f"got {len(grads)}")
        for i, (g, (lo, hi)) in enumerate(zip(grads, self._slices)):
            if not isinstance(g, torch.Tensor):
                raise ValueError(f"gradient chunk {i} is a {type(g).__name__}, not a tensor")
            if g.dim() != 1 or g.numel() != hi - lo:
                raise ValueError(
                    f"gradient chunk {i} (elements [{lo}, {hi})) has shape "
                    f"{tuple(g.shape)}, expected ({hi - lo},)")
            if g.dtype != torch.float32 or g.device != self._shard.device:
                raise ValueError(
                    f"gradient chunk {i} is {g.dtype} on {g.device}, expected "
                    f"torch.float32 on {self._shard.device}")
        lr_scale = float(lr_scale)
        if not (math.isfinite(lr_scale) and lr_scale > 0):
            raise ValueError(f"lr_scale must be finite and > 0, got {lr_scale!r}")
        if self._optimizer is None:  # empty shard
            self._steps += 1
            return

        for group in self._optimizer.param_groups:
            group["lr"] = self._spec.lr * lr_scale
        for p, g in zip(self._params, grads):
            p.grad = g
        try:
            self._optimizer.step()
        finally:
            for p in self._params:
                p.grad = None
        self._steps += 1
        if self._steps == 1 and "momentum_buffer" in self._buffers:
            self._adopt_momentum_buffers()

    # -- checkpoint -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, enough to resume bit-identically.

        ``{"spec": dict, "steps": int, "numel": int, "param_step": float | None,
        "buffers": {kind: flat fp32 tensor}}``; ``param_step`` is torch's
        per-chunk ``step`` counter (the same for every chunk, ``None`` for
        sgd).  The buffers are the live state, not copies: clone them for a
        snapshot that later steps must not change.  The shard itself is not
        included.
        """
        param_step = None
        if self._step_counts is not None and self._step_counts.numel():
            param_step = float(self._step_counts[0])
        elif self._step_counts is not None:
            param_step = float(self._steps)
        return {"spec": self._spec.to_dict(), "steps": self._steps,
                "numel": self._shard.numel(), "param_step": param_step,
                "buffers": dict(self._buffers)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (possibly saved with another ``chunk_elems``).

        The saved spec must equal this optimizer's (``ConfigError`` naming the
        differing fields otherwise); sizes and buffer kinds are checked
        (``ValueError``) before anything changes.  Buffers are copied in.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"optimizer state must be a mapping, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in _STATE_KEYS)
        missing = [k for k in _STATE_KEYS if k not in d]
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
        param_step = d["param_step"]
        if self._step_counts is not None:
            if (isinstance(param_step, bool) or not isinstance(param_step, (int, float))
                    or not param_step >= 0):
                raise ValueError(
                    f"optimizer state param_step must be a number >= 0 for "
                    f"{self._spec.name}, got {param_step!r}")
        elif param_step is not None:
            raise ValueError(f"optimizer state param_step must be None for sgd, got {param_step!r}")
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
            self._step_counts.fill_(float(param_step))
        self._steps = steps
        if self._optimizer is not None:
            self._point_state()

    # -- internals --------------------------------------------------------

    def _point_state(self) -> None:
        """Make ``optimizer.state[chunk]`` views of the flat buffers.

        SGD's momentum state stays empty before the first step, so torch runs
        its first-step rule (``buf = grad``) exactly.
        """
        assert self._optimizer is not None
        state = self._optimizer.state
        sgd_before_first_step = self._spec.name == "sgd" and self._steps == 0
        for i, (p, (lo, hi)) in enumerate(zip(self._params, self._slices)):
            s = state[p]
            s.clear()
            if sgd_before_first_step:
                continue
            if self._step_counts is not None:
                s["step"] = self._step_counts[i]
            for kind, buf in self._buffers.items():
                s[kind] = buf[lo:hi]

    def _adopt_momentum_buffers(self) -> None:
        """Move the momentum buffers SGD created on its first step into the flat buffer."""
        assert self._optimizer is not None
        flat = self._buffers["momentum_buffer"]
        for p, (lo, hi) in zip(self._params, self._slices):
            s = self._optimizer.state[p]
            view = flat[lo:hi]
            view.copy_(s["momentum_buffer"])
            s["momentum_buffer"] = view


def _fastest_implementation(spec: OptimizerSpec, shard: torch.Tensor) -> Implementation:
    """The first of fused, foreach that runs ``spec`` on ``shard``'s device, else forloop.

    Probed with one step on a two-element tensor, so it reflects the installed
    torch, the device and the options (torch raises for unsupported combinations).
    """
    for impl, flags in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
        probe = torch.zeros(2, dtype=torch.float32, device=shard.device)
        probe.grad = torch.ones_like(probe)
        try:
            spec.torch_class()([probe], **spec.torch_kwargs(), **flags).step()
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            continue
        return impl  # type: ignore[return-value]
    return "forloop"
