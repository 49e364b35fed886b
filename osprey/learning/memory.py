"""What a LoRA training step on the served model holds, in bytes, from shapes.

A step holds, beside the served weights: the adapter's own weights with their gradients and AdamW's
two moments (float32, as peft keeps adapters beside bf16 weights: 16 bytes a parameter), and the
activations autograd saves for the backward, and the logits of every token (the loss is taken in
float32). With activation checkpointing (the default, :class:`~osprey.learning.adapters.LoraSettings`)
those are every layer's input, plus the larger of the loss's tensors (freed once the backward leaves the
LM head) and one layer's full set while it is recomputed; without, every layer's full set and the
loss's tensors. The decoder is Llama-style (Osprey's Llama, PixelRefer-Lite's Qwen2), the
adapted layers those of the architecture (:data:`~osprey.learning.adapters.LORA_TARGETS`). A test checks
the formula against what a real step allocates on the tiny and small presets of both region models
(:class:`~osprey.runtime.memory.LiveBytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import LoraSettings

__all__ = ["LoraStepBytes", "adapter_parameters", "lora_step_bytes", "projection_shapes"]


def projection_shapes(llm_config) -> dict[str, tuple[int, int]]:
    """``(in, out)`` features of each projection of one layer of a Llama-style decoder (Llama, Qwen2)."""
    hidden, inter = llm_config.hidden_size, llm_config.intermediate_size
    heads = llm_config.num_attention_heads
    head_dim = getattr(llm_config, "head_dim", None) or hidden // heads
    kv = (getattr(llm_config, "num_key_value_heads", None) or heads) * head_dim
    return {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }  # fmt: skip


def targeted_shapes(llm_config, settings: LoraSettings) -> list[tuple[int, int]]:
    """The ``(in, out)`` of every projection of one layer that ``settings`` adapt (the architecture's own
    list unless they name theirs: :meth:`~osprey.learning.adapters.LoraSettings.for_llm`)."""
    shapes = projection_shapes(llm_config)
    targets = settings.for_llm(llm_config).target_modules
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"LoRA target modules {unknown} are not decoder projections {sorted(shapes)}")
    return [shapes[t] for t in targets]


def adapter_parameters(llm_config, settings: LoraSettings) -> int:
    """Parameters of a LoRA adapter with ``settings`` on a Llama-style decoder (Llama, Qwen2): ``rank x
    (in + out)`` for every targeted projection of every layer."""
    per_layer = sum(settings.rank * (n_in + n_out) for n_in, n_out in targeted_shapes(llm_config, settings))
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
    """One training step over a sample of ``tokens`` tokens (its whole sequence: the prompt with its image
    and region tokens, and the answer) with ``settings`` (see the module docstring). Attention keeps no ``tokens x tokens``
    probabilities (SDPA's fused kernels, on a GPU and on a CPU, keep one float per head and token)."""
    settings = settings or LoraSettings()
    element = torch.empty((), dtype=dtype).element_size()
    hidden, inter, layers = llm_config.hidden_size, llm_config.intermediate_size, llm_config.num_hidden_layers
    # one layer's saved tensors: the norms' inputs, the rotated queries/keys, the values and attention's
    # output; the MLP's gate, up and their product; each targeted projection's dropped-out input and mask
    adapted = sum(n_in for n_in, _ in targeted_shapes(llm_config, settings))
    layer = tokens * ((4 * hidden + 3 * inter) * element + adapted * (element + 1))
    upcast = 4 if element != 4 else 0  # the loss's float32 copy of the logits (none when they are float32)
    logits = tokens * llm_config.vocab_size * (element + upcast + 2 * 4)  # LM head, copy, log-softmax, grad
    embeds = 2 * tokens * hidden * element
    if settings.gradient_checkpointing:
        # the layers' inputs all along; the loss's tensors are freed before the last layer is recomputed
        held = layers * tokens * hidden * element + max(layer, logits)
    else:
        held = layers * layer + logits
    return LoraStepBytes(state=16 * adapter_parameters(llm_config, settings), activations=held + embeds)
