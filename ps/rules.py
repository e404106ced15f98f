"""Update rules (how pushes become optimizer steps) and the push ledger.

An update rule is handed to the server behind a narrow interface::

    on_push(worker, clk, grads, tick) -> None   # may apply a step, advance clocks
    on_clock(worker, clk) -> None               # a clock completed with no push
    on_membership() -> None                     # a worker died or (re)joined

``ApplyOnArrival`` (staleness > 0): every push is one optimizer step.
``SyncAveraging`` (staleness 0): the gradients of one clock are summed, and
once every live worker has completed the clock their average is applied as
one step, so the result equals synchronous data-parallel training.

``PushLedger`` makes pushes idempotent: a push is identified by
(worker, incarnation, sequence number); one already applied is acknowledged
again and not applied twice.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from common.errors import ErrorCode, ProtocolError
from common.plan import frame_slices
from ps.ssp import SSPGate


class ApplyOnArrival:
    """SSP/ASP: apply each push as it arrives (one optimizer step per push)."""

    def __init__(self, gate: SSPGate, step: Callable[[Sequence[torch.Tensor], float], None],
                 lr_scale: Callable[[int, int], float] | None = None):
        self.gate = gate
        self._step = step
        self._lr_scale = lr_scale

    def on_push(self, w: int, clk: int, grads: Sequence[torch.Tensor], tick: bool) -> None:
        scale = self._lr_scale(w, clk) if self._lr_scale else 1.0
        self._step(grads, scale)
        if tick:
            self.gate.advance(w, clk + 1)

    def on_clock(self, w: int, clk: int) -> None:
        self.gate.advance(w, clk + 1)

    def on_membership(self) -> None:
        pass

    def rejoin_clock(self, w: int, start: int) -> int:
        return start

    def waiting(self) -> frozenset:
        """Workers that completed their clock and only wait for the others (none here)."""
        return frozenset()


class SyncAveraging:
    """BSP: average the gradients of one clock over the workers, one step per clock."""

    def __init__(self, gate: SSPGate, step: Callable[[Sequence[torch.Tensor], float], None],
                 n: int, chunk_elems: int):
        self.gate = gate
        self._step = step
        self.n = n
        self._slices = frame_slices(n, chunk_elems)
        self._sum: torch.Tensor | None = None
        self._contributors: set[int] = set()
        self._ticked: set[int] = set()
        self.steps_applied = 0

    @property
    def clock(self) -> int:
        """The clock being accumulated."""
        return max(self.gate.min_clock, 0)

    def _check_clock(self, w: int, clk: int) -> None:
        if not self.gate.workers[w].live:
            raise ProtocolError(f"worker {w} was declared dead; send HELLO to rejoin", ErrorCode.FENCED)
        if clk != self.gate.workers[w].clock or w in self._ticked:
            raise ProtocolError(
                f"worker {w} sent clock {clk}, but with staleness 0 this server "
                f"accumulates clock {self.clock} and worker {w} is at "
                f"{self.gate.workers[w].clock}{' (already completed)' if w in self._ticked else ''}",
                ErrorCode.BAD_CLOCK)

    def on_push(self, w: int, clk: int, grads: Sequence[torch.Tensor], tick: bool) -> None:
        self._check_clock(w, clk)
        if self._sum is None:
            self._sum = torch.zeros(self.n, dtype=torch.float32)
            fresh = True
        else:
            fresh = not self._contributors
        for (a, b), g in zip(self._slices, grads):
            if fresh:
                self._sum[a:b].copy_(g)
            else:
                self._sum[a:b].add_(g)
        self._contributors.add(w)
        if tick:
            self._ticked.add(w)
            self._maybe_apply()

    def on_clock(self, w: int, clk: int) -> None:
        if (w in self._ticked and clk == self.gate.workers[w].clock) or 0 <= clk < self.gate.workers[w].clock:
            return  # a retried CLOCK: already counted
        self._check_clock(w, clk)
        self._ticked.add(w)
        self._maybe_apply()

    def on_membership(self) -> None:
        self._maybe_apply()

    def _maybe_apply(self) -> None:
        live = self.gate.live_workers()
        if not live or any(w not in self._ticked for w in live):
            return
        if self._contributors:
            self._sum.div_(len(self._contributors))
            self._step([self._sum[a:b] for a, b in self._slices], 1.0)
            self.steps_applied += 1
        target = self.clock + 1
        for w in self._ticked:
            self.gate.advance(w, target)
        self._contributors.clear()
        self._ticked.clear()

    def waiting(self) -> frozenset:
        """Workers that completed the clock being accumulated and wait for the others.

        Their clocks advance only when every live worker's have (one step per
        clock), so the gate still counts them below; they hold nobody back.
        """
        return frozenset(self._ticked)

    def rejoin_clock(self, w: int, start: int) -> int:
        """Clock a rejoining worker starts at.

        If its previous incarnation already completed the clock being
        accumulated, that contribution stays counted and the new incarnation
        starts at the next clock (its push for this clock would count twice).
        """
        if w in self._ticked:
            self.gate.advance(w, start + 1)
            return start + 1
        return start


class DelayCompensation:
    """DC-ASGD (Zheng et al., ICML 2017): compensate a stale gradient for the delay.

    ``g' = g + lambda * g * g * (w_now - w_read)``, where ``w_read`` are the
    weights the worker computed ``g`` on.  The server keeps, per worker, the
    last ``KEEP`` weight versions it sent (keyed by update step), so the
    memory cost is up to ``KEEP * W`` copies of the shard (4 bytes per element
    each) plus one shard-sized work buffer.  A push whose read step is no
    longer kept is applied uncompensated and counted in ``misses``.
    """

    KEEP = 2

    def __init__(self, lam: float, n: int, chunk_elems: int):
        self.lam = float(lam)
        self.n = n
        self._slices = frame_slices(n, chunk_elems)
        self._kept: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self._work = torch.empty(n, dtype=torch.float32)
        self.compensated = 0
        self.misses = 0

    def remember(self, w: int, step: int, weights: torch.Tensor) -> None:
        ring = self._kept.setdefault(w, [])
        if ring and ring[-1][0] == step:
            return
        if len(ring) >= self.KEEP:
            _, buf = ring.pop(0)
            buf.copy_(weights)
        else:
            buf = weights.clone()
        ring.append((step, buf))

    def compensate(self, w: int, read_step: int, grads, weights: torch.Tensor) -> list[torch.Tensor]:
        w_read = next((buf for step, buf in self._kept.get(w, ()) if step == read_step), None)
        if w_read is None:
            self.misses += 1
            return list(grads)
        out = []
        for (a, b), g in zip(self._slices, grads):
            t = self._work[a:b]
            torch.sub(weights[a:b], w_read[a:b], out=t)
            t.mul_(g).mul_(g).mul_(self.lam).add_(g)
            out.append(t)
        self.compensated += 1
        return out

    def nbytes(self) -> int:
        return sum(buf.numel() * 4 for ring in self._kept.values() for _, buf in ring) + self.n * 4

    def stats(self) -> dict:
        return {"lambda": self.lam, "compensated": self.compensated, "misses": self.misses,
                "bytes": self.nbytes()}


class PushLedger:
    """Which (worker, incarnation, seq) pushes have been applied."""

    MAX_OUT_OF_ORDER = 4096

    def __init__(self):
        self._inc: dict[int, int] = {}
        self._mark: dict[int, int] = {}       # every seq <= mark is applied
        self._extra: dict[int, set[int]] = {}  # applied seqs above the mark

    def reset(self, w: int, incarnation: int) -> None:
        self._inc[w] = incarnation
        self._mark[w] = -1
        self._extra[w] = set()

    def incarnation(self, w: int) -> int | None:
        return self._inc.get(w)

    def applied(self, w: int, seq: int) -> bool:
        return seq <= self._mark.get(w, -1) or seq in self._extra.get(w, ())

    def record(self, w: int, seq: int) -> None:
        extra = self._extra.setdefault(w, set())
        mark = self._mark.get(w, -1)
        if seq <= mark:
            return
        if seq == mark + 1 and not extra:  # the usual case: the next push, none ahead of it
            self._mark[w] = seq
            return
        extra.add(seq)
        while mark + 1 in extra:
            mark += 1
            extra.discard(mark)
        if len(extra) > self.MAX_OUT_OF_ORDER:  # bound memory: assume the oldest gap is lost
            mark = min(extra)
            extra.discard(mark)
            while mark + 1 in extra:
                mark += 1
                extra.discard(mark)
        self._mark[w] = mark

    def last_seq(self, w: int) -> int:
        extra = self._extra.get(w)
        return max(extra) if extra else self._mark.get(w, -1)

    def state(self) -> dict:
        return {str(w): {"inc": self._inc[w], "mark": self._mark.get(w, -1),
                         "extra": sorted(self._extra.get(w, ()))} for w in self._inc}

    def load(self, state: dict) -> None:
        """Restore :meth:`state` (from a checkpoint)."""
        for key, st in state.items():
            w = int(key)
            self._inc[w] = int(st["inc"])
            self._mark[w] = int(st["mark"])
            self._extra[w] = set(int(x) for x in st["extra"])
