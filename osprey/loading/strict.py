"""Strict loading of a released checkpoint layout onto a model built on the meta device.

Every tensor is accounted for: a model's ``map_name`` turns its released name into a parameter name
(None for a tensor the model never runs), and loading fails naming every tensor that is unexpected or
of the wrong shape and every parameter left without a tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

logger = logging.getLogger(__name__)


def load_strict(
    model: torch.nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    source: str,
    map_name: Callable[[str], str | None],
    architecture: str,
    scope: str = "",
    optional_prefix: str | None = None,
    only: set[str] | None = None,
) -> set[str]:
    """Assign released tensors onto ``model`` (built on the meta device); ``map_name`` turns a released
    name into ours (None: a tensor the model never runs), ``architecture`` names the model in errors.

    Only parameters whose names start with ``scope`` (and, with ``only``, are in it) are expected from
    this source. Raises ValueError naming every unexpected, mis-shaped or missing tensor; parameters under
    ``optional_prefix`` may stay missing (they are loaded from elsewhere). Floating-point tensors are cast
    to ``dtype``. Returns the names loaded.
    """
    expected = {
        name: tuple(t.shape)
        for name, t in model.state_dict().items()
        if name.startswith(scope) and (only is None or name in only)
    }
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    skipped = 0
    batch: dict[str, torch.Tensor] = {}
    for released, tensor in tensors:
        name = map_name(released)
        if name is None:
            skipped += 1
            continue
        if name not in expected:
            unexpected.append(released)
            continue
        if tuple(tensor.shape) != expected[name]:
            mismatched.append(f"{released}: checkpoint {tuple(tensor.shape)}, model {expected[name]}")
            continue
        batch[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        loaded.add(name)
        if len(batch) >= 64:
            model.load_state_dict(batch, strict=False, assign=True)
            batch = {}
    if batch:
        model.load_state_dict(batch, strict=False, assign=True)
    missing = sorted(
        n for n in expected if n not in loaded and not (optional_prefix and n.startswith(optional_prefix))
    )
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {name_list(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors of the wrong shape: {name_list(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} missing tensors: {name_list(missing)}")
    if problems:
        raise ValueError(f"{source} does not match the {architecture} architecture: " + "; ".join(problems))
    logger.info("loaded %d tensors from %s (%d known-unused skipped)", len(loaded), source, skipped)
    return loaded


def name_list(names: list[str], limit: int = 12) -> str:
    """The first ``limit`` of ``names``, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def map_by_prefix(name: str, key_map: Iterable[tuple[str, str]]) -> str:
    """``name`` with the first matching released prefix of ``key_map`` (released -> ours) replaced; the
    name unchanged when none matches (it is then reported as unexpected)."""
    for released, ours in key_map:
        if name.startswith(released):
            return ours + name[len(released) :]
    return name
