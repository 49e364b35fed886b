"""The disk tier of the feature cache: one file per key, checked on every read, bounded in bytes.

- **Format.** ``<folder>/<key>.pt`` holds one header line, ``osprey-feature-cache/1 sha256:<hex>\\n``,
  then ``torch.save``'s bytes of the value. The digest covers the key and those bytes, so a file
  whose content changed after it was written (a flipped bit, a torn write after a power loss, a file
  copied under another key) is caught on read, however well ``torch.load`` would still read it. A
  file that fails the check, has no header (written before checksums existed: such files are
  treated as unreadable) or cannot be loaded is logged, deleted and its value recomputed. Values are
  loaded with ``torch.load(weights_only=True, map_location=...)``.
- **Writes.** A writer serialises the value, makes room for it (below), writes it into
  ``.<key>.<pid>.<random>.tmp`` while holding an exclusive ``flock`` on that file, and renames it into
  place, so readers never see half a file. A writer killed mid-write (kill -9, out of memory) leaves a
  temporary file nobody holds: opening the tier removes those, logging each, and keeps the ones whose
  writer is alive (their lock is held, in this process or another). Temporary files are never counted.
- **Budget.** The ``*.pt`` files never add up to more than ``max_bytes``: opening the tier counts what
  is really in the folder and evicts down to the budget; every write first evicts the least recently
  used files (oldest mtime; a read refreshes it) until the new file fits, and a value larger than the
  whole budget is not written. Eviction and writing happen under an exclusive ``flock`` on
  ``<folder>/.lock``, so several processes sharing the folder keep one bound.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import io
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["SUFFIX", "DiskTier", "read_file"]

logger = logging.getLogger(__name__)

SUFFIX = ".pt"
_MAGIC = b"osprey-feature-cache/1 sha256:"
_HEADER_BYTES = len(_MAGIC) + 64 + 1  # the magic, the hex digest, "\n"
_TMP_RE = re.compile(r"^\.[A-Za-z0-9_.-]{1,250}\.tmp$")  # what writers write into (and older versions did)
_LOCK_NAME = ".lock"
LOCK_TIMEOUT_S = 30.0  # how long a write waits for another process's write before giving up on persisting


def _digest(key: str, payload: bytes | memoryview) -> bytes:
    digest = hashlib.sha256(key.encode() + b"\n")
    digest.update(payload)
    return digest.hexdigest().encode()


def _header(key: str, payload: bytes | memoryview) -> bytes:
    return _MAGIC + _digest(key, payload) + b"\n"


def _problem(key: str, header: bytes, payload: bytes) -> str | None:
    """Why a file read as ``header`` + ``payload`` is not ``key``'s value, or None when it is."""
    if len(header) != _HEADER_BYTES or not header.startswith(_MAGIC) or not header.endswith(b"\n"):
        return "no checksum header (written by an older version, or not a cache file)"
    if not hmac.compare_digest(header[len(_MAGIC) : -1], _digest(key, payload)):
        return "checksum mismatch: its content changed after it was written"
    return None


