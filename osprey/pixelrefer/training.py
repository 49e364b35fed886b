"""PixelRefer-Lite's LoRA training sequences: (image, mask, prompt, answer) -> input embeddings and labels.

What :class:`~osprey.learning.lora.LoraTrainer` asks of the region model it trains, for this model
(Osprey's: :mod:`osprey.model.training`). A sample is written in the prompts the released weights were
trained on (:class:`~osprey.pixelrefer.prompts.PixelReferPrompts`: the Qwen chat template, the region as
``[`` + ``<REGION>`` x 32 + ``]``). As in the authors' supervised fine-tuning, the labels are the
assistant reply's tokens and the ``<|im_end|>`` that closes it; the chat header, the question and
``<|im_start|>assistant\\n`` are not supervised (nor the newline after ``<|im_end|>``, which predicts
nothing of the answer and is left out).

A region's 32 tokens are the serving ones: the whole image at 336x336 and the region's own crop through
the tower, the object tokenizer's k-means drawn from the region's seeded generator
(:func:`~osprey.pixelrefer.modeling.region_seed`) and the object-centric infusion, all frozen. So
:meth:`PixelReferSequences.prepare` computes them once per sample without gradients, and
:meth:`PixelReferSequences.sequence` only embeds the prompt and the answer around them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from osprey.model.preprocess import to_rgb_array

from .configuration import PixelReferConfig
from .modeling import PixelReferModel, region_seed
from .processing import region_crop, whole_image
from .prompts import CHAT_PREFIX, PixelReferPrompts

IGNORE = -100  # the label of a token the loss skips (transformers' convention)


class PixelReferSequences:
    """Training sequences of a served :class:`~osprey.pixelrefer.modeling.PixelReferModel`; ``seed`` is the
    serving wrapper's k-means seed. Only the language model's adapter trains: the object tokenizer and
    the infusion stay as served (``train`` must be empty)."""

    def __init__(
        self, *, model: PixelReferModel, tokenizer, config: PixelReferConfig, seed: int = 0,
        train: Sequence[str] = (),
    ) -> None:  # fmt: skip
        if train:
            raise ValueError(
                f"PixelRefer-Lite trains its language model's LoRA adapter only, not {sorted(train)} "
                "(train_mask_extractor and train_projector are Osprey's parts)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.seed = seed
        self.prompts = PixelReferPrompts(config.mask_num)
        self.trained: dict[str, torch.nn.Module] = {}  # parts trained beside the adapter: none

    @property
    def context_tokens(self) -> int:
        """Tokens every sample holds before its question text: the chat header and one region."""
        return len(self.prompts.tokenize_prompt(self.tokenizer, CHAT_PREFIX)) + self.config.mask_num + 2

    @torch.no_grad()
    def prepare(self, image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """The ``(mask_num, D)`` region tokens of ``mask`` ``(H, W)`` in ``image`` ``(H, W, 3)``, exactly as
        serving computes them; no gradients."""
        rgb, inside = to_rgb_array(image), np.asarray(mask) > 0
        whole = self.model.encode_whole(whole_image(rgb, self.config))
        crop = region_crop(rgb, inside, self.config)
        return self.model.region_tokens(crop, whole, region_seed(inside, self.seed))

    def sequence(self, prepared: torch.Tensor, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, D)`` input embeddings of ``prompt`` (ending ``<|im_start|>assistant\\n``, one region)
        followed by ``answer`` and ``<|im_end|>``, and ``(T,)`` labels: the answer's ids and
        ``<|im_end|>``, :data:`IGNORE` elsewhere."""
        model, prompts = self.model, self.prompts
        prompt_ids = prompts.tokenize_prompt(self.tokenizer, prompt)
        answer_ids = prompts.answer_ids(self.tokenizer, prompt_ids, prompt, answer, finished=True)
        ids = torch.tensor(prompt_ids + answer_ids, device=model.device)
        embeds = model.embed(ids, region_tokens=prepared)
        labels = [IGNORE] * len(prompt_ids) + answer_ids
        return embeds, torch.tensor(labels, device=model.device)
