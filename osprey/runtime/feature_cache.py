"""A thread-safe cache of per-image features, keyed by image content.

Used for SAM image embeddings and Osprey's image encodings: the expensive encoder runs once per
distinct image, whatever URL or request it came from.

- Tiers, each bounded in bytes: the device (whole values where they were computed), host RAM (what
  the device tier evicts, slimmed) and disk (the slim value of everything computed); see
  :class:`FeatureCache`.
- Concurrency: callers asking for the same key while it is being computed wait for that one
  computation (per-key in-flight dedupe); the computation runs outside the cache's lock, so other
  keys are served meanwhile. If the computation raises, every waiter gets the same exception and
  nothing is cached.
- Disk (optional, :mod:`osprey.runtime.disk_tier`): slim values go to ``disk_dir/<key>.pt`` behind a
  sha256 checksum of their content, checked on every read; each is written to a temp file and
  renamed, so readers never see half a file. The folder is kept under ``max_disk_bytes`` by deleting
  the least recently used files (oldest mtime; a disk hit refreshes the mtime); opening the cache
  counts what is really there, evicts down to the budget and removes the temp files of writers killed
  mid-write. A miss in memory is served from disk before computing. Files are loaded with
  ``torch.load(weights_only=True, map_location=map_location)`` (``"cpu"`` unless told otherwise),
  so a value read back from disk lives on that device. A file that fails its checksum or cannot be
  read is logged, deleted and recomputed; files written before checksums existed (no checksum line)
  are treated as unreadable, so they are recomputed once.

Values must be what ``torch.save`` can write and ``weights_only`` loading can read back: tensors,
numbers, strings, tuples, lists, dicts of those, and dataclasses whose types are listed in
``value_types`` (they are added to torch's safe globals).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from .disk_tier import DiskTier
from .steps import waiting

__all__ = ["FeatureCache", "content_key", "nbytes", "to_device"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


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


def _check_key(key: str) -> None:
    if not _KEY_PATTERN.match(key):
        raise ValueError(
            f"cache key must be 1-200 characters of [A-Za-z0-9_.-] (it names a file), got {key!r}; "
            "build keys with content_key()"
        )


class _Pending:
    """One in-flight computation that other callers of the same key wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


def nbytes(value: Any) -> int:
    """Bytes of the tensors and arrays in ``value`` (dataclasses, dicts, lists and tuples are walked;
    a tensor reachable twice counts once)."""
    seen: set[int] = set()

    def walk(item: Any) -> int:
        if isinstance(item, torch.Tensor):
            if item.device.type != "meta":  # a meta tensor has no storage to share: count its shape
                if item.data_ptr() in seen:
                    return 0
                seen.add(item.data_ptr())
            return item.numel() * item.element_size()
        if isinstance(item, np.ndarray):
            return int(item.nbytes)
        if isinstance(item, dict):
            return sum(walk(v) for v in item.values())
        if isinstance(item, (list, tuple)):
            return sum(walk(v) for v in item)
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return sum(walk(getattr(item, f.name)) for f in dataclasses.fields(item))
        return 0

    return walk(value)