def _read(handle, key: str, map_location: str | torch.device) -> Any:
    """The value in the open cache file ``handle`` of ``key``; ValueError saying why when it fails its
    check (other errors of reading or unpickling propagate)."""
    header = handle.read(_HEADER_BYTES)
    payload = handle.read()
    problem = _problem(key, header, payload)
    if problem is not None:
        raise ValueError(problem)
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def read_file(path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """The value in the cache file ``path`` (``<key>.pt``), checked as a read through the cache checks
    it: ValueError when its checksum does not match, for inspecting a cache folder by hand."""
    path = Path(path)
    with open(path, "rb") as handle:
        return _read(handle, path.name.removesuffix(SUFFIX), map_location)


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st, held = path.stat(), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


class DiskTier:
    """Checked, budgeted files of slim values in ``folder`` (see the module docstring).

    Args:
        folder: created if missing; leftovers of killed writers are removed and the folder is brought
            under ``max_bytes`` on creation.
        max_bytes: bound on the total size of the value files (0: nothing is written).
        name: the cache's name in log lines.
        map_location: the device values are loaded onto.
    """

    def __init__(
        self, *, folder: str | Path, max_bytes: int, name: str, map_location: str | torch.device = "cpu"
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.folder = Path(folder).expanduser()
        self.max_bytes = int(max_bytes)
        self.name = name
        self.map_location = map_location
        self._lock = threading.Lock()  # one writer of this tier at a time; the flock covers other processes
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.remove_dead_writes()
            self._evict_at_open()
        except OSError as error:  # a read-only folder still serves what it holds
            logger.warning("cache %s: cannot tidy %s at start: %s", self.name, self.folder, error)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    # ---- reading ----
    def load(self, key: str) -> Any | None:
        """The value stored under ``key``, or None (no file, or a file that failed the check or the load,
        which is then deleted)."""
        path = self.path(key)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning("cache %s: cannot open %s (%s)", self.name, path.name, error)
            return None
        with handle:
            try:
                value = _read(handle, key, self.map_location)
            except Exception as error:  # a foreign or damaged file, or one that fails to read: recompute
                self._discard(path, handle.fileno(), str(error) or type(error).__name__)
                return None
        try:
            os.utime(path)  # mtime is the LRU clock
        except OSError:
            pass
        return value

    def _discard(self, path: Path, fd: int, problem: str) -> None:
        logger.warning(
            "cache %s: deleting unreadable file %s (%s); recomputing it", self.name, path.name, problem
        )
        if _same_file(path, fd):  # not a good file another process renamed there meanwhile
            path.unlink(missing_ok=True)

    # ---- writing ----
    def save(self, key: str, value: Any) -> None:
        """Write ``value`` (already slimmed) under ``key``, evicting the least recently used files first so
        the folder stays within ``max_bytes``; errors (disk full, a read-only folder) are logged and the
        cache goes on in memory."""
        path = self.path(key)
        try:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            payload = buffer.getbuffer()
            header = _header(key, payload)
            size = len(header) + len(payload)
            if size > self.max_bytes:
                logger.debug("cache %s: %s (%d bytes) is over the disk budget alone", self.name, key, size)
                return
            with self._lock, self._locked_folder(LOCK_TIMEOUT_S) as locked:
                if not locked:
                    logger.warning(
                        "cache %s: not persisting %s: another process has held %s for %.0f s",
                        self.name, path.name, self.folder / _LOCK_NAME, LOCK_TIMEOUT_S,
                    )  # fmt: skip
                    return
                self._evict(room_for=size)
                self._write(path, header, payload)
        except Exception as error:  # the cache still works in memory
            logger.warning("cache %s: could not persist %s (%s)", self.name, path.name, error)

    def _write(self, path: Path, header: bytes, payload: memoryview) -> None:
        for _ in range(3):
            tmp = self.folder / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # says "alive" to a cache opening meanwhile
                if not _same_file(tmp, fd):
                    continue  # taken for a leftover between its creation and the lock: take another name
                try:
                    with os.fdopen(fd, "wb", closefd=False) as handle:
                        handle.write(header)
                        handle.write(payload)
                    os.replace(tmp, path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                return
            finally:
                os.close(fd)  # releases the lock, which followed the file through the rename
        raise RuntimeError(f"{self.folder}: every temporary file was removed before it could be locked")

    # ---- the budget ----
    def files(self) -> list[tuple[Path, float, int]]:
        """``(path, mtime, size)`` of the value files, oldest first (temporary files are not counted)."""
        files = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            files.append((path, st.st_mtime, st.st_size))
        files.sort(key=lambda item: (item[1], item[0].name))
        return files

    def _evict(self, *, room_for: int = 0) -> tuple[int, int]:
        """Delete the oldest files until they and ``room_for`` more bytes fit; returns (files, bytes)."""
        files = self.files()
        total = sum(size for _, _, size in files)
        evicted = freed = 0
        for path, _, size in files:
            if total + room_for <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            evicted, freed = evicted + 1, freed + size
            logger.debug("cache %s: evicted %s from disk", self.name, path.name)
        return evicted, freed

    def _evict_at_open(self) -> None:
        with self._lock, self._locked_folder(0.0) as locked:
            if not locked:
                return  # another process is writing: its write evicts down to the budget first
            evicted, freed = self._evict()
        if evicted:
            logger.info(
                "cache %s: %s held more than its budget of %d bytes: evicted the %d oldest files (%d bytes)",
                self.name, self.folder, self.max_bytes, evicted, freed,
            )  # fmt: skip

    @contextmanager
    def _locked_folder(self, timeout_s: float) -> Iterator[bool]:
        """Holds the folder's flock (True), or yields False after ``timeout_s`` of another holding it."""
        fd = os.open(self.folder / _LOCK_NAME, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            deadline, pause = time.monotonic() + timeout_s, 0.002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
            yield True
        finally:
            os.close(fd)

    # ---- leftovers ----
    def remove_dead_writes(self) -> list[Path]:
        """Remove the temporary files of writers that died mid-write (nobody holds their lock); returns
        them, each logged. A live writer's file, in this process or another, is kept."""
        removed = []
        for path in sorted(self.folder.iterdir()):
            if not _TMP_RE.match(path.name):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # its writer finished meanwhile
            except OSError as error:
                if error.errno != errno.ELOOP:  # a symlink is not ours: left alone
                    logger.warning("cache %s: cannot check the leftover %s: %s", self.name, path, error)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live writer holds it
            try:
                if _same_file(path, fd) and os.path.isfile(path):
                    path.unlink()
                    removed.append(path)
                    logger.warning(
                        "cache %s: removed %s, left by a writer that did not finish", self.name, path
                    )
            except OSError as error:
                logger.warning("cache %s: cannot remove the leftover %s: %s", self.name, path, error)
            finally:
                os.close(fd)
        return removed

    def clear(self) -> None:
        """Delete every value file."""
        with self._lock, self._locked_folder(LOCK_TIMEOUT_S):
            for path, _, _ in self.files():
                path.unlink(missing_ok=True)
