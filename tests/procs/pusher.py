"""A worker process that pushes gradients of ones forever (until killed).

Usage: python -m tests.procs.pusher ENDPOINT N_ELEMS FRAME_ELEMS READY_FILE
"""
import sys

import numpy as np

from common.config import ClientSettings
from common.plan import PartitionPlan
from worker.client import PSClient


def main(endpoint, n, frame, ready_file):
    plan = PartitionPlan.build([("w", (n,), "float32")], 1, frame_elems=frame)
    c = PSClient([endpoint], 0, settings=ClientSettings(frame_elems=frame)).start()
    c.hello(plan)
    c.init(np.zeros(n, np.float32))
    ones = np.ones(n, np.float32)
    clk = 0
    while True:
        handles = [c.push(ones, clk + i) for i in range(4)]  # several large pushes in flight
        clk += 4
        for h in handles:
            h.wait(60)
        if clk == 8:
            open(ready_file, "w").write("pushing\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
