"""A thread-safe cache of per-image features, keyed by image content.

Used for SAM image embeddings and (later) Osprey's CLIP features: the expensive encoder runs
once per distinct image, whatever URL or request it came from.

- Memory: an LRU of at most ``max_items`` values.
- Concurrency: callers asking for the same key while it is being computed wait for that one
  computation (per-key in-flight dedupe); the computation runs outside the cache's lock, so other
  keys are served meanwhile. If the computation raises, every waiter gets the same exception and
  nothing is cached.
- Disk (optional): values are written with ``torch.save`` to ``disk_dir/<key>.pt`` (via a temp
  file and ``os.replace``, so readers never see half a file), the folder is kept under
  ``max_disk_bytes`` by deleting the least recently used files (oldest mtime; a disk hit refreshes
  the mtime), and a memory miss is served from disk before computing. Files are loaded with
  ``torch.load(weights_only=True, map_location=map_location)`` (``"cpu"`` unless told otherwise),
  so a value read back from disk lives on that device. A file that cannot be read is logged,
  deleted and recomputed.

Values must be what ``torch.save`` can write and ``weights_only`` loading can read back: tensors,
numbers, strings, tuples, lists, dicts of those, and dataclasses whose types are listed in
``value_types`` (they are added to torch's safe globals).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

__all__ = ["FeatureCache", "content_key"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_SUFFIX = ".pt"


def content_key(image: np.ndarray, *parts: str) -> str:
    """Hex sha256 of an image's content plus extra parts (model id, settings...).

    Args:
        image: HxWx3 uint8 RGB array (any memory layout; hashed as C-contiguous pixels).
        parts: strings that also distinguish the value, e.g. the model id and input size.

    The hash covers the dtype, the shape and the pixel bytes, so the same pixels give the same
    key whatever URL they came from, and a crop, a resize or another model gives another key.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}; "
            "convert with np.asarray(pil_image.convert('RGB'))"
        )
    digest = hashlib.sha256()
    digest.update(f"{image.dtype.str}|{image.shape}|".encode())
    digest.update(memoryview(np.ascontiguousarray(image)).cast("B"))
    for part in parts:
        encoded = str(part).encode()
        # Length-prefixed so ("ab", "c") and ("a", "bc") differ.
        digest.update(f"|{len(encoded)}:".encode() + encoded)
    return digest.hexdigest()


