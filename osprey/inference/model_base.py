"""What every region model does the same way, behind :class:`~osprey.inference.region_model.RegionModel`.

:class:`RegionModelBase` holds a loaded network with its tokenizer and config, and does, for any
architecture: loading (:meth:`~RegionModelBase.from_pretrained` through the model's
:class:`~osprey.loading.loader.ModelLoader`), the encoded-image cache (keys, restoring what the host or
disk tier kept), labelling one image, many images and the one-region-per-call baseline through the
shared planner and runners, and step boundaries for the scheduler. A subclass
says only what its architecture does differently: how an image is encoded (:meth:`_encode`), how the
prompt prefix runs on it (:meth:`_with_prefix`), what a region puts into a prompt
(:meth:`region_tokens_of`), its prompts, and its feature maps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from osprey.loading.loader import ModelLoader, choose_device
from osprey.model.preprocess import stack_masks, to_rgb_array
from osprey.runtime.steps import yield_before_each

from .answering import answer_baseline, answer_fast, label_items
from .baseline import BaselineRunner
from .fast import EncodedImage, FastRunner, ImageFeatures
from .fields import LabelRequest, RegionLabels
from .plan import Planner


class RegionModelBase(ABC):
    """A loaded region model with its tokenizer. Safe to share between threads; GPU work from several
    threads is serialised by the caller (the backend runs one model per process).

    Subclasses set ``family`` (the model's kind, part of ``model_version`` and of cache keys),
    ``encoding_format`` (part of every cache key: bump it when the layout of their
    :class:`~osprey.inference.fast.EncodedImage` changes, so values an older version persisted on disk are
    recomputed instead of misread) and ``loader``.
    """

    family: str
    encoding_format: str
    loader: ModelLoader

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        tokenizer,
        config,
        model_id: str,
        cache,
        prompts,
        fast: FastRunner,
        baseline: BaselineRunner,
        prefix_ids: Sequence[int],
        vision_blocks: Iterable[torch.nn.Module],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_id = model_id
        self.cache = cache
        self.adapter_tag = (
            ""  # the active LoRA adapter (see osprey.learning.lora.AdapterSet); part of cache keys
        )
        self.prompts = prompts  # the model's prompt set, for the planner
        self.fast = fast
        self.baseline = baseline
        self._prefix_ids = prefix_ids  # the prompt prefix every encoded image runs
        # a scheduler sharing the model may hand it over before any vision or decoder block
        yield_before_each(model.llm.get_decoder().layers)
        yield_before_each(vision_blocks)

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
    ):
        """Load a preset or a released checkpoint (see the subclass for the names it knows).

        Args:
            name_or_path: a checkpoint directory; a released model's name (from the Hugging Face cache,
                never downloaded here); a Hugging Face repo id already cached; or a random-weight preset
                (for tests).
            device: default CUDA when available, else CPU.
            dtype: default bfloat16 on CUDA, float32 on CPU.
            random_weights: build a preset's architecture at full size with random weights
                (benchmarks; answers are meaningless).
            cache: a :class:`osprey.runtime.feature_cache.FeatureCache` for encoded images, or None.
            seed: the random weights' seed.
        """
        device, dtype = choose_device(device, dtype)
        model, tokenizer, config = cls.loader.load(
            name_or_path, device=device, dtype=dtype, random_weights=random_weights, seed=seed
        )
        return cls(model=model, tokenizer=tokenizer, config=config, model_id=config.name, cache=cache)

    @property
    def untrained(self) -> bool:
        """True for random-weight models: every answer they give is meaningless."""
        return self.config.untrained

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- images ----
    def cache_key(self, rgb: np.ndarray) -> str:
        """The encoded-image cache's key of ``rgb`` for this model, its dtype and its active adapter."""
        from osprey.runtime.feature_cache import content_key

        return content_key(
            rgb, self.family, self.encoding_format, self.model_id, str(self.model.dtype), self.adapter_tag
        )

    def encode_image(self, image: Image.Image | np.ndarray) -> EncodedImage:
        """Encode once (cached by image content when the model has a cache)."""
        rgb = to_rgb_array(image)
        if self.cache is None:
            return self._encode(rgb)
        return self.cache.get_or_compute(
            self.cache_key(rgb), lambda: self._encode(rgb), restore=self._from_features
        )

    def encode_images(self, images: Sequence[Image.Image | np.ndarray]) -> list[EncodedImage]:
        """:meth:`encode_image` for several images."""
        return [self.encode_image(image) for image in images]

    @abstractmethod
    def _encode(self, rgb: np.ndarray) -> EncodedImage:
        """``rgb`` ``(H, W, 3)`` uint8 encoded: its features and the prompt prefix run on them."""

    @abstractmethod
    def _with_prefix(self, features: dict, image_tokens: torch.Tensor, image_hw) -> EncodedImage:
        """An encoding from an image's features: the prompt prefix run on them."""

    def _from_features(self, kept: ImageFeatures) -> EncodedImage:
        """An encoding from what the host or disk cache kept: only the prefix runs again."""
        features = {name: value.to(self.device) for name, value in kept.features.items()}
        return self._with_prefix(features, kept.image_tokens.to(self.device), tuple(kept.image_hw))

    # ---- regions ----
    @abstractmethod
    def region_tokens_of(self, rgb: np.ndarray, masks: torch.Tensor, encoded: EncodedImage) -> tuple:
        """What ``masks`` ``(R, H, W)`` put into a prompt: a tuple of ``(R, ...)`` tensors."""

    def planner(self, request: LabelRequest) -> Planner:
        """The questions of ``request`` in this model's prompts."""
        return Planner(
            tokenizer=self.tokenizer, request=request, untrained=self.untrained, prompts=self.prompts
        )

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
            region_tokens = self.region_tokens_of(rgb, mask_t, encoded)
        return answer_fast(self.planner(request), self.fast, encoded, region_tokens, [0] * len(mask_t))

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

    def label_baseline(
        self, image: Image.Image | np.ndarray, masks: Sequence[np.ndarray] | np.ndarray, request: LabelRequest
    ) -> list[RegionLabels]:
        """The authors' one-region-per-call flow (see :mod:`osprey.inference.baseline`): same answers,
        much slower."""
        rgb = to_rgb_array(image)
        mask_t = stack_masks(masks, image_hw=rgb.shape[:2])
        return answer_baseline(self.planner(request), self.baseline, rgb, mask_t)

    # ---- what the learning loop and the budgets ask ----
    @abstractmethod
    def feature_levels(self) -> tuple[tuple[str, int], ...]:
        """The encoded feature maps the per-project head pools inside each mask, with their widths."""

    @property
    @abstractmethod
    def feature_backbone(self) -> str:
        """Names the network the feature maps come from (a head trained on one fits only that one)."""

    @abstractmethod
    def encoding_bytes(self, image_hw: tuple[int, int] = (480, 640)):
        """One cached encoding of an ``image_hw`` image by part, and the vision tower's peak
        (:class:`~osprey.inference.memory.EncodingBytes`), exactly from shapes on any device (``meta``
        included): what the caches and the memory budget count."""
