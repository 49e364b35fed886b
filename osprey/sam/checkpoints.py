"""The one table of the SAM checkpoints Meta publishes: file names, checksums, sizes and where they are.

Pure data (no torch, no segment-anything), so the download command and ``--check`` read it without
loading a model library: :mod:`osprey.sam.build` takes each architecture's file name from here, and
:mod:`osprey.download.sam` fetches and verifies the files it lists.

A published name is ``sam_<type>_<md5 prefix>.pth``: its hex suffix is the start of the file's
**MD5** (``sam_vit_h_4b8939.pth`` has MD5 ``4b8939a8...``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_SAM_BASE_URL", "SAM_CHECKPOINTS", "SamCheckpoint"]

DEFAULT_SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM_NAME = re.compile(r"sam_\w+_([0-9a-f]{6})\.pth")


@dataclass(frozen=True)
class SamCheckpoint:
    """A published SAM checkpoint: its file name (``sam_<type>_<md5 prefix>.pth``), full sha256 and size."""

    name: str
    sha256: str | None = None
    size_text: str = ""

    def __post_init__(self) -> None:
        if _SAM_NAME.fullmatch(self.name) is None:
            raise ValueError(f"SAM checkpoint names end in _<6 hex digits>.pth, got {self.name!r}")
        if self.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", self.sha256) is None:
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")

    @property
    def md5_prefix(self) -> str:
        """The hex suffix of the published name: the first six hex digits of the file's MD5."""
        return _SAM_NAME.fullmatch(self.name).group(1)


# The files Meta publishes, by model type, with their sha256 (the same digests are quoted by many
# projects that pin them).
SAM_CHECKPOINTS: dict[str, SamCheckpoint] = {
    "vit_h": SamCheckpoint(
        "sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        size_text="2.4 GB",
    ),
    "vit_l": SamCheckpoint(
        "sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        size_text="1.2 GB",
    ),
    "vit_b": SamCheckpoint(
        "sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size_text="358 MB",
    ),
}
