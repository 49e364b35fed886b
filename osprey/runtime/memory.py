"""Bytes held by tensors, for any model: a module's weights, and the peak of what code holds while it runs.

- :func:`weight_bytes`: a module's parameters and buffers.
- :class:`LiveBytes`: the peak of the bytes held by tensors while code runs, on any device, ``meta``
  included, so the activations of a 7B forward or of SAM ViT-H are known without a GPU.

What one model's caches hold, from its shapes, lives with that model (:mod:`osprey.inference.memory`
for Osprey, :mod:`osprey.sam.memory` for SAM).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytes", "tensor_bytes", "weight_bytes"]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements (its storage may be larger: a view counts only what it shows)."""
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor an operation creates until it is freed; ``peak`` is the most
    held at once (on top of what existed before). Views and in-place results are not new memory.

        with LiveBytes() as live:
            model(x)
        live.peak  # bytes

    It sees what PyTorch allocates for the computation, not the allocator's rounding and caching
    (on CUDA, ``torch.cuda.max_memory_allocated`` is a few percent higher), and works on ``meta``
    tensors, so full-size models can be measured without their memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        inputs = {id(a) for a in flat}
        # under inference mode a view does not say it is one (_is_view() is False): a result on an
        # input's storage is a view all the same
        storages = {_storage(a) for a in flat} - {None}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or id(tensor) in inputs or tensor._is_view():
                continue
            if _storage(tensor) in storages:
                continue
            size = tensor_bytes(tensor)
            if not size:
                continue
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def _storage(tensor: torch.Tensor) -> int | None:
    """The identity of ``tensor``'s storage (its C object: meta tensors share it too, though they have
    no address), or None for tensors without one (sparse, some wrappers)."""
    try:
        return tensor.untyped_storage()._cdata or None
    except (RuntimeError, NotImplementedError):
        return None
