"""A LoRA step's byte formula (osprey.learning.memory) against what a real step on the served model
holds (LiveBytes), on the tiny and small presets of both region models (Osprey's Llama with its
attention projections adapted, PixelRefer-Lite's Qwen2 with all seven), with and without activation
checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osprey.inference.region_model import load_region_model
from osprey.learning.adapters import LORA_TARGETS
from osprey.learning.lora import LoraSettings, LoraTrainer, RegionExample, instruction_samples
from osprey.learning.memory import adapter_parameters, lora_step_bytes
from osprey.runtime.memory import LiveBytes


@pytest.fixture(scope="module", params=["tiny", "small", "pixelrefer-lite-tiny", "pixelrefer-lite-small"])
def served(request):
    return load_region_model(request.param, device="cpu")


@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_lora_steps_memory_is_bounded_by_its_formula(served, checkpointing):
    image = np.zeros((96, 96, 3), np.uint8)
    mask = np.zeros((96, 96), bool)
    mask[20:60, 20:60] = True
    caption = "a red square on the left of a long wooden table"
    example = RegionExample(image=image, mask=mask, category="square", part=None, attributes=(),
                            caption=caption, description=None)  # fmt: skip
    prompts = served.lora_sequences().prompts
    samples = instruction_samples([example], categories=("circle", "square"), prompts=prompts)
    sample = samples[-1]  # the caption: the longest
    settings = LoraSettings(rank=4, grad_accum=1, gradient_checkpointing=checkpointing)
    trainer = LoraTrainer(osprey=served, settings=settings)
    try:
        config = served.model.llm.config
        assert trainer.settings.target_modules == LORA_TARGETS[config.model_type]
        assert sum(p.numel() for p in trainer.trainable_parameters()) == adapter_parameters(config, settings)
        prepared = trainer.sequences.prepare(image, mask)
        tokens = trainer.sequences.sequence(prepared, sample.prompt, sample.answer)[0].shape[0]
        optimizer = torch.optim.AdamW(trainer.trainable_parameters(), lr=1e-3)
        with LiveBytes() as live, trainer._step(train=True):
            trainer._loss(sample, prepared).backward()
            optimizer.step()  # its moments are made here: part of the step's state
    finally:
        trainer.close()
    formula = lora_step_bytes(config, served.model.dtype, tokens=tokens, settings=settings)
    assert live.peak <= formula.peak <= 2.5 * live.peak, (live.peak, formula)
