"""SAM checkpoints: fetching from Meta's download site, and verifying what is on disk.

The table of published files (:data:`~osprey.sam.checkpoints.SAM_CHECKPOINTS`) lives in
:mod:`osprey.sam.checkpoints`, pure data that imports no torch, so this module costs nothing heavy
either.

A file is streamed to ``<name>.part`` (resumed with an HTTP range when a previous run was cut off)
and renamed only once complete and verified: it must match its published sha256 and the hex suffix
of its published name, which is the start of the file's **MD5** (``sam_vit_h_4b8939.pth`` has MD5
``4b8939a8...``); a file that does not is deleted and the fetch fails.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from osprey.sam.checkpoints import DEFAULT_SAM_BASE_URL, SAM_CHECKPOINTS, SamCheckpoint

from .report import (
    ChecksumError,
    DownloadError,
    FileStatus,
    NetworkUnavailableError,
    file_digests,
    file_size,
)

__all__ = [
    "DEFAULT_SAM_BASE_URL",
    "SAM_CHECKPOINTS",
    "SamCheckpoint",
    "check_sam",
    "fetch_sam",
    "sam_checkpoint",
    "sam_offline_help",
    "verify_sam_file",
]

logger = logging.getLogger(__name__)


def sam_checkpoint(
    model_type: str, checkpoints: Mapping[str, SamCheckpoint] = SAM_CHECKPOINTS
) -> SamCheckpoint:
    """The published checkpoint of ``model_type`` (``vit_h``, ``vit_l``, ``vit_b``)."""
    try:
        return checkpoints[model_type]
    except KeyError:
        raise ValueError(
            f"SAM model {model_type!r} has no published checkpoint; expected one of {', '.join(checkpoints)}"
        ) from None


def fetch_sam(
    model_type: str,
    directory: Path,
    *,
    base_url: str = DEFAULT_SAM_BASE_URL,
    force: bool = False,
    checkpoints: Mapping[str, SamCheckpoint] = SAM_CHECKPOINTS,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> tuple[Path, bool]:
    """Fetch ``directory/<published name>``; return ``(path, fetched_now)``.

    An existing file that verifies is kept (``fetched_now`` False) unless ``force``. The file is
    streamed to ``<name>.part`` (a previous partial file is resumed with an HTTP range request when
    the server supports it), verified, then renamed into place, so the final name only ever holds a
    complete, verified file.

    Raises:
        ValueError: unknown ``model_type``.
        NetworkUnavailableError: the server cannot be reached.
        ChecksumError: the fetched file does not match (it is deleted).
        DownloadError: an HTTP error, or a transfer cut off (the partial file is kept for resuming).
    """
    checkpoint = sam_checkpoint(model_type, checkpoints)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint.name
    part = path.with_name(path.name + ".part")
    if path.is_file() and not force:
        problem = verify_sam_file(path, checkpoint)
        if problem is None:
            logger.info("%s is present and verified; kept", path)
            return path, False
        logger.warning("%s; fetching it again", problem)
    if force:
        part.unlink(missing_ok=True)
    url = base_url.rstrip("/") + "/" + checkpoint.name
    _stream(url, part, timeout_s=timeout_s, progress=progress, label=checkpoint.name)
    problem = verify_sam_file(part, checkpoint)
    if problem is not None:
        part.unlink()
        raise ChecksumError(
            f"{problem}: the download from {url} is corrupt or not the published file, so it was deleted; "
            "run the command again, or fetch the file another way and check it with `osprey-label download --check`"
        )
    os.replace(part, path)
    logger.info("fetched and verified %s", path)
    return path, True


def verify_sam_file(path: Path, checkpoint: SamCheckpoint) -> str | None:
    """None when ``path`` is the published ``checkpoint``, else what is wrong (reads the whole file)."""
    md5, sha256 = file_digests(path)
    if not md5.startswith(checkpoint.md5_prefix):
        return (
            f"{path} has MD5 {md5[:12]}..., but the published {checkpoint.name} has an MD5 "
            f"beginning {checkpoint.md5_prefix}"
        )
    if checkpoint.sha256 is not None and sha256 != checkpoint.sha256:
        return f"{path} has sha256 {sha256}, but the published {checkpoint.name} has {checkpoint.sha256}"
    return None


def check_sam(
    model_type: str, directory: Path, *, checkpoints: Mapping[str, SamCheckpoint] = SAM_CHECKPOINTS
) -> list[FileStatus]:
    """One row for the SAM checkpoint ``serve`` loads from ``directory``: ok, missing or bad."""
    checkpoint = sam_checkpoint(model_type, checkpoints)
    path = directory / checkpoint.name
    label = f"SAM {model_type} {checkpoint.name}"
    if not path.is_file():
        return [
            FileStatus(
                label,
                str(directory),
                None,
                "missing",
                f"run `osprey-label download --sam {model_type}`, or copy {checkpoint.name} "
                f"({checkpoint.size_text}) into {directory}",
            )
        ]
    problem = verify_sam_file(path, checkpoint)
    if problem is not None:
        return [
            FileStatus(
                label, str(directory), file_size(path), "bad", problem + "; delete it and download again"
            )
        ]
    return [FileStatus(label, str(directory), file_size(path), "ok", "checksums match the published file")]


def _stream(url: str, part: Path, *, timeout_s: float, progress: bool, label: str) -> None:
    from tqdm import tqdm

    start = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "osprey-label"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as error:
        total = _range_total(error.headers.get("Content-Range"))
        error.close()
        if error.code == 416 and start:
            if total == start:  # the previous run got every byte; only the check is left
                return
            part.unlink()
            return _stream(url, part, timeout_s=timeout_s, progress=progress, label=label)
        raise DownloadError(f"{url} answered HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise NetworkUnavailableError(f"cannot reach {url} ({reason}); this machine looks offline") from None
    with response:
        resumed = response.status == 206 and (response.headers.get("Content-Range") or "").startswith(
            f"bytes {start}-"
        )
        offset = start if resumed else 0
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        if start and not resumed:
            logger.info("the server does not resume; fetching %s from the start", label)
        received = offset
        with (
            part.open("ab" if resumed else "wb") as out,
            tqdm(
                total=expected,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                disable=not progress,
            ) as bar,
        ):
            try:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                raise DownloadError(
                    f"the transfer of {url} stopped after {received} bytes ({type(error).__name__}); "
                    f"{part} is kept: run the command again to resume"
                ) from None
    if expected is not None and received != expected:
        raise DownloadError(
            f"the transfer of {url} stopped after {received} of {expected} bytes; "
            f"{part} is kept: run the command again to resume"
        )


def _range_total(content_range: str | None) -> int | None:
    match = re.fullmatch(r"bytes \*/(\d+)", (content_range or "").strip())
    return int(match.group(1)) if match else None


def sam_offline_help(model_type: str, directory: Path) -> str:
    """How to bring the checkpoint of ``model_type`` into ``directory`` by hand (one line)."""
    checkpoint = sam_checkpoint(model_type)
    return (
        f"  SAM {model_type}: copy {checkpoint.name} ({checkpoint.size_text}, "
        f"{DEFAULT_SAM_BASE_URL}{checkpoint.name}) into {directory} (MODEL_DIR), or point SAM_CHECKPOINT at it."
    )
