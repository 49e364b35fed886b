"""The vectorised brush RLE decoder against the bit-by-bit one it replaced: the same mask, or the same
error, on real encoded masks, on the editor's literal runs, on any word size and run-length sizes, and
on truncated and random streams; windows as small as one bit, so every window boundary is crossed."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import encode_rle
from rle_reference import reference_decode
from test_rle import pack_rle

from backend.labelstudio import rle as rle_codec
from backend.labelstudio.rle import decode_brush_rle, encode_brush_rle


def outcome(decode, rle, width, height):
    try:
        return decode(rle, width, height)
    except ValueError as error:
        return f"{type(error).__name__}: {error}"


def assert_same(rle, width, height):
    expected, got = (
        outcome(reference_decode, rle, width, height),
        outcome(decode_brush_rle, rle, width, height),
    )
    if isinstance(expected, str) or isinstance(got, str):
        assert got == expected
    else:
        assert got.dtype == bool and got.shape == expected.shape == (height, width)
        np.testing.assert_array_equal(got, expected)


def random_stream(rng, width: int, height: int) -> list[int]:
    """A stream with a random word size and run-length sizes, random repeated and literal runs (whose
    total may miss the header's count), sometimes cut short, sometimes followed by garbage."""
    count = width * height * 4
    word_size, sizes = int(rng.integers(1, 33)), tuple(int(s) for s in rng.integers(1, 17, 4))
    segments, left = [], count + int(rng.integers(-3, 6))
    while left > 0:
        n = int(rng.integers(1, min(left, 2 ** max(sizes)) + 1))
        word = lambda: int(rng.integers(0, 2**word_size)) * int(rng.random() < 0.5)  # noqa: E731
        segments.append(("rep", word(), n) if rng.random() < 0.5 else ("lit", [word() for _ in range(n)]))
        left -= n
    rle = pack_rle(segments, count=count, word_size=word_size, sizes=sizes)
    if rng.random() < 0.3:
        rle = rle[: int(rng.integers(7, len(rle) + 1))]
    if rng.random() < 0.2:
        rle = rle + [int(b) for b in rng.integers(0, 256, int(rng.integers(1, 40)))]
    return rle


def garbage_stream(rng, width: int, height: int) -> list[int]:
    """A correct header (random word size and sizes) followed by random bytes."""
    count = width * height * 4
    word_size, sizes = int(rng.integers(1, 33)), [int(s) for s in rng.integers(1, 17, 4)]
    bits = f"{count:032b}{word_size - 1:05b}" + "".join(f"{s - 1:04b}" for s in sizes) + "000"
    head = [int(bits[i : i + 8], 2) for i in range(0, 56, 8)]
    return head + [int(b) for b in rng.integers(0, 256, int(rng.integers(0, 200)))]


@pytest.fixture(params=[(1, 0), (7, 1), (33, 2), (1 << 16, 3)], ids=lambda p: f"window{p[0]}-levels{p[1]}")
def windows(request, monkeypatch):
    window, levels = request.param
    monkeypatch.setattr(rle_codec, "_WINDOW_BITS", window)
    monkeypatch.setattr(rle_codec, "_COARSE_LEVELS", levels)
    monkeypatch.setattr(rle_codec, "_PIXEL_CHUNK", 3)


def test_same_as_the_bit_by_bit_decoder_on_masks_we_encode(windows):
    rng = np.random.default_rng(0)
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(1, 24, 2))
        mask = rng.random((height, width)) < rng.random()
        assert_same(encode_brush_rle(mask), width, height)


def test_same_on_label_studio_sdk_rle_of_anti_aliased_rgba(windows):
    """label-studio-sdk's encoder on RGBA canvases whose alpha is not only 0/255 (an anti-aliased
    stroke): literal single values, short and long repeats."""
    rng = np.random.default_rng(1)
    for _ in range(30):
        height, width = (int(v) for v in rng.integers(1, 20, 2))
        rgba = np.zeros((height, width, 4), np.uint8)
        painted = rng.random((height, width)) < 0.4
        rgba[painted] = (255, 0, 0, 0)
        rgba[painted, 3] = rng.integers(1, 256, int(painted.sum()))
        assert_same([int(b) for b in encode_rle(rgba.ravel())], width, height)


def test_same_on_any_word_size_run_sizes_truncation_and_garbage(windows):
    rng = np.random.default_rng(2)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 10, 2))
        try:
            assert_same(random_stream(rng, width, height), width, height)
        except StopIteration:  # a run longer than the largest size: pack_rle cannot write it
            continue
        assert_same(garbage_stream(rng, width, height), width, height)


def test_runs_longer_than_a_window_and_a_whole_photo():
    mask = np.zeros((768, 1024), bool)
    mask[100:600, 200:900] = True
    mask[::7, ::5] = ~mask[::7, ::5]
    rle = encode_brush_rle(mask)
    np.testing.assert_array_equal(decode_brush_rle(rle, 1024, 768), mask)
    assert_same(rle, 1024, 768)


def test_the_rgba_canvas_is_never_built():
    """The decoder writes alpha straight into the mask: peak memory is about the (H, W) bool mask, not
    the W*H*4 RGBA bytes the bit-by-bit decoder filled first."""
    import tracemalloc

    mask = np.zeros((2048, 2048), bool)
    mask[300:1700, 400:1500] = True
    rle = encode_brush_rle(mask)
    tracemalloc.start()
    try:
        decoded = decode_brush_rle(rle, 2048, 2048)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(decoded, mask)
    assert peak < 2048 * 2048 * 2  # the mask (4 MiB) and small temporaries; RGBA alone is 16 MiB


# ---- the encoder: byte for byte the SDK's, without its bit strings ----


def sdk_encode(mask: np.ndarray) -> list[int]:
    return [int(b) for b in encode_rle(np.repeat((mask != 0).astype(np.uint8).ravel() * np.uint8(255), 4))]


def box(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[height // 4 : height // 4 + height // 2 + 1, width // 5 : width // 5 + width // 2 + 1] = True
    return mask


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 5), (48, 64), (129, 257), (300, 300)])
@pytest.mark.parametrize("kind", ["noise", "sparse", "empty", "full", "box"])
def test_the_encoder_writes_exactly_the_sdks_bytes(shape, kind):
    rng = np.random.default_rng(hash((shape, kind)) % 2**32)
    height, width = shape
    mask = {
        "noise": lambda: rng.random(shape) > 0.5,
        "sparse": lambda: rng.random(shape) > 0.97,
        "empty": lambda: np.zeros(shape, bool),
        "full": lambda: np.ones(shape, bool),  # 300x300: one run of 360,000 bytes, split at 2**16
        "box": lambda: box(height, width),
    }[kind]()
    encoded = encode_brush_rle(mask)
    assert encoded == sdk_encode(mask)
    np.testing.assert_array_equal(decode_brush_rle(encoded, width, height), mask)


def test_the_run_encoder_matches_the_sdk_on_every_run_length_class():
    lengths = [1, 2, 7, 8, 9, 16, 17, 255, 256, 257, 65535, 65536, 65537, 131072, 131073, 1, 3]
    values = np.concatenate([np.full(n, (i * 37) % 256, np.uint8) for i, n in enumerate(lengths)])
    runs = rle_codec._encode_runs(
        np.array([(i * 37) % 256 for i in range(len(lengths))]), np.array(lengths), total=values.size
    )
    assert runs == [int(b) for b in encode_rle(values)]