class _Pending:
    """One in-flight computation that other callers of the same key wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class FeatureCache(Generic[T]):
    """LRU cache of computed features with in-flight dedupe and optional disk persistence.

    Args:
        name: short name used in logs and stats (e.g. ``"sam-embeddings"``).
        max_items: how many values to keep in memory (>= 1).
        disk_dir: folder for persisted values, created if missing; ``None`` keeps memory only.
        max_disk_bytes: bound on the total size of ``*.pt`` files in ``disk_dir``.
        map_location: device that values read from disk are loaded onto (default ``"cpu"``).
        value_types: dataclass types stored as values, allowed when loading from disk.
    """

    def __init__(
        self,
        *,
        name: str,
        max_items: int,
        disk_dir: str | Path | None = None,
        max_disk_bytes: int = 2**30,
        map_location: str | torch.device = "cpu",
        value_types: Iterable[type] = (),
    ) -> None:
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be an int >= 1, got {max_items!r}")
        if max_disk_bytes < 0:
            raise ValueError(f"max_disk_bytes must be >= 0, got {max_disk_bytes}")
        self.name = name
        self.max_items = max_items
        self.max_disk_bytes = int(max_disk_bytes)
        self.map_location = map_location
        self.disk_dir = Path(disk_dir).expanduser() if disk_dir is not None else None
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        types = list(value_types)
        if types:
            torch.serialization.add_safe_globals(types)
        self._lock = threading.Lock()
        self._disk_lock = threading.Lock()
        self._items: OrderedDict[str, T] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._counters = dict.fromkeys(("hits", "misses", "disk_hits", "evictions", "waits"), 0)

    def get_or_compute(self, key: str, compute: Callable[[], T]) -> T:
        """Return the value cached under ``key``, computing it with ``compute()`` on a miss.

        Concurrent callers with the same key share one computation: the first runs ``compute``
        (outside the cache lock), the others wait and get its value, or its exception.
        """
        if not _KEY_PATTERN.match(key):
            raise ValueError(
                f"cache key must be 1-200 characters of [A-Za-z0-9_.-] (it names a file), got {key!r}; "
                "build keys with content_key()"
            )
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self._counters["hits"] += 1
                return self._items[key]
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
            else:
                self._counters["waits"] += 1
        assert pending is not None
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.value

        try:
            value, from_disk = self._load_or_compute(key, compute)
        except BaseException as error:
            pending.error = error
            with self._lock:
                del self._pending[key]
            pending.done.set()
            raise
        pending.value = value
        with self._lock:
            self._store_locked(key, value)
            del self._pending[key]
        pending.done.set()
        if not from_disk:
            self._save(key, value)
        return value

    def peek(self, key: str) -> T | None:
        """The value under ``key`` from memory or disk, without computing; None when neither holds it.
        With :meth:`put`, callers compute misses together (a batch) instead of one ``compute`` each."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self._counters["hits"] += 1
                return self._items[key]
        loaded = self._load(key)
        if loaded is None:
            return None
        with self._lock:
            self._counters["disk_hits"] += 1
        self._remember(key, loaded)
        return loaded

    def put(self, key: str, value: T) -> None:
        """Store a value computed by the caller after a :meth:`peek` miss (memory, then disk)."""
        if not _KEY_PATTERN.match(key):
            raise ValueError(f"cache key must be 1-200 characters of [A-Za-z0-9_.-], got {key!r}")
        with self._lock:
            self._counters["misses"] += 1
        self._remember(key, value)
        self._save(key, value)

    def _remember(self, key: str, value: T) -> None:
        with self._lock:
            self._store_locked(key, value)

    def _store_locked(self, key: str, value: T) -> None:
        """Keep ``value`` as the newest item, evicting the oldest beyond ``max_items`` (hold the lock)."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
            self._counters["evictions"] += 1

    def stats(self) -> dict[str, Any]:
        """Counters and sizes: hits, misses, disk_hits, evictions, waits, items, disk_bytes.

        ``hits`` counts memory hits, ``waits`` callers that joined an in-flight computation,
        ``misses`` calls that ran ``compute``, ``disk_hits`` memory misses served from disk.
        """
        with self._lock:
            stats: dict[str, Any] = dict(self._counters)
            stats["items"] = len(self._items)
        stats["disk_bytes"] = sum(size for _, _, size in self._disk_files())
        stats["name"] = self.name
        stats["max_items"] = self.max_items
        return stats

    def clear(self) -> None:
        """Drop every value (memory and disk) and reset the counters, like ``lru_cache.cache_clear``.

        Computations in flight finish and are stored as usual.
        """
        with self._lock:
            self._items.clear()
            for counter in self._counters:
                self._counters[counter] = 0
        with self._disk_lock:
            for path, _, _ in self._disk_files():
                path.unlink(missing_ok=True)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    # Disk persistence ------------------------------------------------------------------------

    def _load_or_compute(self, key: str, compute: Callable[[], T]) -> tuple[T, bool]:
        loaded = self._load(key)
        if loaded is not None:
            with self._lock:
                self._counters["disk_hits"] += 1
            return loaded, True
        with self._lock:
            self._counters["misses"] += 1
        return compute(), False

    def _path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{key}{_SUFFIX}"

    def _load(self, key: str) -> T | None:
        if self.disk_dir is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            value = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as error:  # a truncated, foreign or unreadable file: recompute instead
            logger.warning("cache %s: deleting unreadable file %s (%s)", self.name, path.name, error)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # mtime is the LRU clock of the disk tier
        except OSError:
            pass
        return value

    def _save(self, key: str, value: T) -> None:
        if self.disk_dir is None or self.max_disk_bytes == 0:
            return
        path = self._path(key)
        tmp_name = None
        try:
            with tempfile.NamedTemporaryFile(
                dir=self.disk_dir, prefix=f".{key}.", suffix=".tmp", delete=False
            ) as f:
                tmp_name = f.name
                torch.save(value, f)
            os.replace(tmp_name, path)
            tmp_name = None
        except Exception as error:  # disk full, read-only folder...: the cache still works in memory
            logger.warning("cache %s: could not persist %s (%s)", self.name, path.name, error)
            return
        finally:
            if tmp_name is not None:
                Path(tmp_name).unlink(missing_ok=True)
        self._enforce_disk_bound()

    def _disk_files(self) -> list[tuple[Path, float, int]]:
        """(path, mtime, size) of the persisted values, oldest first."""
        if self.disk_dir is None:
            return []
        files = []
        for path in self.disk_dir.glob(f"*{_SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            files.append((path, st.st_mtime, st.st_size))
        files.sort(key=lambda item: (item[1], item[0].name))
        return files

    def _enforce_disk_bound(self) -> None:
        with self._disk_lock:
            files = self._disk_files()
            total = sum(size for _, _, size in files)
            for path, _, size in files:
                if total <= self.max_disk_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
                logger.debug("cache %s: evicted %s from disk", self.name, path.name)
