"""Byte counters every model shares: a module's weights, and LiveBytes' peak of a forward."""

from __future__ import annotations

import torch
from torch import nn

from osprey.runtime.memory import LiveBytes, tensor_bytes, weight_bytes


def test_live_bytes_counts_what_is_held_at_once_not_what_was_ever_allocated():
    x = torch.zeros(1024, 1024)  # 4 MiB, before the mode: not counted
    with LiveBytes() as live:
        for _ in range(5):
            y = x + 1  # 4 MiB each, the previous one freed when y is rebound
        z = y.view(-1)  # a view: no new memory
        y.add_(1)  # in place: no new memory
    assert live.peak == 2 * 4 * 2**20  # the new y exists before the old one is dropped
    assert z.numel() == 1024 * 1024
    with torch.device("meta"), LiveBytes() as meta:
        a = torch.empty(4096, 4096)
        b = a @ a
    assert meta.peak == 2 * 4096 * 4096 * 4 and b.shape == (4096, 4096)


def test_weight_bytes_counts_parameters_and_buffers_once_each():
    tied = nn.Linear(8, 8)  # 64 + 8 float32
    model = nn.Sequential(tied, nn.BatchNorm1d(8, dtype=torch.float16), tied)
    # BatchNorm: weight, bias, running mean and var in float16, plus an int64 batch counter.
    assert weight_bytes(model) == (64 + 8) * 4 + 4 * 8 * 2 + 8
    assert tensor_bytes(torch.empty(3, 5, dtype=torch.bfloat16)) == 30
    with torch.device("meta"):
        big = nn.Linear(4096, 4096, bias=False)
    assert weight_bytes(big) == 4096 * 4096 * 4  # counted from the shape; nothing allocated
