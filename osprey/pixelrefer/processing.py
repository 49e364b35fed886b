"""Pixels for PixelRefer-Lite, exactly as the released weights were trained (``pixelreferlite/mm_utils.py``
``resize_image_mask`` and the DAMO-VL image processor at 2a18ec7, re-implemented):

- **the region's crop** (the Scale-Adaptive Object Tokenizer's input): the mask's bounding box padded by
  ``crop_padding_patches`` x 14 pixels on every side (clipped to the image), scaled so the region covers
  about ``mask_num`` patches: ``scale = ceil(sqrt(196 * mask_num / area))``, and when that is 1 and the
  region is larger than 50 x 196 pixels, ``1 / sqrt(area / 196 / 50)``; each side rounded up to a multiple
  of 14. The crop is resized with OpenCV (``INTER_LINEAR`` when either side grows, else ``INTER_AREA``),
  the cropped mask to the patch grid (``INTER_LINEAR`` on 0/1 floats).
- **the whole image** at 336x336 and **the region's crop** at 224x224, both ``INTER_AREA``, for the
  object-centric infusion.
- **the image processor** on each of them: the pixel cap (``mm_max_length`` tokens, see
  :attr:`~osprey.pixelrefer.configuration.PixelReferConfig.max_pixels`) divided by the number of masks
  in the call, Qwen2-VL's ``smart_resize`` (PIL bicubic, only when the size changes), x/255 in float64
  then float32, (x - mean) / std, and 14x14 patches flattened channel-first in raster order.

The authors' helper, given several masks in one call, reuses the first region's 224x224 crop for every
region (its per-image cache); their evaluation passes one mask per call. Here every region gets its own
crop, which is that single-mask behaviour, and the cap is the single-mask cap.

The region's box reaches the model as ``(top, left, bottom, right)`` (inclusive): see
:func:`osprey.pixelrefer.modeling.box_positions` for how it is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from .configuration import PixelReferConfig

CROP_SCALE_LIMIT = 50.0  # regions above 50 x 196 pixels are shrunk to about that size


@dataclass(frozen=True)
class RegionCrop:
    """One region's inputs: ``crop`` ``(h, w, 3)`` uint8 (sides multiples of the patch), ``grid_mask``
    ``(h / 14, w / 14)`` float32, ``local`` the crop at ``local_size`` squared, ``box`` ``(top, left,
    bottom, right)`` inclusive pixels of the padded crop, and the image's ``(H, W)``."""

    crop: np.ndarray
    grid_mask: np.ndarray
    local: np.ndarray
    box: tuple[int, int, int, int]
    image_hw: tuple[int, int]


def region_crop(rgb: np.ndarray, mask: np.ndarray, config: PixelReferConfig) -> RegionCrop:
    """``rgb`` ``(H, W, 3)`` uint8 and a non-empty ``(H, W)`` binary ``mask`` -> the region's inputs."""
    patch = config.vision.patch_size
    height, width = rgb.shape[:2]
    mask_u8 = (np.asarray(mask) > 0).astype(np.uint8)
    points = cv2.findNonZero(mask_u8)
    if points is None:
        raise ValueError("mask is empty: it selects no pixel; draw a region or drop the mask")
    x, y, box_w, box_h = cv2.boundingRect(points)
    pad = patch * config.crop_padding_patches
    top, left = max(0, y - pad), max(0, x - pad)
    bottom, right = min(height, y + box_h + pad), min(width, x + box_w + pad)  # exclusive
    box = (top, left, min(height - 1, bottom - 1), min(width - 1, right - 1))
    crop_h, crop_w = bottom - top, right - left
    image_crop = rgb[top:bottom, left:right]
    mask_crop = mask_u8[top:bottom, left:right]
    area = int(mask_u8.sum(dtype=np.int64))
    scale: float = math.ceil(math.sqrt(196.0 * config.mask_num / max(area, 1)))
    if scale == 1 and area / 196.0 > CROP_SCALE_LIMIT:
        scale = 1.0 / math.sqrt((area / 196.0) / CROP_SCALE_LIMIT)
    out_h = int(math.ceil((crop_h * scale) / patch) * patch)
    out_w = int(math.ceil((crop_w * scale) / patch) * patch)
    grows = out_h >= crop_h or out_w >= crop_w
    resized = cv2.resize(
        image_crop, (out_w, out_h), interpolation=cv2.INTER_LINEAR if grows else cv2.INTER_AREA
    )
    grid_mask = cv2.resize(
        mask_crop.astype(np.float32), (out_w // patch, out_h // patch), interpolation=cv2.INTER_LINEAR
    )
    size = config.local_size
    local = cv2.resize(image_crop, (size, size), interpolation=cv2.INTER_AREA)
    return RegionCrop(crop=resized, grid_mask=grid_mask, local=local, box=box, image_hw=(height, width))


def whole_image(rgb: np.ndarray, config: PixelReferConfig) -> np.ndarray:
    """The whole image at ``global_size`` squared (``INTER_AREA``), for the global infusion."""
    size = config.global_size
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's rule: both sides multiples of ``factor``, the area within ``[min_pixels, max_pixels]``,
    the aspect ratio kept as closely as possible."""
    if height < factor or width < factor:
        scale = factor / min(height, width)
        width, height = round(scale * width), round(scale * height)
    elif max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_patches(
    image: np.ndarray, config: PixelReferConfig, *, masks_in_call: int = 1
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(h, w, 3)`` uint8 -> (``(gh * gw, 3 * 14 * 14)`` float32 patches, ``(gh, gw)``), as the release's
    image processor gives them (see the module docstring)."""
    patch = config.vision.patch_size
    height, width = image.shape[:2]
    out_h, out_w = smart_resize(
        height, width, factor=patch, min_pixels=config.min_pixels,
        max_pixels=int(config.max_pixels // masks_in_call),
    )  # fmt: skip
    if (out_h, out_w) != (height, width):
        image = np.asarray(
            Image.fromarray(image).resize((out_w, out_h), resample=Image.BICUBIC, reducing_gap=None)
        )
    pixels = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.array(config.image_mean, dtype=np.float32)) / np.array(
        config.image_std, dtype=np.float32
    )
    grid_h, grid_w = out_h // patch, out_w // patch
    pixels = pixels.transpose(2, 0, 1).reshape(3, grid_h, 1, patch, grid_w, 1, patch)
    pixels = pixels.transpose(1, 4, 2, 5, 0, 3, 6).reshape(grid_h * grid_w, 3 * patch * patch)
    return torch.from_numpy(np.ascontiguousarray(pixels)), (grid_h, grid_w)
