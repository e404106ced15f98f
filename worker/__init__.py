"""Worker side of zps: everything that runs next to the model.

    client      PSClient: the I/O thread that owns the sockets to every server
    binding     ModelBinding: parameters and gradients as views of two flat buffers
    session     PSWorker: the SSP read / push / tick loop with its weight cache
    api         join() and Session: the training API for user scripts
    trainer     the built-in training loop (metrics, stragglers, final evaluation)
    workloads   built-in workloads: linreg, digits, mf, charlm
    stragglers  seeded straggler profiles
    progress    progress bar or periodic lines
    cli         ps-worker
"""
from worker.api import Session, join, partition
from worker.session import PSWorker, ReadRecord

__all__ = ["PSWorker", "ReadRecord", "Session", "join", "partition"]
