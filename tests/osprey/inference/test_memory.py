"""Byte counts from shapes equal the bytes of real tensors; LiveBytes sees a forward's peak."""

from __future__ import annotations

import numpy as np
import torch

from osprey.inference.memory import LiveBytes, encoding_bytes
from osprey.runtime.feature_cache import nbytes


def test_encoding_bytes_from_shapes_equal_a_real_encoding(tiny_osprey):
    expected = encoding_bytes(tiny_osprey, image_hw=(120, 160))
    real = tiny_osprey.encode_image(np.zeros((120, 160, 3), np.uint8))
    assert nbytes(real) == expected.whole
    assert nbytes(real.state) == expected.prefix_kv
    assert expected.prefix_tokens == real.state.segment.shape[1]


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
