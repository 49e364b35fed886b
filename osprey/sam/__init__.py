"""SAM-assisted refinement of annotator input, with cached image embeddings, and segment everything.
May import segment-anything (``build``, the one adapter), ``osprey.runtime.feature_cache`` and
``osprey.download`` (the published checkpoint table); never ``backend``.

Typical use (one model, one embedder shared by every request and thread)::

    from osprey.sam import SamEverything, SamImageEmbedder, SamRefiner, build_sam

    sam = build_sam("vit_b", checkpoint="models/sam_vit_b_01ec64.pth", device="cuda")
    embedder = SamImageEmbedder(sam=sam, model_id="sam_vit_b_01ec64", max_images=16)
    refiner = SamRefiner(embedder=embedder)
    everything = SamEverything(embedder=embedder)

    result = refiner.refine(image, points=[[120, 80]], point_labels=[1])   # encodes the image
    result = refiner.refine(image, box_xyxy=[100, 60, 220, 180])            # decoder only
    regions = everything.generate(image)                                    # decoder only

All coordinates are original-image pixels; see :mod:`osprey.sam.prompts` for the conventions.
"""

from .build import (
    SAM_ARCHITECTURES,
    SamArchitecture,
    build_sam,
    build_tiny_sam,
    checkpoint_url,
    known_model_types,
)
from .embedding import ImageEmbedding, SamImageEmbedder
from .everything import EverythingOptions, SamEverything, SegmentedRegion
from .masks import (
    mask_bbox_xyxy,
    mask_exterior_points,
    mask_interior_points,
    mask_to_low_res_logits,
    rasterize_polygon,
)
from .prompts import MaskPromptConfig, SamPrompt, build_sam_prompt
from .refine import RefinedMask, SamRefiner, stability_score

__all__ = [
    "SAM_ARCHITECTURES",
    "EverythingOptions",
    "ImageEmbedding",
    "MaskPromptConfig",
    "RefinedMask",
    "SamArchitecture",
    "SamEverything",
    "SamImageEmbedder",
    "SamPrompt",
    "SamRefiner",
    "SegmentedRegion",
    "build_sam",
    "build_sam_prompt",
    "build_tiny_sam",
    "checkpoint_url",
    "known_model_types",
    "mask_bbox_xyxy",
    "mask_exterior_points",
    "mask_interior_points",
    "mask_to_low_res_logits",
    "rasterize_polygon",
    "stability_score",
]
