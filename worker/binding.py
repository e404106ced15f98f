"""``ModelBinding``: a model's parameters and gradients as views of two flat buffers.

After binding, every parameter ``p`` of the module is a view into one flat
fp32 buffer (``flat``) and its gradient a view into one flat gradient buffer
(``flat_grad``), both laid out by the partition plan.  A pull reply lands in
place with one copy per frame; a push sends slices of ``flat_grad`` without
a copy.  No per-tensor work happens on the hot path.

On a CUDA model the flat buffers live on the device and cross to the host
through pinned staging buffers (one device-to-host copy of the gradients per
push on a side stream, one host-to-device copy of the weights per install).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from common.errors import ConfigError
from common.plan import PartitionPlan, frame_slices, specs_of_module
from common import protocol as proto


class ModelBinding:
    """Rebinds ``module``'s parameters onto flat buffers cut by a partition plan."""

    def __init__(self, module: torch.nn.Module, num_servers: int, frame_elems: int = 1 << 18):
        params = [p for _, p in module.named_parameters()]
        if not params:
            raise ConfigError("the model has no parameters to train")
        bad = [(n, p.dtype) for n, p in module.named_parameters() if p.dtype != torch.float32]
        if bad:
            raise ConfigError(f"zps binds fp32 parameters; convert the model with .float() first "
                              f"(found {bad[:3]}{'...' if len(bad) > 3 else ''})")
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ConfigError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
        self.module = module
        self.device = devices.pop()
        self.plan = PartitionPlan.build(specs_of_module(module), num_servers, frame_elems=frame_elems)
        self.params = params
        total = self.plan.total
        self.flat = torch.empty(total, dtype=torch.float32, device=self.device)
        self.flat_grad = torch.zeros(total, dtype=torch.float32, device=self.device)
        self._grad_views = []
        with torch.no_grad():
            for spec, p in zip(self.plan.tensors, params):
                view = self.flat[spec.offset:spec.end].view(spec.shape)
                view.copy_(p.data)
                p.data = view
                g = self.flat_grad[spec.offset:spec.end].view(spec.shape)
                p.grad = g
                self._grad_views.append(g)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.host_params = torch.empty(total, dtype=torch.float32, pin_memory=True)
            self.host_grads = torch.empty(total, dtype=torch.float32, pin_memory=True)
            self._stream = torch.cuda.Stream(device=self.device)
        else:
            self.host_params = self.flat
            self.host_grads = self.flat_grad
        self._param_np = self.host_params.numpy()
        self._grad_np = self.host_grads.numpy()

    @property
    def total(self) -> int:
        return self.plan.total

    # ------------------------------------------------------------ weights
    def params_host(self) -> np.ndarray:
        """The current weights as a host fp32 array (a view on CPU)."""
        if self.cuda:
            self.host_params.copy_(self.flat)
        return self._param_np

    def install(self, replies: Sequence) -> None:
        """Copy pull replies (one per server, in rank order) into the flat weights."""
        dst = self._param_np
        fe = self.plan.frame_elems
        for k, msg in enumerate(replies):
            lo, hi = self.plan.range_of(k)
            proto.check_layout(msg, hi - lo, fe)
            for (a, b), chunk in zip(frame_slices(hi - lo, fe), proto.payload(msg)):
                dst[lo + a:lo + b] = chunk
        if self.cuda:
            with torch.no_grad():
                self.flat.copy_(self.host_params, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()

    def load_flat(self, values: np.ndarray) -> None:
        """Overwrite the weights with a full flat vector."""
        with torch.no_grad():
            self.flat.copy_(torch.as_tensor(values, dtype=torch.float32))

    # ------------------------------------------------------------ gradients
    def grads_host(self) -> np.ndarray:
        """The gradients as one host fp32 array, ready to push.

        A gradient that code outside zps replaced (``model.zero_grad()`` sets
        them to None by default, and backward then allocates new ones) is
        copied back into the flat buffer and re-bound; a missing one counts
        as zero.
        """
        with torch.no_grad():
            for p, g in zip(self.params, self._grad_views):
                pg = p.grad
                if pg is None:
                    g.zero_()
                    p.grad = g
                elif pg.data_ptr() != g.data_ptr():
                    g.copy_(pg)
                    p.grad = g
        if self.cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self.host_grads.copy_(self.flat_grad, non_blocking=True)
            self._stream.synchronize()
        return self._grad_np

    def zero_grad(self) -> None:
        with torch.no_grad():
            self.flat_grad.zero_()
            for p, g in zip(self.params, self._grad_views):
                if p.grad is None or p.grad.data_ptr() != g.data_ptr():
                    p.grad = g
