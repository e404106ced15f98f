"""Atomic, self-describing checkpoints of one server's shard.

Layout (one folder per server rank, one folder per checkpoint)::

    CHECKPOINT_DIR/server-<rank>/ckpt-<seq:06d>-step-<step:012d>/
        weights.npy           fp32 shard weights
        opt-<kind>.npy        flat optimizer state buffers (exp_avg, momentum_buffer, ...)
        meta.json             everything else + a SHA-256 of every .npy file

Names follow **write order**: ``seq`` is one more than the highest ``seq`` in
the folder when the checkpoint is written (0 in an empty folder), so every
name is new even when several checkpoints hold the same step (a shutdown
right after a periodic checkpoint, repeated ``ps-ctl checkpoint`` while
idle, a restore followed by a stop), and the newest checkpoint written is
the one ``latest`` returns and ``prune`` keeps, whatever its step (a folder
holding an earlier job's checkpoints at higher steps loses those first).
``step`` is in the name for people; order never depends on it.

Folders of the earlier format ``ckpt-<step:012d>-<n:06d>`` are still read:
they count as older than every ``ckpt-<seq>-step-<step>`` folder and are
ordered among themselves by (step, n), as they were.  Other names are
ignored (never read, never pruned).

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
import re
import shutil
import time
from typing import Callable

import numpy as np

from common.errors import ZPSError

log = logging.getLogger("zps.checkpoint")

FORMAT = 1
PREFIX = "ckpt-"
#: ``ckpt-<seq>-step-<step>``: written by this version, ordered by ``seq``.
_NAME = re.compile(r"ckpt-(\d+)-step-(\d+)")
#: ``ckpt-<step:012d>-<n:06d>``: the earlier format, older than any of the above.
_OLD_NAME = re.compile(r"ckpt-(\d+)-(\d+)")
#: ``read_latest`` lists the folder again at most this many times when the
#: checkpoint it reads is pruned under it (a server that checkpoints very often).
MAX_RELISTS = 20


class CheckpointError(ZPSError):
    """A checkpoint could not be written or read."""


def server_dir(root: str, rank: int) -> str:
    return os.path.join(root, f"server-{rank}")


def checkpoint_name(seq: int, step: int) -> str:
    """The folder name of the checkpoint written ``seq``-th in its folder, holding ``step``."""
    return f"{PREFIX}{seq:06d}-step-{step:012d}"


def write_order(name: str) -> tuple | None:
    """Sort key of a checkpoint folder name in write order; None for names that are no checkpoint.

    ``(1, seq)`` for this format, ``(0, step, n)`` for the earlier one (all of
    which were written before any of this format).
    """
    m = _NAME.fullmatch(name)
    if m:
        return (1, int(m.group(1)))
    m = _OLD_NAME.fullmatch(name)
    if m:
        return (0, int(m.group(1)), int(m.group(2)))
    return None


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


def _next_seq(base: str) -> int:
    """One more than the highest ``seq`` among the checkpoint folders in ``base`` (0 if none)."""
    seqs = [key[1] for key in map(write_order, os.listdir(base)) if key is not None and key[0] == 1]
    return max(seqs, default=-1) + 1


def write(root: str, rank: int, step: int, arrays: dict[str, np.ndarray], meta: dict,
          keep: int = 3, pause_between_files: float = 0.0) -> str:
    """Write one checkpoint atomically; keep the newest ``keep`` (0: all); return its folder.

    ``pause_between_files`` (seconds) is a fault-injection hook for tests that
    kill a server in the middle of a checkpoint; it is 0 in normal use.
    """
    base = server_dir(root, rank)
    os.makedirs(base, exist_ok=True)
    seq = _next_seq(base)
    name = checkpoint_name(seq, step)
    tmp = os.path.join(base, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    sums = {}
    try:
        for key, arr in arrays.items():
            sums[key] = _write_npy(os.path.join(tmp, f"{key}.npy"), arr)
            if pause_between_files:
                time.sleep(pause_between_files)  # fault injection (tests only)
        doc = {"format": FORMAT, "rank": rank, "step": step, "seq": seq, "time": time.time(),
               "sha256": sums, **meta}
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
    """Checkpoint folders of ``rank`` in write order, oldest first (see the module docstring)."""
    base = server_dir(root, rank)
    try:
        names = os.listdir(base)
    except (FileNotFoundError, NotADirectoryError):
        return []
    keyed = sorted((key, d) for d, key in ((d, write_order(d)) for d in names) if key is not None)
    paths = [os.path.join(base, d) for _, d in keyed]
    if complete_only:
        paths = [p for p in paths if os.path.exists(os.path.join(p, "meta.json"))]
    return paths


def prune(root: str, rank: int, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (in write order; 0: keep all), and dead writers' leftovers."""
    paths = list_checkpoints(root, rank, complete_only=False)
    for p in paths[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    base = server_dir(root, rank)
    for d in os.listdir(base):  # temporary folders of writers that died
        if d.startswith(".tmp-") and not d.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(base, d), ignore_errors=True)


def read(path: str, verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of one checkpoint folder; CheckpointError if it is incomplete or corrupt.

    A folder removed while it is read (pruned) is incomplete too.
    """
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a complete checkpoint ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: meta.json holds a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r} is not {FORMAT}")
    sums = meta.get("sha256", {})
    if not isinstance(sums, dict):
        raise CheckpointError(f"{path}: meta.json's sha256 is not a map of file checksums")
    arrays = {}
    for key, digest in sums.items():
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
        try:
            arrays[key] = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read {key}.npy ({exc})") from None
    return meta, arrays


def read_latest(root: str, rank: int, verify: bool = True,
                check: Callable[[str, dict, dict], None] | None = None
                ) -> tuple[str, dict, dict[str, np.ndarray]] | None:
    """``(path, meta, arrays)`` of the newest checkpoint of ``rank`` that reads back whole, or None.

    A checkpoint that is incomplete or corrupt, or that ``check(path, meta,
    arrays)`` rejects (by raising CheckpointError: e.g. ``meta.json`` lacks a
    key the caller needs), is skipped with a warning for the one written
    before it.  One that disappears while it is read (pruned by a server
    that is still checkpointing) sends the search back to the newest again,
    as a newer one was written meanwhile; after ``MAX_RELISTS`` such restarts
    it gives up with CheckpointError.
    """
    bad: set[str] = set()
    for _ in range(MAX_RELISTS):
        for path in reversed(list_checkpoints(root, rank)):
            if path in bad:
                continue
            try:
                meta, arrays = read(path, verify)
                if check is not None:
                    check(path, meta, arrays)
                return path, meta, arrays
            except CheckpointError as exc:
                if not os.path.isdir(path):
                    log.info("checkpoint %s was removed while being read; looking again", path)
                    break
                log.warning("skipping checkpoint %s: %s", path, exc)
                bad.add(path)
        else:
            return None
    raise CheckpointError(f"the checkpoints of server {rank} in {server_dir(root, rank)} were removed "
                          f"while being read {MAX_RELISTS} times: is a server checkpointing there every step?")


def latest(root: str, rank: int) -> str | None:
    """The newest checkpoint of ``rank`` (in write order) that reads back whole, or None."""
    found = read_latest(root, rank)
    return None if found is None else found[0]
