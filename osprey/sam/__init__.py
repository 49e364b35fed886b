"""SAM-assisted refinement of annotator input, with cached image embeddings, and segment everything.
May import segment_anything (in build.py) and osprey.runtime; never osprey.inference, osprey.download or backend.

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

Importing this package is cheap: each public name is imported from its module on first use, so
``osprey.sam.checkpoints`` (the published files, read by the download command), ``osprey.sam.masks``
and ``osprey.sam.prompts`` load without torch or segment-anything.
"""

from __future__ import annotations

import importlib

# Public name -> the module of this package that defines it.
_HOMES = {
    "SAM_ARCHITECTURES": "build",
    "SamArchitecture": "build",
    "build_sam": "build",
    "build_tiny_sam": "build",
    "checkpoint_url": "build",
    "known_model_types": "build",
    "resolve_sam_dtype": "build",
    "ImageEmbedding": "embedding",
    "SamImageEmbedder": "embedding",
    "EverythingOptions": "everything",
    "SamEverything": "everything",
    "SegmentedRegion": "everything",
    "order_regions": "everything",
    "mask_bbox_xyxy": "masks",
    "mask_exterior_points": "masks",
    "mask_interior_points": "masks",
    "mask_to_low_res_logits": "masks",
    "rasterize_polygon": "masks",
    "MaskPromptConfig": "prompts",
    "SamPrompt": "prompts",
    "build_sam_prompt": "prompts",
    "RefinedMask": "refine",
    "SamRefiner": "refine",
    "stability_score": "refine",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'osprey.sam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # resolved once; later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
