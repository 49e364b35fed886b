"""Osprey's byte counts from shapes equal the bytes of real tensors."""

from __future__ import annotations

import numpy as np

from osprey.inference.memory import encoding_bytes
from osprey.runtime.feature_cache import nbytes


def test_encoding_bytes_from_shapes_equal_a_real_encoding(tiny_osprey):
    expected = encoding_bytes(tiny_osprey, image_hw=(120, 160))
    real = tiny_osprey.encode_image(np.zeros((120, 160, 3), np.uint8))
    assert nbytes(real) == expected.whole
    assert nbytes(real.state) == expected.prefix_kv
    assert expected.prefix_tokens == real.state.segment.shape[1]
