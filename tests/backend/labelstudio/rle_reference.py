"""The bit-by-bit brush RLE decoder the backend used before the vectorised one, kept as the tests' and
``bench/rle.py``'s reference: the vectorised decoder must give exactly its output (mask or error).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from backend.labelstudio.rle import BadRegionError, image_size

_HEADER_BYTES = 7
_MAX_VALUES = 2**32 - 1


def _rle_bytes(rle, max_len: int) -> np.ndarray:
    if not isinstance(rle, (list, tuple, np.ndarray)):
        raise BadRegionError(f"brush rle must be a list of integers 0..255, got {type(rle).__name__}")
    if len(rle) > max_len:
        raise BadRegionError(
            f"brush rle has {len(rle)} entries, more than any mask of this image can need ({max_len}); "
            f"the data is corrupt or belongs to another image"
        )
    try:
        array = np.asarray(rle)
    except (ValueError, OverflowError):
        raise BadRegionError("brush rle must be a flat list of integers 0..255") from None
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise BadRegionError(f"brush rle must be a flat list of integers 0..255, got dtype {array.dtype}")
    if array.size < _HEADER_BYTES:
        raise BadRegionError(f"brush rle has {array.size} entries; even its header needs {_HEADER_BYTES}")
    if array.min() < 0 or array.max() > 255:
        raise BadRegionError(f"brush rle entries must be bytes 0..255, got {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def rle_header(rle: Sequence[int]) -> tuple[int, int, list[int]]:
    """Read an RLE header: ``(number of values, word size in bits, run-length field sizes)``."""
    head = int.from_bytes(bytes(int(b) for b in rle[:_HEADER_BYTES]), "big")  # 56 bits, 53 used
    count = head >> 24
    word_size = ((head >> 19) & 0x1F) + 1
    sizes = [((head >> (15 - 4 * k)) & 0xF) + 1 for k in range(4)]
    return count, word_size, sizes


def reference_decode(rle: Sequence[int], width: int, height: int) -> np.ndarray:
    """Decode Label Studio brush RLE into an ``(H, W)`` bool mask (alpha > 0).

    The header's value count must equal ``width * height * 4`` (RGBA bytes of the image); that is
    checked before anything is decoded. Raises BadRegionError on a size mismatch, non-integer,
    negative or absurdly long input, or data that ends early.
    """
    width, height = image_size(width, height)
    expected = width * height * 4
    if expected > _MAX_VALUES:
        raise BadRegionError(
            f"a {width}x{height} image is too large for Label Studio brush RLE (32-bit count)"
        )
    data = _rle_bytes(rle, max_len=8 * expected + 64)
    count, word_size, sizes = rle_header(data)
    if count != expected:
        raise BadRegionError(
            f"brush rle encodes {count} RGBA bytes but a {width}x{height} image needs {expected}; the mask "
            f"was drawn on an image of another size (check original_width/original_height)"
        )
    if data.size > math.ceil(expected * (word_size + 3 + max(sizes)) / 8) + 64:
        raise BadRegionError(f"brush rle has {data.size} entries, more than {count} values can take")
    values = _decode_runs(data, count, word_size, sizes)
    return values.reshape(height, width, 4)[:, :, 3] > 0


def _decode_runs(data: np.ndarray, count: int, word_size: int, sizes: list[int]) -> np.ndarray:
    bits = np.unpackbits(data)
    text = (bits + ord("0")).tobytes().decode("ascii")
    total_bits = len(text)
    weights = (1 << np.arange(word_size - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)
    out = np.zeros(count, dtype=np.uint8 if word_size <= 8 else np.uint32)
    pos, i = 8 * _HEADER_BYTES - 3, 0
    while i < count:
        if pos + 3 > total_bits:
            break
        repeated = text[pos] == "1"
        size = sizes[int(text[pos + 1 : pos + 3], 2)]
        pos += 3
        if pos + size > total_bits:
            break
        run = int(text[pos : pos + size], 2) + 1
        pos += size
        end = min(i + run, count)
        needed = word_size if repeated else run * word_size
        if pos + needed > total_bits:
            break
        if repeated:
            out[i:end] = int(text[pos : pos + word_size], 2)
        else:
            words = bits[pos : pos + run * word_size].reshape(run, word_size).astype(np.uint64) @ weights
            out[i:end] = words[: end - i]
        pos += needed
        i = end
    if i < count:
        raise BadRegionError(f"brush rle ends after {i} of its {count} values; the data is truncated")
    return out
