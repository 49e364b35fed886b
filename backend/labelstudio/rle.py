"""Label Studio's brush RLE: the bit-packed run-length code of the RGBA bytes of an
``original_width x original_height`` canvas (see ``label_studio_sdk.converter.brush``). The alpha byte
carries the mask: any non-zero alpha is painted, as the Label Studio editor draws it.

The decoder checks the header's value count against the image size before it decodes anything, so a
payload cannot make it allocate more than the image it claims to belong to (the claimed size itself is
capped by :mod:`backend.labelstudio.limits`). Decoding is vectorised with numpy and writes the alpha
mask directly, never the ``W x H x 4`` canvas; its output (mask or error) is that of reading the stream
bit by bit (``tests/backend/labelstudio/rle_reference.py``; ``bench/rle.py`` compares the two).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from backend.errors import InputError

_HEADER_BYTES = 7  # 32-bit value count, 5-bit word size - 1, four 4-bit run-length sizes - 1 (53 bits)
_MAX_VALUES = 2**32 - 1  # the header counts values in 32 bits
_WINDOW_BITS = 1 << 16  # run headers are searched this many bit positions at a time
_COARSE_LEVELS = 3  # pointer doubling levels before the chain is walked (every 8th run)
_PIXEL_CHUNK = 1 << 20  # literal words read this many at a time


class BadRegionError(InputError):
    """Region data from Label Studio that cannot be used; the message says what was wrong."""


def image_size(width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` as ints; BadRegionError unless both are positive integers."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise BadRegionError(f"{name} must be a positive integer number of pixels, got {value!r}")
    return int(width), int(height)


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


def decode_brush_rle(rle: Sequence[int], width: int, height: int) -> np.ndarray:
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
    return _decode_runs(data, count, word_size, sizes).reshape(height, width)


def _decode_runs(data: np.ndarray, count: int, word_size: int, sizes: list[int]) -> np.ndarray:
    """The alpha bytes of the ``count`` RGBA values as a flat ``(count // 4,)`` bool array (alpha > 0).

    A value stream is a chain of runs, each starting where the previous one ends, so the run headers
    are found window by window: every bit position of a window is read as if a header started there
    (:func:`_window_runs`), and the chain from the window's first header is followed with
    :func:`_chain`. The values are then written straight into the alpha mask; the RGBA array is never
    built. Runs, their order, the clipping of the last run and the "truncated" check are those of the
    bit-by-bit reading: a run counts only when all of its bits are present.
    """
    padded = np.concatenate([data, np.zeros(8, np.uint8)])  # word reads may run past the end
    total = 8 * data.size
    alpha = np.zeros(count // 4, dtype=bool)
    done, at = 0, 8 * _HEADER_BYTES - 3
    while done < count and at < total:
        n = min(_WINDOW_BITS, total - at)
        repeated, run, data_at, end = _window_runs(padded, at, n, word_size, sizes)
        complete = end <= total - at
        path, leave = _chain(np.where(complete, end, total - at), n)
        repeated, run, data_at, complete = repeated[path], run[path], data_at[path], complete[path]
        if not complete.all():  # the first run whose bits are missing ends the data
            cut = int(np.argmin(complete))
            repeated, run, data_at, leave = repeated[:cut], run[:cut], data_at[:cut], total - at
        stop = done + np.cumsum(run, dtype=np.int64)
        if stop.size and stop[-1] >= count:
            keep = int(np.searchsorted(stop, count)) + 1
            repeated, run, data_at, stop = repeated[:keep], run[:keep], data_at[:keep], stop[:keep]
            stop[-1] = count
        if stop.size:
            first = np.concatenate([[done], stop[:-1]])
            _fill_alpha(alpha, padded, repeated, first, stop, at + data_at.astype(np.int64), word_size)
            done = int(stop[-1])
        at += leave
    if done < count:
        raise BadRegionError(f"brush rle ends after {done} of its {count} values; the data is truncated")
    return alpha


def _window_runs(padded: np.ndarray, at: int, n: int, word_size: int, sizes: list[int]):
    """Every bit position ``at + r`` (``r < n``) read as a run header: ``(repeated, run, data_at, end)``,
    positions relative to ``at``: the run's words start at ``data_at`` and it ends at ``end``."""
    first = at >> 3
    raw = padded[first : first + (n + 26) // 8 + 5].astype(np.uint32)
    raw = np.concatenate([raw, np.zeros(max(0, (n + 26) // 8 + 5 - raw.size), np.uint32)])
    words = (raw[:-3] << 24) | (raw[1:-2] << 16) | (raw[2:-1] << 8) | raw[3:]  # 32 bits from each byte
    wide = np.repeat(words, 8)  # wide[j]: the 32 bits that start at bit j's byte
    offset = _bit_offsets(wide.size)  # j % 8
    r0 = at & 7
    head = (wide[r0 : r0 + n] >> (29 - offset[r0 : r0 + n])) & 7  # flag bit, 2-bit size index
    field = (wide[r0 + 3 : r0 + 3 + n] >> (16 - offset[r0 + 3 : r0 + 3 + n])) & 0xFFFF  # 16 bits after
    size = np.asarray(sizes, dtype=np.uint32)[head & 3]
    run = ((field >> (16 - size)) + 1).astype(np.int32)
    repeated = head >= 4
    data_at = np.arange(n, dtype=np.int32) + 3 + size.astype(np.int32)
    end = data_at + np.where(repeated, word_size, run * word_size).astype(np.int32)
    return repeated, run, data_at, end


@lru_cache(maxsize=4)
def _offset_pattern(size: int) -> np.ndarray:
    pattern = np.tile(np.arange(8, dtype=np.uint32), -(-size // 8))
    pattern.flags.writeable = False  # shared between calls and threads
    return pattern


def _bit_offsets(size: int) -> np.ndarray:
    """``arange(size) % 8`` as uint32, from a shared read-only pattern (a window needs at most
    ``_WINDOW_BITS + 48``)."""
    return _offset_pattern(max(size, _WINDOW_BITS + 64))[:size]


def _chain(nxt: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """The run headers from position 0 of a window of ``n`` bits, given each position's successor
    ``nxt`` (``> position``; ``>= n`` leaves the window): ``(headers inside, where the chain leaves)``.

    Pointer doubling: ``jump`` maps a position to its successor ``2**k`` runs on (positions past the
    window map to themselves), squared ``_COARSE_LEVELS`` times; the chain is then walked in steps of
    ``2**_COARSE_LEVELS`` runs and the headers in between are filled in from the kept levels.
    """
    leaving = nxt >= n
    exits = nxt[leaving]  # each leaving position gets its own slot, which maps to itself
    jump = np.empty(n + exits.size, dtype=np.int32)
    jump[:n] = nxt
    jump[n:] = np.arange(n, n + exits.size, dtype=np.int32)
    jump[:n][leaving] = jump[n:]
    levels = []
    for _ in range(_COARSE_LEVELS):
        levels.append(jump)
        jump = jump[jump]
    steps, node, coarse = memoryview(jump), 0, []
    while node < n:
        coarse.append(node)
        node = steps[node]
    path = np.asarray(coarse, dtype=np.int32)
    for level in reversed(levels):  # headers 2**k runs after each known one, interleaved in order
        path = np.stack([path, level[path]], axis=1).ravel()
    return path[: int(np.searchsorted(path, n))], int(exits[node - n])


def _words_nonzero(padded: np.ndarray, at: np.ndarray, word_size: int) -> np.ndarray:
    """Whether the ``word_size``-bit word at each bit position of ``at`` is non-zero (``(N,)`` bool)."""
    byte, shift = at >> 3, (at & 7).astype(np.uint64)
    span = np.zeros(at.size, dtype=np.uint64)
    for k in range(5):  # a word of up to 32 bits, starting anywhere in a byte, lies in 5 bytes
        span = (span << np.uint64(8)) | padded[byte + k].astype(np.uint64)
    return ((span >> (np.uint64(40 - word_size) - shift)) & np.uint64((1 << word_size) - 1)) != 0


def _fill_alpha(alpha, padded, repeated, first, stop, data_at, word_size: int) -> None:
    """Write runs ``[first, stop)`` (value indices, in order and contiguous) into the alpha mask: value
    ``4 * q + 3`` is pixel ``q``'s alpha, so a run holds pixels ``first // 4`` to ``stop // 4``."""
    pixels = stop // 4 - first // 4
    value = np.zeros(repeated.size, dtype=bool)
    value[repeated] = _words_nonzero(padded, data_at[repeated], word_size)
    alpha[first[0] // 4 : stop[-1] // 4] = np.repeat(value, pixels)
    literal = ~repeated & (pixels > 0)
    if not literal.any():
        return
    pixels, first, data_at = pixels[literal], first[literal], data_at[literal]
    offsets = np.cumsum(pixels) - pixels
    total = int(offsets[-1] + pixels[-1])
    for begin in range(0, total, _PIXEL_CHUNK):  # bounded memory for long literal runs
        k = np.arange(begin, min(begin + _PIXEL_CHUNK, total))
        r = np.searchsorted(offsets, k, side="right") - 1
        q = first[r] // 4 + (k - offsets[r])
        alpha[q] = _words_nonzero(padded, data_at[r] + (4 * q + 3 - first[r]) * word_size, word_size)


def encode_brush_rle(mask: np.ndarray) -> list[int]:
    """Encode an ``(H, W)`` mask as Label Studio brush RLE (RGBA bytes, 255 where the mask is set).

    Byte for byte what label-studio-sdk's ``converter.brush.encode_rle`` writes for the RGBA canvas (a
    test compares them), computed with numpy from the mask's runs instead of bit strings: a 4096x4096
    mask of fine detail takes milliseconds, not seconds.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty (H, W) array, got shape {mask.shape}")
    if mask.size * 4 > _MAX_VALUES:
        raise ValueError(f"a {mask.shape[1]}x{mask.shape[0]} mask is too large for brush RLE (32-bit count)")
    flat = (mask != 0).ravel()
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.concatenate((starts, [flat.size]))) * 4  # every pixel is 4 equal RGBA bytes
    values = np.where(flat[starts], 255, 0).astype(np.int64)
    return _encode_runs(values, lengths.astype(np.int64), total=flat.size * 4)


_RUN_FIELDS = np.array([3, 4, 8, 16])  # bits of a run's length - 1, by field index (the header says so)
_LONGEST_RUN = 1 << 16
_CODES_PER_CHUNK = 1 << 18


def _encode_runs(values: np.ndarray, lengths: np.ndarray, *, total: int) -> list[int]:
    """The bit stream of ``total`` 8-bit values given as runs: a 53-bit header (value count, word size
    8, run fields 3/4/8/16), then per run a code ``flag (1) | field index (2) | length - 1 | value (8)``
    (flag 1: a repeated value; flag 0 with field 0 and length 0: one literal value). Runs over 2**16
    go out as 2**16-long pieces and the rest, each with the 16-bit field, as the SDK writes them; the
    stream ends with 1 to 8 zero bits (a whole zero byte when it is already aligned), as the SDK's."""
    pieces = (lengths + _LONGEST_RUN - 1) // _LONGEST_RUN
    value = np.repeat(values, pieces)
    length = np.full(int(pieces.sum()), _LONGEST_RUN, dtype=np.int64)
    length[np.cumsum(pieces) - 1] = lengths - (pieces - 1) * _LONGEST_RUN
    run_length = np.repeat(lengths, pieces)  # the field follows the whole run's length
    index = np.searchsorted(np.array([8, 16, 256]), run_length, side="left")  # <=8, <=16, <=256, longer
    single = run_length == 1
    field = np.where(single, 3, _RUN_FIELDS[index])
    index = np.where(single, 0, index)
    count = np.where(single, 0, length - 1)
    flag = (~single).astype(np.int64)
    codes = (flag << (field + 10)) | (index << (field + 8)) | (count << 8) | value  # at most 27 bits
    codes = codes.astype(">u4")
    header = (total << 21) | (7 << 16) | (2 << 12) | (3 << 8) | (7 << 4) | 15  # 53 bits
    carry = np.unpackbits(np.frombuffer(header.to_bytes(7, "big"), np.uint8))[-53:]  # bits not yet packed
    packed = []
    columns = np.arange(32, dtype=np.int8)[None, :]
    for begin in range(0, codes.size, _CODES_PER_CHUNK):  # bounded temporaries on masks of many runs
        chunk = codes[begin : begin + _CODES_PER_CHUNK]
        # each code's 32 bits, most significant first; keep its last (field + 11)
        chunk_bits = np.unpackbits(chunk.view(np.uint8).reshape(-1, 4), axis=1)
        keep = columns >= (21 - field[begin : begin + _CODES_PER_CHUNK]).astype(np.int8)[:, None]
        bits = np.concatenate((carry, chunk_bits[keep]))
        whole = bits.size // 8 * 8
        packed.append(np.packbits(bits[:whole]))
        carry = bits[whole:]
    packed.append(np.packbits(np.concatenate((carry, np.zeros(8 - carry.size % 8, np.uint8)))))
    return np.concatenate(packed).tolist()
