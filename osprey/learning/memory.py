"""What a LoRA training step on the served model holds, in bytes, from shapes.

A step holds, beside the served weights: the adapter's own weights with their gradients and AdamW's
two moments (float32, as peft keeps adapters beside bf16 weights: 16 bytes a parameter), and the
activations autograd saves for the backward. With activation checkpointing (the default,
:class:`~osprey.learning.adapters.LoraSettings`) those are every layer's input plus one layer's full
set while it is recomputed; without, every layer's full set. The logits of every token (the loss is
taken in float32) come on top. A test checks the formula against what a real step allocates on the
tiny and small presets (:class:`~osprey.runtime.memory.LiveBytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import LoraSettings

__all__ = ["LoraStepBytes", "adapter_parameters", "lora_step_bytes"]


def adapter_parameters(llm_config, settings: LoraSettings) -> int:
    """Parameters of a LoRA adapter with ``settings`` on a Llama-style decoder: ``rank x (in + out)``
    for every targeted projection of every layer."""
    hidden, inter = llm_config.hidden_size, llm_config.intermediate_size
    heads = llm_config.num_attention_heads
    head_dim = getattr(llm_config, "head_dim", None) or hidden // heads
    kv = (getattr(llm_config, "num_key_value_heads", None) or heads) * head_dim
    shapes = {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }  # fmt: skip
    unknown = [t for t in settings.target_modules if t not in shapes]
    if unknown:
        raise ValueError(f"LoRA target modules {unknown} are not Llama projections {sorted(shapes)}")
    per_layer = sum(settings.rank * sum(shapes[t]) for t in settings.target_modules)
    return llm_config.num_hidden_layers * per_layer


@dataclass(frozen=True)
class LoraStepBytes:
    """A LoRA job's memory: ``state`` for the whole job, ``activations`` during one step."""

    state: int  # adapter weights, gradients and AdamW moments (float32)
    activations: int  # saved for the backward, and the logits

    @property
    def peak(self) -> int:
        return self.state + self.activations


def lora_step_bytes(
    llm_config, dtype: torch.dtype, *, tokens: int, settings: LoraSettings | None = None
) -> LoraStepBytes:
    """One training step over a sample of ``tokens`` tokens (prefix with the image tokens, the question
    and the answer) with ``settings`` (see the module docstring). Attention keeps no ``tokens x tokens``
    probabilities (SDPA's fused kernels, on a GPU and on a CPU, keep one float per head and token)."""
    settings = settings or LoraSettings()
    element = torch.empty((), dtype=dtype).element_size()
    hidden, inter, layers = llm_config.hidden_size, llm_config.intermediate_size, llm_config.num_hidden_layers
    # one layer's saved tensors: the norms' inputs, the rotated queries/keys, the values and attention's
    # output; the MLP's gate, up and their product; each targeted projection's dropped-out input and mask
    targets = len(settings.target_modules)
    layer = tokens * ((4 * hidden + 3 * inter) * element + targets * hidden * (element + 1))
    saved = layers * tokens * hidden * element + layer if settings.gradient_checkpointing else layers * layer
    logits = tokens * llm_config.vocab_size * (element + 3 * 4)  # LM head, float32 copy, log-softmax, grad
    embeds = 2 * tokens * hidden * element
    return LoraStepBytes(
        state=16 * adapter_parameters(llm_config, settings), activations=saved + logits + embeds
    )
