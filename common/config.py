"""Settings of each role, as frozen dataclasses, and the one precedence rule.

Every field is a named setting with a help text (``field metadata``);
``resolve()`` fills a settings class from, in order of precedence::

    command-line flag  >  ZPS_<NAME> environment variable  >  TOML job file  >  default

Settings reject bad values with a :class:`ConfigError` naming the value.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from common.errors import ConfigError


def setting(default, help: str, **kw):
    """A dataclass field with a help text (shown by --help and ps-stat)."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def parse_staleness(value) -> int | float:
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("inf", "infinity", "asp", "-1"):
            return math.inf
        try:
            value = int(v)
        except ValueError:
            raise ConfigError(f"staleness must be a non-negative integer or 'inf', got {value!r}") from None
    if isinstance(value, float) and value == math.inf:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"staleness must be a non-negative integer or 'inf', got {value!r}")
    return value


def staleness_to_wire(s) -> int:
    return -1 if s == math.inf else int(s)


def staleness_from_wire(v: int) -> int | float:
    return math.inf if v < 0 else v


def _positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TransportSettings:
    """ZeroMQ socket options shared by every role."""

    sndhwm: int = setting(1000, "send high-water mark, messages per peer")
    rcvhwm: int = setting(1000, "receive high-water mark, messages per peer")
    linger: float = setting(1.0, "seconds a closing socket may spend flushing")
    max_msg_bytes: int = setting(0, "largest message accepted (0: derived from the plan)")

    def __post_init__(self):
        _positive("sndhwm", self.sndhwm)
        _positive("rcvhwm", self.rcvhwm)
        _positive("linger", self.linger, allow_zero=True)
        _positive("max_msg_bytes", self.max_msg_bytes, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    """How a worker talks to the servers."""

    request_timeout: float = setting(60.0, "seconds a push, init or control request may take")
    read_timeout: float = setting(120.0, "seconds a read may wait for the staleness bound")
    heartbeat_interval: float = setting(1.0, "seconds between heartbeats to each server")
    frame_elems: int = setting(1 << 18, "elements per data frame (1 MiB of fp32)")
    max_pushes_in_flight: int = setting(4, "pushes sent but not yet acknowledged before a push waits")
    refresh: str = setting("eager", "'eager': pull fresh weights after every push; "
                                    "'lazy': pull only when the cached weights are too stale")
    transport: TransportSettings = dataclasses.field(default_factory=TransportSettings)

    def __post_init__(self):
        for name in ("request_timeout", "read_timeout", "heartbeat_interval"):
            _positive(name, getattr(self, name))
        _positive("frame_elems", self.frame_elems)
        if self.frame_elems % 64:
            raise ConfigError(f"frame_elems must be a multiple of 64, got {self.frame_elems}")
        _positive("max_pushes_in_flight", self.max_pushes_in_flight)
        if self.refresh not in ("eager", "lazy"):
            raise ConfigError(f"refresh must be 'eager' or 'lazy', got {self.refresh!r}")


def env_name(field: str) -> str:
    return "ZPS_" + field.upper()


def _coerce(cls_field: dataclasses.Field, raw: Any, source: str):
    """Turn a string (env, CLI) or TOML value into the field's type."""
    typ = cls_field.type if isinstance(cls_field.type, str) else getattr(cls_field.type, "__name__", "")
    name = cls_field.name
    if not isinstance(raw, str):
        return raw
    try:
        if typ == "bool":
            v = raw.strip().lower()
            if v in ("1", "true", "yes", "on"):
                return True
            if v in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ == "int":
            return int(raw)
        if typ == "float":
            return float(raw)
        if typ in ("float | None", "Optional[float]"):
            return None if raw.strip().lower() in ("", "none") else float(raw)
        if typ in ("int | None", "Optional[int]"):
            return None if raw.strip().lower() in ("", "none") else int(raw)
    except ValueError:
        raise ConfigError(f"{name} from {source}: cannot read {raw!r} as {typ}") from None
    return raw


def resolve(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
            job: Mapping[str, Any] | None = None, section: str | None = None):
    """Build ``cls`` by the precedence rule: flag > ZPS_* env > TOML job file > default.

    ``flags`` holds only the flags the user gave (None values are ignored);
    ``job`` is the parsed TOML file; its top-level keys apply to every role and
    its ``[section]`` table (e.g. ``[server]``) overrides them for one role.
    Unknown keys in the job file's section are an error naming them.
    """
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    job = dict(job or {})
    layered = {k: v for k, v in job.items() if not isinstance(v, dict)}
    if section and isinstance(job.get(section), dict):
        sect = job[section]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(sect) - names)
        if unknown:
            raise ConfigError(f"job file [{section}] has unknown settings {unknown}; known: {sorted(names)}")
        layered.update(sect)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in flags:
            values[f.name] = _coerce(f, flags[f.name], f"--{f.name.replace('_', '-')}")
        elif env_name(f.name) in env:
            values[f.name] = _coerce(f, env[env_name(f.name)], env_name(f.name))
        elif f.name in layered:
            values[f.name] = _coerce(f, layered[f.name], "job file")
    return cls(**values)


