"""The PixelRefer-Lite network: SigLIP-NaViT tower, object tokenizer with object-centric infusion, Qwen2.

State-dict names: ``vision_encoder.*`` (transformers' ``VideoLlama3VisionModel``, the same network as the
authors' DAMO-VL encoder), ``region_encoder.*`` and ``llm.*`` (a transformers ``Qwen2ForCausalLM``);
:mod:`osprey.pixelrefer.loading` maps the released names onto these. This file is the one adapter to
transformers for this model.

Per region (:meth:`PixelReferModel.region_tokens`), as the released weights were trained:

1. the region's crop through the tower -> a ``(gh, gw, C)`` grid; plus a box position embedding
   (``pos_linear`` of each cell's normalised coordinates, :func:`box_positions`);
2. the grid resized (bilinear) to the mask grid when the image processor changed the crop's size; the
   cells whose grid mask is above 0 kept in raster order; more than ``mask_num`` of them are reduced to
   ``mask_num`` by k-means (:func:`kmeans`), fewer are zero-padded to ``mask_num``;
3. cross-attention to the 224x224 crop's features (``fusion_attention_local`` after ``ln_local``), then to
   the 336x336 whole image's (``fusion_attention_global`` after ``ln_global``), each added back;
4. ``feat_linear`` (Linear, GELU, Linear) to the LLM width: ``mask_num`` tokens that replace the
   region's ``<REGION>`` placeholders.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .configuration import PixelReferConfig, VisionConfig
from .processing import RegionCrop, pixel_patches

KMEANS_ITERATIONS = 3


def build_vision_encoder(config: VisionConfig) -> nn.Module:
    """transformers' ``VideoLlama3VisionModel`` at ``config``'s size (SDPA attention)."""
    from transformers import VideoLlama3VisionConfig, VideoLlama3VisionModel

    hf = VideoLlama3VisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        patch_size=config.patch_size,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act=config.hidden_act,
        rope_parameters={"rope_type": "axial", "rope_theta": config.rope_theta},
    )
    hf._attn_implementation = "sdpa"
    return VideoLlama3VisionModel(hf)


def build_llm(config: PixelReferConfig) -> nn.Module:
    """transformers' ``Qwen2ForCausalLM`` at ``config.text``'s size (SDPA attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = config.text
    hf = Qwen2Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_theta,
        tie_word_embeddings=text.tie_word_embeddings,
        initializer_range=text.initializer_range,
        use_sliding_window=False,
    )
    hf._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(hf)


def box_positions(
    grid_h: int, grid_w: int, box: tuple[int, int, int, int], image_hw: tuple[int, int]
) -> torch.Tensor:
    """``(grid_h, grid_w, 2)`` float32 cell coordinates fed to ``pos_linear``, as the weights were trained.

    The box arrives as ``(top, left, bottom, right)`` but is read as ``(x0, y0, x1, y1)``: channel 0 is
    ``(j / grid_w * (bottom - top) + top) / (W - 1)`` and channel 1 ``(i / grid_h * (right - left) + left)
    / (H - 1)`` for cell ``(i, j)``. Reproduced, not corrected: it is what the weights learned.
    """
    x0, y0, x1, y1 = box
    height, width = image_hw
    xs = torch.arange(grid_w, dtype=torch.float32) / grid_w
    xs = (xs.repeat(grid_h, 1) * (x1 - x0) + x0) / (width - 1)
    ys = torch.arange(grid_h, dtype=torch.float32) / grid_h
    ys = (ys.unsqueeze(1).repeat(1, grid_w) * (y1 - y0) + y0) / (height - 1)
    return torch.stack([xs, ys], dim=2)


def kmeans(tokens: torch.Tensor, num_clusters: int, draw: torch.Tensor) -> torch.Tensor:
    """The release's k-means: ``tokens`` ``(n, C)`` -> ``(num_clusters, C)`` centroids.

    Starts from ``tokens[draw[:num_clusters]]`` (``draw``: a permutation of ``range(n)``), runs
    ``KMEANS_ITERATIONS`` rounds of nearest-centroid assignment (ties to the lowest index) and means (an
    empty cluster keeps its centroid), and stops early when the update moves no centroid by more than
    1e-6, returning the centroids from before that update. The output order follows the draw.
    """
    centroids = tokens[draw[:num_clusters]]
    for _ in range(KMEANS_ITERATIONS):
        distances = torch.sum((tokens.unsqueeze(1) - centroids.unsqueeze(0)) ** 2, dim=2)  # (n, k)
        labels = torch.argmin(distances, dim=1)
        updated = torch.stack(
            [
                tokens[labels == i].mean(dim=0) if bool((labels == i).any()) else centroids[i]
                for i in range(num_clusters)
            ]
        )
        if torch.allclose(centroids, updated, atol=1e-6):
            break
        centroids = updated
    return centroids


