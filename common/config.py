"""Settings of each role, as frozen dataclasses, and the one precedence rule.

Every field is a named setting with a help text (``field metadata``);
``resolve()`` fills a settings class from, in order of precedence::

    command-line flag  >  ZPS_<NAME> environment variable  >  TOML job file  >  default

Settings reject bad values with a :class:`ConfigError` naming the value.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
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


def check_timeout(timeout, what: str = "timeout", allow_none: bool = True) -> float | None:
    """A wait's ``timeout``: None (the default, where ``allow_none``) or a finite number of seconds above 0.

    Anything else (NaN, infinity, 0, a negative number, a string) raises
    ``ValueError`` naming the value, before anything waits: ZeroMQ would wait
    forever on a negative poll timeout, and NaN never compares.
    """
    if timeout is None and allow_none:
        return None
    if (type(timeout) is float or type(timeout) is int) and 0 < timeout < math.inf:
        return float(timeout)   # the common case, without the costlier checks below
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < math.inf:
        raise ValueError(f"{what}: timeout must be {'None (the default) or ' if allow_none else ''}a finite "
                         f"number of seconds above 0, got {timeout!r}")
    return float(timeout)


#: the server-side optimizers (ps.optim.OptimizerSpec takes these names)
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "adagrad")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_frame_elems(value) -> None:
    """Elements per data frame: a positive multiple of 64 (frames start 256-byte aligned)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 64:
        raise ConfigError(f"frame_elems must be a positive multiple of 64, got {value!r}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


#: help text of every role's ``curve_keys`` setting
CURVE_HELP = ("CurveZMQ key folder written by bin/ps-keygen: encrypts and authenticates every "
              "socket of this role (give it to every role of the job); empty: plain text")


@dataclasses.dataclass(frozen=True)
class TransportSettings:
    """ZeroMQ socket options shared by every role."""

    sndhwm: int = setting(1000, "send high-water mark, messages per peer")
    rcvhwm: int = setting(1000, "receive high-water mark, messages per peer")
    linger: float = setting(1.0, "seconds a closing socket may spend flushing")
    max_msg_bytes: int = setting(64 << 20, "largest frame a receiving socket accepts, bytes (ZeroMQ MAXMSGSIZE; "
                                           "larger frames drop the connection); 0: no limit")

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
    push_segment_frames: int = setting(8, "data frames per PUSH message: a longer range goes to its server "
                                          "as several segments, each checked while the rest arrives "
                                          "(0: always one message)")
    refresh: str = setting("eager", "'eager': pull fresh weights after every push; "
                                    "'lazy': pull only when the cached weights are too stale")
    attempt_timeout: float = setting(10.0, "seconds without an answer before a request is sent again "
                                           "(same sequence number; pulls wait for their deadline first)")
    backoff_max: float = setting(2.0, "cap of the exponential backoff between attempts, seconds")
    faults: str = setting("none", "fault injection on sends, e.g. 'drop=0.1,dup=0.1,types=PUSH' (tests, experiments)")
    fault_seed: int = setting(0, "seed of the fault injector")
    curve_keys: str = setting("", CURVE_HELP)
    transport: TransportSettings = dataclasses.field(default_factory=TransportSettings)

    def __post_init__(self):
        for name in ("request_timeout", "read_timeout", "heartbeat_interval"):
            _positive(name, getattr(self, name))
        _check_frame_elems(self.frame_elems)
        if self.transport.max_msg_bytes and self.frame_elems * 4 > self.transport.max_msg_bytes:
            raise ConfigError(f"frame_elems={self.frame_elems} makes {self.frame_elems * 4}-byte frames, above "
                              f"max_msg_bytes={self.transport.max_msg_bytes}")
        _positive("max_pushes_in_flight", self.max_pushes_in_flight)
        _positive("push_segment_frames", self.push_segment_frames, allow_zero=True)
        if self.refresh not in ("eager", "lazy"):
            raise ConfigError(f"refresh must be 'eager' or 'lazy', got {self.refresh!r}")
        _positive("attempt_timeout", self.attempt_timeout)
        _positive("backoff_max", self.backoff_max)
        for name in ("request_timeout", "read_timeout", "attempt_timeout", "heartbeat_interval", "backoff_max"):
            if not math.isfinite(getattr(self, name)):   # every wait is bounded; infinity overflows the wire
                raise ConfigError(f"{name} must be a finite number of seconds, got {getattr(self, name)!r}")


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
            job: Mapping[str, Any] | None = None, section: str | None = None,
            fixed: Mapping[str, Any] | None = None):
    """Build ``cls`` by the precedence rule: flag > ZPS_* env > TOML job file > default.

    ``flags`` holds the flags the user gave (None values are ignored); ``job``
    is the parsed TOML file: its top-level keys apply to every role and its
    ``[section]`` table (e.g. ``[server]``) overrides them for one role.  Keys
    the class does not know are left to other settings classes.  ``fixed``
    values are passed as they are (nested settings already resolved).
    """
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    job = dict(job or {})
    layered = {k: v for k, v in job.items() if not isinstance(v, dict)}
    if section and isinstance(job.get(section), dict):
        layered.update(job[section])
    fixed = dict(fixed or {})
    values = dict(fixed)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in fixed:
            continue
        if f.name in flags:
            values[f.name] = _coerce(f, flags[f.name], f"--{f.name.replace('_', '-')}")
        elif env_name(f.name) in env:
            values[f.name] = _coerce(f, env[env_name(f.name)], env_name(f.name))
        elif f.name in layered:
            values[f.name] = _coerce(f, layered[f.name], "job file")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


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

    rank: int = setting(0, "this server's rank in [0, num_servers) (with --coordinator: asked for, else assigned)")
    coordinator: str = setting("", "coordinator address tcp://HOST:PORT; the job's settings then come from it")
    advertise: str = setting("", "host name or address workers should use to reach this server "
                                 "(default: the bound address; this host's address for a wildcard bind)")
    interface: str = setting("", "network card (e.g. eth0) whose address to bind and advertise; "
                                 "replaces a loopback --bind host, kept beside a wildcard one")
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
    dc_lambda: float = setting(0.0, "delay compensation (DC-ASGD) strength lambda; 0 turns it off "
                                    "(costs up to 2 shard copies per worker)")
    max_parked: int = setting(10000, "parked reads at most; more are refused with OVERLOADED")
    checkpoint_dir: str = setting("", "folder for checkpoints (server-<rank>/ckpt-*); empty: no checkpoints")
    checkpoint_every_steps: int = setting(0, "checkpoint every N update steps (0: off)")
    checkpoint_every_seconds: float = setting(0.0, "checkpoint every T seconds (0: off)")
    checkpoint_keep: int = setting(3, "checkpoints kept per server")
    restore: bool = setting(False, "resume from the newest complete checkpoint in checkpoint_dir")
    checkpoint_pause: float = setting(0.0, "testing only: seconds to pause between checkpoint files")
    torch_threads: int = setting(1, "torch intra-op threads of the server process (0: torch's default); "
                                    "1 avoids an OpenMP wake-up per kernel on every small update")
    apply_threads: int = setting(2, "threads that share one large update (>= 16 MiB of a shard): the event "
                                    "loop and apply_threads - 1 helpers taking 8 MiB pieces in turn "
                                    "(a busy core never holds the update up: the loop takes what is left)")
    spin_us: float = setting(200.0, "microseconds the event loop polls for the next request before it "
                                    "sleeps, while requests come one at a time and often (0: never); "
                                    "a server thread inside another program never does")
    curve_keys: str = setting("", CURVE_HELP)
    transport: TransportSettings = dataclasses.field(default_factory=TransportSettings)

    def __post_init__(self):
        object.__setattr__(self, "staleness", parse_staleness(self.staleness))
        if self.restore and not self.checkpoint_dir:
            raise ConfigError("--restore needs --checkpoint-dir (the folder the checkpoints are in)")
        for name in ("checkpoint_every_steps", "checkpoint_every_seconds", "checkpoint_pause"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive("checkpoint_keep", self.checkpoint_keep)
        _positive("apply_threads", self.apply_threads)
        _positive("spin_us", self.spin_us, allow_zero=True)
        if self.spin_us > 100_000:
            raise ConfigError(f"spin_us must be at most 100000 (0.1 s of busy polling), got {self.spin_us!r}")
        _positive("num_servers", self.num_servers)
        _positive("num_workers", self.num_workers)
        limit = 1 << 16 if self.coordinator else self.num_servers  # the coordinator sets the count
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < limit:
            raise ConfigError(f"rank must be in [0, {self.num_servers}), got {self.rank!r}" if not self.coordinator
                              else f"rank must be a non-negative integer (the coordinator checks it against "
                                   f"the job's server count), got {self.rank!r}")
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


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """What every role of one job agrees on; held by the coordinator, handed to all."""

    num_servers: int = setting(1, "servers in the job")
    num_workers: int = setting(1, "workers in the job")
    staleness: Any = setting(0, "staleness bound s: 0 = BSP, k = SSP, inf = ASP")
    optimizer: str = setting("", "server-side optimizer: sgd, adam, adamw, adagrad (default: the workload's, else sgd)")
    lr: float | None = setting(None, "learning rate (default: the workload's)")
    momentum: float | None = setting(None, "SGD momentum (default: the workload's)")
    nesterov: bool = setting(False, "SGD Nesterov momentum")
    weight_decay: float | None = setting(None, "weight decay (None: the optimizer's default)")
    staleness_lr: bool = setting(False, "divide the learning rate by each update's measured staleness")
    dc_lambda: float = setting(0.0, "delay compensation (DC-ASGD) strength lambda; 0 turns it off")
    workload: str = setting("", "built-in workload the workers train (linreg, digits, mf, charlm)")
    steps: int = setting(0, "iterations (clocks) per worker (0: the workload's default)")
    seed: int = setting(0, "seed of the model, the data split and the straggler draws")
    batch_size: int = setting(0, "per-worker batch size (0: the workload's default)")
    straggler: str = setting("none", "straggler profile: none, RANK:FACTOR, random:P:FACTOR, "
                                     "pause:RANK|all:EVERY:SECONDS, dist:KIND:..., A+B (worker/stragglers.py)")
    eval_every: int = setting(0, "worker 0 evaluates the metric every N clocks (0: about 20 times a run)")
    read_timeout: float = setting(120.0, "seconds a read may wait for the staleness bound")
    worker_timeout: float = setting(10.0, "seconds of silence after which a worker is dropped")
    heartbeat_interval: float = setting(1.0, "seconds between heartbeats")
    frame_elems: int = setting(1 << 18, "elements per data frame")
    faults: str = setting("none", "fault injection on workers' sends, e.g. 'drop=0.1,dup=0.1,types=PUSH'")

    def __post_init__(self):
        object.__setattr__(self, "staleness", parse_staleness(self.staleness))
        _positive("num_servers", self.num_servers)
        _positive("num_workers", self.num_workers)
        for name in ("steps", "batch_size", "eval_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("read_timeout", "worker_timeout", "heartbeat_interval"):
            _positive(name, getattr(self, name))
        if self.lr is not None:
            _positive("lr", self.lr)
        if self.optimizer and self.optimizer not in OPTIMIZER_NAMES:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)} (or empty: the "
                              f"workload's), got {self.optimizer!r}")
        if self.momentum is not None and not (_finite_number(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        for name in ("dc_lambda",) + (("weight_decay",) if self.weight_decay is not None else ()):
            v = getattr(self, name)
            if not (_finite_number(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        _check_frame_elems(self.frame_elems)
        if self.heartbeat_interval * 2 > self.worker_timeout:
            raise ConfigError(f"worker_timeout ({self.worker_timeout}s) must be at least twice "
                              f"heartbeat_interval ({self.heartbeat_interval}s)")

    def to_wire(self) -> dict:
        d = dataclasses.asdict(self)
        d["staleness"] = staleness_to_wire(self.staleness)
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "JobSettings":
        d = dict(d)
        if "staleness" in d and isinstance(d["staleness"], int) and d["staleness"] < 0:
            d["staleness"] = math.inf
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"job description has unknown settings {unknown}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class CoordinatorSettings:
    """The coordinator: membership, ranks, address book, barriers, liveness."""

    bind: str = setting("tcp://127.0.0.1:0", "ZeroMQ endpoint to bind (port 0 picks a free port)")
    advertise: str = setting("", "host name or address the other hosts use to reach the coordinator "
                                 "(default: the bound address; this host's address for a wildcard bind)")
    interface: str = setting("", "network card (e.g. eth0) whose address to bind and advertise; "
                                 "replaces a loopback --bind host, kept beside a wildcard one")
    reach_timeout: float = setting(3.0, "seconds to check that a registering server's advertised endpoint "
                                        "is reachable from the coordinator (0: no check)")
    register_timeout: float = setting(600.0, "seconds to wait for every role to register before giving up")
    done_grace: float = setting(30.0, "seconds servers get to leave after the last worker finished")
    job: JobSettings = dataclasses.field(default_factory=JobSettings)
    curve_keys: str = setting("", CURVE_HELP)
    transport: TransportSettings = dataclasses.field(default_factory=TransportSettings)

    def __post_init__(self):
        _positive("register_timeout", self.register_timeout)
        _positive("done_grace", self.done_grace)
        _positive("reach_timeout", self.reach_timeout, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """One worker process (``ps-worker``)."""

    coordinator: str = setting("", "coordinator address tcp://HOST:PORT")
    rank: int = setting(-1, "worker rank to ask for (-1: any free rank; a restarted worker asks for its old one)")
    workload: str = setting("", "built-in workload to train (default: the job's)")
    out: str = setting("", "folder for this worker's metrics (metrics-w<rank>.jsonl) and results")
    save: str = setting("", "worker 0 (or the lowest live rank, if worker 0 was lost) writes the trained "
                            "model's state_dict here at the end")
    progress: str = setting("auto", "progress display: auto (a bar on a terminal, lines otherwise), bar, lines, off")
    device: str = setting("cpu", "torch device for the model: cpu, cuda, cuda:N")
    register_timeout: float = setting(300.0, "seconds to wait for the coordinator and every server")
    curve_keys: str = setting("", CURVE_HELP)

    def __post_init__(self):
        if self.progress not in ("auto", "bar", "lines", "off"):
            raise ConfigError(f"progress must be auto, bar, lines or off, got {self.progress!r}")
        _positive("register_timeout", self.register_timeout)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < -1:
            raise ConfigError(f"rank must be -1 (any) or a worker rank, got {self.rank!r}")
