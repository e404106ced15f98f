"""A CUDA worker: weights and gradients cross through pinned host buffers.

Skipped where no GPU exists (the CPU suite covers the same code paths with
device == cpu)."""
import numpy as np
import pytest
import torch

from common.config import ClientSettings, ServerSettings
from ps.server import ShardServer
from worker.session import PSWorker

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def train(device, steps=10):
    server = ShardServer(ServerSettings(num_servers=1, num_workers=1, staleness=0, optimizer="sgd",
                                        lr=0.1, momentum=0.9)).run_in_background()
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).to(device)
        pw = PSWorker(model, [server.endpoint], 0, settings=ClientSettings(frame_elems=1 << 14)).start()
        assert pw.binding.cuda == (device == "cuda")
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randn(64, 256, generator=g).to(device)
            y = torch.randint(0, 10, (64,), generator=g).to(device)
            pw.read()
            pw.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            pw.push()
        pw.flush(30)
        pw.fetch_weights(30)
        out = pw.binding.flat.detach().cpu().numpy().copy()
        pw.close()
        return out
    finally:
        server.shutdown(5)


def test_a_cuda_worker_trains_like_a_cpu_worker():
    gpu = train("cuda")
    cpu = train("cpu")
    rel = np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu)
    print(f"CUDA vs CPU worker after 10 BSP steps: relative difference {rel:.2e}")
    assert rel < 1e-4


def test_cuda_binding_uses_pinned_host_buffers():
    model = torch.nn.Linear(100, 100).cuda()
    from worker.binding import ModelBinding
    b = ModelBinding(model, 1)
    assert b.host_params.is_pinned() and b.host_grads.is_pinned()
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert b.flat.data_ptr() == model.weight.data_ptr()
