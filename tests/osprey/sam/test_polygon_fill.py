"""The project's one polygon fill: pixel centres inside (even-odd), clipped to the image, bounded memory."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest
from matplotlib.path import Path

from osprey.sam import masks
from osprey.sam.masks import rasterize_polygon


def centres_inside(vertices: np.ndarray, *, width: int, height: int) -> np.ndarray:
    """Reference: matplotlib's even-odd point-in-polygon test on every pixel centre, one at a time."""
    rows, cols = np.mgrid[:height, :width]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    return Path(vertices, closed=False).contains_points(centres).reshape(height, width)


def tall_zigzag(n: int, *, width: int, height: int) -> np.ndarray:
    """``n`` vertices alternating between the top and bottom rows: every edge crosses every row."""
    xs = np.linspace(1, width - 1, n)
    return np.stack([xs, np.where(np.arange(n) % 2, height - 1.3, 1.7)], axis=1)


# Exact pixels ------------------------------------------------------------------------------------


def test_rectangle_rasterises_to_exactly_its_area() -> None:
    mask = rasterize_polygon([(2, 3), (6, 3), (6, 8), (2, 8)], width=12, height=10)
    expected = np.zeros((10, 12), dtype=bool)
    expected[3:8, 2:6] = True  # rows 3..7, cols 2..5: 4 x 5 = 20 pixels, the rectangle's area
    np.testing.assert_array_equal(mask, expected)


def test_triangle_pixels_follow_the_pixel_centre_rule() -> None:
    mask = rasterize_polygon([(0, 0), (4, 0), (0, 4)], width=5, height=5)
    # Centre (c + .5, r + .5) is inside x + y < 4  <=>  c + r <= 2; centres ON the hypotenuse
    # (c + r == 3) lie on a right edge and are outside.
    rows, cols = np.indices((5, 5))
    np.testing.assert_array_equal(mask, rows + cols <= 2)
    assert mask.sum() == 6


def test_centres_on_left_and_top_edges_are_in_on_right_and_bottom_edges_out() -> None:
    mask = rasterize_polygon([(1.5, 1.5), (4.5, 1.5), (4.5, 3.5), (1.5, 3.5)], width=6, height=5)
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 1:4] = True  # centres x in {1.5, 2.5, 3.5}, y in {1.5, 2.5}
    np.testing.assert_array_equal(mask, expected)


def test_polygon_orientation_does_not_matter_and_shared_edges_do_not_overlap() -> None:
    left = [(3.0, 2.0), (15.0, 2.0), (15.0, 17.0), (3.0, 17.0)]
    right = [(15.0, 2.0), (27.0, 2.0), (27.0, 17.0), (15.0, 17.0)]
    a, b = rasterize_polygon(left, width=30, height=20), rasterize_polygon(right, width=30, height=20)
    np.testing.assert_array_equal(a, rasterize_polygon(left[::-1], width=30, height=20))
    assert not (a & b).any()
    both = rasterize_polygon([(3, 2), (27, 2), (27, 17), (3, 17)], width=30, height=20)
    np.testing.assert_array_equal(a | b, both)


