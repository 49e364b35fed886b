"""How many bytes each cache tier may use, from the settings, the models and the device's free memory.

Per image, an Osprey encoding on the device is ~0.54 GiB for the 7B model in bf16 (almost all of it the
prefix keys/values), its slim form (vision features + image tokens) ~19 MiB, and a SAM embedding
4 MiB (:mod:`osprey.inference.memory`). So the device tier keeps whole encodings of the few most recent
images, and the host and disk tiers keep slim ones: a hit there costs one prefix forward instead of the
vision tower, and no prefix keys/values are ever written to disk.

``auto`` budgets, measured once at start after the models are loaded:

- **device** (CUDA): the free memory less what one request needs at its peak (SAM's segment everything
  and Osprey's largest forward, from shapes: :func:`osprey.sam.memory.everything_peak_bytes`,
  :func:`osprey.inference.memory.label_activation_bytes`) and less ``OSPREY_DEVICE_SPARE_BYTES``;
  4/5 of it for Osprey, 1/5 for SAM. On a CPU the device is host RAM: 1/4 of the available memory.
- **host**: 1/10 of the machine's RAM, at most 4 GiB, 4/5 for Osprey.
- **disk**: ``OSPREY_CACHE_DISK_BYTES``, 4/5 for Osprey.

``OSPREY_CACHE_IMAGES`` still caps the device tier's items. Explicit byte values (``8GiB``, ``512MB``,
``1073741824``) split the same way.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass

from backend.errors import SettingsError

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
OSPREY_SHARE = 0.8  # of every tier's budget; the rest is SAM's
GiB = 2**30


def parse_bytes(text: str, *, setting: str, auto: bool = False) -> int | None:
    """``"4GiB"`` -> 4294967296; ``"auto"`` -> None where ``auto`` is allowed."""
    if auto and text.strip().lower() == "auto":
        return None
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        allowed = "'auto' or " if auto else ""
        raise SettingsError(f"{setting}={text!r}: expected {allowed}a size such as 4GiB, 512MB or 1073741824")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class CacheBudgets:
    """Byte budgets of each cache's tiers, and what they were derived from."""

    osprey_device: int
    sam_device: int
    osprey_host: int
    sam_host: int
    osprey_disk: int
    sam_disk: int
    device_free: int | None  # the device's free bytes when measured (None: not measured)
    request_peak: int  # bytes one request needs at its peak, kept free
    spare: int

    def to_dict(self) -> dict:
        return asdict(self)


def derive_budgets(
    settings,
    *,
    device_kind: str,
    device_free: int | None,
    host_total: int,
    host_available: int,
    request_peak: int,
) -> CacheBudgets:
    """Budgets for a device of ``device_kind`` (``"cuda"`` or ``"cpu"``) with ``device_free`` bytes
    free after loading the models (see the module docstring for the rules)."""
    spare = parse_bytes(settings.device_spare_bytes, setting="OSPREY_DEVICE_SPARE_BYTES") or 0
    device = parse_bytes(settings.cache_device_bytes, setting="OSPREY_CACHE_DEVICE_BYTES", auto=True)
    if device is None:
        if device_kind == "cuda" and device_free is not None:
            device = max(0, device_free - request_peak - spare)
        else:
            device = host_available // 4
    host = parse_bytes(settings.cache_host_bytes, setting="OSPREY_CACHE_HOST_BYTES", auto=True)
    if host is None:
        host = min(host_total // 10, 4 * GiB)
    disk = parse_bytes(settings.cache_disk_bytes, setting="OSPREY_CACHE_DISK_BYTES") or 0

    def split(total: int) -> tuple[int, int]:
        return int(total * OSPREY_SHARE), total - int(total * OSPREY_SHARE)

    (od, sd), (oh, sh), (ok, sk) = split(device), split(host), split(disk)
    return CacheBudgets(od, sd, oh, sh, ok, sk, device_free, request_peak, spare)


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM (``/proc/meminfo``; sysconf where that is missing)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.strip()}
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def request_peak_bytes(settings, osprey, *, points_per_batch: int = 64) -> int:
    """Bytes one request needs at its peak beyond weights and caches: the larger of SAM's segment
    everything (on a 1.4-megapixel photo) and the region model's largest forward (``osprey``: any
    :class:`~osprey.inference.region_model.RegionModel`, its ``label_peak_bytes``)."""
    from osprey.sam.memory import everything_peak_bytes

    sam = everything_peak_bytes(settings.sam_model, points_per_batch=points_per_batch).peak
    return max(sam, osprey.label_peak_bytes())


def device_budgets(settings, osprey) -> CacheBudgets:
    """Measure the device and derive the budgets (call after loading the models)."""
    import torch

    device = osprey.device
    free = None
    peak = 0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        peak = request_peak_bytes(settings, osprey)
    total, available = host_memory()
    budgets = derive_budgets(
        settings, device_kind=device.type, device_free=free, host_total=total, host_available=available,
        request_peak=peak,
    )  # fmt: skip
    logger.info(
        "cache budgets: device %.2f GiB Osprey + %.2f GiB SAM, host %.2f + %.2f GiB, disk %.2f + %.2f GiB "
        "(device free %s, one request's peak %.2f GiB, spare %.2f GiB)",
        budgets.osprey_device / GiB, budgets.sam_device / GiB, budgets.osprey_host / GiB,
        budgets.sam_host / GiB, budgets.osprey_disk / GiB, budgets.sam_disk / GiB,
        f"{free / GiB:.2f} GiB" if free is not None else "not measured", peak / GiB, budgets.spare / GiB,
    )  # fmt: skip
    return budgets
