"""What the models and their caches occupy, in bytes: from real tensors, or exactly from shapes.

- :func:`encoding_bytes`: one cached Osprey encoding, by part (vision features, image tokens, prefix
  keys/values). The vision part runs the tower, so on the ``meta`` device it is exact and free; the
  prefix keys/values follow from the decoder's shape (a test checks the formula on real encodings).
- :func:`sam_embedding_bytes`: one cached SAM image embedding.
- :func:`weight_bytes`: a module's parameters and buffers.
- :class:`LiveBytes`: the peak of the bytes held by tensors while code runs, on any device, ``meta``
  included, so the activations of a 7B forward or of SAM ViT-H are known without a GPU.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["EncodingBytes", "LiveBytes", "encoding_bytes", "sam_embedding_bytes", "weight_bytes"]


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
        features=sum(_tensor_bytes(t) for t in features.values()),
        image_tokens=_tensor_bytes(image_tokens),
        prefix_kv=prefix_kv_bytes(model.llm.config, tokens, model.dtype),
        prefix_tokens=tokens,
    )


def prefix_kv_bytes(llm_config, tokens: int, dtype: torch.dtype) -> int:
    """Keys and values of ``tokens`` tokens in every decoder layer, plus their segment and position
    (two int64 per token): a :class:`~osprey.model.llm.KVState` of one row."""
    heads = llm_config.num_attention_heads
    kv_heads = getattr(llm_config, "num_key_value_heads", None) or heads
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * llm_config.num_hidden_layers * kv_heads * tokens * head_dim * element + 2 * 8 * tokens


def sam_embedding_bytes(arch) -> int:
    """One cached SAM embedding (float32 ``(prompt_embed_dim, grid, grid)``) of a
    :class:`~osprey.sam.build.SamArchitecture`."""
    grid = arch.image_size // arch.patch_size
    return arch.prompt_embed_dim * grid * grid * 4


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


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
        inputs = {id(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or id(tensor) in inputs or tensor._is_view():
                continue
            size = _tensor_bytes(tensor)
            if not size:
                continue
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


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
