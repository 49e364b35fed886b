"""What Osprey's caches and forwards occupy, in bytes, exactly from shapes.

- :func:`encoding_bytes`: one cached Osprey encoding, by part (vision features, image tokens, prefix
  keys/values). The vision part runs the tower, so on the ``meta`` device it is exact and free; the
  prefix keys/values follow from the decoder's shape (a test checks the formula on real encodings).
  Every region model answers the same question with its own ``encoding_bytes()``
  (PixelRefer-Lite's from its shapes, :func:`tower_peak_bytes` for its tower).
- :func:`prefix_kv_bytes`: the keys/values of ``tokens`` tokens in every decoder layer.

The counters every model shares (:func:`~osprey.runtime.memory.weight_bytes`,
:class:`~osprey.runtime.memory.LiveBytes`) live in :mod:`osprey.runtime.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from osprey.model.kv import KVLayout
from osprey.runtime.memory import LiveBytes, tensor_bytes

__all__ = [
    "EncodingBytes", "WorkBytes", "encoding_bytes", "fit_work", "forward_bytes", "kv_buffer_bytes",
    "prefix_kv_bytes", "tower_peak_bytes", "work_bytes",
]  # fmt: skip


@dataclass(frozen=True)
class EncodingBytes:
    """One cached Osprey encoding by part. ``slim`` is what the host and disk tiers keep."""

    features: int
    image_tokens: int
    prefix_kv: int
    prefix_tokens: int
    vision_peak: int = 0  # what the vision tower's forward holds at its peak, its outputs included

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
    with torch.inference_mode(), LiveBytes() as live:
        features, image_tokens = model.encode_pixels(pixels.to(model.device))
    tokens = len(osprey._prefix_ids) - 1 + image_tokens.shape[0]
    assert osprey._prefix_ids[-1] == IMAGE_PLACEHOLDER_ID
    return EncodingBytes(
        features=sum(tensor_bytes(t) for t in features.values()),
        image_tokens=tensor_bytes(image_tokens),
        prefix_kv=prefix_kv_bytes(model.llm.config, tokens, model.dtype),
        prefix_tokens=tokens,
        vision_peak=live.peak,
    )


def tower_peak_bytes(vision_config, dtype: torch.dtype, *, tokens: int) -> int:
    """Peak bytes of a vision transformer's forward over ``tokens`` patches beyond its weights: its input
    and output hidden states and one layer's working set (the residual, the normed input, queries, keys,
    values and the attention output, the MLP's intermediate activation before and after its
    non-linearity). Attention scores are not materialised (SDPA's fused kernels)."""
    hidden, inner = vision_config.hidden_size, vision_config.intermediate_size
    return tokens * (8 * hidden + 2 * inner) * _element(dtype)


def prefix_kv_bytes(llm_config, tokens: int, dtype: torch.dtype) -> int:
    """Keys and values of ``tokens`` tokens in every decoder layer, plus their segment and position
    (two int64 per token): a :class:`~osprey.model.kv.KVState` of one row."""
    return tokens * KVLayout.of(llm_config, dtype).token_bytes()


# ---- one labelling call's working memory: keys/values buffers, scoring chunks, decode groups ----------

SHARED_TEXT_TOKENS = 512  # a question's text shared by every region, run once per image (a long label set)
REGION_PROMPT_TOKENS = 16  # a region's own part of a question (<mask><pos>, the rest of the turn, ASSISTANT:)
POOL_KEEP = 2  # buffers osprey.model.kv.BufferPool keeps between requests (its default)


def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _bucket(columns: int, step: int = 256) -> int:
    return -(-columns // step) * step  # what BufferPool allocates: capacities in multiples of 256


def kv_buffer_bytes(llm_config, dtype: torch.dtype, *, rows: int, columns: int) -> int:
    """A :class:`~osprey.model.kv.KVBuffer` of ``rows`` x ``columns`` (rounded up as the pool does)."""
    return rows * _bucket(columns) * KVLayout.of(llm_config, dtype).token_bytes()


def forward_bytes(llm_config, dtype: torch.dtype, *, tokens: int, columns: int, logits_rows: int) -> int:
    """Transient peak of one forward of ``tokens`` new tokens over ``columns`` keys on a buffer, with
    float32 logits at ``logits_rows`` positions: the additive attention mask and its boolean parts, one
    layer's working set (hidden states, the rotated queries/keys and the MLP's intermediate projections),
    and the logits (the LM head's output in the model's dtype, its float32 copy and the softmax's
    temporary). Attention scores are not materialised (SDPA's fused kernels)."""
    element, hidden = _element(dtype), llm_config.hidden_size
    mask = tokens * columns * (element + 4)  # additive mask + (allowed, same, visible gather, padding)
    layer = tokens * (3 * llm_config.intermediate_size + 6 * hidden) * element
    logits = logits_rows * llm_config.vocab_size * (element + 8)
    return mask + layer + logits


@dataclass(frozen=True)
class WorkBytes:
    """What one labelling call needs on top of weights and caches (see :func:`work_bytes`)."""

    score_buffer: int
    generate_buffer: int
    prepare: int  # a question's shared text first run on an image: the prefix keys/values copied once
    score: int  # a scoring chunk's forward
    prefill: int  # a decode group's prefill forward
    step: int  # one decoding step
    keep: int  # buffers the pool keeps between requests (of the larger shape, at worst)

    @property
    def scoring(self) -> int:
        """Closed-set scoring at its peak: its buffer and one chunk's forward."""
        return self.score_buffer + self.score

    @property
    def generating(self) -> int:
        """Decoding one group at its peak: its buffer and the larger of its prefill and a step."""
        return self.generate_buffer + max(self.prefill, self.step)

    @property
    def peak(self) -> int:
        """The kept buffers beyond the one in use, and the largest of the moments above."""
        kept = (self.keep - 1) * max(self.score_buffer, self.generate_buffer)
        return kept + max(self.prepare, self.scoring, self.generating)


def work_bytes(
    llm_config, dtype: torch.dtype, *, context_tokens: int, chunk_tokens: int, decode_rows: int,
    max_new_tokens: int, region_tokens: int = REGION_PROMPT_TOKENS, keep: int = POOL_KEEP,
) -> WorkBytes:  # fmt: skip
    """The working memory of labelling one image whose cached keys/values hold ``context_tokens``
    (prefix and shared question text): scoring chunks of ``chunk_tokens`` (the fast path's
    ``max_batch_tokens``) and decode groups of ``decode_rows`` answers of up to ``max_new_tokens``
    tokens (``max_decode_rows``), each after a ``region_tokens`` region prompt. What
    :class:`~osprey.inference.fast.FastRunner` and :class:`~osprey.inference.decode.GreedyDecoder`
    allocate: a buffer of the context plus the chunk (scoring) or plus the region prompts and every
    answer's token slots (decoding), the forwards on it, and per decoding step the answers' logits, the
    step's attention mask over the buffer and the answers' outputs."""
    prompts = decode_rows * region_tokens
    gen_columns = context_tokens + prompts + decode_rows * max(max_new_tokens - 1, 0)
    vocab = llm_config.vocab_size
    outputs = (decode_rows + 1) * (max_new_tokens * 12 + vocab)  # out tokens/log-probs, tokens seen
    return WorkBytes(
        score_buffer=kv_buffer_bytes(llm_config, dtype, rows=1, columns=context_tokens + chunk_tokens),
        generate_buffer=kv_buffer_bytes(llm_config, dtype, rows=1, columns=gen_columns),
        prepare=prefix_kv_bytes(llm_config, context_tokens, dtype)
        + forward_bytes(llm_config, dtype, tokens=SHARED_TEXT_TOKENS, columns=context_tokens, logits_rows=0),
        score=forward_bytes(
            llm_config,
            dtype,
            tokens=chunk_tokens,
            columns=context_tokens + chunk_tokens,
            logits_rows=chunk_tokens,
        ),  # fmt: skip
        prefill=forward_bytes(
            llm_config, dtype, tokens=prompts, columns=context_tokens + prompts, logits_rows=decode_rows
        )
        + outputs,
        step=forward_bytes(
            llm_config, dtype, tokens=decode_rows, columns=gen_columns, logits_rows=decode_rows
        )
        + outputs,
        keep=keep,
    )


CHUNK_CHOICES = (2048, 1024, 512, 256)  # scoring chunk sizes tried, largest first


def fit_work(
    model, budget: int, *, max_new_tokens: int, max_rows: int = 64, context_tokens: int | None = None
) -> tuple[int, int]:
    """``(max_batch_tokens, max_decode_rows)`` for ``model`` (an OspreyModel or any model with a
    ``llm.config`` and ``dtype``) so that one labelling call's :func:`work_bytes` stays within
    ``budget`` bytes: the largest scoring chunk of :data:`CHUNK_CHOICES` whose scoring fits, then the
    most answers decoded together (at most ``max_rows``) that fit beside it. At least 256 tokens and one
    answer, whatever the budget. ``context_tokens``: default, the model's image tokens plus the prompt's
    few and :data:`SHARED_TEXT_TOKENS` of shared question text."""
    config, dtype = model.llm.config, model.dtype
    if context_tokens is None:
        context_tokens = _image_tokens(model) + 32 + SHARED_TEXT_TOKENS

    def cost(chunk: int, rows: int) -> int:
        return work_bytes(
            config, dtype, context_tokens=context_tokens, chunk_tokens=chunk, decode_rows=rows,
            max_new_tokens=max_new_tokens,
        ).peak  # fmt: skip

    chunk = next((c for c in CHUNK_CHOICES if cost(c, 1) <= budget), CHUNK_CHOICES[-1])
    rows = 1
    while rows < max_rows and cost(chunk, rows + 1) <= budget:
        rows += 1
    return chunk, rows


def _image_tokens(model) -> int:
    """Image tokens in ``model``'s prefix: its token level's grid (1,024 when the config does not say)."""
    vision = getattr(getattr(model, "config", None), "vision", None)
    if vision is None or not hasattr(vision, "level_size"):
        return 1024
    return vision.level_size(vision.image_token_level) ** 2
