"""PixelRefer-Lite's tokenizer: the checkpoint's Qwen2 tokenizer, or a small built one for the presets.

The release's tokenizer is Qwen2.5's byte-level BPE with ``<image>``, ``<|stream_start|>``,
``<|stream_end|>`` and ``<REGION>`` added as special tokens (the authors' training script adds them);
``<|im_end|>`` ends an answer. Loading makes sure all of them are there and never split.
"""

from __future__ import annotations

from pathlib import Path

from .prompts import ADDED_TOKENS, IM_END, IM_START, REGION_TOKEN, tokenizer_training_corpus

BASE_SPECIAL = ("<|endoftext|>", IM_START, IM_END)


def _finish(tokenizer):
    from transformers import AddedToken

    missing = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
        )
    if tokenizer.convert_tokens_to_ids(IM_END) is None:
        raise ValueError(f"the tokenizer has no {IM_END} token; it is not a Qwen2 chat tokenizer")
    tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``)."""
    from transformers import AutoTokenizer, Qwen2Config

    try:  # config.json names the authors' model type, unknown to transformers: the tokenizer is Qwen2's
        tokenizer = AutoTokenizer.from_pretrained(str(path), config=Qwen2Config())
    except (ImportError, ValueError, OSError) as error:
        raise ValueError(
            f"cannot load the tokenizer of {path}: {error} (a PixelRefer-Lite checkpoint carries Qwen2's "
            "tokenizer.json or vocab.json and merges.txt)"
        ) from error
    return _finish(tokenizer)


def build_tiny_tokenizer(vocab_size: int):
    """A deterministic Qwen-like byte-level BPE tokenizer trained on the built-in corpus, for the
    random-weight presets: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` first, the added tokens
    (``<REGION>`` among them) last, all inside the embedding table as in the release."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        special_tokens=list(BASE_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_training_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token="<|endoftext|>")
    tokenizer = _finish(tokenizer)
    if max(tokenizer.get_vocab().values()) >= vocab_size:
        raise RuntimeError(f"tiny tokenizer grew past {vocab_size} ids")
    return tokenizer


def region_token_id(tokenizer) -> int:
    return int(tokenizer.convert_tokens_to_ids(REGION_TOKEN))
