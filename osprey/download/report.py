"""What ``osprey-label download`` reports: its errors, the ``--check`` table, and file digests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


class DownloadError(RuntimeError):
    """A fetch failed; the message names the file and what to do."""


class NetworkUnavailableError(DownloadError):
    """The server could not be reached at all (offline machine, DNS, proxy, firewall)."""


class ChecksumError(DownloadError):
    """A downloaded file does not match its published checksum; it has been deleted."""


@dataclass(frozen=True)
class FileStatus:
    """One line of the ``--check`` table. ``status`` is ``ok``, ``missing`` or ``bad``."""

    file: str
    where: str
    size_bytes: int | None
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def format_table(rows: list[FileStatus]) -> str:
    """The ``--check`` table: file, where, size, status; then one line per problem."""
    header = ("file", "where", "size", "status")
    cells = [header] + [(r.file, r.where, human_size(r.size_bytes), r.status) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    lines = [
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}".rstrip()
        for row in cells
    ]
    lines += [f"{r.status}: {r.file}: {r.detail}" for r in rows if not r.ok and r.detail]
    return "\n".join(lines)


def human_size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "-"
    size = float(size_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def file_digests(path: Path) -> tuple[str, str]:
    """``(md5, sha256)`` hex digests of the file, read once."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def file_size(path: Path) -> int | None:
    """Size in bytes, None when the file cannot be read."""
    try:
        return path.stat().st_size
    except OSError:
        return None
