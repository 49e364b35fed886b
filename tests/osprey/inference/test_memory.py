"""Each region model's byte counts from shapes equal the bytes of real tensors."""

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


def test_pixelrefer_lites_encoding_bytes_equal_a_real_encoding_and_bound_its_tower():
    from osprey.inference.pixelrefer import PixelReferLite
    from osprey.runtime.memory import LiveBytes

    tiny_pixelrefer = PixelReferLite.from_pretrained("pixelrefer-lite-tiny", device="cpu")
    expected = tiny_pixelrefer.encoding_bytes((120, 160))
    with LiveBytes() as live:
        real = tiny_pixelrefer.encode_image(np.zeros((120, 160, 3), np.uint8))
    assert nbytes(real) == expected.whole  # global features and the chat header's keys/values
    assert nbytes(real.state) == expected.prefix_kv and expected.prefix_tokens == real.state.segment.shape[1]
    assert expected == tiny_pixelrefer.encoding_bytes((1080, 1920))  # the whole image is resized first
    assert expected.vision_peak >= live.peak - nbytes(real.state)  # the tower's formula is an upper bound
