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

from osprey.model.config import OspreyConfig
from osprey.model.loading import default_device, default_dtype, load_model
from osprey.model.modeling import OspreyModel
from osprey.model.preprocess import preprocess_image, stack_masks, to_rgb_array
from osprey.model.prompts import IMAGE_PLACEHOLDER_ID, IMAGE_TOKEN, conversation, tokenize_prompt
from osprey.runtime.steps import yield_before_each

from .answering import answer_baseline, answer_fast, label_items
from .baseline import BaselineRunner
from .fast import EncodedImage, FastRunner, ImageFeatures, encode_image, encode_prefix
from .fields import LabelRequest, RegionLabels
from .plan import Planner

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


class Osprey:
    """A loaded Osprey model with its tokenizer. Safe to share between threads; GPU work from
    several threads is serialised by the caller (the backend runs one model per process). One
    implementation of :class:`~osprey.inference.region_model.RegionModel`."""

    family = "osprey"

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
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_id = model_id
        self.cache = cache
        self.adapter_tag = (
            ""  # the active LoRA adapter (see osprey.learning.lora.AdapterSet); part of cache keys
        )
        self.fast = FastRunner(
            model=model, eos_token_id=tokenizer.eos_token_id, max_batch_tokens=max_batch_tokens
        )
        self.baseline = BaselineRunner(
            model=model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        prefix = tokenize_prompt(tokenizer, conversation(IMAGE_TOKEN))
        # a scheduler sharing the model may hand it over before any vision or decoder block
        yield_before_each(model.llm.get_decoder().layers)
        yield_before_each(b for stage in model.vision_tower.visual.trunk.stages for b in stage.blocks)
        self._prefix_ids = prefix[: prefix.index(IMAGE_PLACEHOLDER_ID) + 1]

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        random_weights: bool = False,
        cache=None,
        seed: int = 0,
    ) -> Osprey:
        """Load a preset or a released checkpoint.

        Args:
            name_or_path: a checkpoint directory (HF format, ``model_type: osprey``); ``osprey-7b``
                or ``osprey-chat-7b`` (from the Hugging Face cache, never downloaded here); a Hugging
                Face repo id already cached; or ``tiny``/``small`` (random weights, for tests).
            device: default CUDA when available, else CPU.
            dtype: default bfloat16 on CUDA, float32 on CPU.
            random_weights: build a preset's architecture at full size with random weights
                (benchmarks; answers are meaningless).
            cache: a :class:`osprey.runtime.feature_cache.FeatureCache` for encoded images, or None.
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        model, tokenizer, config = load_model(
            name_or_path, device=device, dtype=dtype, random_weights=random_weights, seed=seed
        )
        if random_weights and not config.untrained:
            config = OspreyConfig.from_dict({**config.to_dict(), "untrained": True})
        return cls(model=model, tokenizer=tokenizer, config=config, model_id=config.name, cache=cache)

    @property
    def untrained(self) -> bool:
        """True for random-weight models: every answer they give is meaningless."""
        return self.config.untrained

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- what the learning loop and the budgets ask (see RegionModel) ----
    def feature_levels(self) -> tuple[tuple[str, int], ...]:
        """The encoded feature maps the per-project head pools inside each mask: res2..res5."""
        from osprey.model.config import LEVELS

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

    def label_peak_bytes(self) -> int:
        """Bytes of labelling's largest forward: a full scoring chunk over the prefix (on any device)."""
        from .memory import encoding_bytes, label_activation_bytes

        return label_activation_bytes(
            self.model.llm.config, self.model.dtype, chunk_tokens=self.fast.max_batch_tokens,
            context_tokens=encoding_bytes(self).prefix_tokens,
        )  # fmt: skip

    # ---- images ----
    def encode_image(self, image: Image.Image | np.ndarray) -> EncodedImage:
        """Encode once: vision features, image tokens and the prompt prefix's KV cache."""
        rgb = to_rgb_array(image)
        if self.cache is None:
            return self._encode(rgb)
        from osprey.runtime.feature_cache import content_key

        key = content_key(
            rgb, "osprey", ENCODING_FORMAT, self.model_id, str(self.model.dtype), self.adapter_tag
        )
        return self.cache.get_or_compute(key, lambda: self._encode(rgb), restore=self._from_features)

    def _encode(self, rgb: np.ndarray) -> EncodedImage:
        pixels = preprocess_image(rgb, image_size=self.config.vision.image_size)
        return encode_image(self.model, pixels, rgb.shape[:2], list(self._prefix_ids))

    def _from_features(self, kept: ImageFeatures) -> EncodedImage:
        """An encoding from what the host or disk cache kept: only the prefix runs again."""
        device = self.device
        features = {name: value.to(device) for name, value in kept.features.items()}
        return encode_prefix(
            self.model, features, kept.image_tokens.to(device), tuple(kept.image_hw), list(self._prefix_ids)
        )

    def encode_images(self, images: Sequence[Image.Image | np.ndarray]) -> list[EncodedImage]:
        """:meth:`encode_image` for several images; those not cached go through the vision tower as one
        batch (the decoder runs each prefix on its own)."""
        from osprey.runtime.feature_cache import content_key

        rgbs = [to_rgb_array(image) for image in images]
        out: list[EncodedImage | None] = [None] * len(rgbs)
        keys = [
            content_key(
                rgb, "osprey", ENCODING_FORMAT, self.model_id, str(self.model.dtype), self.adapter_tag
            )
            for rgb in rgbs
        ]
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
                out[i] = encode_prefix(
                    self.model, features, tokens, rgbs[i].shape[:2], list(self._prefix_ids)
                )
                if self.cache is not None:
                    self.cache.put(keys[i], out[i])
        return out

    def label_many(
        self,
        items: Sequence[tuple[Image.Image | np.ndarray, Sequence[np.ndarray] | np.ndarray]],
        request: LabelRequest,
        *,
        encoded: Sequence[EncodedImage] | None = None,
    ) -> list[list[RegionLabels]]:
        """:meth:`label` for several ``(image, masks)`` pairs at once: every image's regions and
        questions share the same forward passes and the same decoding loop (:class:`ImageBatch`), and
        each answer is the one :meth:`label` gives for that image alone. Returns one list per item."""
        return label_items(self, items, request, encoded, self.region_tokens_of)

    def region_tokens_of(self, rgb: np.ndarray, masks: torch.Tensor, encoded: EncodedImage) -> tuple:
        """What ``masks`` ``(R, H, W)`` put into a prompt: (mask tokens, spatial tokens), each ``(R, D)``."""
        return self.model.region_tokens(encoded.features, masks)

    def planner(self, request: LabelRequest) -> Planner:
        """The questions of ``request`` in Osprey's prompts."""
        return Planner(tokenizer=self.tokenizer, request=request, untrained=self.untrained)

    # ---- labelling ----
    def label(
        self,
        image: Image.Image | np.ndarray,
        masks: Sequence[np.ndarray] | np.ndarray,
        request: LabelRequest,
        *,
        encoded: EncodedImage | None = None,
    ) -> list[RegionLabels]:
        """Answer ``request`` for every region; ``masks`` are ``(H, W)`` binary arrays at the image's
        resolution. Uses (and fills) the image cache; pass ``encoded`` to skip the lookup."""
        rgb = to_rgb_array(image)
        mask_t = stack_masks(masks, image_hw=rgb.shape[:2])
        encoded = encoded or self.encode_image(rgb)
        if encoded.image_hw != rgb.shape[:2]:
            raise ValueError(f"encoded image is {encoded.image_hw} (H, W) but the image is {rgb.shape[:2]}")
        with torch.inference_mode():
            region_tokens = self.model.region_tokens(encoded.features, mask_t)
        return answer_fast(self.planner(request), self.fast, encoded, region_tokens, [0] * len(mask_t))

    def label_baseline(
        self, image: Image.Image | np.ndarray, masks: Sequence[np.ndarray] | np.ndarray, request: LabelRequest
    ) -> list[RegionLabels]:
        """The upstream-style flow (see :mod:`osprey.inference.baseline`): same answers, much slower."""
        rgb = to_rgb_array(image)
        mask_t = stack_masks(masks, image_hw=rgb.shape[:2])
        return answer_baseline(self.planner(request), self.baseline, rgb, mask_t)
