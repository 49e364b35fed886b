"""How many bytes each cache tier may use, from the settings, the models and the device's free memory.

Per image, an Osprey encoding on the device is ~0.54 GiB for the 7B model in bf16 (almost all of it the
prefix keys/values), its slim form (vision features + image tokens) ~19 MiB, and a SAM embedding
4 MiB (:mod:`osprey.inference.memory`). So the device tier keeps whole encodings of the few most recent
images, and the host and disk tiers keep slim ones: a hit there costs one prefix forward instead of the
vision tower, and no prefix keys/values are ever written to disk.

``auto`` budgets, measured once at start after the models are loaded:

- **device** (CUDA): the free memory less what one request needs at its peak (:class:`RequestPeak`,
  from shapes: SAM's segment everything, :func:`osprey.sam.memory.everything_peak_bytes`; the vision
  tower; labelling's keys/values buffers, scoring chunks and decode groups for the configured maximum
  tokens, :func:`osprey.inference.memory.work_bytes`; a LoRA step and a LoRA job's adapter state,
  :func:`osprey.learning.memory.lora_step_bytes`) and less ``OSPREY_DEVICE_SPARE_BYTES``; 4/5 of it
  for Osprey, 1/5 for SAM. Before that, the scoring chunk and the answers decoded together are sized
  so that the clicked image's caches still fit (:func:`fit_request`). On a CPU the device is host
  RAM: 1/4 of the available memory.
- **host**: 1/10 of the machine's RAM, at most 4 GiB, 4/5 for Osprey.
- **disk**: ``OSPREY_CACHE_DISK_BYTES``, 4/5 for Osprey.

``OSPREY_CACHE_IMAGES`` still caps the device tier's items. Explicit byte values (``8GiB``, ``512MB``,
``1073741824``) split the same way.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, replace

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
    points_per_batch: int | None = None  # segment everything's batch sized to the device (None: not sized)

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


DECODE_ROWS = 32  # answers decoded together at most (OSPREY_MAX_REGIONS caps it lower; memory may too)
LORA_ANSWER_TOKENS = 256  # a training sample's answer at its longest (a detailed description)


@dataclass(frozen=True)
class RequestPeak:
    """What one request (or one LoRA training step) holds at its peak beyond weights and caches, by
    part; the parts run one at a time, on the one model, so the peak is the largest of them, plus a
    LoRA job's adapter state, held for the whole job beside serving."""

    sam: int  # segment everything: SAM's encoder or one decoder batch (osprey.sam.memory)
    vision: int  # the region model's vision tower on one image
    labelling: int  # keys/values buffers, scoring chunks and decode groups (osprey.inference.memory)
    lora_step: int  # a LoRA step's activations (0: LoRA off)
    lora_state: int  # the adapter's weights, gradients and AdamW moments (0: LoRA off)
    chunk_tokens: int  # the scoring chunk the labelling part is counted for
    decode_rows: int  # answers decoded together
    max_new_tokens: int
    points_per_batch: int = 64  # segment everything's points decoded (and masks upsampled) at once

    @property
    def peak(self) -> int:
        return max(self.sam, self.vision, self.labelling, self.lora_step) + self.lora_state

    def to_dict(self) -> dict:
        return {**asdict(self), "peak": self.peak}


def lora_on(settings, device_type: str) -> bool:
    """OSPREY_LORA: ``true``, ``false``, or ``auto`` (on when the models run on a CUDA GPU)."""
    return settings.lora == "true" or (settings.lora == "auto" and device_type == "cuda")


def max_new_tokens(settings) -> int:
    return max(settings.max_caption_tokens, settings.max_description_tokens)


def context_tokens(osprey, encoding=None) -> int:
    """Tokens in an encoded image's keys/values when questions run: the region model's prefix (from its
    shapes, ``encoding`` when already known) and a long label set's shared text."""
    from osprey.inference.memory import SHARED_TEXT_TOKENS

    return (encoding or osprey.encoding_bytes()).prefix_tokens + SHARED_TEXT_TOKENS


def request_peak(
    settings, osprey, *, chunk_tokens: int, decode_rows: int, points_per_batch: int = 64,
    encoding=None, lora: bool | None = None,
) -> RequestPeak:  # fmt: skip
    """The :class:`RequestPeak` of ``osprey`` (any region model) with SAM ``settings.sam_model`` for
    scoring chunks of ``chunk_tokens`` and ``decode_rows`` answers decoded together of up to the
    configured maximum tokens. ``encoding``: the model's ``encoding_bytes()`` when already known;
    ``lora``: whether a LoRA job may run (default: as OSPREY_LORA says)."""
    from osprey.inference.memory import work_bytes
    from osprey.learning.memory import lora_step_bytes
    from osprey.sam.memory import everything_peak_bytes

    model, config = osprey.model, osprey.model.llm.config
    encoding = encoding or osprey.encoding_bytes()
    context = context_tokens(osprey, encoding)
    new_tokens = max_new_tokens(settings)
    work = work_bytes(
        config, model.dtype, context_tokens=context, chunk_tokens=chunk_tokens, decode_rows=decode_rows,
        max_new_tokens=new_tokens,
    )  # fmt: skip
    if lora is None:
        lora = lora_on(settings, osprey.device.type)
    step = None
    if lora:  # the longest sample: what each holds before its question, a question and a long answer
        tokens = osprey.lora_sequences().context_tokens + 64 + LORA_ANSWER_TOKENS
        step = lora_step_bytes(config, model.dtype, tokens=tokens)
    return RequestPeak(
        sam=everything_peak_bytes(
            settings.sam_model, points_per_batch=points_per_batch, points_per_side=settings.points_per_side
        ).peak,
        vision=encoding.vision_peak, labelling=work.peak,
        lora_step=step.activations if step else 0, lora_state=step.state if step else 0,
        chunk_tokens=chunk_tokens, decode_rows=decode_rows, max_new_tokens=new_tokens,
        points_per_batch=points_per_batch,
    )  # fmt: skip


