"""A worker process for the multi-process tests.

Usage: python -m tests.procs.train_worker CONFIG.json

CONFIG keys: endpoints, worker, steps, seed, in_dim, out_dim, batch,
slow (seconds of extra delay per iteration: a straggler), frame_elems, out
(path of the JSON result: records and final local weights).
"""
import json
import sys
import time

import torch

from common.config import ClientSettings
from worker.session import PSWorker


def make_model(cfg):
    torch.manual_seed(cfg["seed"])
    return torch.nn.Sequential(torch.nn.Linear(cfg["in_dim"], cfg["hidden"]), torch.nn.Tanh(),
                               torch.nn.Linear(cfg["hidden"], cfg["out_dim"]))


def batch(cfg, w, c):
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + w * 10_007 + c)
    x = torch.randn(cfg["batch"], cfg["in_dim"], generator=g)
    y = torch.randn(cfg["batch"], cfg["out_dim"], generator=g)
    return x, y


def main(path):
    cfg = json.load(open(path))
    model = make_model(cfg)
    settings = ClientSettings(frame_elems=cfg.get("frame_elems", 1 << 18), read_timeout=cfg.get("read_timeout", 60.0),
                              request_timeout=cfg.get("request_timeout", 60.0),
                              heartbeat_interval=cfg.get("heartbeat_interval", 1.0))
    w = cfg["worker"]
    pw = PSWorker(model, cfg["endpoints"], w, settings=settings).start(timeout=30)
    losses = []
    while pw.clock < cfg["steps"]:
        pw.read()
        pw.zero_grad()
        x, y = batch(cfg, w, pw.clock)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if cfg.get("slow"):
            time.sleep(cfg["slow"])  # the injected straggler delay
        pw.push()
        losses.append(loss.item())
    pw.flush(30)
    recs = [dict(clock=r.clock, staleness=r.staleness, wait=r.wait_seconds, pulled=r.pulled) for r in pw.records]
    stats = dict(pw.stats, rejoins=pw.rejoins, retries=pw.client.stats["retries"], clock=pw.clock)
    pw.close()
    json.dump({"records": recs, "losses": losses, "stats": stats}, open(cfg["out"], "w"))


if __name__ == "__main__":
    main(sys.argv[1])
