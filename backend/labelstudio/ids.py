"""Label Studio's object ids as the backend keys them, and the checks that keep malformed ones out.

Label Studio's ids (projects, tasks, annotations, users) are positive integers in a 64-bit signed
database column; the backend stores them in SQLite INTEGER columns of the same range. An id that is a
bool, a float (``1e400`` arrives as infinity), a list or out of that range is refused with a message
naming the field.
"""

from __future__ import annotations

import re

from backend.errors import RequestError

MAX_ID = 2**63 - 1  # SQLite INTEGER and Label Studio's bigint columns
_PROJECT_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def project_key(project) -> str:
    """Label Studio project reference (``12``, ``"12"``, ``"12.1699999999"``) as the store's key ``"12"``."""
    if isinstance(project, bool) or project is None:
        raise ValueError(f"expected a Label Studio project id (int or str), got {project!r}")
    text = str(project).strip().split(".", 1)[0]
    if not text:
        raise ValueError(f"expected a non-empty Label Studio project id, got {project!r}")
    return text


def label_studio_id(value, where: str, *, error: type[ValueError] = RequestError) -> int:
    """``value`` as an integer id in ``0..MAX_ID`` (digit strings accepted); ``error`` naming ``where``
    (e.g. ``"'tasks[1].id'"``) for anything else."""
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 19:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{where} must be an integer id, got {type(value).__name__} {_shown(value)}")
    if not 0 <= value <= MAX_ID:
        raise error(f"{where} must be an integer id between 0 and 2**63 - 1, got {_shown(value)}")
    return value


def request_project(value, where: str = "'project'") -> str | None:
    """A request's project reference (``7``, ``"7"``, ``"7.1731000000"`` as Label Studio sends it) as the
    project's key ``"7"``, or None when absent; RequestError naming ``where`` for lists, floats, bools or
    odd characters. The HTTP layer normalises here, once: everything below sees ``"7"``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(
            f"{where} must be a Label Studio project id (int or str), got {type(value).__name__} {_shown(value)}"
        )
    if isinstance(value, int):
        label_studio_id(value, where)
    key = str(value).strip().split(".", 1)[0]  # the same rule as project_key, which refuses less politely
    if not _PROJECT_KEY.fullmatch(key):
        raise RequestError(
            f'{where} must be a Label Studio project id such as 7 or "7.1731000000", got {_shown(value)}'
        )
    return key


def bad_task_ids(tasks: list) -> dict[int, str]:
    """``{index: reason}`` for the tasks of a ``/predict`` batch whose ``id`` is present but not a valid
    Label Studio id (``None`` and a missing id are allowed: such tasks are predicted, not recorded)."""
    bad = {}
    for index, task in enumerate(tasks):
        if isinstance(task, dict) and task.get("id") is not None:
            try:
                label_studio_id(task["id"], f"'tasks[{index}].id'")
            except RequestError as error:
                bad[index] = str(error)
    return bad


def _shown(value) -> str:
    """A short, log-safe rendering of a bad value (never the whole payload)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
