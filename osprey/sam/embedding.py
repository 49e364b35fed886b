"""SAM image embeddings, computed once per distinct image and cached by content.

The cached value is an :class:`ImageEmbedding`: the encoder output plus the two sizes every
later prompt needs (``original_size`` to map prompts into SAM's frame and masks back out,
``input_size`` to crop SAM's padding). Nothing per-request is stored, so many requests can decode
against one embedding at the same time; this replaces ``SamPredictor``'s ``set_image`` state,
which makes a shared predictor unsafe across threads.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from osprey.runtime.feature_cache import FeatureCache, content_key
from osprey.runtime.steps import acquire, yield_after, yield_before_each

from .attention import chunk_global_attention, fuse_window_attention
from .build import ResizeLongestSide, Sam

__all__ = ["ImageEmbedding", "SamImageEmbedder", "check_image"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageEmbedding:
    """One image's SAM embedding.

    Attributes:
        features: 1xCxhxw float32 image embedding (1x256x64x64 for the released models), on the
            model's device.
        original_size: (H, W) of the image as given.
        input_size: (H, W) of the image after SAM's resize (longest side = encoder input size),
            before padding to the square input frame.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an HxWx3 uint8 RGB image and return it."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = (
            f"shape {image.shape} dtype {image.dtype}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(
            f"image must be an HxWx3 uint8 RGB numpy array, got {got}; "
            "convert with np.asarray(pil_image.convert('RGB'))"
        )
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image is empty, shape {image.shape}")
    return image


class SamImageEmbedder:
    """Runs SAM's image encoder, at most once per distinct image, through a :class:`FeatureCache`.

    Args:
        sam: the SAM model (see :mod:`osprey.sam.build`); shared, read-only.
        model_id: names the weights (e.g. ``"sam_vit_b_01ec64"``); part of the cache key, so it
            must change whenever the weights do (a disk cache outlives the process).
        max_images, max_bytes: bounds of the device tier (one embedding is 4 MiB for the released
            models); either may be None, not both.
        host_max_bytes: byte budget of the host tier, which keeps what the device tier evicts (0: off).
        disk_dir, max_disk_bytes: optional persistence of embeddings (see :class:`FeatureCache`).
        cache: an existing cache to share instead of making one (then the bounds above are unused).

    Encoder runs are serialized by a lock (concurrent encodes of different images would only
    compete for the same device and multiply peak memory); the same image requested by several
    threads is encoded once, by the cache's in-flight dedupe.
    """

    def __init__(
        self,
        *,
        sam: Sam,
        model_id: str,
        max_images: int | None = 16,
        max_bytes: int | None = None,
        host_max_bytes: int = 0,
        disk_dir: str | Path | None = None,
        max_disk_bytes: int = 2**30,
        cache: FeatureCache[ImageEmbedding] | None = None,
    ) -> None:
        if not model_id:
            raise ValueError("model_id must be a non-empty string naming the SAM weights")
        self.sam = sam
        self.model_id = model_id
        self.encoder_size = int(sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.encoder_size)
        self.cache: FeatureCache[ImageEmbedding] = cache or FeatureCache(
            name="sam-embeddings",
            max_items=max_images,
            max_bytes=max_bytes,
            host_max_bytes=host_max_bytes,
            disk_dir=disk_dir,
            max_disk_bytes=max_disk_bytes,
            map_location=sam.device,
            value_types=[ImageEmbedding],
        )
        self._encoder_lock = threading.Lock()
        # a scheduler may hand SAM over between encoder and decoder blocks, and between bands of a
        # global attention (see osprey.runtime.steps)
        yield_before_each([*sam.image_encoder.blocks, *sam.mask_decoder.transformer.layers])
        yield_after(sam.mask_decoder)  # before its masks are upscaled
        chunk_global_attention(sam.image_encoder)
        fuse_window_attention(sam.image_encoder)
        self._encoder_dtype = next(sam.image_encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self.sam.device

    def key(self, image: np.ndarray) -> str:
        """Cache key of ``image``: its content plus model id, input frame and encoder dtype."""
        return content_key(
            check_image(image), self.model_id, f"frame={self.encoder_size}", str(self._encoder_dtype)
        )

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Embedding of an HxWx3 uint8 RGB image, from the cache or by running the encoder once."""
        check_image(image)
        embedding = self.cache.get_or_compute(self.key(image), lambda: self.encode(image))
        if embedding.features.device != self.device:  # e.g. loaded from disk onto another device
            embedding = ImageEmbedding(
                features=embedding.features.to(self.device),
                original_size=embedding.original_size,
                input_size=embedding.input_size,
            )
        return embedding

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> ImageEmbedding:
        """Run the image encoder on an HxWx3 uint8 RGB image, bypassing the cache."""
        check_image(image)
        original_size = (int(image.shape[0]), int(image.shape[1]))
        resized = self.transform.apply_image(image)  # (h, w, 3) uint8, longest side = encoder_size
        input_size = (int(resized.shape[0]), int(resized.shape[1]))
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None].float()
        x = self.sam.preprocess(x)  # normalised, padded to (1, 3, encoder_size, encoder_size)
        with acquire(self._encoder_lock):
            features = self.sam.image_encoder(x.to(self._encoder_dtype))
        logger.debug("encoded a %dx%d image", *original_size)
        return ImageEmbedding(features=features.float(), original_size=original_size, input_size=input_size)
