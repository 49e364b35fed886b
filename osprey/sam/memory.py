"""What SAM holds, from shapes: one cached image embedding, and segment everything at its peak.

Segment everything (:mod:`osprey.sam.everything`) has two moments of peak memory, never at once:

- the image encoder (its global-attention blocks, banded by :mod:`osprey.sam.attention`), in the
  encoder's dtype;
- one decoder batch of ``points_per_batch`` points, plus the upsampling of at most ``points_per_batch``
  masks to the image in float32 (logits, then the thresholded masks and the stability test's
  temporaries), on top of the low-resolution logits of every mask kept so far.

The batch is linear in ``points_per_batch``: ``fixed + per_point * points_per_batch`` bytes, both
coefficients measured once per model type and image size on ``meta`` tensors under
:class:`~osprey.runtime.memory.LiveBytes` (about a second for ViT-H, no memory).
:func:`points_per_batch_for` inverts that formula for a byte budget (the backend's budgets call it);
:func:`everything_peak_bytes` gives both peaks for one setting. :func:`sam_embedding_bytes` is what one
image costs in :class:`~osprey.sam.embedding.SamImageEmbedder`'s cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from osprey.runtime.memory import LiveBytes

from .attention import chunk_global_attention, fuse_window_attention
from .build import (
    SAM_ARCHITECTURES,
    SamArchitecture,
    _assemble,
    batched_mask_to_box,
    calculate_stability_score,
)

__all__ = [
    "EverythingPeak",
    "everything_batch_bytes",
    "everything_kept_bytes",
    "everything_peak_bytes",
    "points_per_batch_for",
    "sam_embedding_bytes",
]

MASKS_PER_POINT = 3  # SAM's multimask output
PHOTO_HW = (1024, 1365)  # a 1.4-megapixel photo, the size the budgets plan for


def sam_embedding_bytes(arch: SamArchitecture) -> int:
    """One cached SAM embedding (float32 ``(prompt_embed_dim, grid, grid)``) of ``arch``."""
    grid = arch.image_size // arch.patch_size
    return arch.prompt_embed_dim * grid * grid * 4


@dataclass(frozen=True)
class EverythingPeak:
    """Bytes held at SAM's two peaks of one segment-everything task (on top of weights and caches):
    the encoder, and one decoder batch (``decoder_batch``) beside the low-resolution logits of the masks
    kept until NMS (``kept``, at most every mask of the grid)."""

    encoder: int
    decoder_batch: int
    kept: int = 0

    @property
    def peak(self) -> int:
        return max(self.encoder, self.decoder_batch + self.kept)


def everything_kept_bytes(model_type: str, *, points_per_side: int = 32, crop_n_layers: int = 0) -> int:
    """Most bytes of low-resolution logits segment everything keeps until NMS: every mask of every
    point of the grid passing the filters (float32, SAM's low-resolution frame each). Crop layer ``i``
    adds ``4 ** i`` crops of the same grid."""
    low_res = _low_res_side(SAM_ARCHITECTURES[model_type]) ** 2 * 4
    crops = sum(4**layer for layer in range(crop_n_layers + 1))
    return crops * points_per_side**2 * MASKS_PER_POINT * low_res


def everything_batch_bytes(
    model_type: str, *, points_per_batch: int = 64, image_hw: tuple[int, int] = PHOTO_HW
) -> int:
    """Bytes of one decoder batch of ``points_per_batch`` points with its upsampling, on an ``image_hw``
    (H, W) image: ``fixed + per_point * points_per_batch`` (see the module docstring)."""
    fixed, per_point = _batch_coefficients(model_type, tuple(image_hw))
    return fixed + per_point * int(points_per_batch)


def points_per_batch_for(
    model_type: str,
    budget_bytes: int,
    *,
    points_per_side: int = 32,
    image_hw: tuple[int, int] = PHOTO_HW,
    most: int = 256,
) -> int:
    """The largest ``points_per_batch`` (1 to ``most``, and no more than the grid's points) whose
    decoder batch fits ``budget_bytes`` beside the kept masks' logits: the batch formula solved for the
    number of points. 1 when even one point does not fit (segment everything then runs slowly rather
    than not at all)."""
    fixed, per_point = _batch_coefficients(model_type, tuple(image_hw))
    room = int(budget_bytes) - fixed - everything_kept_bytes(model_type, points_per_side=points_per_side)
    return max(1, min(int(most), points_per_side**2, room // per_point))


def everything_peak_bytes(
    model_type: str,
    *,
    points_per_batch: int = 64,
    image_hw: tuple[int, int] = PHOTO_HW,
    points_per_side: int = 32,
    dtype: torch.dtype = torch.float32,
) -> EverythingPeak:
    """The two peaks of segment everything with SAM ``model_type`` on an ``image_hw`` (H, W) image, its
    encoder in ``dtype``."""
    return EverythingPeak(
        encoder=_encoder_bytes(model_type, dtype),
        decoder_batch=everything_batch_bytes(
            model_type, points_per_batch=points_per_batch, image_hw=image_hw
        ),
        kept=everything_kept_bytes(model_type, points_per_side=points_per_side),
    )


def _low_res_side(arch: SamArchitecture) -> int:
    return 4 * arch.image_size // arch.patch_size


@lru_cache(maxsize=8)
def _meta_sam(model_type: str):
    with torch.device("meta"):
        sam = _assemble(SAM_ARCHITECTURES[model_type]).eval()
    chunk_global_attention(sam.image_encoder)
    fuse_window_attention(sam.image_encoder)
    return sam


@lru_cache(maxsize=16)
def _encoder_bytes(model_type: str, dtype: torch.dtype) -> int:
    sam = _meta_sam(model_type)
    frame = SAM_ARCHITECTURES[model_type].image_size
    encoder = sam.image_encoder.to(dtype)
    try:
        with torch.no_grad(), LiveBytes() as live:
            encoder(torch.zeros(1, 3, frame, frame, device="meta", dtype=dtype))
    finally:
        encoder.float()
    return live.peak


@lru_cache(maxsize=32)
def _batch_coefficients(model_type: str, image_hw: tuple[int, int]) -> tuple[int, int]:
    """``(fixed, per_point)`` bytes of a decoder batch with its upsampling (linear in the points)."""
    one, two = (_batch_bytes(model_type, n, image_hw) for n in (1, 2))
    return one - (two - one), two - one


def _batch_bytes(model_type: str, points: int, image_hw: tuple[int, int]) -> int:
    """One decoder batch of ``points`` points, then ``points`` masks upsampled, thresholded, scored and
    boxed, as :meth:`~osprey.sam.everything.SamEverything._filter` does, on ``meta`` tensors."""
    arch, sam = SAM_ARCHITECTURES[model_type], _meta_sam(model_type)
    grid, dim = arch.image_size // arch.patch_size, arch.prompt_embed_dim
    scale = arch.image_size / max(image_hw)
    input_hw = (round(image_hw[0] * scale), round(image_hw[1] * scale))
    embedding = torch.zeros(1, dim, grid, grid, device="meta")
    with torch.no_grad(), LiveBytes() as live:
        # the prompt encoder's output for one point each (its own work is tiny; no mask input, so the
        # dense embedding is one vector expanded, as SAM's prompt encoder makes it)
        sparse = torch.zeros(points, 2, dim, device="meta")
        dense = torch.zeros(1, dim, 1, 1, device="meta").expand(points, dim, grid, grid)
        low_res, iou = sam.mask_decoder(
            image_embeddings=embedding, image_pe=torch.zeros(1, dim, grid, grid, device="meta"),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        )  # fmt: skip
        del sparse, dense
        flat = low_res.flatten(0, 1)
        chunk = flat[:points]  # at most points_per_batch masks upsampled at once
        logits = sam.postprocess_masks(chunk[:, None], input_hw, image_hw)[:, 0]
        stability = calculate_stability_score(logits, 0.0, 1.0)
        masks = logits > 0.0
        del logits
        boxes = batched_mask_to_box(masks)
        del masks, stability, boxes, iou
    return live.peak
