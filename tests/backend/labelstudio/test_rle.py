"""Label Studio's brush RLE: round trips, what the SDK and the editor write, malformed input."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from backend.labelstudio import rle as rle_codec
from backend.labelstudio.rle import BadRegionError, decode_brush_rle, encode_brush_rle

W, H = 160, 120


def ellipse(center_xy, radii_xy, shape=(H, W)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - center_xy[0]) / radii_xy[0]) ** 2 + ((yy - center_xy[1]) / radii_xy[1]) ** 2 <= 1


def pack_rle(segments, count: int, word_size: int = 8, sizes=(3, 4, 8, 16)) -> list[int]:
    """Write the rle-pack bit stream (as Label Studio's editor does) from ('rep', value, n) and
    ('lit', [values]) segments, independently of the code under test."""
    bits = f"{count:032b}{word_size - 1:05b}" + "".join(f"{s - 1:04b}" for s in sizes)
    for segment in segments:
        n = segment[2] if segment[0] == "rep" else len(segment[1])
        index = next(i for i, s in enumerate(sizes) if n - 1 < 2**s)
        bits += ("1" if segment[0] == "rep" else "0") + f"{index:02b}" + f"{n - 1:0{sizes[index]}b}"
        values = [segment[1]] if segment[0] == "rep" else segment[1]
        bits += "".join(f"{v:0{word_size}b}" for v in values)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((H, W), bool),
        np.ones((H, W), bool),
        ellipse((60, 50), (40, 30)),
        np.random.default_rng(0).random((H, W)) > 0.5,
        np.ones((1, 1), bool),
        np.pad(np.ones((3, 700), bool), ((200, 97), (0, 300))),  # runs longer than 2**16 values
    ],
)
def test_rle_round_trip(mask):
    rle = encode_brush_rle(mask)
    assert all(isinstance(b, int) and 0 <= b <= 255 for b in rle)
    decoded = decode_brush_rle(rle, mask.shape[1], mask.shape[0])
    assert decoded.dtype == bool and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)


def test_encoded_rle_is_what_the_sdk_decodes():
    mask = ellipse((80, 60), (50, 20))
    rgba = decode_rle(encode_brush_rle(mask)).reshape(H, W, 4)
    np.testing.assert_array_equal(rgba[..., 3] == 255, mask)
    assert set(np.unique(rgba[..., 3])) == {0, 255}


def test_decoder_reads_editor_style_literal_runs_like_the_sdk():
    # A 4x2 canvas painted in red (255, 0, 0, 128) on its right half, encoded with literal runs.
    pixels = np.zeros((2, 4, 4), np.uint8)
    pixels[:, 2:] = (255, 0, 0, 128)
    flat = pixels.ravel().tolist()
    rle = pack_rle(
        [
            ("rep", 0, 8),
            ("lit", flat[8:16]),
            ("rep", 0, 8),
            ("lit", flat[24:29]),
            ("rep", 0, 2),
            ("lit", flat[31:32]),
        ],
        count=len(flat),
    )
    np.testing.assert_array_equal(decode_rle(rle), flat)
    np.testing.assert_array_equal(decode_brush_rle(rle, 4, 2), pixels[..., 3] > 0)


def test_wrong_size_header_is_refused_before_decoding(monkeypatch):
    rle = encode_brush_rle(ellipse((60, 50), (40, 30)))

    def must_not_run(*args):
        raise AssertionError("decoded despite a size mismatch")

    monkeypatch.setattr(rle_codec, "_decode_runs", must_not_run)
    with pytest.raises(BadRegionError, match=rf"encodes {W * H * 4} RGBA bytes but a 161x120 image needs"):
        decode_brush_rle(rle, W + 1, H)


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("0,1,2", "list of integers"),
        ([1.5] * 10, "flat list of integers"),
        ([True] * 10, "flat list of integers"),
        ([0, 0, -1, 0, 0, 0, 0, 0], "bytes 0..255"),
        ([0, 0, 256, 0, 0, 0, 0, 0], "bytes 0..255"),
        ([0, 0, 0], "header needs 7"),
        ([0] * (8 * 4 * 4 * 4 + 65), "more than any mask of this image can need"),
    ],
)
def test_malformed_rle_is_refused(rle, message):
    with pytest.raises(BadRegionError, match=message):
        decode_brush_rle(rle, 4, 4)


def test_truncated_rle_is_refused():
    rle = encode_brush_rle(np.random.default_rng(1).random((H, W)) > 0.5)
    with pytest.raises(BadRegionError, match="truncated"):
        decode_brush_rle(rle[: len(rle) // 2], W, H)
