"""Straggler profiles: seeded, reproducible slowdowns of worker iterations.

A slowdown is a delay proportional to the iteration's measured compute time
(a worker FACTOR times slower sleeps (FACTOR - 1) x compute), so a profile
behaves the same on a busy machine as on an idle one.

Profiles (``--straggler``):

    none               no slowdown
    RANK:FACTOR        worker RANK is persistently FACTOR times slower
    random:P:FACTOR    every worker is FACTOR times slower on a random fraction P of iterations
"""
from __future__ import annotations

import dataclasses
import random

from common.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class StragglerProfile:
    kind: str                 # none | rank | random
    rank: int = -1
    prob: float = 0.0
    factor: float = 1.0
    text: str = "none"

    @classmethod
    def parse(cls, text: str) -> "StragglerProfile":
        t = (text or "none").strip().lower()
        if t in ("none", ""):
            return cls("none")
        parts = t.split(":")
        try:
            if parts[0] == "random" and len(parts) == 3:
                p, f = float(parts[1]), float(parts[2])
                if not 0 <= p <= 1 or f < 1:
                    raise ValueError
                return cls("random", prob=p, factor=f, text=t)
            if len(parts) == 2:
                r, f = int(parts[0]), float(parts[1])
                if r < 0 or f < 1:
                    raise ValueError
                return cls("rank", rank=r, factor=f, text=t)
        except ValueError:
            pass
        raise ConfigError(f"straggler profile must be none, RANK:FACTOR (FACTOR >= 1) or "
                          f"random:P:FACTOR (0 <= P <= 1), got {text!r}")

    def injector(self, rank: int, seed: int) -> "StragglerInjector":
        return StragglerInjector(self, rank, seed)


class StragglerInjector:
    """Decides each iteration's extra delay for one worker."""

    def __init__(self, profile: StragglerProfile, rank: int, seed: int):
        self.profile = profile
        self.rank = rank
        self._rng = random.Random(f"{seed}:{rank}:{profile.text}")

    def delay(self, compute_seconds: float) -> float:
        p = self.profile
        if p.kind == "rank" and p.rank == self.rank:
            return (p.factor - 1.0) * compute_seconds
        if p.kind == "random" and self._rng.random() < p.prob:
            return (p.factor - 1.0) * compute_seconds
        return 0.0
