"""The one adapter module for Hugging Face transformers / tokenizers.

Builds the Llama causal LM from :class:`~osprey.model.config.LLMConfig`, loads or builds the tokenizer,
and runs the decoder layers on preallocated keys/values (:mod:`osprey.model.kv`) with explicit positions
and a tree-shaped attention mask. A change in transformers' decoder layers touches this file only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLMConfig
from .kv import KVBuffer, KVLayout, KVState

__all__ = [
    "DecoderParts", "KVState", "build_llm", "build_tiny_tokenizer", "decoder_parts", "embed_tokens",
    "finish_tokenizer", "forward_on_buffer", "forward_on_state", "load_tokenizer", "logits_of",
    "rope_angles", "run_layers", "tree_attention_mask",
]  # fmt: skip

logger = logging.getLogger(__name__)

MASK_TOKEN = "<mask>"
POS_TOKEN = "<pos>"


def build_llm(config: LLMConfig) -> nn.Module:
    """A ``LlamaForCausalLM`` with random weights and SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        initializer_range=config.initializer_range,
        tie_word_embeddings=False,
    )
    hf_config._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_config)


# ---- tokenizers --------------------------------------------------------------------------------------

# transformers 4.31's Llama fast tokenizer (what the authors ran) normalised every text piece between
# added tokens on its own: a "▁" in front, spaces as "▁", and no pre-tokenizer. transformers 5 prepends
# "▁" to the first piece only (a Metaspace pre-tokenizer), so "<pos>." would become "<pos>" "." where
# the model was trained on "<pos>" "▁.".
SPACE = "▁"


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer as the authors' code used it: see :func:`finish_tokenizer`.

    Reads ``tokenizer.json`` when the checkpoint has one, else SentencePiece's ``tokenizer.model``
    (converted by transformers, which needs ``protobuf``). Both give the authors' ids.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except (ImportError, ValueError, OSError) as error:
        raise ValueError(
            f"cannot load the tokenizer of {path}: {error} (a checkpoint needs tokenizer.json or "
            f"tokenizer.model; reading tokenizer.model needs `pip install protobuf sentencepiece`)"
        ) from error
    return finish_tokenizer(tokenizer)


def finish_tokenizer(tokenizer):
    """``<mask>``/``<pos>`` present as special, never-normalised tokens (as the authors' ``add_tokens(...,
    special_tokens=True)`` registers them; a checkpoint's ``added_tokens.json`` alone does not), pad =
    unk (as Osprey trains), and each text piece normalised as transformers 4.31 did (see ``SPACE``)."""
    from tokenizers import normalizers
    from transformers import AddedToken

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; Osprey's prompts are "
            f"tokenised with the fast Llama tokenizer (tokenizer.json, or tokenizer.model with protobuf)"
        )
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (MASK_TOKEN, POS_TOKEN)],
        special_tokens=True,
    )
    tokenizer.pad_token = tokenizer.unk_token
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.pre_tokenizer = None
    return tokenizer


