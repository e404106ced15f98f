"""A server's shard: its flat fp32 weights and the snapshots pulls are sent from.

``ShardStore`` owns the range ``[lo, hi)`` of the flat parameter vector as
one contiguous fp32 tensor, plus the optimizer that updates it in place.

Pull replies are sent zero-copy.  ZeroMQ reads a sent buffer later, from its
I/O thread, so the live weights (updated in place) are never handed to it:
a reply is sent from a *snapshot* of one weights version.  ``SnapshotPool``
recycles snapshot buffers once ZeroMQ's trackers say every message that
used them has left, so a stream of pulls allocates nothing after warm-up,
and every pull of one version shares one snapshot.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import zmq

from common.plan import frame_slices
from common.protocol import WIRE_DTYPE

#: Below this many bytes a reply is copied into the message (cheaper than tracking).
ZERO_COPY_MIN_BYTES = 1 << 16


@dataclasses.dataclass
class _Snapshot:
    buf: np.ndarray
    version: int
    trackers: list

    def busy(self) -> bool:
        self.trackers = [t for t in self.trackers if not t.done]
        return bool(self.trackers)


class SnapshotPool:
    """Reusable, immutable-while-sent copies of the weights."""

    def __init__(self, n: int, frame_elems: int):
        self.n = n
        self.slices = frame_slices(n, frame_elems)
        self._snaps: list[_Snapshot] = []
        self.allocated = 0

    def frames(self, weights: np.ndarray, version: int) -> list:
        """Data frames holding ``weights`` at ``version``, ready for a zero-copy send."""
        if self.n * WIRE_DTYPE.itemsize < ZERO_COPY_MIN_BYTES:
            return [weights[a:b].tobytes() for a, b in self.slices]
        snap = next((s for s in self._snaps if s.version == version), None)
        if snap is None:
            snap = next((s for s in self._snaps if not s.busy()), None)
            if snap is None:
                snap = _Snapshot(np.empty(self.n, dtype=WIRE_DTYPE), -1, [])
                self._snaps.append(snap)
                self.allocated += 1
            np.copyto(snap.buf, weights)
            snap.version = version
        out = [zmq.Frame(memoryview(snap.buf[a:b]), copy=False, track=True) for a, b in self.slices]
        snap.trackers.append(zmq.MessageTracker(*out))
        return out

    def nbytes(self) -> int:
        return sum(s.buf.nbytes for s in self._snaps)


class ShardStore:
    """The flat weights of one range and their version counter."""

    def __init__(self, n: int, frame_elems: int):
        self.n = n
        self.frame_elems = frame_elems
        self.weights = torch.zeros(n, dtype=torch.float32)
        self.initialized = False
        self.version = 0  # bumped on every change of the weights
        self.snapshots = SnapshotPool(n, frame_elems)

    @property
    def array(self) -> np.ndarray:
        return self.weights.numpy()

    def set_from(self, chunks: list[np.ndarray]) -> None:
        """Overwrite the weights with the data frames of an INIT."""
        arr = self.array
        for (a, b), chunk in zip(frame_slices(self.n, self.frame_elems), chunks):
            arr[a:b] = chunk
        self.initialized = True
        self.version += 1

    def reply_frames(self) -> list:
        return self.snapshots.frames(self.array, self.version)
