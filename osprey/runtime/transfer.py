"""Moving small things between the host and the device without stalling the device's queue.

- :func:`to_device`: host data (lists, numpy arrays, CPU tensors) onto the device. On CUDA the data goes
  through pinned (page-locked) memory with ``non_blocking=True``: a copy from ordinary pageable memory
  makes the host wait until the device has drained its queue, a copy from pinned memory is queued like a
  kernel. PyTorch's pinned allocator keeps the host block alive until the copy has run.
- :func:`read_back`: device tensors to host lists, all of them in one synchronisation (one wait for the
  device, not one per value). Every value the host reads from the device in the fast path goes through
  here, so the reads are easy to count and to keep few.
- :func:`to_host`: a device tensor queued for the host, into pinned memory, without waiting (masks:
  many bytes, read after the next synchronisation).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["read_back", "to_device", "to_host"]


def to_device(data, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``data`` (nested lists, a numpy array or a CPU tensor) as a tensor on ``device``; queued, not
    waited for, on CUDA (see the module docstring)."""
    device = torch.device(device)
    if isinstance(data, torch.Tensor):
        host = data if dtype is None else data.to(dtype)
    elif isinstance(data, np.ndarray):
        host = torch.from_numpy(data) if dtype is None else torch.from_numpy(data).to(dtype)
    else:
        host = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    if host.device.type == "cuda":
        return host.to(device, non_blocking=True)
    return host.pin_memory().to(device, non_blocking=True)


def read_back(*tensors: torch.Tensor) -> list:
    """Each tensor as a (nested) host list, after one synchronisation with the device."""
    if all(t.device.type != "cuda" for t in tensors):
        return [t.tolist() for t in tensors]
    copies = [t.detach().to("cpu", non_blocking=True) for t in tensors]  # into pinned memory
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [c.tolist() for c in copies]


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the host. From CUDA the copy goes into pinned memory and is only queued: read the
    result after a synchronisation (:func:`read_back` makes one); other tensors are returned as they are."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
