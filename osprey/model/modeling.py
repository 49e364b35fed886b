"""The Osprey network: vision tower, projector, mask extractor and a Llama causal LM, composed.

State-dict names: ``vision_tower.*``, ``mm_projector.*``, ``mask_extractor.*`` and ``llm.*``
(a transformers ``LlamaForCausalLM``). :mod:`osprey.model.checkpoint` maps the released names onto these.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import OspreyConfig
from .extractor import MaskExtractor, build_mask_extractor, build_projector
from .llm import build_llm, embed_tokens
from .prompts import IMAGE_PLACEHOLDER_ID
from .vision import VisionTower, build_vision_tower


class OspreyModel(nn.Module):
    """Composed Osprey network. Parts are built by :func:`build_osprey_model` and passed in."""

    def __init__(
        self,
        *,
        config: OspreyConfig,
        vision_tower: VisionTower,
        mm_projector: nn.Module,
        mask_extractor: MaskExtractor,
        llm: nn.Module,
        mask_token_id: int,
        pos_token_id: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.mask_extractor = mask_extractor
        self.llm = llm
        self.mask_token_id = mask_token_id
        self.pos_token_id = pos_token_id

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``pixels (1, 3, S, S)`` -> (``{level: (C, h, w)}``, projected image tokens ``(N_img, D)``)."""
        return self.encode_pixels_batch(pixels)[0]

    def encode_pixels_batch(self, pixels: torch.Tensor) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """``pixels (B, 3, S, S)`` -> per image (``{level: (C, h, w)}``, image tokens ``(N_img, D)``),
        the vision tower and projector run once for the whole batch."""
        features = self.vision_tower(pixels.to(device=self.device, dtype=self.dtype))
        tokens = features[self.config.vision.image_token_level]
        tokens = self.mm_projector(tokens.flatten(2).transpose(1, 2))  # (B, h*w, D)
        return [({level: f[i] for level, f in features.items()}, tokens[i]) for i in range(pixels.shape[0])]

    def region_tokens(
        self, features: dict[str, torch.Tensor], masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``masks (R, H, W)`` (bool or float, any device) -> (mask tokens ``(R, D)``, spatial tokens ``(R, D)``).

        Host masks reach a CUDA device through pinned memory without making the host wait; masks already
        on the device (SAM's) are used where they are."""
        device = self.device
        if masks.device != device:
            if device.type == "cuda" and masks.device.type == "cpu":
                masks = masks.pin_memory()
            masks = masks.to(device, non_blocking=True)
        return self.mask_extractor(features, masks)

    def embed(
        self,
        ids: torch.Tensor,
        *,
        image_tokens: torch.Tensor | None = None,
        mask_tokens: torch.Tensor | None = None,
        spatial_tokens: torch.Tensor | None = None,
        counts: dict[str, int] | None = None,
    ) -> torch.Tensor:
        """Embeddings for ``ids`` (any shape ``(..., T)``) with the placeholders filled.

        Image placeholders take ``image_tokens`` rows in order, each ``<mask>`` takes the next
        ``mask_tokens`` row and each ``<pos>`` the next ``spatial_tokens`` row. The placeholder ids
        are never looked up in the embedding table (``<mask>``/``<pos>`` may lie beyond it).
        ``counts`` (``{"image": n, "<mask>": n, "<pos>": n}``, a name left out meaning 0) are the
        placeholder counts when the caller knows them from the host's copy of ``ids``: the check
        against the feature rows then needs no read from the device.
        """
        table = embed_tokens(self.llm)
        placeholders = {
            "image": (ids == IMAGE_PLACEHOLDER_ID, image_tokens),
            "<mask>": (ids == self.mask_token_id, mask_tokens),
            "<pos>": (ids == self.pos_token_id, spatial_tokens),
        }
        special = torch.zeros_like(ids, dtype=torch.bool)
        for where, _ in placeholders.values():
            special |= where
        embeds = table(ids.masked_fill(special, 0))
        for name, (where, features) in placeholders.items():
            count = counts.get(name, 0) if counts is not None else int(where.sum())
            given = 0 if features is None else features.shape[0]
            if count != given:
                raise ValueError(
                    f"{name} placeholders and features do not match: {count} placeholder tokens, "
                    f"{given} feature rows"
                )
            if count:
                embeds = embeds.masked_scatter(where[..., None], features.to(embeds.dtype))
        return embeds


def build_osprey_model(
    config: OspreyConfig, *, mask_token_id: int, pos_token_id: int, device: str | torch.device = "cpu"
) -> OspreyModel:
    """All parts at the config's dimensions, randomly initialised. Call it inside
    ``torch.device(device)`` (or accelerate's ``init_empty_weights`` with ``device="meta"``)."""
    return OspreyModel(
        config=config,
        vision_tower=build_vision_tower(config.vision, device=device),
        mm_projector=build_projector(config),
        mask_extractor=build_mask_extractor(config),
        llm=build_llm(config.llm),
        mask_token_id=mask_token_id,
        pos_token_id=pos_token_id,
    )
