"""A seeded fault injector for the transport: drop, duplicate and delay messages.

Off by default.  ``PSClient`` consults it for every send attempt of the
message types it covers; tests and experiments use it to prove that retries
and sequence numbers make pushes exactly-once.
"""
from __future__ import annotations

import dataclasses
import random

from common.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    drop: float = 0.0        # probability a send attempt is silently dropped
    dup: float = 0.0         # probability a send attempt is sent twice
    delay: float = 0.0       # probability a send attempt is held back
    delay_seconds: float = 0.05  # how long a delayed attempt is held back (uniform in [0, this])
    types: tuple[str, ...] = ("PUSH",)  # message type names covered ("*": all)
    seed: int = 0

    def __post_init__(self):
        for name in ("drop", "dup", "delay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"fault {name} rate must be in [0, 1), got {v!r}")
        if self.delay_seconds < 0:
            raise ConfigError(f"fault delay_seconds must be >= 0, got {self.delay_seconds!r}")

    @property
    def active(self) -> bool:
        return bool(self.drop or self.dup or self.delay)

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> "FaultSpec":
        """``drop=0.1,dup=0.1,delay=0.05,delay_seconds=0.02,types=PUSH+PULL`` ('' or 'none': off)."""
        if not text or text.strip().lower() == "none":
            return cls(seed=seed)
        kw: dict = {"seed": seed}
        for part in text.split(","):
            key, _, val = part.partition("=")
            key = key.strip()
            try:
                if key in ("drop", "dup", "delay", "delay_seconds"):
                    kw[key] = float(val)
                elif key == "types":
                    kw[key] = tuple(t.strip().upper() for t in val.split("+") if t.strip())
                elif key == "seed":
                    kw[key] = int(val)
                else:
                    raise ConfigError(f"unknown fault setting {key!r} in {text!r} "
                                      "(known: drop, dup, delay, delay_seconds, types, seed)")
            except ValueError:
                raise ConfigError(f"fault setting {key}={val!r} is not a number") from None
        return cls(**kw)


class FaultInjector:
    """Decides, per send attempt, how many copies go out and after what delay."""

    def __init__(self, spec: FaultSpec, stream: str = ""):
        self.spec = spec
        self._rng = random.Random(f"{spec.seed}:{stream}")
        self.counts = {"dropped": 0, "duplicated": 0, "delayed": 0}

    def covers(self, type_name: str) -> bool:
        return self.spec.active and ("*" in self.spec.types or type_name in self.spec.types)

    def plan(self, type_name: str) -> tuple[int, float]:
        """``(copies, delay_seconds)`` for one send attempt: 0 copies means dropped."""
        if not self.covers(type_name):
            return 1, 0.0
        r = self._rng
        if r.random() < self.spec.drop:
            self.counts["dropped"] += 1
            return 0, 0.0
        copies = 1
        if r.random() < self.spec.dup:
            self.counts["duplicated"] += 1
            copies = 2
        delay = 0.0
        if r.random() < self.spec.delay:
            self.counts["delayed"] += 1
            delay = r.uniform(0, self.spec.delay_seconds)
        return copies, delay
