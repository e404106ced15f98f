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


def check_model(module: torch.nn.Module) -> torch.device:
    """Refuse a model zps cannot bind (``ConfigError`` saying why); return its device.

    Called before a worker registers anywhere, so a bad model costs the job nothing.
    """
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"zps binds a torch.nn.Module, got {type(module).__name__}")
    named = list(module.named_parameters())
    if not named:
        raise ConfigError("the model has no parameters to train")
    bad = [(n, p.dtype) for n, p in named if p.dtype != torch.float32]
    if bad:
        raise ConfigError(f"zps binds fp32 parameters; convert the model with .float() first "
                          f"(found {bad[:3]}{'...' if len(bad) > 3 else ''})")
    frozen = [n for n, p in named if not p.requires_grad]
    if frozen:
        # they would be pushed as zero gradients, and the servers' weight decay (AdamW's by
        # default) would still move them
        raise ConfigError(f"parameters {frozen[:3]}{'...' if len(frozen) > 3 else ''} are frozen "
                          "(requires_grad=False): zps trains every parameter of the module it binds. "
                          "Bind the trainable submodule instead, or unfreeze them")
    devices = {p.device for _, p in named}
    if len(devices) != 1:
        raise ConfigError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "meta":
        raise ConfigError("the model's parameters are on the meta device (no data): materialize them "
                          "first, e.g. with model.to_empty(device='cpu') and an initialization")
    return device


class ModelBinding:
    """Rebinds ``module``'s parameters onto flat buffers cut by a partition plan."""

    def __init__(self, module: torch.nn.Module, num_servers: int, frame_elems: int = 1 << 18):
        self.device = check_model(module)
        params = [p for _, p in module.named_parameters()]
        self.module = module
        self.plan = PartitionPlan.build(specs_of_module(module), num_servers, frame_elems=frame_elems)
        self.params = params
        total = self.plan.total
        self.flat = torch.empty(total, dtype=torch.float32, device=self.device)
        self.flat_grad = torch.zeros(total, dtype=torch.float32, device=self.device)
        self._grad_views = []
        self._param_views = []
        with torch.no_grad():
            for spec, p in zip(self.plan.tensors, params):
                view = self.flat[spec.offset:spec.end].view(spec.shape)
                view.copy_(p.data)
                p.data = view
                self._param_views.append(view)
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
        self._follow_memory()
        if self.cuda:
            self.host_params.copy_(self.flat)
        return self._param_np

    def install(self, replies: Sequence) -> None:
        """Copy pull replies (one per server, in rank order) into the flat weights."""
        self._follow_memory()
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

    def check_bound(self) -> None:
        """Raise ``ConfigError`` if the model no longer trains on the flat buffers.

        ``model.double()``, ``.to(...)`` or ``load_state_dict(..., assign=True)``
        after binding give the module parameters zps does not see: it would
        push zeros and its pulls would never reach the model.  Memory that
        moved as a whole (``share_memory()``) is followed.
        """
        now = list(self.module.parameters())
        if len(now) != len(self.params) or any(a is not b for a, b in zip(now, self.params)):
            raise ConfigError("the model's parameters were replaced after it was bound (e.g. by "
                              "load_state_dict(..., assign=True)): zps no longer sees them. Load weights "
                              "with a plain load_state_dict, or bind the model after loading")
        for spec, p, v in zip(self.plan.tensors, self.params, self._param_views):
            if p.data_ptr() != v.data_ptr() or p.dtype != v.dtype or p.device != v.device:
                raise ConfigError(f"parameter {spec.name} was moved or converted after the model was bound "
                                  "(e.g. by .double() or .to(...)): zps no longer sees it. Move or convert "
                                  "the model before binding it")
        self._follow_memory()

    def _follow_memory(self) -> None:
        """Re-take the numpy views if the flat buffers' memory moved (``share_memory()`` does that)."""
        if self._param_np.ctypes.data != self.host_params.data_ptr() or \
                self._grad_np.ctypes.data != self.host_grads.data_ptr():
            self._param_np = self.host_params.numpy()
            self._grad_np = self.host_grads.numpy()

    # ------------------------------------------------------------ gradients
    def grads_host(self) -> np.ndarray:
        """The gradients as one host fp32 array, ready to push.

        A gradient that code outside zps replaced (``model.zero_grad()`` sets
        them to None by default, and backward then allocates new ones) is
        copied back into the flat buffer and re-bound; a missing one counts
        as zero.  A model whose parameters were replaced or moved since
        binding is refused (:meth:`check_bound`).
        """
        self.check_bound()
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