def region_seed(mask: np.ndarray, seed: int = 0) -> int:
    """The k-means draw's seed of one region: a hash of its mask, so the same region always gets the
    same tokens, whatever else the request holds (the authors draw from the global generator)."""
    packed = np.packbits(np.asarray(mask) > 0)
    digest = hashlib.sha256(np.asarray(mask.shape, dtype=np.int64).tobytes() + packed.tobytes()).digest()
    return (int.from_bytes(digest[:8], "little") + seed) % (2**63)


class RegionEncoder(nn.Module):
    """The object tokenizer and object-centric infusion (released names ``model.region_encoder.*``)."""

    def __init__(self, *, vision_width: int, text_width: int, heads: int) -> None:
        super().__init__()
        self.feat_linear = nn.Sequential(
            nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width)
        )
        self.fusion_attention_local = nn.MultiheadAttention(vision_width, heads, batch_first=True)
        self.fusion_attention_global = nn.MultiheadAttention(vision_width, heads, batch_first=True)
        self.ln_local = nn.LayerNorm(vision_width)
        self.ln_global = nn.LayerNorm(vision_width)
        self.pos_linear = nn.Linear(2, vision_width)

    def object_tokens(
        self, grid: torch.Tensor, grid_mask: torch.Tensor, positions: torch.Tensor, num_tokens: int, draw
    ) -> torch.Tensor:
        """``grid`` ``(gh, gw, C)``, ``grid_mask`` ``(mh, mw)``, ``positions`` ``(gh, gw, 2)`` ->
        ``(num_tokens, C)`` masked patch features (k-means or zero padding). ``draw(n)`` gives the
        k-means permutation of ``range(n)``."""
        features = (grid + self.pos_linear(positions.to(grid))).permute(2, 0, 1)[None]  # (1, C, gh, gw)
        if features.shape[-2:] != grid_mask.shape:
            features = F.interpolate(
                features, size=tuple(grid_mask.shape), mode="bilinear", align_corners=False
            )
        inside = grid_mask > 0
        tokens = features[..., inside].permute(2, 0, 1).reshape(-1, features.shape[1])  # (n, C), raster order
        if tokens.shape[0] > num_tokens:
            tokens = kmeans(tokens, num_tokens, draw(tokens.shape[0]))
        return F.pad(tokens, (0, 0, 0, num_tokens - tokens.shape[0]))

    def infuse(self, queries: torch.Tensor, local: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """``queries`` ``(R, K, C)``, ``local`` ``(R, L, C)``, ``whole`` ``(R, G, C)`` -> ``(R, K, D)``."""
        queries = queries + self.fusion_attention_local(self.ln_local(queries), local, local)[0]
        queries = queries + self.fusion_attention_global(self.ln_global(queries), whole, whole)[0]
        return self.feat_linear(queries)


class PixelReferModel(nn.Module):
    """Composed PixelRefer-Lite network; parts are built by :func:`build_pixelrefer_model`."""

    def __init__(
        self,
        *,
        config: PixelReferConfig,
        vision_encoder: nn.Module,
        region_encoder: RegionEncoder,
        llm: nn.Module,
        region_token_id: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision_encoder = vision_encoder
        self.region_encoder = region_encoder
        self.llm = llm
        self.region_token_id = region_token_id

    # the shared fast path (osprey.inference.fast) names the region placeholder so
    @property
    def mask_token_id(self) -> int:
        return self.region_token_id

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    def encode_patches(self, images: list[tuple[torch.Tensor, tuple[int, int]]]) -> list[torch.Tensor]:
        """Several images' patches (:func:`~osprey.pixelrefer.processing.pixel_patches`) through the tower
        in one packed call (each image attends to itself only) -> one ``(gh, gw, C)`` grid each."""
        pixels = torch.cat([p for p, _ in images]).to(device=self.device, dtype=self.dtype)
        grids = torch.tensor([[1, h, w] for _, (h, w) in images], device=self.device)
        ones = torch.ones(len(images), dtype=torch.long, device=self.device)
        out = self.vision_encoder(pixels, grids, ones).last_hidden_state
        sizes = [h * w for _, (h, w) in images]
        return [chunk.view(h, w, -1) for chunk, (_, (h, w)) in zip(out.split(sizes), images, strict=True)]

    def encode_whole(self, image: np.ndarray) -> torch.Tensor:
        """The whole image at 336x336 (``image``, already resized) -> ``(576, C)`` global features."""
        (grid,) = self.encode_patches([pixel_patches(image, self.config)])
        return grid.reshape(-1, grid.shape[-1])

    def region_tokens(self, crop: RegionCrop, whole: torch.Tensor, seed: int) -> torch.Tensor:
        """One region's ``(mask_num, D)`` tokens from its :class:`RegionCrop`, the image's global features
        ``(G, C)`` and its k-means seed (:func:`region_seed`)."""
        config = self.config
        crop_grid, local_grid = self.encode_patches(
            [pixel_patches(crop.crop, config), pixel_patches(crop.local, config)]
        )
        positions = box_positions(crop_grid.shape[0], crop_grid.shape[1], crop.box, crop.image_hw)
        generator = torch.Generator().manual_seed(seed)

        def draw(n: int) -> torch.Tensor:
            return torch.randperm(n, generator=generator).to(self.device)

        grid_mask = torch.from_numpy(crop.grid_mask).to(self.device)
        queries = self.region_encoder.object_tokens(
            crop_grid, grid_mask, positions.to(self.device), config.mask_num, draw
        )
        local = local_grid.reshape(1, -1, local_grid.shape[-1])
        return self.region_encoder.infuse(queries[None], local, whole[None].to(queries.dtype))[0]

    def embed(self, ids: torch.Tensor, *, region_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings for ``ids`` (any shape ``(..., T)``); the ``<REGION>`` placeholders, in order, take the
        rows of ``region_tokens`` ``(n, D)``. Raises when the counts differ, saying both."""
        where = ids == self.region_token_id
        count, given = int(where.sum()), 0 if region_tokens is None else region_tokens.shape[0]
        if count != given:
            raise ValueError(
                f"<REGION> placeholders and region tokens do not match: {count} placeholder tokens, "
                f"{given} token rows"
            )
        embeds = self.llm.get_input_embeddings()(ids)
        if count:
            embeds = embeds.masked_scatter(where[..., None], region_tokens.to(embeds.dtype))
        return embeds

    def embed_regions(
        self, ids: torch.Tensor, regions: torch.Tensor, region_tokens: torch.Tensor
    ) -> torch.Tensor:
        """The fast path's packed embedding: ``regions`` names the region of every ``<REGION>`` in
        row-major order (``mask_num`` consecutive ones per region); ``region_tokens`` ``(R, mask_num, D)``."""
        per = self.config.mask_num
        if regions.numel() % per:
            raise ValueError(f"{regions.numel()} <REGION> placeholders are not whole regions of {per} tokens")
        groups = regions.view(-1, per)
        if bool((groups != groups[:, :1]).any()):
            raise ValueError(f"each region's {per} <REGION> placeholders must be consecutive")
        tokens = region_tokens[groups[:, 0]].reshape(-1, region_tokens.shape[-1])
        return self.embed(ids, region_tokens=tokens)


def build_pixelrefer_model(config: PixelReferConfig, *, region_token_id: int) -> PixelReferModel:
    """All parts at ``config``'s dimensions, randomly initialised. Call it inside ``torch.device(...)``
    (or accelerate's ``init_empty_weights``)."""
    return PixelReferModel(
        config=config,
        vision_encoder=build_vision_encoder(config.vision),
        region_encoder=RegionEncoder(
            vision_width=config.vision.hidden_size,
            text_width=config.text.hidden_size,
            heads=config.region_heads,
        ),
        llm=build_llm(config),
        region_token_id=region_token_id,
    )
