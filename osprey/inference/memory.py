"""What Osprey's caches and forwards occupy, in bytes, exactly from shapes.

- :func:`encoding_bytes`: one cached Osprey encoding, by part (vision features, image tokens, prefix
  keys/values). The vision part runs the tower, so on the ``meta`` device it is exact and free; the
  prefix keys/values follow from the decoder's shape (a test checks the formula on real encodings).
- :func:`prefix_kv_bytes`: the keys/values of ``tokens`` tokens in every decoder layer.
- :func:`label_activation_bytes`: the peak of one of the fast path's labelling forwards.

The counters every model shares (:func:`~osprey.runtime.memory.weight_bytes`,
:class:`~osprey.runtime.memory.LiveBytes`) live in :mod:`osprey.runtime.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from osprey.model.kv import KVLayout
from osprey.runtime.memory import tensor_bytes

__all__ = ["EncodingBytes", "encoding_bytes", "label_activation_bytes", "prefix_kv_bytes"]


@dataclass(frozen=True)
class EncodingBytes:
    """One cached Osprey encoding by part. ``slim`` is what the host and disk tiers keep."""

    features: int
    image_tokens: int
    prefix_kv: int
    prefix_tokens: int

    @property
    def slim(self) -> int:
        return self.features + self.image_tokens

    @property
    def whole(self) -> int:
        return self.slim + self.prefix_kv


def encoding_bytes(osprey, image_hw: tuple[int, int] = (480, 640)) -> EncodingBytes:
    """Bytes of one :class:`~osprey.inference.fast.EncodedImage` of ``osprey`` (an
    :class:`~osprey.inference.api.Osprey`, on any device, ``meta`` included)."""
    from osprey.model.preprocess import preprocess_image
    from osprey.model.prompts import IMAGE_PLACEHOLDER_ID

    model = osprey.model
    pixels = preprocess_image(np.zeros((*image_hw, 3), np.uint8), image_size=osprey.config.vision.image_size)
    with torch.inference_mode():
        features, image_tokens = model.encode_pixels(pixels.to(model.device))
    tokens = len(osprey._prefix_ids) - 1 + image_tokens.shape[0]
    assert osprey._prefix_ids[-1] == IMAGE_PLACEHOLDER_ID
    return EncodingBytes(
        features=sum(tensor_bytes(t) for t in features.values()),
        image_tokens=tensor_bytes(image_tokens),
        prefix_kv=prefix_kv_bytes(model.llm.config, tokens, model.dtype),
        prefix_tokens=tokens,
    )


def prefix_kv_bytes(llm_config, tokens: int, dtype: torch.dtype) -> int:
    """Keys and values of ``tokens`` tokens in every decoder layer, plus their segment and position
    (two int64 per token): a :class:`~osprey.model.kv.KVState` of one row."""
    return tokens * KVLayout.of(llm_config, dtype).token_bytes()


def label_activation_bytes(llm_config, dtype: torch.dtype, *, chunk_tokens: int, context_tokens: int) -> int:
    """Peak bytes of one of the fast path's forwards over ``chunk_tokens`` new tokens on top of
    ``context_tokens`` cached ones (:class:`~osprey.inference.fast.FastRunner`'s ``max_batch_tokens``
    on a prefix): the chunk's new keys/values in every layer, which the forward returns, plus one
    layer's working set (hidden states, the MLP's three intermediate projections, the additive mask).
    Logits are taken at a few positions only and left out."""
    element = torch.empty((), dtype=dtype).element_size()
    new_kv = prefix_kv_bytes(llm_config, chunk_tokens, dtype)
    layer = chunk_tokens * (3 * llm_config.intermediate_size + 4 * llm_config.hidden_size) * element
    mask = chunk_tokens * (context_tokens + chunk_tokens) * element
    return new_kv + layer + mask
