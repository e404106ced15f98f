"""The built-in training loop: trains a workload as one worker of a job.

Writes one JSON record per iteration to ``metrics-w<rank>.jsonl`` (worker,
clock, loss, time, read_staleness, wait_seconds, compute_seconds,
delay_seconds), plus evaluation records from worker 0 (``eval``,
``eval_loss``).  At the end worker 0 (or, if it was lost, the lowest live
rank: ``Session.finalizer``) fetches the final weights, evaluates them,
optionally saves the ``state_dict``, and writes ``final.json``.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch

from worker.api import Session
from worker.progress import Progress
from worker.stragglers import StragglerProfile

log = logging.getLogger("zps.worker")


def train_workload(session: Session, workload, out_dir: str = "", save: str = "",
                   progress: str = "auto") -> dict:
    job = session.job
    rank = session.rank
    model = session.model
    steps = job.steps or workload.defaults.steps
    batches = workload.batches(rank, job.num_workers, job.batch_size or None)
    injector = StragglerProfile.parse(job.straggler).injector(rank, job.seed)
    eval_every = job.eval_every or max(1, steps // 20)
    metrics = open(os.path.join(out_dir, f"metrics-w{rank}.jsonl"), "a") if out_dir else None
    bar = Progress(steps, f"worker {rank}", progress)
    start_clock = session.clock
    totals = {"compute_seconds": 0.0, "wait_seconds": 0.0, "delay_seconds": 0.0, "iterations": 0}
    try:
        while session.clock < steps:
            rec = session.read()
            t0 = time.perf_counter()
            session.zero_grad()
            loss = workload.loss(model, next(batches))
            loss.backward()
            compute = time.perf_counter() - t0
            delay = injector.delay(compute)
            if delay > 0:
                time.sleep(delay)  # the injected slowdown of a straggler
            clock = session.clock
            session.push()
            lv = float(loss.detach())
            totals["compute_seconds"] += compute
            totals["wait_seconds"] += rec.wait_seconds
            totals["delay_seconds"] += delay
            totals["iterations"] += 1
            row = {"worker": rank, "clock": clock, "loss": lv, "time": time.time(),
                   "read_staleness": rec.staleness, "wait_seconds": rec.wait_seconds,
                   "compute_seconds": compute, "delay_seconds": delay}
            if rank == 0 and ((clock + 1) % eval_every == 0 or clock + 1 >= steps):
                row["eval"] = float(workload.evaluate(model))
                row["eval_loss"] = float(workload.eval_loss(model))
            if metrics:
                metrics.write(json.dumps(row) + "\n")
            bar.update(session.clock, f"loss {lv:.4f} staleness {rec.staleness}")
        session.worker.flush(job.read_timeout)
    finally:
        if metrics:
            metrics.close()
    result = {"rank": rank, "start_clock": start_clock, "clock": session.clock, "rejoins": session.worker.rejoins,
              **totals, "client": dict(session.worker.client.stats)}

    def final_step():
        if session.finalizer:   # worker 0, or the lowest live rank if worker 0 was lost
            result["final"] = finalize(session, workload, out_dir, save)

    session.finish({k: v for k, v in result.items() if k != "client"}, before_done=final_step)
    if out_dir:
        with open(os.path.join(out_dir, f"result-w{rank}.json"), "w") as fh:
            json.dump(result, fh)
    return result


def finalize(session: Session, workload, out_dir: str, save: str) -> dict:
    """Fetch the final weights from the servers, evaluate, save; the session's finalizer only."""
    w = session.worker
    w.fetch_weights(session.job.read_timeout)
    final = {"metric": workload.metric_name, "value": float(workload.evaluate(session.model)),
             "eval_loss": float(workload.eval_loss(session.model)),
             "servers": [w.client.server_stats(k, 10) for k in range(len(w.client.endpoints))]}
    if save:
        os.makedirs(os.path.dirname(os.path.abspath(save)), exist_ok=True)
        torch.save(session.model.state_dict(), save)
        final["saved"] = os.path.abspath(save)
    log.info("final %s: %.4f", final["metric"], final["value"])
    if out_dir:
        with open(os.path.join(out_dir, "final.json"), "w") as fh:
            json.dump(final, fh, default=str)
    return final
