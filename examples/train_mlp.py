"""A plain PyTorch training loop turned into a zps worker.

Run a job with your own script on every worker:

    bin/ps-coordinator --bind tcp://127.0.0.1:5555 --num-servers 2 --num-workers 2 \
        --staleness 2 --optimizer sgd --lr 0.1 --steps 300 &
    bin/ps-server --coordinator tcp://127.0.0.1:5555 &
    bin/ps-server --coordinator tcp://127.0.0.1:5555 &
    bin/ps-worker --coordinator tcp://127.0.0.1:5555 -- python examples/train_mlp.py &
    bin/ps-worker --coordinator tcp://127.0.0.1:5555 -- python examples/train_mlp.py

The script reads the coordinator's address from ZPS_COORDINATOR (set by
ps-worker).  The servers run the optimizer; the script only computes
gradients.  Worker 0 saves the trained model to ZPS_OUT/model.pt (or ./model.pt).
"""
import os

import torch
from sklearn.datasets import load_digits

from worker import join


def main():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = torch.utils.data.TensorDataset(x[:1500], y[:1500])
    test_x, test_y = x[1500:], y[1500:]

    torch.manual_seed(0)  # every worker builds the same initial model
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    with join(model) as ps:                                   # 1. bind the model to the job
        loader = torch.utils.data.DataLoader(ps.shard(train),  # 2. this worker's part of the data
                                             batch_size=32, shuffle=True)
        steps = ps.steps or 300
        while ps.clock < steps:
            for xb, yb in loader:
                with ps.step():                               # 3. read weights; on exit push, tick
                    loss = torch.nn.functional.cross_entropy(model(xb), yb)
                    loss.backward()
                if ps.clock >= steps:
                    break

        def report():  # runs after every worker finished, before the servers stop
            ps.worker.fetch_weights()
            with torch.no_grad():
                acc = (model(test_x).argmax(1) == test_y).float().mean().item()
            print(f"worker 0: held-out accuracy {acc:.3f} after {ps.clock} clocks", flush=True)
            out = os.environ.get("ZPS_OUT", ".")
            torch.save(model.state_dict(), os.path.join(out, "model.pt"))

        ps.finish(before_done=report if ps.rank == 0 else None)  # 4. wait for the others

if __name__ == "__main__":
    main()
