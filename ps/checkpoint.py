"""Atomic, self-describing checkpoints of one server's shard.

Layout (one folder per server rank, one folder per checkpoint)::

    CHECKPOINT_DIR/server-<rank>/ckpt-<step:012d>-<n>/
        weights.npy           fp32 shard weights
        opt-<kind>.npy        flat optimizer state buffers (exp_avg, momentum_buffer, ...)
        meta.json             everything else + a SHA-256 of every .npy file

Writing is atomic: the files go to ``.tmp-ckpt-...``, each is fsync'ed,
the folder is fsync'ed and renamed to its final name, and the parent folder
is fsync'ed.  A folder without ``meta.json`` or whose checksums do not match
is incomplete and never loaded; so a crash during a checkpoint leaves the
previous one loadable.  ``.npy`` files are read with ``allow_pickle=False``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np

from common.errors import ZPSError

log = logging.getLogger("zps.checkpoint")

FORMAT = 1
PREFIX = "ckpt-"


class CheckpointError(ZPSError):
    """A checkpoint could not be written or read."""


def server_dir(root: str, rank: int) -> str:
    return os.path.join(root, f"server-{rank}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npy(path: str, arr: np.ndarray) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write(root: str, rank: int, step: int, arrays: dict[str, np.ndarray], meta: dict,
          keep: int = 3, pause_between_files: float = 0.0) -> str:
    """Write one checkpoint atomically; keep the newest ``keep``; return its folder.

    ``pause_between_files`` (seconds) is a fault-injection hook for tests that
    kill a server in the middle of a checkpoint; it is 0 in normal use.
    """
    base = server_dir(root, rank)
    os.makedirs(base, exist_ok=True)
    n = len(list_checkpoints(root, rank, complete_only=False))
    name = f"{PREFIX}{step:012d}-{n:06d}"
    tmp = os.path.join(base, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    sums = {}
    try:
        for key, arr in arrays.items():
            sums[key] = _write_npy(os.path.join(tmp, f"{key}.npy"), arr)
            if pause_between_files:
                time.sleep(pause_between_files)  # fault injection (tests only)
        doc = {"format": FORMAT, "rank": rank, "step": step, "time": time.time(), "sha256": sums, **meta}
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = os.path.join(base, name)
        os.rename(tmp, final)
        _fsync_dir(base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, rank, keep)
    return final


def list_checkpoints(root: str, rank: int, complete_only: bool = True) -> list[str]:
    """Checkpoint folders of ``rank``, oldest first."""
    base = server_dir(root, rank)
    if not os.path.isdir(base):
        return []
    names = sorted(d for d in os.listdir(base) if d.startswith(PREFIX))
    paths = [os.path.join(base, d) for d in names]
    if complete_only:
        paths = [p for p in paths if os.path.exists(os.path.join(p, "meta.json"))]
    return paths


def prune(root: str, rank: int, keep: int) -> None:
    paths = list_checkpoints(root, rank, complete_only=False)
    for p in paths[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    base = server_dir(root, rank)
    for d in os.listdir(base):  # temporary folders of writers that died
        if d.startswith(".tmp-") and not d.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(base, d), ignore_errors=True)


def read(path: str, verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of one checkpoint folder; CheckpointError if it is incomplete or corrupt."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a complete checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r} is not {FORMAT}")
    arrays = {}
    for key, digest in meta.get("sha256", {}).items():
        f = os.path.join(path, f"{key}.npy")
        if verify:
            h = hashlib.sha256()
            try:
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        h.update(block)
            except OSError as exc:
                raise CheckpointError(f"{path}: missing {key}.npy ({exc})") from None
            if h.hexdigest() != digest:
                raise CheckpointError(f"{path}: {key}.npy does not match its checksum")
        arrays[key] = np.load(f, allow_pickle=False)
    return meta, arrays


def latest(root: str, rank: int) -> str | None:
    """The newest checkpoint of ``rank`` that reads back whole, or None."""
    for path in reversed(list_checkpoints(root, rank)):
        try:
            read(path)
            return path
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
    return None