def describe(settings) -> dict:
    """Every setting and its value, for --help, logs and ps-stat."""
    out = {}
    for f in dataclasses.fields(settings):
        v = getattr(settings, f.name)
        if dataclasses.is_dataclass(v):
            v = describe(v)
        elif isinstance(v, float) and v == math.inf:
            v = "inf"
        out[f.name] = v
    return out


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """One shard server."""

    rank: int = setting(0, "this server's rank in [0, num_servers)")
    num_servers: int = setting(1, "servers in the job")
    num_workers: int = setting(1, "workers in the job (ids 0..num_workers-1)")
    staleness: Any = setting(0, "staleness bound s: 0 = BSP, k = SSP, inf = ASP")
    bind: str = setting("tcp://127.0.0.1:0", "ZeroMQ endpoint to bind (port 0 picks a free port)")
    optimizer: str = setting("sgd", "server-side optimizer: sgd, adam, adamw, adagrad")
    lr: float = setting(0.01, "learning rate")
    momentum: float = setting(0.0, "SGD momentum")
    nesterov: bool = setting(False, "SGD Nesterov momentum")
    weight_decay: float | None = setting(None, "weight decay (None: the optimizer's default)")
    beta1: float = setting(0.9, "Adam/AdamW beta1")
    beta2: float = setting(0.999, "Adam/AdamW beta2")
    eps: float | None = setting(None, "Adam/AdamW/Adagrad epsilon (None: the optimizer's default)")
    read_timeout: float = setting(120.0, "longest a parked read waits when the request names no deadline, seconds")
    worker_timeout: float = setting(10.0, "seconds of silence after which a worker is dead")
    staleness_lr: bool = setting(False, "divide the learning rate by each update's measured staleness")
    max_parked: int = setting(10000, "parked reads at most; more are refused with OVERLOADED")
    transport: TransportSettings = dataclasses.field(default_factory=TransportSettings)

    def __post_init__(self):
        object.__setattr__(self, "staleness", parse_staleness(self.staleness))
        _positive("num_servers", self.num_servers)
        _positive("num_workers", self.num_workers)
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.num_servers:
            raise ConfigError(f"rank must be in [0, {self.num_servers}), got {self.rank!r}")
        for name in ("lr", "read_timeout", "worker_timeout", "max_parked"):
            _positive(name, getattr(self, name))
        _positive("momentum", self.momentum, allow_zero=True)

    @property
    def optimizer_options(self) -> dict:
        """Keyword options for ``ps.optim.OptimizerSpec`` (defaults left out)."""
        opts: dict[str, Any] = {"name": self.optimizer, "lr": self.lr}
        if self.optimizer == "sgd":
            opts.update(momentum=self.momentum, nesterov=self.nesterov)
        if self.optimizer in ("adam", "adamw"):
            opts["betas"] = (self.beta1, self.beta2)
        if self.weight_decay is not None:
            opts["weight_decay"] = self.weight_decay
        if self.eps is not None and self.optimizer != "sgd":
            opts["eps"] = self.eps
        return opts
