"""Osprey's mask-aware visual extractor and the vision-to-LLM projector.

Attribute names match the released checkpoint (``mask_extractor.res2`` ...,
``mask_extractor.feat_linear``, ``mask_extractor.mask_linear.layers.{0,1,2}``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEVELS, OspreyConfig


def mask_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Average ``features`` inside each mask.

    Args:
        features: ``(C, h, w)`` one image's feature map.
        masks: ``(R, H, W)`` float or bool masks at any resolution; they are resized to ``(h, w)``
            (bilinear), binarised (``> 0``) and averaged over: ``sum / (area + 1e-8)``.

    Returns:
        ``(R, C)`` pooled features; an empty mask pools to zeros.
    """
    if not masks.is_floating_point():
        masks = masks.to(features.dtype)
    if masks.shape[-2:] != features.shape[-2:]:
        masks = F.interpolate(masks[:, None], size=features.shape[-2:], mode="bilinear", align_corners=False)[
            :, 0
        ]
    binary = (masks > 0).to(features.dtype)
    area = binary.sum(dim=(-1, -2), keepdim=True) + 1e-8
    return torch.einsum("chw,rhw->rc", features, binary / area)


class MLP(nn.Module):
    """Linear layers with ReLU between them (the spatial-token MLP)."""

    def __init__(self, *, dims: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskExtractor(nn.Module):
    """Per region: a mask token from pooled multi-level features and a spatial token from the mask."""

    def __init__(
        self, *, level_channels: dict[str, int], embed_dim: int, out_dim: int, mask_shape: int
    ) -> None:
        super().__init__()
        self.mask_shape = mask_shape
        for level in LEVELS:
            setattr(self, level, nn.Linear(level_channels[level], embed_dim))
        self.feat_linear = nn.Linear(embed_dim, out_dim)
        self.mask_linear = MLP(dims=[mask_shape * mask_shape, embed_dim, embed_dim, out_dim])

    def forward(
        self, features: dict[str, torch.Tensor], masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Region tokens for one image.

        Args:
            features: ``{level: (C, h, w)}`` for res2..res5 of one image.
            masks: ``(R, H, W)`` binary masks at the image's original resolution.

        Returns:
            ``(mask_tokens, spatial_tokens)``, each ``(R, out_dim)``.
        """
        masks = masks.to(dtype=features[LEVELS[0]].dtype)
        summed = sum(getattr(self, level)(mask_pool(features[level], masks)) for level in LEVELS)
        mask_tokens = self.feat_linear(summed)
        small = F.interpolate(masks[:, None], size=self.mask_shape, mode="bilinear", align_corners=False)
        spatial_tokens = self.mask_linear(small.reshape(masks.shape[0], -1))
        return mask_tokens, spatial_tokens


def build_mask_extractor(config: OspreyConfig) -> MaskExtractor:
    return MaskExtractor(
        level_channels={level: config.vision.level_channels(level) for level in LEVELS},
        embed_dim=config.extractor.embed_dim,
        out_dim=config.llm.hidden_size,
        mask_shape=config.extractor.mask_shape,
    )


def build_projector(config: OspreyConfig) -> nn.Module:
    """``mlp<N>x_gelu``: Linear(mm_hidden -> hidden), then (GELU, Linear(hidden -> hidden)) x (N-1)."""
    hidden = config.llm.hidden_size
    if config.projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, hidden)
    modules: list[nn.Module] = [nn.Linear(config.mm_hidden_size, hidden)]
    for _ in range(1, config.projector_depth):
        modules += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*modules)
