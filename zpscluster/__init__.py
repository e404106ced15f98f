"""Cluster-level tools built on the zps roles.

    procs       start role processes, wait for their READY line, stream and stop them
    launch      ps-launch: a whole job on one host, summary.json and metrics.jsonl
    node        ps-node: one process of a job under torchrun, Slurm, Open MPI or Kubeflow
    doctor      ps-doctor: pre-flight checks of a (multi-host) job
    ctl         ps-ctl, ps-stat, ps-export: operate a job and its checkpoints
    bench       ps-bench: zps against bare pyzmq, torch.distributed.rpc and gloo
    experiment  ps-experiment: staleness grids, tables, plots and a report
    soak        ps-soak: mixed faults for a set time, invariants checked
"""
