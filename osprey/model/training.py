"""Osprey's LoRA training sequences: (image, mask, prompt, answer) -> input embeddings and labels.

What :class:`~osprey.learning.lora.LoraTrainer` asks of the region model it trains (the other model's
are in :mod:`osprey.pixelrefer.training`). A sample is written in Osprey's own conversation
(:mod:`osprey.model.prompts`): ``<image>`` becomes the projected image tokens, ``<mask>`` and ``<pos>``
the region's mask and spatial tokens, and the labels supervise the answer's tokens and ``</s>`` only.

Two steps, so the frozen work stays outside the training step: :meth:`OspreySequences.prepare` runs the
vision tower without gradients (it may hand the model over at its block boundaries);
:meth:`OspreySequences.sequence` runs the parts that may be trained (the mask extractor, the projector:
private copies when asked, so the served ones never change) and embeds the prompt and the answer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from . import prompts as P
from .modeling import OspreyModel
from .preprocess import preprocess_image

IGNORE = -100  # the label of a token the loss skips (transformers' convention)
TRAINABLE = ("mask_extractor", "mm_projector")


class OspreySequences:
    """Training sequences of a served :class:`~osprey.model.modeling.OspreyModel`; ``train`` names the
    parts trained beside the language model's adapter (of :data:`TRAINABLE`): each gets a private copy,
    in :attr:`trained`."""

    prompts = P  # the prompt set instruction samples are written in

    def __init__(self, *, model: OspreyModel, tokenizer, image_size: int, train: Sequence[str] = ()) -> None:
        unknown = sorted(set(train) - set(TRAINABLE))
        if unknown:
            raise ValueError(f"Osprey cannot train {unknown}: its trainable parts are {list(TRAINABLE)}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.trained: dict[str, nn.Module] = {
            name: copy.deepcopy(getattr(model, name)).requires_grad_(True) for name in train
        }

    def part(self, name: str) -> nn.Module:
        """The mask extractor or projector a sequence runs: the private copy when trained."""
        return self.trained[name] if name in self.trained else getattr(self.model, name)

    @property
    def context_tokens(self) -> int:
        """Tokens every sample holds before its question: the system turn and the image tokens."""
        prefix = P.tokenize_prompt(self.tokenizer, P.conversation(P.IMAGE_TOKEN))
        prefix = prefix[: prefix.index(P.IMAGE_PLACEHOLDER_ID) + 1]
        return len(P.expand_image_placeholder(prefix, self.model.config.vision.num_image_tokens))

    @torch.no_grad()
    def prepare(
        self, image: np.ndarray, mask: np.ndarray
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, np.ndarray]:
        """The frozen vision tower's features and projected image tokens of ``image`` ``(H, W, 3)`` uint8,
        and ``mask`` ``(H, W)``; no gradients."""
        pixels = preprocess_image(np.asarray(image), image_size=self.image_size)
        features, image_tokens = self.model.encode_pixels(pixels)
        return features, image_tokens, np.asarray(mask) > 0

    def sequence(self, prepared, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, D)`` input embeddings of ``prompt`` (ending ``ASSISTANT:``) followed by ``answer`` and
        ``</s>``, and ``(T,)`` labels: the answer's ids and ``</s>``, :data:`IGNORE` elsewhere."""
        features, image_tokens, mask = prepared
        model = self.model
        if "mm_projector" in self.trained:
            level = model.config.vision.image_token_level
            image_tokens = self.trained["mm_projector"](features[level].flatten(1).transpose(0, 1))
        masks = torch.from_numpy(mask)[None].to(model.device)
        mask_tokens, spatial_tokens = self.part("mask_extractor")(features, masks)
        prompt_ids = P.tokenize_prompt(self.tokenizer, prompt)
        answer_ids = P.answer_ids(self.tokenizer, prompt_ids, prompt, answer, finished=True)
        ids = P.expand_image_placeholder(prompt_ids, image_tokens.shape[0]) + answer_ids
        embeds = model.embed(
            torch.tensor(ids, device=model.device), image_tokens=image_tokens, mask_tokens=mask_tokens,
            spatial_tokens=spatial_tokens,
            counts={"image": image_tokens.shape[0], "<mask>": ids.count(model.mask_token_id),
                    "<pos>": ids.count(model.pos_token_id)},
        )  # fmt: skip
        labels = [IGNORE] * (len(ids) - len(answer_ids)) + answer_ids
        return embeds, torch.tensor(labels, device=model.device)
