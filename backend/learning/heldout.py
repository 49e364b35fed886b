"""The held-out split every training job gates its new version on.

Regions are split by task, so the regions of one task never straddle the split: a stable 1-in-5 hash of
the task id (of the annotation id when the task is unknown) is held out. A project so small that the hash
puts everything on one side holds out every fifth region instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def heldout(task_id: int | None, annotation_id: int) -> bool:
    """Stable 1-in-5 split by task (regions of one task never straddle the split)."""
    key = f"{task_id if task_id is not None else f'a{annotation_id}'}".encode()
    return hashlib.sha256(key).digest()[0] % 5 == 0


def heldout_flags(keys: Sequence[tuple[int | None, int]]) -> list[bool]:
    """One held-out flag per ``(task_id, annotation_id)``, in order: ``heldout`` of each, or every
    fifth (indices 0, 5, 10, ...) when that leaves either side empty."""
    flags = [heldout(task_id, annotation_id) for task_id, annotation_id in keys]
    if all(flags) or not any(flags):
        flags = [i % 5 == 0 for i in range(len(keys))]
    return flags
