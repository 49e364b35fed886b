"""Refine what an annotator drew (clicks, box, brush, polygon) into a precise SAM mask.

The flow is ``SamPredictor``'s, without its per-image state: the image embedding comes from the
shared :class:`~osprey.sam.embedding.SamImageEmbedder` (cached by image content), and each call
runs SAM's prompt encoder and mask decoder on its own tensors. A :class:`SamRefiner` is therefore
safe to call from many threads at once, and a second click on the same image costs the decoder
only. The host reads the device once per call: the candidates' scores and, queued beside them into
pinned memory, their masks; the chosen mask also stays on the device (``device_mask``) for a region
model on the same device to read there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from osprey.runtime.feature_cache import FeatureCache
from osprey.runtime.transfer import read_back, to_device, to_host

from .embedding import ImageEmbedding, SamImageEmbedder, check_image
from .prompts import MaskPromptConfig, SamPrompt, build_sam_prompt

__all__ = ["RefinedMask", "SamRefiner", "stability_score"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefinedMask:
    """SAM's answer to one prompt.

    Attributes:
        mask: HxW bool at the ORIGINAL image size.
        predicted_iou: SAM's own estimate of the mask's IoU with the object.
        stability_score: IoU of the mask logits thresholded at ``threshold + offset`` and
            ``threshold - offset`` (as SAM's automatic mask generator computes it); 0 if empty.
        candidate_index: which of SAM's outputs was picked (0..num_candidates-1).
        num_candidates: 3 with multimask output, else 1.
        selected_by: ``"rough_mask_iou"`` (best IoU with the brush/polygon), ``"predicted_iou"``
            (SAM's best estimate) or ``"single_output"``.
        rough_mask_iou: IoU of ``mask`` with the rough mask, when one was given.
        low_res_logits: 1xhxw float32 logits of the picked candidate in SAM's padded low-resolution
            frame (1x256x256 for the released models).
        device_mask: ``mask`` as an HxW bool tensor on SAM's device (a region model on that device
            reads it without a copy from the host).
    """

    mask: np.ndarray
    predicted_iou: float
    stability_score: float
    candidate_index: int
    num_candidates: int
    selected_by: str
    rough_mask_iou: float | None
    low_res_logits: np.ndarray
    device_mask: torch.Tensor | None = None

    @property
    def area(self) -> int:
        """Number of mask pixels."""
        return int(self.mask.sum())


def stability_score(logits: torch.Tensor, *, mask_threshold: float, offset: float) -> torch.Tensor:
    """Stability of ...xHxW mask logits: |logits > t + offset| / |logits > t - offset|, per mask.

    The first mask is always inside the second, so this is their IoU. Empty masks score 0.
    """
    inner = (logits > mask_threshold + offset).flatten(-2).sum(-1, dtype=torch.int64)
    outer = (logits > mask_threshold - offset).flatten(-2).sum(-1, dtype=torch.int64)
    return torch.where(
        outer > 0, inner.double() / outer.clamp(min=1).double(), torch.zeros_like(inner).double()
    )


def _mask_iou(candidates: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """IoU of CxHxW bool candidates with one HxW bool reference, shape (C,)."""
    inter = (candidates & reference).flatten(1).sum(1, dtype=torch.int64)
    union = (candidates | reference).flatten(1).sum(1, dtype=torch.int64)
    return inter.double() / union.clamp(min=1).double()


class SamRefiner:
    """Turns annotator input into one SAM mask, reusing cached image embeddings.

    Args:
        embedder: supplies (cached) image embeddings; share one between the refiner and
            :class:`~osprey.sam.everything.SamEverything`.
        mask_prompt: how brush masks and polygons become prompts.
        stability_offset: logit offset of the stability score (SAM's AMG uses 1.0).

    Example::

        sam = build_sam("vit_b", checkpoint="models/sam_vit_b_01ec64.pth", device="cuda")
        refiner = SamRefiner(embedder=SamImageEmbedder(sam=sam, model_id="sam_vit_b_01ec64"))
        result = refiner.refine(image, points=[[120, 80]], point_labels=[1])
        refiner.cache.stats()  # {'hits': ..., 'misses': ..., ...}
    """

    def __init__(
        self,
        *,
        embedder: SamImageEmbedder,
        mask_prompt: MaskPromptConfig | None = None,
        stability_offset: float = 1.0,
    ) -> None:
        if stability_offset <= 0:
            raise ValueError(f"stability_offset must be > 0, got {stability_offset}")
        self.embedder = embedder
        self.sam = embedder.sam
        self.mask_prompt = mask_prompt or MaskPromptConfig()
        self.stability_offset = float(stability_offset)

    @property
    def cache(self) -> FeatureCache[ImageEmbedding]:
        """The embedding cache (``.stats()`` gives hits, misses, evictions...)."""
        return self.embedder.cache

    def refine(
        self,
        image: np.ndarray,
        *,
        points: np.ndarray | Sequence[Sequence[float]] | None = None,
        point_labels: np.ndarray | Sequence[int] | None = None,
        box_xyxy: np.ndarray | Sequence[float] | None = None,
        mask: np.ndarray | None = None,
        polygon: np.ndarray | Sequence[Sequence[float]] | None = None,
        multimask_output: bool | None = None,
    ) -> RefinedMask:
        """Refine any combination of annotator inputs on ``image`` into one mask.

        Args:
            image: HxWx3 uint8 RGB.
            points: Nx2 (X, Y) pixel clicks; point_labels: N of 1 (positive) / 0 (negative),
                None for all positive.
            box_xyxy: XYXY pixel box.
            mask: rough HxW brush mask at the image size (pixels > 0 inside).
            polygon: (x, y) pixel vertices (>= 3), filled by pixel centre.
            multimask_output: None picks SAM's recommendation: three candidates for a rough mask
                (picked by IoU with it) or a lone click (picked by predicted IoU), one otherwise.

        Raises:
            ValueError: no prompt, or a prompt that does not fit the image (see
                :mod:`osprey.sam.prompts`).
        """
        check_image(image)
        prompt = build_sam_prompt(
            image.shape[:2],
            points=points,
            point_labels=point_labels,
            box_xyxy=box_xyxy,
            mask=mask,
            polygon=polygon,
            config=self.mask_prompt,
            encoder_size=self.embedder.encoder_size,
            mask_input_size=tuple(self.sam.prompt_encoder.mask_input_size),
        )
        return self.refine_prompt(image, prompt, multimask_output=multimask_output)

    def refine_prompt(
        self, image: np.ndarray, prompt: SamPrompt, *, multimask_output: bool | None = None
    ) -> RefinedMask:
        """Like :meth:`refine`, for a prompt already built with :func:`build_sam_prompt`."""
        check_image(image)
        if tuple(prompt.image_size) != tuple(image.shape[:2]):
            raise ValueError(
                f"prompt was built for a {prompt.image_size} (H, W) image but the image is {image.shape[:2]}"
            )
        embedding = self.embedder.embed(image)
        if multimask_output is None:
            lone_click = (
                prompt.box_xyxy is None and prompt.point_coords is not None and len(prompt.point_coords) == 1
            )
            multimask_output = prompt.rough_mask is not None or lone_click
        return self._decode(embedding, prompt, multimask_output)

    @torch.no_grad()
    def _decode(self, embedding: ImageEmbedding, prompt: SamPrompt, multimask_output: bool) -> RefinedMask:
        sam, device = self.sam, self.embedder.device
        transform = self.embedder.transform
        original_size = embedding.original_size

        points = boxes = masks = None
        if prompt.point_coords is not None:
            coords = transform.apply_coords(prompt.point_coords, original_size)  # into SAM's input frame
            points = (
                torch.as_tensor(coords, dtype=torch.float32, device=device)[None],  # (1, N, 2)
                torch.as_tensor(prompt.point_labels, dtype=torch.int32, device=device)[None],  # (1, N)
            )
        if prompt.box_xyxy is not None:
            box = transform.apply_boxes(prompt.box_xyxy[None], original_size)
            boxes = torch.as_tensor(box, dtype=torch.float32, device=device)  # (1, 4)
        if prompt.mask_input is not None:
            masks = torch.as_tensor(prompt.mask_input, dtype=torch.float32, device=device)[
                None
            ]  # (1, 1, 256, 256)

        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
        low_res, iou_pred = sam.mask_decoder(
            image_embeddings=embedding.features,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )  # (1, C, 256, 256), (1, C)
        logits = sam.postprocess_masks(low_res, embedding.input_size, original_size)[0]  # (C, H, W)
        candidates = logits > sam.mask_threshold
        stabilities = stability_score(logits, mask_threshold=sam.mask_threshold, offset=self.stability_offset)
        rough = None
        if prompt.rough_mask is not None:
            rough = _mask_iou(candidates, to_device(prompt.rough_mask, candidates.device))
        host_masks, host_low_res = to_host(candidates), to_host(low_res[0].float())  # queued, read below
        scores = [iou_pred[0].float(), stabilities] + ([rough] if rough is not None else [])
        iou_host, stability_host, *rough_host = read_back(*scores)  # the one wait for the device

        num = len(iou_host)
        rough_ious = rough_host[0] if rough_host else None
        if rough_ious is not None:
            # Best IoU with the rough mask; SAM's own estimate breaks ties.
            order = sorted(range(num), key=lambda i: (-rough_ious[i], -iou_host[i], i))
            index, selected_by = order[0], "rough_mask_iou"
        elif num > 1:
            index, selected_by = max(range(num), key=lambda i: (iou_host[i], -i)), "predicted_iou"
        else:
            index, selected_by = 0, "single_output"
        return RefinedMask(
            mask=host_masks[index].numpy(),
            predicted_iou=float(iou_host[index]),
            stability_score=float(stability_host[index]),
            candidate_index=index,
            num_candidates=num,
            selected_by=selected_by,
            rough_mask_iou=None if rough_ious is None else float(rough_ious[index]),
            low_res_logits=host_low_res[index : index + 1].numpy(),
            device_mask=candidates[index],
        )