def fit_request(settings, osprey, *, device_free: int, lora: bool | None = None) -> RequestPeak:
    """Size the region model's labelling work (its scoring chunk and decode group, set on
    ``osprey.fast``) so that one request's peak, the spare and the smallest useful caches (the image
    being clicked: one whole Osprey encoding and one SAM embedding) fit in ``device_free`` bytes; the
    request peak at those sizes (``lora``: whether a LoRA job may run, default as OSPREY_LORA says).
    Decoding takes at most :data:`DECODE_ROWS` answers (and at most OSPREY_MAX_REGIONS) at once; fewer
    when memory says so (one at the least)."""
    from osprey.inference.memory import fit_work
    from osprey.sam.build import SAM_ARCHITECTURES
    from osprey.sam.memory import points_per_batch_for, sam_embedding_bytes

    spare = parse_bytes(settings.device_spare_bytes, setting="OSPREY_DEVICE_SPARE_BYTES") or 0
    encoding = osprey.encoding_bytes()
    # the device tier splits its budget 4/5 Osprey, 1/5 SAM: room for one of each within its share
    osprey_floor = encoding.whole / OSPREY_SHARE
    sam_floor = sam_embedding_bytes(SAM_ARCHITECTURES[settings.sam_model]) / (1 - OSPREY_SHARE)
    cache_floor = int(max(osprey_floor, sam_floor)) + 2**20
    rows_wanted = max(1, min(settings.max_regions, DECODE_ROWS))
    others = request_peak(settings, osprey, chunk_tokens=256, decode_rows=1, encoding=encoding, lora=lora)
    budget = device_free - spare - cache_floor - others.lora_state
    chunk, rows = fit_work(
        osprey.model, max(budget, 0), max_new_tokens=max_new_tokens(settings), max_rows=rows_wanted,
        context_tokens=context_tokens(osprey, encoding),
    )  # fmt: skip
    osprey.fast.max_batch_tokens, osprey.fast.max_decode_rows = chunk, rows
    # segment everything's batch: as many points as fit in what the other parts need anyway, so SAM
    # never sets the peak by its batch (at most SAM's default 64; 1 when even one does not fit)
    sized = request_peak(
        settings,
        osprey,
        chunk_tokens=chunk,
        decode_rows=rows,
        encoding=encoding,
        lora=lora,
        points_per_batch=1,
    )
    room = max(sized.vision, sized.labelling, sized.lora_step)
    points = points_per_batch_for(settings.sam_model, room, points_per_side=settings.points_per_side, most=64)
    return request_peak(
        settings, osprey, chunk_tokens=chunk, decode_rows=rows, encoding=encoding, lora=lora,
        points_per_batch=points,
    )  # fmt: skip


def device_budgets(settings, osprey) -> CacheBudgets:
    """Measure the device and derive the budgets (call after loading the models)."""
    import torch

    device = osprey.device
    free = None
    peak, points = 0, None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        request = fit_request(settings, osprey, device_free=free)
        peak, points = request.peak, request.points_per_batch
        logger.info(
            "labelling work sized to the device: scoring chunks of %d tokens, %d answers decoded together "
            "(up to %d tokens each), segment everything %d points at a time; one request's peak by part "
            "(GiB): %s", request.chunk_tokens, request.decode_rows, request.max_new_tokens, points,
            {k: round(v / GiB, 2) for k, v in request.to_dict().items() if k in ("sam", "vision", "labelling", "lora_step", "lora_state")},
        )  # fmt: skip
    total, available = host_memory()
    budgets = derive_budgets(
        settings, device_kind=device.type, device_free=free, host_total=total, host_available=available,
        request_peak=peak,
    )  # fmt: skip
    budgets = replace(budgets, points_per_batch=points)
    logger.info(
        "cache budgets: device %.2f GiB Osprey + %.2f GiB SAM, host %.2f + %.2f GiB, disk %.2f + %.2f GiB "
        "(device free %s, one request's peak %.2f GiB, spare %.2f GiB)",
        budgets.osprey_device / GiB, budgets.sam_device / GiB, budgets.osprey_host / GiB,
        budgets.sam_host / GiB, budgets.osprey_disk / GiB, budgets.sam_disk / GiB,
        f"{free / GiB:.2f} GiB" if free is not None else "not measured", peak / GiB, budgets.spare / GiB,
    )  # fmt: skip
    return budgets
