"""Server side of zps: data flows push -> codec -> shard -> optimizer -> reply.

    server       ShardServer: the ROUTER event loop of one server process
    shard        ShardStore (flat fp32 weights) and the pool of snapshots pulls are sent from
    optim        OptimizerSpec and ShardOptimizer: torch's functional fused optimizers over the flat shard
    ssp          SSPGate: clock table, liveness and parked reads, as pure logic
    rules        update rules (BSP averaging, apply on arrival), DC-ASGD, the push ledger
    checkpoint   atomic checkpoints of a shard and everything needed to resume
    coordinator  Coordinator: ranks, address book, barriers, liveness
    cli          ps-server and ps-coordinator
"""
