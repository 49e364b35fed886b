"""SAM's byte counts from shapes equal the bytes of real tensors."""

from __future__ import annotations

import numpy as np

from osprey.runtime.feature_cache import nbytes
from osprey.sam.build import SAM_ARCHITECTURES
from osprey.sam.embedding import SamImageEmbedder
from osprey.sam.memory import sam_embedding_bytes


def test_sam_embedding_bytes_from_shapes_equal_a_real_embedding(sam, one_torch_thread):
    embedder = SamImageEmbedder(sam=sam, model_id="tiny-test", max_images=1)
    embedding = embedder.encode(np.zeros((60, 80, 3), np.uint8))
    assert nbytes(embedding.features) == sam_embedding_bytes(SAM_ARCHITECTURES["tiny"])
    assert sam_embedding_bytes(SAM_ARCHITECTURES["vit_h"]) == 4 * 2**20  # (256, 64, 64) float32
