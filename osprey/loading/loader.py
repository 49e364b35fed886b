"""A region model from a preset or a released checkpoint, the same way for every architecture.

Each model describes itself once as a :class:`ModelLoader` (its presets, how it builds random weights,
how it reads its checkpoint); :meth:`ModelLoader.load` does the rest. :func:`build_and_load` is the part
of reading a checkpoint every model shares: build on the meta device, then load strictly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import read_weights
from .strict import load_strict


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def choose_device(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)``: CUDA when available, else the CPU; bfloat16 on CUDA, float32 on the CPU."""
    device = torch.device(device) if device is not None else default_device()
    return device, dtype or default_dtype(device)


def build_and_load(
    build: Callable[[], torch.nn.Module],
    files: Iterable[Path],
    *,
    device: torch.device,
    dtype: torch.dtype,
    source: str,
    map_name: Callable[[str], str | None],
    architecture: str,
    optional_prefix: str | None = None,
) -> tuple[torch.nn.Module, set[str]]:
    """``build()`` on the meta device, then every tensor of ``files`` loaded strictly onto it (see
    :func:`~osprey.loading.strict.load_strict`). Returns the model and the names loaded."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build()
    loaded = load_strict(
        model, read_weights(files), device=device, dtype=dtype, source=source, map_name=map_name,
        architecture=architecture, optional_prefix=optional_prefix,
    )  # fmt: skip
    return model, loaded


@dataclass(frozen=True)
class ModelLoader:
    """How one architecture is loaded. ``build_random(config, device=, dtype=, seed=)`` gives
    ``(model, tokenizer)`` with seeded random weights; ``load_checkpoint(name_or_path, device=, dtype=)``
    gives ``(model, tokenizer, config)`` from a released checkpoint (a directory or a cached release).
    Configs are frozen dataclasses with ``untrained`` and ``name`` fields."""

    architecture: str
    preset_names: Callable[[], list[str]]
    load_preset: Callable[[str], Any]
    build_random: Callable[..., tuple[torch.nn.Module, Any]]
    load_checkpoint: Callable[..., tuple[torch.nn.Module, Any, Any]]

    def load(
        self,
        name_or_path: str,
        *,
        device: torch.device,
        dtype: torch.dtype,
        random_weights: bool = False,
        seed: int = 0,
    ) -> tuple[torch.nn.Module, Any, Any]:
        """Preset or checkpoint -> ``(model, tokenizer, config)``, in eval mode on ``device``.

        A preset marked ``untrained`` (or any preset with ``random_weights``) is built with random weights
        seeded by ``seed``, and its config says ``untrained``; another preset is its released checkpoint.
        """
        presets = self.preset_names()
        if name_or_path in presets:
            config = self.load_preset(name_or_path)
            if config.untrained or random_weights:
                model, tokenizer = self.build_random(config, device=device, dtype=dtype, seed=seed)
                return model, tokenizer, dataclasses.replace(config, untrained=True)
        elif random_weights:
            raise ValueError(f"random_weights needs a preset ({', '.join(presets)}), got {name_or_path!r}")
        return self.load_checkpoint(name_or_path, device=device, dtype=dtype)
