"""What SAM holds, from shapes: one cached image embedding, and segment everything at its peak.

Two moments dominate: the image encoder (its global-attention blocks, banded by
:mod:`osprey.sam.attention`) and one decoder batch of ``points_per_batch`` points, whose three masks
per point are upscaled to the 1024 frame and then to the original image in float32 before they are
thresholded. :func:`everything_peak_bytes` runs both on ``meta`` tensors under
:class:`~osprey.runtime.memory.LiveBytes` (about a second for ViT-H, no memory).
:func:`sam_embedding_bytes` is what one image costs in :class:`~osprey.sam.embedding.SamImageEmbedder`'s cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osprey.runtime.memory import LiveBytes

from .attention import chunk_global_attention
from .build import SAM_ARCHITECTURES, SamArchitecture, _assemble

__all__ = ["EverythingPeak", "everything_peak_bytes", "sam_embedding_bytes"]


def sam_embedding_bytes(arch: SamArchitecture) -> int:
    """One cached SAM embedding (float32 ``(prompt_embed_dim, grid, grid)``) of ``arch``."""
    grid = arch.image_size // arch.patch_size
    return arch.prompt_embed_dim * grid * grid * 4


@dataclass(frozen=True)
class EverythingPeak:
    """Bytes held at SAM's two peaks of one segment-everything task (on top of weights and caches)."""

    encoder: int
    decoder_batch: int

    @property
    def peak(self) -> int:
        return max(self.encoder, self.decoder_batch)


def everything_peak_bytes(
    model_type: str, *, points_per_batch: int = 64, image_hw: tuple[int, int] = (1024, 1365)
) -> EverythingPeak:
    """The two peaks of segment everything with SAM ``model_type`` on an ``image_hw`` (H, W) image."""
    arch = SAM_ARCHITECTURES[model_type]
    with torch.device("meta"):
        sam = _assemble(arch).eval()
    chunk_global_attention(sam.image_encoder)
    frame = arch.image_size
    scale = frame / max(image_hw)
    input_hw = (round(image_hw[0] * scale), round(image_hw[1] * scale))
    grid, dim = frame // arch.patch_size, arch.prompt_embed_dim
    with torch.no_grad(), LiveBytes() as encoder:
        embedding = sam.image_encoder(torch.zeros(1, 3, frame, frame, device="meta"))
    with torch.no_grad(), LiveBytes() as decoder:
        # the prompt encoder's output for one point each (its own work is tiny, and data-dependent)
        sparse = torch.zeros(points_per_batch, 2, dim, device="meta")
        dense = torch.zeros(points_per_batch, dim, grid, grid, device="meta")
        low_res, _ = sam.mask_decoder(
            image_embeddings=embedding, image_pe=torch.zeros(1, dim, grid, grid, device="meta"),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        )  # fmt: skip
        masks = sam.postprocess_masks(low_res, input_hw, image_hw)
        _ = masks > 0.0
    return EverythingPeak(encoder=encoder.peak, decoder_batch=decoder.peak)
