"""The one adapter module for Hugging Face transformers / tokenizers.

Builds the Llama causal LM from :class:`~osprey.model.config.LLMConfig`, loads or builds the tokenizer,
and runs the decoder on a prefix KV cache with explicit positions and a 4D attention mask.
A change in the transformers cache or masking API touches this file only.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import LLMConfig

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


# ---- running the decoder on a cached prefix -----------------------------------------------------------


@dataclass
class KVState:
    """Keys/values of tokens already run through the decoder, in ``B`` independent rows (one image
    each), with every token's segment and position.

    ``layers[i] = (keys, values)``, each ``(B, n_kv_heads, T, head_dim)``; ``segment`` and ``position``
    are ``(B, T)`` long tensors. A segment of ``-1`` marks padding (a row shorter than the longest),
    which no query ever sees. Tensors are never modified in place, so one state can be the base of many
    later forwards.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    segment: torch.Tensor
    position: torch.Tensor

    @classmethod
    def empty(cls, device: torch.device, batch: int = 1) -> KVState:
        none = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(layers=[], segment=none, position=none.clone())

    @property
    def batch(self) -> int:
        return self.segment.shape[0]

    @classmethod
    def stack(cls, states: list[KVState]) -> KVState:
        """One state whose row ``b`` is ``states[b]`` (each a single row), shorter rows padded."""
        length = max(s.segment.shape[1] for s in states)

        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            short = length - t.shape[-2 if t.dim() == 4 else -1]
            if not short:
                return t
            if t.dim() == 4:  # (1, H, T, D): pad the token axis
                return torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], short, t.shape[3])], dim=2)
            return torch.cat([t, t.new_full((t.shape[0], short), value)], dim=1)

        layers = [
            tuple(torch.cat([pad(s.layers[i][k], 0) for s in states]) for k in (0, 1))
            for i in range(len(states[0].layers))
        ]
        return cls(
            layers=layers,
            segment=torch.cat([pad(s.segment, -1) for s in states]),
            position=torch.cat([pad(s.position, 0) for s in states]),
        )


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
    only (its output is discarded, and a row of nothing but -inf would give NaN)."""
    rows = torch.arange(query_segment.shape[0], device=query_segment.device)[:, None, None]
    q_seg, k_seg = query_segment.clamp(min=0), key_segment.clamp(min=0)
    same = q_seg[:, :, None] == k_seg[:, None, :]
    allowed = visible[rows, q_seg[:, :, None], k_seg[:, None, :]] & (
        ~same | (key_position[:, None, :] <= query_position[:, :, None])
    )
    allowed &= (key_segment >= 0)[:, None, :]
    padding = query_segment < 0
    if padding.any():
        allowed[padding] = False
        allowed[..., 0] |= padding
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


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
    """Run ``embeds`` ``(B, N, D)`` after the tokens of ``state`` (``B`` rows).

    Args:
        segment, position: ``(B, N)`` segment id (-1: padding) and absolute position of every new token.
        visible: ``(B, S, S)`` bool, ``visible[b, a, c]`` when segment ``a`` of row ``b`` may attend to
            segment ``c``.
        logits_at: ``(rows, indices)`` of the new tokens whose next-token logits are wanted, or None.

    Returns:
        ``(logits (len(rows), V) in float32 or None, new state including the new tokens)``.
    """
    from transformers import DynamicCache

    key_segment = torch.cat([state.segment, segment], dim=1)
    key_position = torch.cat([state.position, position], dim=1)
    mask = tree_attention_mask(
        query_segment=segment,
        query_position=position,
        key_segment=key_segment,
        key_position=key_position,
        visible=visible,
        dtype=embeds.dtype,
    )
    cache = DynamicCache(ddp_cache_data=state.layers) if state.layers else DynamicCache()
    causal_lm = (
        llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    )  # peft: LoRA stays in the layers
    decoder = causal_lm.model
    out = decoder(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=position,
        use_cache=True,
        **{_cache_argument(decoder): cache},
    )
    returned = out.cache if _cache_argument(decoder) == "cache" else out.past_key_values
    new_layers = [(layer.keys, layer.values) for layer in returned.layers]
    logits = None
    if logits_at is not None:
        rows, indices = logits_at
        logits = causal_lm.lm_head(out.last_hidden_state[rows, indices]).float()
    return logits, KVState(layers=new_layers, segment=key_segment, position=key_position)


def _cache_argument(llm: nn.Module) -> str:
    """The decoder's name for its KV cache: ``cache`` (transformers >= 5.2x), else ``past_key_values``
    (earlier 5.x, where ``cache`` does not exist yet). Asked once per model class."""
    cls = type(llm)
    name = _CACHE_ARGUMENT.get(cls)
    if name is None:
        parameters = inspect.signature(cls.forward).parameters
        name = "cache" if "cache" in parameters else "past_key_values"
        _CACHE_ARGUMENT[cls] = name
    return name


_CACHE_ARGUMENT: dict[type, str] = {}


def embed_tokens(llm: nn.Module) -> nn.Embedding:
    return llm.get_input_embeddings()
