"""SAM's global attention in bands of query rows: bit-identical to upstream's on the CPU, with a step
boundary between bands."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from osprey.runtime.steps import between_steps
from osprey.sam.attention import chunk_global_attention
from osprey.sam.build import build_tiny_sam


@pytest.mark.parametrize(
    ("dim", "heads", "grid"),
    [(32, 2, 64), (768, 12, 32), (1280, 16, 16)],  # the tiny width, ViT-B's, ViT-H's
)
def test_banded_attention_equals_upstream_bit_for_bit(dim, heads, grid):
    torch.manual_seed(0)
    upstream = Attention(
        dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=(grid, grid)
    ).eval()
    with torch.no_grad():
        upstream.rel_pos_h.normal_()
        upstream.rel_pos_w.normal_()
    block = torch.nn.Module()
    block.attn, block.window_size = copy.deepcopy(upstream), 0
    encoder = torch.nn.Module()
    encoder.blocks = torch.nn.ModuleList([block])
    assert chunk_global_attention(encoder) == 1
    x = torch.randn(1, grid, grid, dim)
    bands = []
    with torch.no_grad(), between_steps(lambda: bands.append(1)):
        got = block.attn(x)
        want = upstream(x)
    assert torch.equal(got, want)
    assert len(bands) == grid // 8 - 1  # a boundary between each two bands of 8 rows


def test_only_global_blocks_change_and_only_once():
    sam = build_tiny_sam()
    encoder = sam.image_encoder
    global_blocks = [b for b in encoder.blocks if b.window_size == 0]
    assert global_blocks and len(global_blocks) < len(encoder.blocks)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        want = encoder(x)
        assert chunk_global_attention(encoder) == len(global_blocks)
        assert chunk_global_attention(encoder) == 0
        assert torch.equal(encoder(x), want)
    with pytest.raises(ValueError, match="rows_per_band"):
        chunk_global_attention(encoder, rows_per_band=0)
