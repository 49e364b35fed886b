"""SAM's global attention, computed a band of query rows at a time.

The image encoder's global-attention blocks (4 of ViT-H's 32) attend from every one of the 64x64
embedding positions to every other: upstream builds the whole ``(B * heads, 4096, 4096)`` score
matrix, adds the decomposed relative positions to it, and softmaxes it in place, several copies of
1 GiB at once for ViT-H in float32. Each query row's softmax only needs its own scores, so
:func:`chunk_global_attention` runs the same arithmetic on ``rows_per_band`` rows of the embedding
grid at a time (8 rows: 512 queries). Per band it is the same matrix products on fewer rows, so on the
CPU the output is bit-identical to upstream's (a test checks it on every released width); it needs
an eighth of the memory and runs 2-3x faster on a CPU (better cache use). Between bands is a
:func:`~osprey.runtime.steps.step_boundary`: a global block is SAM's longest single step, and a
scheduler can hand the model to an annotator's click there.

Where a fused kernel pays (a CUDA device, or an encoder in bfloat16), every block, global and windowed
(:func:`fuse_window_attention`), computes its attention with ``scaled_dot_product_attention``, the
decomposed relative positions passed as its additive mask: the same sum, softmax and product, without
materialising the score matrix in the encoder's dtype (a bfloat16 softmax of raw scores loses digits the
fused kernel keeps). On the CPU in float32 the upstream arithmetic runs unchanged (bit-identical).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from osprey.runtime.steps import step_boundary

from .build import get_rel_pos

__all__ = ["ROWS_PER_BAND", "chunk_global_attention", "fuse_window_attention", "uses_fused_attention"]

ROWS_PER_BAND = 8  # rows of the (64 x 64) embedding grid per band; bit-exact on the CPU from 4 up


def chunk_global_attention(image_encoder: nn.Module, rows_per_band: int = ROWS_PER_BAND) -> int:
    """Make every global-attention block of SAM's ``ImageEncoderViT`` compute its attention in bands
    of ``rows_per_band`` grid rows (windowed blocks are small and stay as they are). Returns how many
    blocks were changed; calling it again changes nothing."""
    if rows_per_band < 1:
        raise ValueError(f"rows_per_band must be >= 1, got {rows_per_band}")
    changed = 0
    for block in image_encoder.blocks:
        attn = block.attn
        if block.window_size != 0 or getattr(attn, "_osprey_rows_per_band", None) is not None:
            continue
        if not attn.use_rel_pos:
            raise ValueError("chunk_global_attention expects SAM's relative-position attention")
        attn._osprey_rows_per_band = int(rows_per_band)
        attn.forward = types.MethodType(_banded_forward, attn)
        changed += 1
    return changed


def fuse_window_attention(image_encoder: nn.Module) -> int:
    """Make every windowed-attention block of SAM's ``ImageEncoderViT`` use the fused kernel where it
    pays (:func:`uses_fused_attention`), upstream's forward elsewhere. Returns how many blocks were
    changed; calling it again changes nothing."""
    changed = 0
    for block in image_encoder.blocks:
        attn = block.attn
        if block.window_size == 0 or getattr(attn, "_osprey_fused", False):
            continue
        if not attn.use_rel_pos:
            raise ValueError("fuse_window_attention expects SAM's relative-position attention")
        attn._osprey_fused = True
        attn.forward = types.MethodType(_window_forward, attn)
        changed += 1
    return changed


def uses_fused_attention(x: torch.Tensor) -> bool:
    """Whether attention on ``x`` runs as ``scaled_dot_product_attention``: on CUDA, or below float32."""
    return x.is_cuda or x.dtype not in (torch.float32, torch.float64)


def _window_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Upstream ``Attention.forward`` of a windowed block, fused where :func:`uses_fused_attention`."""
    if not uses_fused_attention(x):
        return type(self).forward(self, x)
    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
    bias = _rel_pos_bias(
        q.reshape(q.shape[0], H, W, -1), get_rel_pos(H, H, self.rel_pos_h), get_rel_pos(W, W, self.rel_pos_w)
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B * heads, H * W, hd)
    out = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(out)


def _rel_pos_bias(grid_q: torch.Tensor, rel_h_table: torch.Tensor, rel_w_table: torch.Tensor) -> torch.Tensor:
    """SAM's decomposed relative positions of the query rows ``grid_q (B * heads, rows, W, head_dim)``
    against every key of an ``(H, W)`` grid, as an additive ``(B * heads, rows * W, H * W)`` mask;
    ``rel_h_table`` holds the ``rows`` query rows' entries, ``(rows, H, head_dim)``."""
    rows, W = grid_q.shape[1], grid_q.shape[2]
    H = rel_h_table.shape[1]
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h_table)  # (.., rows, W, H)
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w_table)  # (.., rows, W, W)
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(-1, rows * W, H * W)


def _banded_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Upstream ``Attention.forward`` for a global block, one band of query rows at a time."""
    B, H, W, _ = x.shape
    # qkv: (3, B * heads, H * W, head_dim), exactly as upstream lays it out
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
    k_t = k.transpose(-2, -1)
    rel_h_table = get_rel_pos(H, H, self.rel_pos_h)  # (H, H, head_dim)
    rel_w_table = get_rel_pos(W, W, self.rel_pos_w)  # (W, W, head_dim)
    grid_q = q.reshape(q.shape[0], H, W, q.shape[-1])  # (B * heads, H, W, head_dim)
    fused = uses_fused_attention(x)
    bands = []
    for top in range(0, H, self._osprey_rows_per_band):
        if top:
            step_boundary()
        bottom = min(H, top + self._osprey_rows_per_band)
        rows = bottom - top
        if fused:
            bias = _rel_pos_bias(grid_q[:, top:bottom], rel_h_table[top:bottom], rel_w_table)
            band = q[:, top * W : bottom * W]
            bands.append(F.scaled_dot_product_attention(band, k, v, attn_mask=bias, scale=self.scale))
            continue
        scores = (q[:, top * W : bottom * W] * self.scale) @ k_t  # (B * heads, rows * W, H * W)
        band_q = grid_q[:, top:bottom]
        rel_h = torch.einsum("bhwc,hkc->bhwk", band_q, rel_h_table[top:bottom])  # (.., rows, W, H)
        rel_w = torch.einsum("bhwc,wkc->bhwk", band_q, rel_w_table)  # (.., rows, W, W)
        scores = (scores.view(-1, rows, W, H, W) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(
            -1, rows * W, H * W
        )
        bands.append(scores.softmax(dim=-1) @ v)  # (B * heads, rows * W, head_dim)
    out = torch.cat(bands, dim=1)
    out = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(out)
