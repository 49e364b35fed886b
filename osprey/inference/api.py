"""The public model API: load Osprey once, encode an image once, label many regions fast.

osprey = Osprey.from_pretrained("osprey-7b")           # or a checkpoint dir, or "tiny"
encoded = osprey.encode_image(image)                   # cached by image content
labels = osprey.label(image, masks, LabelRequest(categories=("cat", "dog"), caption=True))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from osprey.model import prompts
from osprey.model.config import LEVELS, OspreyConfig
from osprey.model.loading import OSPREY
from osprey.model.modeling import OspreyModel
from osprey.model.preprocess import preprocess_image, to_rgb_array
from osprey.model.prompts import IMAGE_PLACEHOLDER_ID, IMAGE_TOKEN, conversation, tokenize_prompt

from .baseline import BaselineRunner
from .fast import EncodedImage, FastRunner, encode_image, encode_prefix
from .model_base import RegionModelBase

logger = logging.getLogger(__name__)

# Part of every cache key of an encoded image: bump it when EncodedImage's layout changes, so values
# an older version persisted on disk are recomputed instead of misread (2: batch-row KV states).
ENCODING_FORMAT = "enc3"


def image_feature_cache(
    *,
    max_images: int | None = None,
    max_bytes: int | None = None,
    host_max_bytes: int = 0,
    device: str | torch.device = "cpu",
    disk_dir=None,
    max_disk_bytes: int = 8 * 2**30,
):
    """A :class:`~osprey.runtime.feature_cache.FeatureCache` for :class:`~osprey.inference.fast.EncodedImage`
    values. The device tier holds whole encodings (vision features, image tokens, prefix KV cache:
    ~0.58 GB per image for the 7B model in bf16), bounded by ``max_images`` and/or ``max_bytes``; the
    host tier (``host_max_bytes``) and the disk (``disk_dir``: across restarts) keep only the
    :class:`~osprey.inference.fast.ImageFeatures` (~20 MB), and a hit there reruns the prefix."""
    from osprey.runtime.feature_cache import FeatureCache

    from .fast import ImageFeatures

    return FeatureCache(
        name="osprey",
        max_items=max_images,
        max_bytes=max_bytes,
        host_max_bytes=host_max_bytes,
        disk_dir=disk_dir,
        max_disk_bytes=max_disk_bytes,
        map_location=device,
        value_types=[ImageFeatures],
        slim=ImageFeatures.of,
    )


class Osprey(RegionModelBase):
    """A loaded Osprey model with its tokenizer; one implementation of
    :class:`~osprey.inference.region_model.RegionModel` (the shared part is :class:`RegionModelBase`).

    ``from_pretrained`` knows a checkpoint directory (HF format, ``model_type: osprey``); ``osprey-7b`` or
    ``osprey-chat-7b`` (from the Hugging Face cache, never downloaded here); a Hugging Face repo id already
    cached; and ``tiny``/``small`` (random weights, for tests). An image is encoded as its four ConvNeXt
    feature maps, its 1024 image tokens and the conversation's prefix up to ``<image>`` run through the
    decoder; a region enters the prompt as its mask token and spatial token."""

    family = "osprey"
    encoding_format = ENCODING_FORMAT
    loader = OSPREY

    def __init__(
        self,
        *,
        model: OspreyModel,
        tokenizer,
        config: OspreyConfig,
        model_id: str,
        cache=None,
        max_batch_tokens: int = 2048,
    ) -> None:
        prefix = tokenize_prompt(tokenizer, conversation(IMAGE_TOKEN))
        super().__init__(
            model=model, tokenizer=tokenizer, config=config, model_id=model_id, cache=cache, prompts=prompts,
            fast=FastRunner(model=model, eos_token_id=tokenizer.eos_token_id, max_batch_tokens=max_batch_tokens),
            baseline=BaselineRunner(
                model=model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
            ),
            prefix_ids=prefix[: prefix.index(IMAGE_PLACEHOLDER_ID) + 1],
            vision_blocks=(b for stage in model.vision_tower.visual.trunk.stages for b in stage.blocks),
        )  # fmt: skip

    # ---- what the learning loop and the budgets ask (see RegionModel) ----
    def feature_levels(self) -> tuple[tuple[str, int], ...]:
        """The encoded feature maps the per-project head pools inside each mask: res2..res5."""
        return tuple((level, self.config.vision.level_channels(level)) for level in LEVELS)

    @property
    def feature_backbone(self) -> str:
        return self.config.vision.open_clip_model

    def lora_sequences(self, *, train: Sequence[str] = ()):
        """LoRA training's samples in Osprey's prompts (:class:`~osprey.model.training.OspreySequences`;
        ``train``: parts trained beside the adapter, private copies)."""
        from osprey.model.training import OspreySequences

        return OspreySequences(
            model=self.model, tokenizer=self.tokenizer, image_size=self.config.vision.image_size, train=train
        )

    def encoding_bytes(self, image_hw: tuple[int, int] = (480, 640)):
        """:func:`~osprey.inference.memory.encoding_bytes` (the tower runs, on ``meta`` for free); its
        prefix is the conversation up to ``<image>`` with the image's tokens in its place."""
        from .memory import encoding_bytes

        return encoding_bytes(self, image_hw)

    # ---- images ----
    def _encode(self, rgb: np.ndarray) -> EncodedImage:
        pixels = preprocess_image(rgb, image_size=self.config.vision.image_size)
        return encode_image(self.model, pixels, rgb.shape[:2], list(self._prefix_ids))

    def _with_prefix(self, features: dict, image_tokens: torch.Tensor, image_hw) -> EncodedImage:
        return encode_prefix(self.model, features, image_tokens, tuple(image_hw), list(self._prefix_ids))

    def encode_images(self, images: Sequence[Image.Image | np.ndarray]) -> list[EncodedImage]:
        """:meth:`encode_image` for several images; those not cached go through the vision tower as one
        batch (the decoder runs each prefix on its own)."""
        rgbs = [to_rgb_array(image) for image in images]
        out: list[EncodedImage | None] = [None] * len(rgbs)
        keys = [self.cache_key(rgb) for rgb in rgbs]
        if self.cache is not None:
            for i, key in enumerate(keys):
                out[i] = self.cache.peek(key, restore=self._from_features)
        todo = [i for i, value in enumerate(out) if value is None]
        if todo:
            size = self.config.vision.image_size
            pixels = torch.cat([preprocess_image(rgbs[i], image_size=size) for i in todo])
            with torch.inference_mode():
                encoded = self.model.encode_pixels_batch(pixels)
            for i, (features, tokens) in zip(todo, encoded, strict=True):
                out[i] = self._with_prefix(features, tokens, rgbs[i].shape[:2])
                if self.cache is not None:
                    self.cache.put(keys[i], out[i])
        return out

    # ---- regions ----
    def region_tokens_of(self, rgb: np.ndarray, masks: torch.Tensor, encoded: EncodedImage) -> tuple:
        """What ``masks`` ``(R, H, W)`` put into a prompt: (mask tokens, spatial tokens), each ``(R, D)``."""
        return self.model.region_tokens(encoded.features, masks)
