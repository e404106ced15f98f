"""Straggler profiles: seeded, reproducible slowdowns and pauses of worker iterations.

A *slowdown* is a delay proportional to the iteration's measured compute time
(a worker FACTOR times slower sleeps (FACTOR - 1) x compute), so a profile
behaves the same on a busy machine as on an idle one.  A *pause* is an
absolute number of seconds, whatever the compute time.

Profiles (``--straggler``):

    none                      no slowdown
    RANK:FACTOR               worker RANK is persistently FACTOR times slower
    random:P:FACTOR           every worker is FACTOR times slower on a random fraction P of iterations
    pause:RANK:EVERY:SECONDS  worker RANK sleeps SECONDS on every EVERY-th iteration
                              (iterations EVERY, 2 EVERY, ...)
    pause:all:EVERY:SECONDS   every worker does, each from its own seeded phase
                              (so the pauses of different workers do not line up)
    dist:exp:MEAN             every iteration of every worker is (1 + X) times slower,
                              X ~ exponential with mean MEAN
    dist:lognormal:MU:SIGMA   the same with X ~ lognormal(MU, SIGMA) (X = exp(N(MU, SIGMA^2)))
    dist:uniform:LO:HI        the same with X ~ uniform(LO, HI)
    A+B                       both A and B (their delays add), e.g. ``0:2+pause:all:50:0.5``

Every draw comes from a generator seeded by ``(seed, rank, profile text)``:
the same seed, rank and profile give the same delays; other ranks draw
differently.  ``StragglerProfile.parse`` raises :class:`ConfigError` (a
``ValueError``) naming the offending text.
"""
from __future__ import annotations

import dataclasses
import math
import random

from common.errors import ConfigError

__all__ = ["StragglerProfile", "StragglerInjector", "DISTRIBUTIONS"]

#: distribution name -> number of parameters and their names
DISTRIBUTIONS = {"exp": ("MEAN",), "lognormal": ("MU", "SIGMA"), "uniform": ("LO", "HI")}

_SYNTAX = ("none, RANK:FACTOR (FACTOR >= 1), random:P:FACTOR (0 <= P <= 1), "
           "pause:RANK|all:EVERY:SECONDS, dist:exp:MEAN, dist:lognormal:MU:SIGMA, "
           "dist:uniform:LO:HI, or several joined by '+'")


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"straggler profile {text!r}: {why}; a profile is {_SYNTAX}")


def _number(text: str, part: str, name: str, cast=float):
    try:
        v = cast(part)
    except ValueError:
        raise _bad(text, f"{name} must be a{'n integer' if cast is int else ' number'}, got {part!r}") from None
    if cast is float and not math.isfinite(v):
        raise _bad(text, f"{name} must be finite, got {part!r}")
    return v


