"""ConvNeXt CLIP vision tower: the one adapter module for open_clip / timm.

The tower is open_clip's timm-backed ``visual`` module. Osprey only runs the trunk's stem and
four stages (res2..res5); the CLIP projection head and the trunk's classifier norm are never
executed, so they are replaced by identities and their checkpoint tensors are skipped by name
(see :data:`UNUSED_VISION_KEYS`).
"""

from __future__ import annotations

import logging
import re
import threading

import torch
from torch import nn

from .config import CONFIG_DIR, LEVELS, VisionConfig

logger = logging.getLogger(__name__)

# Tensors that open_clip / released checkpoints hold but Osprey never runs: the CLIP image
# projection head, the ConvNeXt classifier-head norm and the whole CLIP text tower.
UNUSED_VISION_KEYS = re.compile(
    r"^(visual\.head\.|visual\.trunk\.head\.|transformer\.|token_embedding\.|positional_embedding$|"
    r"ln_final\.|text_projection$|logit_scale$|logit_bias$|attn_mask$)"
)

_registered = False
_register_lock = threading.Lock()


def _register_bundled_configs() -> None:
    """Make the project's own open_clip architecture JSONs known to open_clip's registry."""
    global _registered
    with _register_lock:
        if _registered:
            return
        import open_clip

        for path in sorted(CONFIG_DIR.glob("open_clip_*.json")):
            open_clip.add_model_config(path)
        _registered = True


class VisionTower(nn.Module):
    """Multi-level ConvNeXt features.

    ``forward(pixels)`` takes ``(B, 3, S, S)`` normalised pixels (``S = image_size``) and returns
    ``{"res2": (B, C2, S/4, S/4), "res3": ..., "res4": ..., "res5": (B, C5, S/32, S/32)}``.
    """

    def __init__(self, *, visual: nn.Module, config: VisionConfig) -> None:
        super().__init__()
        self.visual = visual
        self.config = config

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        stages = self.visual.trunk.forward_intermediates(pixels, indices=4, intermediates_only=True)
        return dict(zip(LEVELS, stages, strict=True))


def build_vision_tower(config: VisionConfig, *, device: str | torch.device = "cpu") -> VisionTower:
    """Build the tower with random weights (no download) on ``device`` (``"meta"`` to fill it from a
    checkpoint later). Checks the stage widths against ``config``."""
    import open_clip

    _register_bundled_configs()
    clip = open_clip.create_model(
        config.open_clip_model, pretrained=None, force_image_size=config.image_size, device=device
    )
    visual = clip.visual
    del clip
    if not hasattr(visual, "trunk"):
        raise ValueError(f"open_clip model {config.open_clip_model!r} is not a timm ConvNeXt tower")
    visual.head = nn.Identity()
    visual.trunk.head = nn.Identity()
    widths = tuple(info["num_chs"] for info in visual.trunk.feature_info)
    if widths != config.channels:
        raise ValueError(
            f"open_clip model {config.open_clip_model!r} has stage widths {widths}, "
            f"but the Osprey config says {config.channels}"
        )
    return VisionTower(visual=visual, config=config)
