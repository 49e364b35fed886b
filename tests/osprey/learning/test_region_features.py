"""Region feature vectors: layout, pooled CLIP levels, geometry on known shapes, colour."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from osprey.learning.region_features import (
    GEOMETRY_NAMES,
    FeatureLayout,
    feature_layout,
    mask_geometry,
    region_features,
)
from osprey.model.extractor import mask_pool

SIZE = 128
G = {name: i for i, name in enumerate(GEOMETRY_NAMES)}


def disc(radius: int = 30, center: tuple[int, int] = (64, 64)) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def square(top: int = 20, left: int = 30, side: int = 50) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def triangle() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(mask, [np.array([[14, 110], [114, 110], [64, 24]], np.int32)], 1)  # (x, y), ~equilateral
    return mask > 0


def test_layout_of_tiny(tiny_osprey):
    layout = feature_layout(tiny_osprey)
    assert layout.groups == (
        ("res2", 40),
        ("res3", 80),
        ("res4", 160),
        ("res5", 320),
        ("geometry", 12),
        ("colour", 3),
    )
    assert layout.dim == 615
    assert layout.slices()["geometry"] == slice(600, 612)
    assert FeatureLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="sizes >= 1"):
        FeatureLayout(groups=(("a", 0),), backbone="x")


def test_features_shape_levels_and_colour(tiny_osprey):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image[20:70, 30:80] = (200, 100, 50)  # the square's pixels
    masks = [disc(), square(), triangle()]
    features = region_features(tiny_osprey, image, masks)
    layout = feature_layout(tiny_osprey)
    assert features.shape == (3, layout.dim) and features.dtype == np.float32
    assert np.isfinite(features).all()
    slices = layout.slices()
    encoded = tiny_osprey.encode_image(image)
    mask_t = torch.from_numpy(np.stack(masks)).float()
    for level in ("res2", "res3", "res4", "res5"):
        block = features[:, slices[level]]
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1.0, rtol=1e-5)
        pooled = mask_pool(encoded.features[level].float(), mask_t).numpy()  # same pooling as the extractor
        expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        np.testing.assert_allclose(block, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(features[1, slices["colour"]], np.array([200, 100, 50]) / 255, rtol=1e-5)
    for i, mask in enumerate(masks):
        np.testing.assert_allclose(features[i, slices["geometry"]], mask_geometry(mask), rtol=1e-6)


def test_uses_the_given_encoding(tiny_osprey, monkeypatch):
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    encoded = tiny_osprey.encode_image(image)
    calls = []
    monkeypatch.setattr(tiny_osprey, "encode_image", lambda *a: calls.append(1) or encoded)
    with_encoding = region_features(tiny_osprey, image, [disc()], encoded=encoded)
    assert not calls, "an EncodedImage was given: no second vision forward"
    np.testing.assert_array_equal(with_encoding, region_features(tiny_osprey, image, [disc()]))
    assert calls == [1]
    other = np.zeros((64, 96, 3), np.uint8)
    with pytest.raises(ValueError, match="encoded image is"):
        region_features(tiny_osprey, other, [np.ones((64, 96), bool)], encoded=encoded)


def test_bad_masks(tiny_osprey):
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match="empty"):
        region_features(tiny_osprey, image, [np.zeros((SIZE, SIZE), bool)])
    with pytest.raises(ValueError, match="resolution"):
        region_features(tiny_osprey, image, [np.ones((64, 64), bool)])
    with pytest.raises(ValueError, match="empty"):
        mask_geometry(np.zeros((8, 8), bool))


def test_geometry_of_a_disc():
    geometry = mask_geometry(disc(radius=30))
    assert geometry[G["area_fraction"]] == pytest.approx(disc(radius=30).sum() / SIZE**2)
    assert geometry[G["circularity"]] > 0.95
    assert geometry[G["extent"]] == pytest.approx(math.pi * 30**2 / 61**2, abs=0.005)  # pi/4, digitised
    assert geometry[G["log_aspect"]] == pytest.approx(0.0, abs=1e-6)
    assert geometry[G["solidity"]] > 0.97
    assert geometry[G["hu1"]] == pytest.approx(1 / (2 * math.pi), rel=0.01)  # a disc's hu1 = 1/(2 pi)


def test_geometry_of_a_square_and_a_triangle():
    sq = mask_geometry(square(side=50))
    assert sq[G["extent"]] == 1.0
    assert sq[G["solidity"]] == pytest.approx(1.0)
    assert sq[G["circularity"]] == pytest.approx(math.pi / 4, abs=0.01)
    tri = mask_geometry(triangle())
    assert tri[G["extent"]] == pytest.approx(0.5, abs=0.03)
    assert tri[G["circularity"]] == pytest.approx(math.pi / (3 * math.sqrt(3)), abs=0.02)  # 0.605
    wide = mask_geometry(square(side=20) | np.roll(square(side=20), 20, axis=1))  # 40 x 20 box
    assert wide[G["log_aspect"]] == pytest.approx(math.log(2.0))


def test_hu_moments_are_rotation_invariant():
    mask = triangle()
    hu = mask_geometry(mask)[G["hu1"] :]
    np.testing.assert_allclose(mask_geometry(np.rot90(mask))[G["hu1"] :], hu, rtol=1e-4, atol=1e-5)
    assert abs(hu[2]) > 0.01  # a triangle is not centrally symmetric: its third-order invariants show it
