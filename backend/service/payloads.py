"""Request bodies read with a nesting limit: JSON nested deeper than ``MAX_JSON_DEPTH`` is refused (400)
before the parser recurses into it (Python's parser raises RecursionError near 1000 levels; Label
Studio's payloads nest about 8 deep).

The depth is counted on the raw bytes: brackets inside strings are skipped (a quote preceded by an odd
number of backslashes is inside its string), so the count is exact for any well-formed JSON.
"""

from __future__ import annotations

import json

import numpy as np

from backend.errors import RequestError

MAX_JSON_DEPTH = 64


def json_depth(data: bytes) -> int:
    """How deeply the arrays and objects of the JSON text ``data`` nest (0 for a scalar)."""
    if data.count(b"[") + data.count(b"{") <= 1:  # no nesting to count: skip the scan
        return int(b"[" in data or b"{" in data)
    raw = np.frombuffer(data, dtype=np.uint8)
    quotes = np.flatnonzero(raw == ord('"'))
    if quotes.size:
        quotes = quotes[~_escaped(raw, quotes)]
    inside = np.zeros(raw.size + 1, dtype=np.int8)
    inside[quotes] = 1
    inside = np.bitwise_xor.accumulate(inside[:-1])  # 1 from an opening quote up to its closing one
    opening = ((raw == ord("[")) | (raw == ord("{"))) & (inside == 0)
    closing = ((raw == ord("]")) | (raw == ord("}"))) & (inside == 0)
    marks = np.flatnonzero(opening | closing)
    if marks.size == 0:
        return 0
    steps = np.where(opening[marks], 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def _escaped(raw: np.ndarray, quotes: np.ndarray) -> np.ndarray:
    """For each quote position, whether an odd number of backslashes comes right before it."""
    slashes = np.flatnonzero(raw == ord("\\"))
    if slashes.size == 0:
        return np.zeros(quotes.size, dtype=bool)
    breaks = np.flatnonzero(np.diff(slashes) != 1)
    starts = slashes[np.concatenate([[0], breaks + 1])]
    ends = slashes[np.concatenate([breaks, [slashes.size - 1]])]  # runs of backslashes [start, end]
    run = np.searchsorted(ends, quotes - 1)
    run = np.minimum(run, ends.size - 1)
    before = ends[run] == quotes - 1
    return before & ((ends[run] - starts[run] + 1) % 2 == 1)


def parse_json(data: bytes, *, max_depth: int = MAX_JSON_DEPTH):
    """``data`` parsed as JSON; RequestError (400) for text that is not JSON or nests deeper than
    ``max_depth``. ``NaN``/``Infinity`` and numbers beyond a float (``1e400``) parse as floats and are
    refused later by the field that carries them."""
    depth = json_depth(data)
    if depth > max_depth:
        raise RequestError(
            f"the request body nests JSON {depth} levels deep; at most {max_depth} are accepted "
            f"(Label Studio's payloads nest about 8)"
        )
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"the request body is not valid JSON: {str(error)[:120]}") from None
