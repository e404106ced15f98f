"""``ps-ctl``, ``ps-stat`` and ``ps-export``: operate a running job and its checkpoints.

    ps-ctl checkpoint --coordinator URL     every server writes a checkpoint now
    ps-ctl shutdown   --coordinator URL     end the job: servers checkpoint (if set up) and stop
    ps-stat           --coordinator URL     job state, every server's counters and settings
    ps-export CHECKPOINT_DIR OUT            gather the newest checkpoint of every server into a state_dict
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import zmq

from common.config import check_timeout
from common.control import request_once
from common.errors import ConfigError, ZPSError
from common.protocol import MsgType
from common.security import CurveKeys, secure_client


def _add_curve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-keys", metavar="DIR", default=os.environ.get("ZPS_CURVE_KEYS", ""),
                   help="CurveZMQ key folder of the job (server.key and a client pair) [env ZPS_CURVE_KEYS]")


def _secure(args):
    """The CURVE client set-up of ``--curve-keys`` for request_once (None: plain text)."""
    keys = CurveKeys.from_setting(args.curve_keys, connect=True)
    return None if keys is None else (lambda sock: secure_client(sock, keys))


def _seconds(text: str) -> float:
    """A ``--timeout``: a finite number of seconds above 0 (every wait here is bounded)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    try:
        return check_timeout(value, "--timeout", allow_none=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _endpoint(flag: str, text: str) -> str:
    """``text`` if it is an address to connect to (tcp://HOST:PORT); else ValueError naming ``flag``."""
    from common.netaddr import split_endpoint

    try:
        _, port = split_endpoint(text)
    except ValueError:
        port = None
    if not port:
        raise ValueError(f"{flag}: {text!r} is not an address; give tcp://HOST:PORT (e.g. tcp://10.0.0.5:5555)")
    return text


def _check_addresses(p: argparse.ArgumentParser, args) -> None:
    """Exit 2 (argparse's usage error) on a --coordinator or --servers value that is no tcp://HOST:PORT."""
    try:
        if args.coordinator:
            _endpoint("--coordinator", args.coordinator)
        for ep in _server_list(args):
            _endpoint("--servers", ep)
    except ValueError as exc:
        p.error(str(exc))


def _server_list(args) -> list[str]:
    return [s.strip() for s in args.servers.split(",") if s.strip()]


def _servers(args) -> list[str]:
    if args.servers:
        return _server_list(args)
    status = request_once(args.coordinator, MsgType.STATUS, timeout=args.timeout, secure=args.secure)["status"]
    return [s["endpoint"] for s in status["servers"] if s["registered"]]


def ctl_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ps-ctl", description="Operate a running zps job.")
    p.add_argument("command", choices=["checkpoint", "shutdown", "status"],
                   help="checkpoint: every server writes one now; shutdown: end the job (needs "
                        "--coordinator); status: what ps-stat shows")
    p.add_argument("--coordinator", default=os.environ.get("ZPS_COORDINATOR", ""),
                   help="coordinator address tcp://HOST:PORT [env ZPS_COORDINATOR]")
    p.add_argument("--servers", default="", help="comma list of server endpoints (instead of --coordinator)")
    p.add_argument("--timeout", type=_seconds, default=60.0, help="seconds to wait for each answer [60]")
    _add_curve(p)
    args = p.parse_args(argv)
    if not args.coordinator and not args.servers:
        p.error("give --coordinator URL or --servers EP1,EP2")
    _check_addresses(p, args)
    try:
        args.secure = _secure(args)
        if args.command == "checkpoint":
            return _checkpoint_all(args)
        elif args.command == "shutdown":
            if not args.coordinator:
                p.error("shutdown ends a job through its coordinator: give --coordinator URL")
            request_once(args.coordinator, MsgType.SHUTDOWN, timeout=args.timeout, secure=args.secure)
            print("job is ending: servers checkpoint (if set up) and stop, workers stop (ps-worker exits 3), "
                  "all at their next heartbeat")
        else:   # the options as parsed here, wherever they stood on the command line
            return stat_main(["--coordinator", args.coordinator, "--servers", args.servers,
                              "--timeout", repr(args.timeout), "--curve-keys", args.curve_keys])
    except (ZPSError, zmq.ZMQError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


def _checkpoint_all(args) -> int:
    """CHECKPOINT every server, each whatever the others answer; 1 if any failed."""
    failed = []
    for ep in _servers(args):
        try:
            r = request_once(ep, MsgType.CHECKPOINT, timeout=args.timeout, secure=args.secure)
        except (ZPSError, zmq.ZMQError) as exc:
            failed.append(ep)
            print(f"{ep}: FAILED: {exc}")
            continue
        print(f"{ep}: step {r['step']} -> {r['path']}")
    if failed:
        sys.stderr.write(f"error: {len(failed)} server(s) wrote no checkpoint: {', '.join(failed)}\n")
        return 1
    return 0


def stat_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ps-stat", description="Show a running job: state, servers' counters, settings.")
    p.add_argument("--coordinator", default=os.environ.get("ZPS_COORDINATOR", ""))
    p.add_argument("--servers", default="", help="comma list of server endpoints (instead of --coordinator)")
    p.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for each answer [10]")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    _add_curve(p)
    args = p.parse_args(argv)
    if not args.coordinator and not args.servers:
        p.error("give --coordinator URL or --servers EP1,EP2")
    _check_addresses(p, args)
    out: dict = {}
    try:
        args.secure = _secure(args)
        if args.coordinator:
            out["coordinator"] = request_once(args.coordinator, MsgType.STATUS, timeout=args.timeout,
                                              secure=args.secure)["status"]
        out["servers"] = [request_once(ep, MsgType.STATS, timeout=args.timeout, secure=args.secure)["stats"]
                          for ep in _servers(args)]
    except (ZPSError, zmq.ZMQError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    c = out.get("coordinator")
    if c:
        print(f"job {c['state']} at {c['endpoint']} (up {c['uptime']:.0f}s): staleness {c['job']['staleness']}, "
              f"{len(c['servers'])} servers, {len(c['workers'])} workers")
        for w in c["workers"]:
            print(f"  worker {w['rank']}: {'live' if w['live'] else 'DEAD'}{' done' if w['done'] else ''} "
                  f"pid {w['pid']} on {w['host']} restarts {w['restarts']}")
    for s in out["servers"]:
        print(f"server {s['rank']} {s['endpoint']}: step {s['step']} min_clock {s['min_clock']} "
              f"pushes {s['pushes']} pulls {s['pulls']} parked {s['parked']} dup {s['dup_pushes']} "
              f"nonfinite {s['nonfinite']} errors {s['errors']}")
        print("  settings: " + ", ".join(f"{k}={v}" for k, v in s["settings"].items() if k != "transport")
              + ", " + ", ".join(f"{k}={v}" for k, v in s["settings"].get("transport", {}).items()))
    return 0


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ps-export",
                                description="Gather the newest complete checkpoint of every server into one "
                                            "state_dict file (model.load_state_dict(torch.load(OUT))).")
    p.add_argument("checkpoint_dir", help="the servers' --checkpoint-dir")
    p.add_argument("out", help="output file (.pt)")
    args = p.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        p.error(f"out {args.out} is a directory; give a file name (e.g. model.pt)")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        p.error(f"out: folder {folder} does not exist or is not writable")
    try:
        sd, info = export_state_dict(args.checkpoint_dir)
    except ZPSError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    import torch

    tmp = f"{args.out}.tmp{os.getpid()}"   # written whole or not at all
    try:
        torch.save(sd, tmp)
        os.replace(tmp, args.out)
    except OSError as exc:
        sys.stderr.write(f"error: could not write {args.out}: {exc}\n")
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return 1
    if info["ignored"]:
        sys.stderr.write(f"note: ignored {', '.join(info['ignored'])} in {args.checkpoint_dir} "
                         "(not a server-<rank> folder)\n")
    print(f"wrote {len(sd)} tensors ({info['elements']} elements, step {info['steps']}) to {args.out}")
    return 0


def export_state_dict(root: str):
    """``({name: tensor}, info)`` from the newest complete checkpoint of every server."""
    import numpy as np
    import torch

    from common.plan import PartitionPlan
    from ps import checkpoint as ckpt

    ranks, ignored = server_folders(root)
    if not ranks:
        raise ckpt.CheckpointError(f"{root} holds no server-<rank> checkpoint folders"
                                   + (f" (ignored: {', '.join(ignored)})" if ignored else ""))
    metas, shards = [], []
    for r in ranks:
        found = ckpt.read_latest(root, r, check=_exportable)   # skips a checkpoint pruned under it
        if found is None:
            raise ckpt.CheckpointError(f"server {r} has no complete checkpoint in {ckpt.server_dir(root, r)}")
        _, meta, arrays = found
        metas.append(meta)
        shards.append(arrays["weights"])
    try:
        plan = PartitionPlan.from_wire(metas[0]["plan"])
    except ConfigError as exc:
        raise ckpt.CheckpointError(f"the checkpoint of server {ranks[0]} holds an unusable plan: {exc}") from None
    hashes = {m["plan_hash"] for m in metas}
    if len(hashes) != 1 or ranks != list(range(plan.num_servers)):
        raise ckpt.CheckpointError(f"checkpoints do not form one job: plan hashes {sorted(hashes)}, "
                                   f"ranks {ranks} (expected 0..{plan.num_servers - 1})")
    flat = np.empty(plan.total, dtype=np.float32)
    for r, shard in zip(ranks, shards):
        lo, hi = plan.range_of(r)
        if shard.shape != (hi - lo,):
            raise ckpt.CheckpointError(f"the checkpoint of server {r} holds {shard.shape} weights, "
                                       f"its range of the plan {hi - lo}")
        flat[lo:hi] = shard
    sd = {t.name: torch.from_numpy(flat[t.offset:t.end].copy()).reshape(t.shape).to(getattr(torch, t.dtype))
          for t in plan.tensors}
    return sd, {"elements": plan.total, "steps": [m["step"] for m in metas], "ignored": ignored}


_SERVER_FOLDER = re.compile(r"server-(\d+)")


def server_folders(root: str) -> tuple[list[int], list[str]]:
    """``(ranks, ignored)``: the ranks of ``root``'s ``server-<rank>`` folders, and the names of
    entries that start with ``server-`` but are no such folder (``server-old``, ``server-1.bak``,
    ``server-01``: a server of rank 1 writes to ``server-1``)."""
    if not os.path.isdir(root):
        return [], []
    ranks, ignored = [], []
    for d in sorted(os.listdir(root)):
        if not d.startswith("server-"):
            continue
        m = _SERVER_FOLDER.fullmatch(d)
        if m and str(int(m.group(1))) == m.group(1) and os.path.isdir(os.path.join(root, d)):
            ranks.append(int(m.group(1)))
        else:
            ignored.append(d)
    return sorted(ranks), ignored


def _exportable(path: str, meta: dict, arrays: dict) -> None:
    from ps import checkpoint as ckpt

    missing = [k for k in ("plan", "plan_hash", "step") if k not in meta] + \
        ([] if "weights" in arrays else ["weights.npy"])
    if missing:
        raise ckpt.CheckpointError(f"{path}: the checkpoint lacks {', '.join(missing)}")


if __name__ == "__main__":
    sys.exit(ctl_main())