def build_tiny_tokenizer(vocab_size: int):
    """A deterministic Llama-like BPE tokenizer (``<unk>``=0, ``<s>``=1, ``</s>``=2, SentencePiece-style
    ``▁`` word prefix) trained on a built-in corpus, for the random-weight presets and tests.

    ``<mask>`` and ``<pos>`` are added after the ``vocab_size`` base entries, so their ids fall
    outside the embedding table exactly as in the released Osprey checkpoints.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from .prompts import tokenizer_training_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_training_corpus(), trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tiny tokenizer grew to {tok.get_vocab_size()} entries, more than {vocab_size}")
    base_size = tok.get_vocab_size()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
    )
    # Pad the base vocabulary so the added tokens sit right after the embedding table, as in the
    # released checkpoints (ids vocab_size and vocab_size + 1).
    if base_size < vocab_size:
        tokenizer.add_tokens([f"<unused{i}>" for i in range(vocab_size - base_size)])
    return finish_tokenizer(tokenizer)


# ---- running the decoder on preallocated keys/values ----------------------------------------------------
#
# The decoder layers run here, not through the transformers model's forward: each layer's projections,
# norms and MLP are the model's own modules (peft's LoRA layers included), composed as transformers'
# Llama/Qwen2 layer composes them, but the new tokens' keys/values are written in place into a
# KVBuffer and attention reads the buffer as it is. So a forward makes no cache object and concatenates
# nothing, and one decoding step has fixed shapes and no host read: it can be compiled whole.


@dataclass(frozen=True)
class DecoderParts:
    """What running the decoder needs, resolved once per language model (peft's wrapper looked through).

    ``rope``: ``(cos, sin)`` tables ``(max_positions, 1, head_dim)`` in the model's dtype, made by the
    model's own rotary module (so they equal what it computes per position); ``sin`` has its first half
    negated, so that ``x * cos + x.roll(half) * sin`` is transformers' ``apply_rotary_pos_emb``. None when
    the rotary embedding is not a fixed table (dynamic scaling): then the module runs per forward."""

    causal_lm: nn.Module
    decoder: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    rope: tuple[torch.Tensor, torch.Tensor] | None
    grouped: bool  # grouped-query attention: fewer key/value heads than query heads

    @property
    def layers(self):
        return self.decoder.layers

    def layout(self) -> KVLayout:
        dtype = self.decoder.embed_tokens.weight.dtype
        return KVLayout(len(self.decoder.layers), self.kv_heads, self.head_dim, dtype)


def decoder_parts(llm: nn.Module) -> DecoderParts:
    """The :class:`DecoderParts` of ``llm`` (a transformers Llama or Qwen2 causal LM, or peft's wrapper
    of one), cached on the model. ValueError for a decoder this module cannot run (sliding-window
    attention)."""
    causal_lm = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # peft: LoRA stays in
    device = causal_lm.lm_head.weight.device
    cached = causal_lm.__dict__.get("_osprey_decoder_parts")
    if cached is not None and cached[0] == (device, causal_lm.lm_head.weight.dtype):
        return cached[1]
    decoder = causal_lm.model
    attn = decoder.layers[0].self_attn
    if any(getattr(layer.self_attn, "sliding_window", None) for layer in decoder.layers):
        raise ValueError("decoders with sliding-window attention are not supported by the fast path")
    config = causal_lm.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    parts = DecoderParts(
        causal_lm=causal_lm, decoder=decoder, heads=heads, kv_heads=kv_heads, head_dim=attn.head_dim,
        scaling=attn.scaling, rope=_rope_table(decoder, config, device), grouped=kv_heads != heads,
    )  # fmt: skip
    causal_lm.__dict__["_osprey_decoder_parts"] = ((device, causal_lm.lm_head.weight.dtype), parts)
    return parts


def _rope_table(decoder: nn.Module, config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    rotary = decoder.rotary_emb
    if getattr(rotary, "rope_type", "default") in ("dynamic", "longrope") or device.type == "meta":
        return None
    positions = torch.arange(config.max_position_embeddings, device=device)[None]
    dtype = decoder.embed_tokens.weight.dtype
    with torch.no_grad():
        cos, sin = rotary(torch.empty(0, device=device, dtype=dtype), positions)  # (1, P, D)
    half = cos.shape[-1] // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos[0, :, None].contiguous(), sin[0, :, None].contiguous()


def rope_angles(parts: DecoderParts, positions: torch.Tensor, dtype: torch.dtype):
    """``(cos, sin)`` ``(B, N, 1, head_dim)`` for ``positions`` ``(B, N)`` (see :class:`DecoderParts`)."""
    if parts.rope is not None:
        return parts.rope[0][positions], parts.rope[1][positions]
    dummy = torch.empty(0, device=positions.device, dtype=dtype)
    cos, sin = parts.decoder.rotary_emb(dummy, positions)
    half = cos.shape[-1] // 2
    return cos[:, :, None], torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, :, None]


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # In float32 torch's fused op gives transformers' result bit for bit (a test checks it) in one kernel;
    # in other dtypes transformers rounds twice, so its module runs.
    if x.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm(x)


def run_layers(
    parts: DecoderParts,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    hidden: torch.Tensor,
    *,
    rope: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    mask: torch.Tensor,
    read: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    between_layers: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Every decoder layer on ``hidden`` ``(B, N, D)``.

    ``keys[i]``/``values[i]`` are layer ``i``'s ``(B, capacity, kv_heads, head_dim)`` tensors of a
    :class:`~osprey.model.kv.KVBuffer`: the new tokens' keys/values are written into columns ``slots``
    ``(N,)``, in place, and attention reads the first ``K`` columns under the additive ``mask``
    ``(B, 1, N, K)``, through ``read`` (the buffer's :meth:`~osprey.model.kv.KVBuffer.window` views, made
    once) or, when None, through views made here (what a compiled step does: its inputs then never
    alias). Returns the last layer's output (before the final norm). ``between_layers`` runs between two
    layers (a scheduler's hand-over point; never inside a compiled step)."""
    batch, n, _ = hidden.shape
    cos, sin = rope
    half = parts.head_dim // 2
    columns = mask.shape[-1]
    for i, layer in enumerate(parts.layers):
        if between_layers is not None and i:
            between_layers()
        attn = layer.self_attn
        x = _rms(layer.input_layernorm, hidden)
        q = attn.q_proj(x).view(batch, n, parts.heads, parts.head_dim)
        k = attn.k_proj(x).view(batch, n, parts.kv_heads, parts.head_dim)
        v = attn.v_proj(x).view(batch, n, parts.kv_heads, parts.head_dim)
        q = q * cos + q.roll(half, -1) * sin
        k = k * cos + k.roll(half, -1) * sin
        keys[i].index_copy_(1, slots, k)  # in place: nothing concatenated
        values[i].index_copy_(1, slots, v)
        if read is None:
            key, value = keys[i][:, :columns].transpose(1, 2), values[i][:, :columns].transpose(1, 2)
        else:
            key, value = read[0][i], read[1][i]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), key, value, attn_mask=mask, scale=parts.scaling,
            enable_gqa=parts.grouped,
        )  # fmt: skip
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
        hidden = hidden + layer.mlp(_rms(layer.post_attention_layernorm, hidden))
    return hidden


