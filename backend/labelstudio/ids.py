"""Label Studio's object ids as the backend keys them."""

from __future__ import annotations


def project_key(project) -> str:
    """Label Studio project reference (``12``, ``"12"``, ``"12.1699999999"``) as the store's key ``"12"``."""
    if isinstance(project, bool) or project is None:
        raise ValueError(f"expected a Label Studio project id (int or str), got {project!r}")
    text = str(project).strip().split(".", 1)[0]
    if not text:
        raise ValueError(f"expected a non-empty Label Studio project id, got {project!r}")
    return text
