"""Fetching the released weights where a network exists, and checking what is on disk.

This is the library behind ``osprey-label download``. Every file goes where the loaders look:

- **Osprey** and its ConvNeXt CLIP tower come from the Hugging Face Hub into the Hugging Face cache or
  a plain folder (:mod:`osprey.download.hub`).
- **SAM** checkpoints come from Meta's public download site into the models folder (``MODEL_DIR``),
  resumed when cut off and verified against the published checksums (:mod:`osprey.download.sam`; the
  one table of published SAM files, :data:`SAM_CHECKPOINTS`, is :mod:`osprey.sam.checkpoints`).
- What the command prints: errors, the ``--check`` table (:mod:`osprey.download.report`).

Importing this package is cheap: torch, ``osprey.model.checkpoint`` and ``huggingface_hub`` are imported
only by the functions that need them. May import ``osprey.model`` (checkpoint names and resolution),
``osprey.sam.checkpoints`` (pure data) and ``huggingface_hub``; never ``backend``. The
``osprey-label download`` command is :mod:`osprey.download.cli`.
"""

from __future__ import annotations

from pathlib import Path

from osprey.sam.checkpoints import DEFAULT_SAM_BASE_URL, SAM_CHECKPOINTS, SamCheckpoint

from .hub import (
    CONFIG_AND_TOKENIZER_PATTERNS,
    TOKENIZER_FILES,
    SnapshotDownload,
    check_osprey,
    checkpoint_tensor_names,
    fetch_osprey,
    osprey_offline_help,
)
from .report import (
    ChecksumError,
    DownloadError,
    FileStatus,
    NetworkUnavailableError,
    format_table,
    human_size,
)
from .sam import (
    check_sam,
    fetch_sam,
    sam_checkpoint,
    sam_offline_help,
    verify_sam_file,
)

__all__ = [
    "CONFIG_AND_TOKENIZER_PATTERNS",
    "DEFAULT_SAM_BASE_URL",
    "SAM_CHECKPOINTS",
    "TOKENIZER_FILES",
    "ChecksumError",
    "DownloadError",
    "FileStatus",
    "NetworkUnavailableError",
    "SamCheckpoint",
    "SnapshotDownload",
    "check_osprey",
    "check_sam",
    "checkpoint_tensor_names",
    "fetch_osprey",
    "fetch_sam",
    "format_table",
    "human_size",
    "offline_help",
    "osprey_offline_help",
    "sam_checkpoint",
    "sam_offline_help",
    "verify_sam_file",
]


def offline_help(*, model: str | None, sam: str | None, sam_dir: Path, osprey_dir: Path | None = None) -> str:
    """How to bring the weights in by hand, for a machine that cannot fetch them."""
    lines = ["To install the weights by hand, fetch them where a network exists and copy them here:"]
    if model:
        lines.append(osprey_offline_help(model, osprey_dir))
    if sam:
        lines.append(sam_offline_help(sam, sam_dir))
    lines.append("  Then `osprey-label download --check` verifies what is there.")
    return "\n".join(lines)