def logits_of(parts: DecoderParts, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits (float32) of last-layer outputs ``(..., D)``: final norm, then the LM head."""
    logits = parts.causal_lm.lm_head(_rms(parts.decoder.norm, hidden))
    return logits if logits.dtype == torch.float32 else logits.float()


def tree_attention_mask(
    *,
    query_segment: torch.Tensor,
    query_position: torch.Tensor,
    key_segment: torch.Tensor,
    key_position: torch.Tensor,
    visible: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive ``(B, 1, Q, K)`` mask for rows of ``(B, Q)`` queries and ``(B, K)`` keys: a query sees a
    key of its row when the key's segment is the query's own or one of its ancestors
    (``visible[b, q_seg, k_seg]``, ``(B, S, S)``) and, within its own segment, only keys at earlier or
    equal positions. Padding keys (segment -1) are never seen; a padding query sees its row's first key
    only (its output is discarded, and a row of nothing but -inf would give NaN). No host read."""
    rows = torch.arange(query_segment.shape[0], device=query_segment.device)[:, None, None]
    q_seg, k_seg = query_segment.clamp(min=0), key_segment.clamp(min=0)
    same = q_seg[:, :, None] == k_seg[:, None, :]
    allowed = visible[rows, q_seg[:, :, None], k_seg[:, None, :]] & (
        ~same | (key_position[:, None, :] <= query_position[:, :, None])
    )
    allowed &= (key_segment >= 0)[:, None, :]
    first = torch.zeros(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    first[0] = True
    allowed = torch.where((query_segment < 0)[:, :, None], first, allowed)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def forward_on_buffer(
    parts: DecoderParts,
    buffer: KVBuffer,
    *,
    embeds: torch.Tensor,
    segment: torch.Tensor,
    position: torch.Tensor,
    visible: torch.Tensor,
    between_layers: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Run ``embeds`` ``(B, N, D)`` after the ``buffer.length`` kept columns, writing them to columns
    ``length .. length + N`` (``buffer.length`` is left as it was: the caller advances it to keep them).

    Args:
        segment, position: ``(B, N)`` segment id (-1: padding) and absolute position of every new token.
        visible: ``(B, S, S)`` bool, ``visible[b, a, c]`` when segment ``a`` of row ``b`` may attend to
            segment ``c``.

    Returns:
        the last layer's outputs ``(B, N, D)`` (:func:`logits_of` turns rows of it into logits).
    """
    start, n = buffer.length, embeds.shape[1]
    end = start + n
    if end > buffer.capacity:
        raise ValueError(f"{n} new tokens after {start} do not fit a buffer of {buffer.capacity} columns")
    buffer.segment[:, start:end] = segment
    buffer.position[:, start:end] = position
    mask = tree_attention_mask(
        query_segment=segment,
        query_position=position,
        key_segment=buffer.segment[:, :end],
        key_position=buffer.position[:, :end],
        visible=visible,
        dtype=embeds.dtype,
    )
    slots = torch.arange(start, end, device=embeds.device)
    rope = rope_angles(parts, position, embeds.dtype)
    return run_layers(
        parts, buffer.keys, buffer.values, embeds, rope=rope, slots=slots, mask=mask,
        read=buffer.window(end), between_layers=between_layers,
    )  # fmt: skip


def forward_on_state(
    llm: nn.Module,
    state: KVState,
    *,
    embeds: torch.Tensor,
    segment: torch.Tensor,
    position: torch.Tensor,
    visible: torch.Tensor,
    logits_at: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor | None, KVState]:
    """Run ``embeds`` ``(B, N, D)`` after the tokens of ``state`` (``B`` rows) and keep them: a new state
    (one buffer of exactly the needed size, ``state`` copied in once) and, at ``logits_at`` = ``(rows,
    indices)`` of the new tokens, their next-token logits ``(len(rows), V)`` in float32 (or None)."""
    parts = decoder_parts(llm)
    buffer = KVBuffer.from_state(state, capacity=state.length + embeds.shape[1], layout=parts.layout())
    hidden = forward_on_buffer(
        parts, buffer, embeds=embeds, segment=segment, position=position, visible=visible
    )
    buffer.length = buffer.capacity
    logits = None
    if logits_at is not None:
        rows, indices = logits_at
        logits = logits_of(parts, hidden[rows, indices])
    return logits, buffer.state()


def embed_tokens(llm: nn.Module) -> nn.Embedding:
    return llm.get_input_embeddings()
