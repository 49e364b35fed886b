"""SAM's byte counts from shapes equal the bytes of real tensors; the batch formula sizes points_per_batch."""

from __future__ import annotations

import numpy as np
import torch

from osprey.runtime.feature_cache import nbytes
from osprey.runtime.memory import LiveBytes
from osprey.sam import EverythingOptions, SamEverything
from osprey.sam.build import SAM_ARCHITECTURES
from osprey.sam.embedding import SamImageEmbedder
from osprey.sam.everything import _Crop
from osprey.sam.memory import (
    everything_batch_bytes,
    everything_kept_bytes,
    everything_peak_bytes,
    points_per_batch_for,
    sam_embedding_bytes,
)


def test_sam_embedding_bytes_from_shapes_equal_a_real_embedding(sam, one_torch_thread):
    embedder = SamImageEmbedder(sam=sam, model_id="tiny-test", max_images=1)
    embedding = embedder.encode(np.zeros((60, 80, 3), np.uint8))
    assert nbytes(embedding.features) == sam_embedding_bytes(SAM_ARCHITECTURES["tiny"])
    assert sam_embedding_bytes(SAM_ARCHITECTURES["vit_h"]) == 4 * 2**20  # (256, 64, 64) float32


def test_everything_batch_formula_matches_a_real_batch(sam, one_torch_thread):
    """The formula (measured on meta tensors) against the bytes a real decoder batch and its
    upsampling hold on the CPU, every mask surviving the filters (the most upsampling): within 10% (the
    real batch also holds the filters' small per-mask tensors, which the formula leaves out)."""
    everything = SamEverything(embedder=SamImageEmbedder(sam=sam, model_id="tiny-test"))
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    embedding = everything.embedder.embed(image)
    crop = _Crop(box=[0, 0, 400, 300], embedding=embedding)
    for points in (4, 16):
        options = EverythingOptions(points_per_batch=points, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        grid = np.random.default_rng(points).random((points, 2)) * [400, 300]
        with torch.no_grad(), LiveBytes() as live:
            low_res, iou = everything._decode(embedding, grid)
            kept = everything._filter(crop, grid, low_res, iou, (300, 400), options)
        assert len(kept.iou) == 3 * points  # nothing filtered: the upsampling ran on every mask
        formula = everything_batch_bytes("tiny", points_per_batch=points, image_hw=(300, 400))
        assert abs(live.peak - formula) <= 0.10 * live.peak, (points, live.peak, formula)


def test_points_per_batch_for_a_budget_fits_it():
    hw = (1024, 1365)
    kept = everything_kept_bytes("vit_b", points_per_side=32)
    assert kept == 32 * 32 * 3 * 256 * 256 * 4
    for budget in (2**30, 2 * 2**30, 4 * 2**30):
        n = points_per_batch_for("vit_b", budget, image_hw=hw)
        assert everything_batch_bytes("vit_b", points_per_batch=n, image_hw=hw) + kept <= budget
        if n < 256:  # one more point would not fit
            assert everything_batch_bytes("vit_b", points_per_batch=n + 1, image_hw=hw) + kept > budget
    assert points_per_batch_for("vit_b", 1) == 1  # too small a budget: one point at a time, not none
    assert points_per_batch_for("vit_b", 2**40, points_per_side=4) == 16  # never more than the grid
    peak = everything_peak_bytes("vit_b", points_per_batch=8, image_hw=hw)
    assert peak.peak == max(peak.encoder, peak.decoder_batch + peak.kept)
