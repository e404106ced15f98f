"""Cluster-level tools built on the zps roles.

    procs       start role processes, wait for their READY line, stream and stop them
"""