def test_polygon_pixel_count_matches_its_area() -> None:
    vertices = np.array([(10.3, 4.2), (52.7, 12.9), (47.1, 40.6), (20.2, 35.5), (6.6, 22.0)])
    x, y = vertices[:, 0], vertices[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    mask = rasterize_polygon(vertices, width=64, height=48)
    assert abs(int(mask.sum()) - area) < 0.03 * area
    # cv2.fillPoly would also fill the outline: strictly more pixels than the area.
    filled = np.zeros((48, 64), np.uint8)
    cv2.fillPoly(filled, [np.round(vertices).astype(np.int32)], 1)
    assert filled.sum() > mask.sum()


def test_self_intersections_cut_holes_even_odd() -> None:
    # Two overlapping squares traced as one ring: their overlap is crossed twice, so it is outside.
    ring = [(2, 2), (8, 2), (8, 8), (4, 8), (4, 4), (10, 4), (10, 10), (2, 10)]
    mask = rasterize_polygon(ring, width=12, height=12)
    np.testing.assert_array_equal(mask, centres_inside(np.array(ring, float), width=12, height=12))
    assert not mask[5:7, 5:7].any() and mask[3, 3]


# Outside the image, and nothing inside ----------------------------------------------------------------


def test_whole_image_and_larger_polygons_cover_every_pixel() -> None:
    assert rasterize_polygon([(0, 0), (7, 0), (7, 5), (0, 5)], width=7, height=5).all()
    assert rasterize_polygon([(-50, -50), (90, -50), (90, 70), (-50, 70)], width=7, height=5).all()


def test_vertices_outside_the_image_are_clipped_by_the_rule() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        vertices = rng.uniform(-20, 60, (int(rng.integers(3, 9)), 2))
        big = rasterize_polygon(vertices + (30, 30), width=100, height=100)
        np.testing.assert_array_equal(rasterize_polygon(vertices, width=40, height=30), big[30:60, 30:70])


@pytest.mark.parametrize(
    "vertices",
    [
        [(1, 1), (3, 3), (6, 6)],  # collinear
        [(1.1, 1.1), (1.4, 1.1), (1.4, 1.4)],  # inside one pixel, off its centre
        [(20, 20), (30, 20), (30, 30)],  # beyond the image
        [(0, 2.2), (10, 2.2), (10, 2.4), (0, 2.4)],  # between two rows of centres
    ],
)
def test_a_polygon_covering_no_pixel_centre_gives_an_empty_mask(vertices) -> None:
    mask = rasterize_polygon(vertices, width=10, height=10)
    assert mask.shape == (10, 10) and mask.dtype == bool and not mask.any()


@pytest.mark.parametrize(
    ("vertices", "size", "message"),
    [
        ([(1, 1), (5, 5)], (10, 10), "at least 3 vertices"),
        ([], (10, 10), r"\(N, 2\)"),
        ([(1, 1, 1), (5, 1, 1), (3, 4, 1)], (10, 10), r"\(N, 2\)"),
        ([(1, 1), (5, 1), (np.nan, 4)], (10, 10), "finite"),
        ([(1, 1), (5, 1), (np.inf, 4)], (10, 10), "finite"),
        ([(1, 1), (5, 1), (1e300, 4)], (10, 10), "within"),
        ([(1, 1), ("a", 1), (3, 4)], (10, 10), "number pairs"),
        ([(1, 1), (5, 1), (3, 4)], (0, 10), "width and height >= 1"),
    ],
)
def test_bad_polygons_raise_value_errors(vertices, size, message) -> None:
    with pytest.raises(ValueError, match=message):
        rasterize_polygon(vertices, width=size[0], height=size[1])


# Against a reference, by bands, in bounded memory ------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_polygons_equal_a_point_in_polygon_reference(seed) -> None:
    # Random rings are self-intersecting; the range puts many vertices outside the image.
    rng = np.random.default_rng(seed)
    for _ in range(40):
        width, height = (int(v) for v in rng.integers(1, 70, 2))
        n = int(rng.integers(3, 25))
        vertices = rng.uniform(-15, max(width, height) + 15, (n, 2))
        expected = centres_inside(vertices, width=width, height=height)
        np.testing.assert_array_equal(rasterize_polygon(vertices, width=width, height=height), expected)


def test_bands_of_any_size_fill_the_same_pixels(monkeypatch) -> None:
    rng = np.random.default_rng(7)
    polygons = [rng.uniform(-10, 90, (int(rng.integers(3, 40)), 2)) for _ in range(30)]
    polygons.append(tall_zigzag(60, width=80, height=70))
    whole = [rasterize_polygon(v, width=80, height=70) for v in polygons]
    monkeypatch.setattr(masks, "_BAND_ROWS", 3)
    monkeypatch.setattr(masks, "_BAND_CROSSINGS", 5)  # fewer than one row of the zigzag: 1-row bands
    for vertices, expected in zip(polygons, whole, strict=True):
        np.testing.assert_array_equal(rasterize_polygon(vertices, width=80, height=70), expected)


def test_ten_thousand_vertices_on_a_4000_pixel_image_in_bounded_memory() -> None:
    vertices = tall_zigzag(10_000, width=4000, height=4000)  # 40 million edge crossings
    tracemalloc.start()
    try:
        mask = rasterize_polygon(vertices, width=4000, height=4000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < mask.nbytes + 8 * 2**20  # the 16 MB mask and a few MiB (an (H, E) table: 320 MB)
    path = Path(vertices, closed=False)
    for row in (0, 1, 2, 1000, 2345, 3997, 3998, 3999):
        centres = np.stack([np.arange(4000) + 0.5, np.full(4000, row + 0.5)], axis=1)
        np.testing.assert_array_equal(mask[row], path.contains_points(centres), err_msg=f"row {row}")
