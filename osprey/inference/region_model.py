"""The one region-model interface, and choosing the model by name.

Everything above the model library (the service, the bulk engine, the learning loop, ``osprey-label
eval``) talks to a :class:`RegionModel`: :class:`~osprey.inference.api.Osprey` and
:class:`~osprey.inference.pixelrefer.PixelReferLite` implement it. :func:`load_region_model` picks the
implementation from a preset name or a checkpoint's ``config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .fast import EncodedImage, FastRunner
from .fields import LabelRequest, RegionLabels
from .plan import Planner

OSPREY_PRESETS = ("osprey-7b", "osprey-chat-7b")
PIXELREFER_PRESETS = ("pixelrefer-lite-2b", "pixelrefer-lite-7b")


@runtime_checkable
class RegionModel(Protocol):
    """A loaded region model: encode an image once, then label many of its regions.

    ``model_id`` names it (it is part of ``model_version``); ``cache`` is its encoded-image cache (a
    :class:`~osprey.runtime.feature_cache.FeatureCache`) or None; ``adapter_tag`` names the active LoRA
    adapter (part of cache keys); ``model.llm`` is the language model LoRA adapts; ``fast`` runs the
    shared fast path (its ``max_batch_tokens`` bounds one forward) on the questions ``planner(request)``
    words in the model's own prompts and the tensors ``region_tokens_of`` writes regions with. Step
    boundaries for the scheduler sit before every vision and decoder block
    (:func:`osprey.runtime.steps.yield_before_each`).
    """

    family: str
    model_id: str
    cache: object | None
    adapter_tag: str
    tokenizer: object
    model: torch.nn.Module
    fast: FastRunner

    @property
    def untrained(self) -> bool: ...

    @property
    def device(self) -> torch.device: ...

    def encode_image(self, image) -> EncodedImage: ...

    def encode_images(self, images: Sequence) -> list[EncodedImage]: ...

    def label(self, image, masks, request: LabelRequest, *, encoded=None) -> list[RegionLabels]: ...

    def label_many(
        self, items: Sequence, request: LabelRequest, *, encoded=None
    ) -> list[list[RegionLabels]]: ...

    def label_baseline(self, image, masks, request: LabelRequest) -> list[RegionLabels]: ...

    def planner(self, request: LabelRequest) -> Planner: ...

    def region_tokens_of(self, rgb: np.ndarray, masks: torch.Tensor, encoded: EncodedImage) -> tuple: ...

    def feature_levels(self) -> tuple[tuple[str, int], ...]: ...

    @property
    def feature_backbone(self) -> str: ...

    def encoding_bytes(self, image_hw: tuple[int, int] = (480, 640)): ...

    def lora_sequences(self, *, train: Sequence[str] = ()) -> TrainingSequences: ...


class TrainingSequences(Protocol):
    """What LoRA training asks of a region model (:class:`~osprey.learning.lora.LoraTrainer`): its
    ``prompts`` (the prompt set instruction samples are written in, as the planner's), ``prepare(image,
    mask)`` (the frozen work of one sample, without gradients, before the training step),
    ``sequence(prepared, prompt, answer)`` -> ``(T, D)`` input embeddings and ``(T,)`` labels (the answer's
    ids and the model's end-of-answer token, -100 elsewhere), ``trained`` (the private copies of parts
    trained beside the adapter, by name) and ``context_tokens`` (tokens every sample holds before its
    question text, for the memory budget)."""

    prompts: object
    trained: dict[str, torch.nn.Module]

    @property
    def context_tokens(self) -> int: ...

    def prepare(self, image: np.ndarray, mask: np.ndarray) -> object: ...

    def sequence(self, prepared, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]: ...


def model_family(name_or_path: str) -> str:
    """``"osprey"`` or ``"pixelrefer-lite"`` for a preset name, a released model's name or a checkpoint
    directory (by its ``config.json``'s ``model_type``)."""
    from osprey.pixelrefer.configuration import MODEL_TYPE
    from osprey.pixelrefer.configuration import preset_names as pixelrefer_presets

    if name_or_path in pixelrefer_presets():
        return "pixelrefer-lite"
    config = Path(name_or_path).expanduser() / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {config}: {error}") from error
        return "pixelrefer-lite" if model_type == MODEL_TYPE else "osprey"
    if "pixelrefer" in name_or_path.lower():
        return "pixelrefer-lite"
    return "osprey"


def load_region_model(name_or_path: str, **kwargs) -> RegionModel:
    """:meth:`from_pretrained` of the model ``name_or_path`` names (see :func:`model_family`)."""
    if model_family(name_or_path) == "pixelrefer-lite":
        from .pixelrefer import PixelReferLite

        return PixelReferLite.from_pretrained(name_or_path, **kwargs)
    from .api import Osprey

    return Osprey.from_pretrained(name_or_path, **kwargs)


def pooled_features(model: RegionModel, encoded: EncodedImage, masks: torch.Tensor) -> np.ndarray:
    """``(R, sum C)``: each of ``model``'s feature maps averaged inside every mask of ``masks`` ``(R, H, W)``
    (resized to the map, bilinear, ``> 0``), each L2-normalised on its own."""
    from osprey.model.extractor import mask_pool

    parts = []
    with torch.inference_mode():
        for level, _ in model.feature_levels():
            features = encoded.features[level]
            pooled = mask_pool(features.float(), masks.to(device=features.device))  # (R, C)
            parts.append((pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu())
    return torch.cat(parts, dim=1).numpy()