@dataclasses.dataclass(frozen=True)
class StragglerProfile:
    kind: str                 # none | rank | random | pause | dist | combined
    rank: int = -1            # rank: the slow worker; pause: the pausing worker (-1: all)
    prob: float = 0.0         # random
    factor: float = 1.0       # rank, random
    text: str = "none"
    every: int = 0            # pause: every EVERY-th iteration
    seconds: float = 0.0      # pause: absolute seconds
    dist: str = ""            # dist: exp | lognormal | uniform
    params: tuple = ()        # dist: the distribution's parameters
    parts: tuple = ()         # combined: the component profiles

    @classmethod
    def parse(cls, text: str) -> "StragglerProfile":
        t = (text or "none").strip().lower()
        if t in ("none", ""):
            return cls("none")
        if "+" in t:
            pieces = [p.strip() for p in t.split("+")]
            if any(p in ("", "none") for p in pieces):
                raise _bad(text, "every part joined by '+' must be a profile other than none")
            return cls("combined", text=t, parts=tuple(cls._parse_one(p) for p in pieces))
        return cls._parse_one(t)

    @classmethod
    def _parse_one(cls, t: str) -> "StragglerProfile":
        parts = t.split(":")
        head = parts[0]
        if head == "random":
            if len(parts) == 3:
                try:
                    p, f = float(parts[1]), float(parts[2])
                    if 0 <= p <= 1 and f >= 1:
                        return cls("random", prob=p, factor=f, text=t)
                except ValueError:
                    pass
        elif head == "pause":
            if len(parts) != 4:
                raise _bad(t, "a pause is pause:RANK:EVERY:SECONDS or pause:all:EVERY:SECONDS")
            rank = -1 if parts[1] == "all" else _number(t, parts[1], "RANK", int)
            every = _number(t, parts[2], "EVERY", int)
            seconds = _number(t, parts[3], "SECONDS")
            if rank < -1 or (rank == -1 and parts[1] != "all"):
                raise _bad(t, f"RANK must be 'all' or an integer >= 0, got {parts[1]!r}")
            if every < 1:
                raise _bad(t, f"EVERY must be >= 1, got {every}")
            if seconds < 0:
                raise _bad(t, f"SECONDS must be >= 0, got {seconds}")
            return cls("pause", rank=rank, every=every, seconds=seconds, text=t)
        elif head == "dist":
            if len(parts) < 2 or parts[1] not in DISTRIBUTIONS:
                raise _bad(t, f"unknown distribution {parts[1] if len(parts) > 1 else ''!r}; "
                              f"known: {', '.join(sorted(DISTRIBUTIONS))}")
            names = DISTRIBUTIONS[parts[1]]
            if len(parts) != 2 + len(names):
                raise _bad(t, f"dist:{parts[1]} takes {len(names)} parameter(s) {':'.join(names)}")
            vals = tuple(_number(t, v, n) for v, n in zip(parts[2:], names))
            if parts[1] == "exp" and vals[0] < 0:
                raise _bad(t, f"MEAN must be >= 0, got {vals[0]}")
            if parts[1] == "lognormal" and vals[1] < 0:
                raise _bad(t, f"SIGMA must be >= 0, got {vals[1]}")
            if parts[1] == "uniform" and not 0 <= vals[0] <= vals[1]:
                raise _bad(t, f"need 0 <= LO <= HI, got LO={vals[0]} HI={vals[1]}")
            return cls("dist", dist=parts[1], params=vals, text=t)
        elif len(parts) == 2:
            try:
                r, f = int(parts[0]), float(parts[1])
                if r >= 0 and f >= 1:
                    return cls("rank", rank=r, factor=f, text=t)
            except ValueError:
                pass
        raise ConfigError(f"straggler profile must be {_SYNTAX}, got {t!r}")

    @property
    def ranks(self) -> tuple[int, ...]:
        """The specific ranks this profile names (to check against the number of workers)."""
        if self.kind == "combined":
            return tuple(r for p in self.parts for r in p.ranks)
        if self.kind in ("rank", "pause") and self.rank >= 0:
            return (self.rank,)
        return ()

    def injector(self, rank: int, seed: int) -> "StragglerInjector":
        return StragglerInjector(self, rank, seed)


class StragglerInjector:
    """Decides each iteration's extra delay for one worker.

    ``delay`` is called once per iteration, in order; pauses count these calls.
    """

    def __init__(self, profile: StragglerProfile, rank: int, seed: int):
        self.profile = profile
        self.rank = rank
        self._rng = random.Random(f"{seed}:{rank}:{profile.text}")
        self._parts = [StragglerInjector(p, rank, seed) for p in profile.parts]
        self.iteration = 0
        self._phase = 0
        if profile.kind == "pause" and profile.rank == -1:
            self._phase = self._rng.randrange(profile.every)

    def delay(self, compute_seconds: float) -> float:
        p = self.profile
        self.iteration += 1
        if p.kind == "rank" and p.rank == self.rank:
            return (p.factor - 1.0) * compute_seconds
        if p.kind == "random" and self._rng.random() < p.prob:
            return (p.factor - 1.0) * compute_seconds
        if p.kind == "pause" and p.rank in (-1, self.rank):
            return p.seconds if (self.iteration + self._phase) % p.every == 0 else 0.0
        if p.kind == "dist":
            return self._draw() * compute_seconds
        if p.kind == "combined":
            return sum(part.delay(compute_seconds) for part in self._parts)
        return 0.0

    def _draw(self) -> float:
        p = self.profile
        if p.dist == "exp":
            return self._rng.expovariate(1.0 / p.params[0]) if p.params[0] > 0 else 0.0
        if p.dist == "lognormal":
            return self._rng.lognormvariate(*p.params)
        return self._rng.uniform(*p.params)
