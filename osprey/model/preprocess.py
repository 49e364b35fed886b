"""Image and mask preprocessing exactly as Osprey was trained.

Image: RGB, bicubic resize so the short side is ``image_size`` (long side truncated like the CLIP
image processor does), scale to [0, 1], CLIP mean/std normalisation, then a bilinear resize to
exactly ``image_size`` x ``image_size``. Masks stay at the original resolution; both are stretched
over the whole image, so they line up.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from a PIL image or an HxW / HxWx3 / HxWx4 uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if min(array.shape[:2]) < 1:
        raise ValueError(f"image is empty: shape {array.shape}")
    return np.ascontiguousarray(array[..., :3])


def preprocess_image(image: np.ndarray, *, image_size: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(1, 3, image_size, image_size)`` float32 normalised pixels."""
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = int(image_size * long / short)
    size = (new_long, image_size) if width >= height else (image_size, new_long)  # PIL: (W, H)
    resized = Image.fromarray(image).resize(size, resample=Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = ((pixels - mean) / std)[None]
    return F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)


def stack_masks(
    masks: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor, *, image_hw: tuple[int, int]
) -> torch.Tensor:
    """Validate region masks and stack them as ``(R, H, W)`` bool (True inside).

    Each mask must be ``(H, W)`` at the image's resolution and non-empty. Numpy masks give a host tensor
    (one byte a pixel: a quarter of float32 on its way to the device); torch masks stay on their device
    (SAM's masks are not copied to the host and back), checked for emptiness in one read.
    """
    if isinstance(masks, (np.ndarray, torch.Tensor)) and masks.ndim == 2:
        masks = [masks]
    masks = list(masks)
    if not masks:
        raise ValueError("no region masks given: pass at least one (H, W) mask")
    out = []
    for i, mask in enumerate(masks):
        if not isinstance(mask, torch.Tensor):
            mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"mask {i} must be 2-D (H, W), got shape {tuple(mask.shape)}")
        if tuple(mask.shape) != tuple(image_hw):
            raise ValueError(
                f"mask {i} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
                f"{image_hw[1]}x{image_hw[0]}; masks must be at the image's resolution"
            )
        out.append(mask > 0 if isinstance(mask, torch.Tensor) else torch.from_numpy(mask > 0))
    devices = {m.device for m in out}
    if len(devices) > 1:
        out = [m.cpu() for m in out]
    stacked = torch.stack(out)
    filled = stacked.flatten(1).any(1).tolist()  # one read for all the masks
    if not all(filled):
        i = filled.index(False)
        raise ValueError(f"mask {i} is empty: it selects no pixel; draw a region or drop the mask")
    return stacked
