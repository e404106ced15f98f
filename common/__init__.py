"""Shared by every role: the wire contract and the plumbing around it.

    protocol    wire protocol: version, message types, frame layout, pure codec
    plan        PartitionPlan: the cut of the flat parameter vector across servers
    config      frozen settings of every role and the one precedence rule
    errors      one exception hierarchy, grouped by cause; wire error codes
    transport   ZeroMQ sockets configured the zps way; endpoint helpers
    control     CoordinatorLink (a role's connection to the coordinator), request_once
    faults      seeded fault injector (drop, duplicate, delay) for tests and experiments
    security    CurveZMQ keys, secured sockets and the ZAP allow-list
    netaddr     interface addresses, advertisable endpoints, reachability probes
    cli         flags from settings, READY lines, signal handling (used by bin/)
"""