def to_device(value: Any, device: str | torch.device) -> Any:
    """``value`` with every tensor in it moved to ``device`` (dataclasses are copied, not changed)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value,
            **{
                f.name: to_device(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init
            },
        )
    return value


class _Tier:
    """An LRU of values with their sizes, bounded by items and bytes (the caller holds the lock)."""

    def __init__(self, *, max_items: int | None, max_bytes: int | None) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def get(self, key: str) -> Any | None:
        entry = self.items.get(key)
        if entry is None:
            return None
        self.items.move_to_end(key)
        return entry[0]

    def pop(self, key: str) -> Any | None:
        entry = self.items.pop(key, None)
        if entry is None:
            return None
        self.bytes -= entry[1]
        return entry[0]

    def put(self, key: str, value: Any, size: int) -> list[tuple[str, Any]]:
        """Keep ``value`` as the newest; returns the evicted ``(key, value)`` pairs, oldest first (the
        new value itself when it alone is over the byte budget)."""
        self.pop(key)
        self.items[key] = (value, size)
        self.bytes += size
        evicted = []
        while self.items and (
            (self.max_items is not None and len(self.items) > self.max_items)
            or (self.max_bytes is not None and self.bytes > self.max_bytes)
        ):
            old_key, (old_value, old_size) = self.items.popitem(last=False)
            self.bytes -= old_size
            self.evictions += 1
            evicted.append((old_key, old_value))
        return evicted

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0


class FeatureCache(Generic[T]):
    """LRU cache of computed features in three tiers, with in-flight dedupe.

    - **device** (``max_items`` / ``max_bytes``): whole values, where they were computed (the GPU).
    - **host** (``host_max_bytes``, 0 = off): what the device tier evicts, slimmed by ``slim`` and moved
      to host RAM; a hit is brought back by the caller's ``restore``.
    - **disk** (``disk_dir``, ``max_disk_bytes``): the slim value of every computed one, written once.

    ``slim(value)`` keeps what is expensive to recompute and cheap to store (for Osprey's encodings:
    the vision features and image tokens, not the prefix keys/values, which are 25x larger and
    recomputed in one forward); ``restore(slim_value)``, given per call because it may need the model,
    rebuilds the whole value on the device. Without ``slim`` the value is stored as it is and restored
    by moving it to ``map_location``.

    Args:
        name: short name used in logs and stats (e.g. ``"sam-embeddings"``).
        max_items: at most this many values in the device tier (None: bounded by bytes only).
        max_bytes: at most this many bytes of tensors in the device tier (None: by items only).
        host_max_bytes: byte budget of the host tier (0 turns it off).
        disk_dir: folder for persisted values, created if missing (and tidied: see
            :class:`~osprey.runtime.disk_tier.DiskTier`); ``None`` keeps memory only.
        max_disk_bytes: bound on the total size of ``*.pt`` files in ``disk_dir``.
        map_location: the device values are restored onto (default ``"cpu"``).
        value_types: dataclass types stored as values, allowed when loading from disk.
        slim: what of a value the host and disk tiers keep (default: all of it).
    """

    def __init__(
        self,
        *,
        name: str,
        max_items: int | None = None,
        max_bytes: int | None = None,
        host_max_bytes: int = 0,
        disk_dir: str | Path | None = None,
        max_disk_bytes: int = 2**30,
        map_location: str | torch.device = "cpu",
        value_types: Iterable[type] = (),
        slim: Callable[[T], Any] | None = None,
    ) -> None:
        if max_items is None and max_bytes is None:
            raise ValueError("give the device tier a bound: max_items, max_bytes or both")
        if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
            raise ValueError(f"max_items must be an int >= 1, got {max_items!r}")
        for label, amount in (("max_bytes", max_bytes), ("host_max_bytes", host_max_bytes),
                              ("max_disk_bytes", max_disk_bytes)):  # fmt: skip
            if amount is not None and amount < 0:
                raise ValueError(f"{label} must be >= 0, got {amount}")
        self.name = name
        self.max_items = max_items
        self.max_disk_bytes = int(max_disk_bytes)
        self.map_location = map_location
        self.slim = slim
        self.disk_dir = Path(disk_dir).expanduser() if disk_dir is not None else None
        self._disk = None
        if self.disk_dir is not None:
            self._disk = DiskTier(
                folder=self.disk_dir, max_bytes=self.max_disk_bytes, name=name, map_location=map_location
            )
        types = list(value_types)
        if types:
            torch.serialization.add_safe_globals(types)
        self._lock = threading.Lock()
        self._device = _Tier(max_items=max_items, max_bytes=max_bytes)
        self._host = _Tier(max_items=None, max_bytes=int(host_max_bytes))
        self._pending: dict[str, _Pending] = {}
        self._counters = dict.fromkeys(("hits", "misses", "host_hits", "disk_hits", "waits"), 0)

    @property
    def max_bytes(self) -> int | None:
        return self._device.max_bytes

    @property
    def host_max_bytes(self) -> int:
        return int(self._host.max_bytes or 0)

    def get_or_compute(
        self, key: str, compute: Callable[[], T], restore: Callable[[Any], T] | None = None
    ) -> T:
        """Return the value cached under ``key`` (device, host, then disk tier), computing it with
        ``compute()`` on a miss; ``restore`` rebuilds a value from its slim form (see the class).

        Concurrent callers with the same key share one computation: the first runs ``compute``
        (outside the cache lock), the others wait and get its value, or its exception.
        """
        _check_key(key)
        with self._lock:
            value = self._device.get(key)
            if value is not None:
                self._counters["hits"] += 1
                return value
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
            else:
                self._counters["waits"] += 1
        assert pending is not None
        if not owner:
            with waiting():  # the computing thread may have stepped aside for this one
                pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.value

        try:
            value = self._restored(key, restore)
            computed = value is None
            if computed:
                with self._lock:
                    self._counters["misses"] += 1
                value = compute()
        except BaseException as error:
            pending.error = error
            with self._lock:
                del self._pending[key]
            pending.done.set()
            raise
        pending.value = value
        self._remember(key, value)
        with self._lock:
            del self._pending[key]
        pending.done.set()
        if computed:
            self._save(key, value)
        return value

    def peek(self, key: str, restore: Callable[[Any], T] | None = None) -> T | None:
        """The value under ``key`` from any tier, without computing; None when none holds it. With
        :meth:`put`, callers compute misses together (a batch) instead of one ``compute`` each."""
        with self._lock:
            value = self._device.get(key)
            if value is not None:
                self._counters["hits"] += 1
                return value
        value = self._restored(key, restore)
        if value is not None:
            self._remember(key, value)
        return value

    def put(self, key: str, value: T) -> None:
        """Store a value computed by the caller after a :meth:`peek` miss (device tier, then disk)."""
        _check_key(key)
        with self._lock:
            self._counters["misses"] += 1
        self._remember(key, value)
        self._save(key, value)

    def _restored(self, key: str, restore: Callable[[Any], T] | None) -> T | None:
        """The value rebuilt from the host tier or the disk, or None."""
        with self._lock:
            slim = self._host.pop(key)
            tier = "host_hits" if slim is not None else None
        if slim is None:
            slim = self._load(key)
            tier = "disk_hits" if slim is not None else None
        if slim is None:
            return None
        value = restore(slim) if restore is not None else to_device(slim, self.map_location)
        with self._lock:
            self._counters[tier] += 1
        return value

    def _slim(self, value: T) -> Any:
        return self.slim(value) if self.slim is not None else value

    def _remember(self, key: str, value: T) -> None:
        with self._lock:
            evicted = self._device.put(key, value, nbytes(value))
        if not self._host.max_bytes:
            return
        for old_key, old_value in evicted:  # demoted: slim, on the host
            slim = to_device(self._slim(old_value), "cpu")
            with self._lock:
                if old_key not in self._device.items:
                    self._host.put(old_key, slim, nbytes(slim))

    def stats(self) -> dict[str, Any]:
        """Counters and sizes of each tier.

        ``hits`` counts device-tier hits, ``host_hits`` and ``disk_hits`` misses there served (and
        restored) from the host tier or the disk, ``misses`` calls that ran ``compute``, ``waits``
        callers that joined an in-flight computation, ``evictions`` / ``host_evictions`` values pushed
        out of the device / host tier; ``items`` / ``bytes`` are the device tier's, ``host_*`` and
        ``disk_*`` the other tiers'.
        """
        with self._lock:
            stats: dict[str, Any] = dict(self._counters)
            stats.update(
                items=len(self._device.items), bytes=self._device.bytes, max_items=self.max_items,
                max_bytes=self._device.max_bytes, evictions=self._device.evictions,
                host_items=len(self._host.items), host_bytes=self._host.bytes,
                host_max_bytes=self.host_max_bytes, host_evictions=self._host.evictions,
            )  # fmt: skip
        files = self._disk.files() if self._disk is not None else []
        stats.update(
            disk_items=len(files),
            disk_bytes=sum(size for _, _, size in files),
            max_disk_bytes=self.max_disk_bytes,
        )
        stats["name"] = self.name
        return stats

    def clear(self) -> None:
        """Drop every value (all tiers) and reset the counters, like ``lru_cache.cache_clear``.

        Computations in flight finish and are stored as usual.
        """
        with self._lock:
            self._device.clear()
            self._host.clear()
            self._device.evictions = self._host.evictions = 0
            for counter in self._counters:
                self._counters[counter] = 0
        if self._disk is not None:
            self._disk.clear()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._device.items

    def __len__(self) -> int:
        with self._lock:
            return len(self._device.items)

    # Disk persistence ------------------------------------------------------------------------

    def _load(self, key: str) -> T | None:
        return self._disk.load(key) if self._disk is not None else None

    def _save(self, key: str, value: T) -> None:
        if self._disk is None or self.max_disk_bytes == 0:
            return
        try:
            slim = self._slim(value)
        except Exception as error:  # the cache still works in memory
            logger.warning("cache %s: could not persist %s (%s)", self.name, key, error)
            return
        self._disk.save(key, slim)
