"""Training examples from the store: each accepted region with its image and mask, or why it is left out.

A region accepted long ago can go bad: its image deleted (HTTP 404) or replaced by one of another size,
its stored mask unreadable. A training job skips such regions, counts them by reason (``SKIP_REASONS``;
the job result and ``/metrics`` carry the counts) and trains on the rest. Nothing is removed from the
store, so a region whose image comes back is used again by the next job.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from backend.labelstudio.images import ImageLoader, ImageLoadError

from .store import AcceptedRegion

logger = logging.getLogger(__name__)

SKIP_REASONS = {
    "no_image": "the stored region has no image reference",
    "image_gone": "the image is no longer there (HTTP 404 or 410, or no such local file)",
    "image_unavailable": "the image could not be fetched now (network, authentication or upstream error)",
    "image_refused": "the image's source is not allowed (OSPREY_ALLOWED_IMAGE_HOSTS, address rules)",
    "image_too_large": "the image is over OSPREY_MAX_IMAGE_BYTES or OSPREY_MAX_IMAGE_PIXELS",
    "image_undecodable": "the image file cannot be decoded",
    "size_mismatch": "the region was drawn on an image of another size than the one served now",
    "mask_undecodable": "the stored mask cannot be decoded",
    "mask_empty": "the stored mask paints no pixel",
}
_IMAGE_REASONS = {  # ImageLoadError.kind -> reason; every other kind is "image_unavailable"
    "not_found": "image_gone",
    "refused": "image_refused",
    "too_large": "image_too_large",
    "bad_image": "image_undecodable",
}
MAX_NAMED = 5  # skipped regions named per reason in a report (the counts cover them all)


class SkipReport:
    """The regions a training job left out: counts per reason (keys of ``SKIP_REASONS``) and, per reason,
    the first ``max_named`` regions with what was wrong (messages carry no tokens or query strings)."""

    def __init__(self, *, max_named: int = MAX_NAMED) -> None:
        self.counts: Counter[str] = Counter()
        self.named: list[dict] = []
        self.max_named = max_named

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def skip(self, region: AcceptedRegion, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {', '.join(SKIP_REASONS)}")
        self.counts[reason] += 1
        if self.counts[reason] <= self.max_named:
            self.named.append(
                {
                    "reason": reason,
                    "task_id": region.task_id,
                    "annotation_id": region.annotation_id,
                    "region_id": region.region_id,
                    "detail": detail,
                }
            )

    def log(self, project_id: str, job: str, considered: int) -> None:
        """One warning line for the job when it skipped anything (counts only, no image references)."""
        if self.total:
            logger.warning(
                "project %s: the %s job skips %d of %d regions: %s",
                project_id,
                job,
                self.total,
                considered,
                dict(sorted(self.counts.items())),
            )

    def as_dict(self) -> dict:
        """``{"total": n, "by_reason": {reason: n}, "examples": [{reason, task_id, annotation_id,
        region_id, detail}, ...]}``: what a job result carries under ``skipped_examples``."""
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())), "examples": self.named}


@dataclass(frozen=True)
class ImageRegions:
    """The usable regions of one image: ``rgb`` is ``(H, W, 3)`` uint8, ``masks[i]`` the ``(H, W)`` bool
    mask of ``regions[i]`` at the image's resolution."""

    image_ref: str
    rgb: np.ndarray
    regions: list[AcceptedRegion]
    masks: list[np.ndarray]


def usable_regions(
    regions: Iterable[AcceptedRegion], loader: ImageLoader, report: SkipReport
) -> Iterator[ImageRegions]:
    """The regions grouped by image, in first-seen order, each image loaded once and only while its
    group is used; every region that cannot be used goes into ``report`` instead."""
    by_image: dict[str, list[AcceptedRegion]] = {}
    for region in regions:
        if not region.image_ref:
            report.skip(region, "no_image", "the annotation was stored without an image reference")
            continue
        by_image.setdefault(region.image_ref, []).append(region)
    for ref, group in by_image.items():
        try:
            rgb = loader.load(ref).rgb
        except ImageLoadError as error:
            reason = _IMAGE_REASONS.get(error.kind, "image_unavailable")
            # the error names its source without credentials or query string (never a data: URI's body)
            logger.warning("training: skipping %d region(s), %s: %s", len(group), reason, error)
            for region in group:
                report.skip(region, reason, str(error))
            continue
        height, width = rgb.shape[:2]
        kept, masks = [], []
        for region in group:
            if (region.width, region.height) != (width, height):
                report.skip(
                    region,
                    "size_mismatch",
                    f"stored for a {region.width}x{region.height} image, the image is {width}x{height} (W x H)",
                )
                continue
            try:
                mask = region.mask()
            except ValueError as error:
                report.skip(region, "mask_undecodable", str(error))
                continue
            if not mask.any():
                report.skip(region, "mask_empty", "the mask paints no pixel")
                continue
            kept.append(region)
            masks.append(mask)
        if kept:
            yield ImageRegions(image_ref=ref, rgb=rgb, regions=kept, masks=masks)


def last_skipped(queue, project_id: str, *, kinds: tuple[str, ...] = ("train", "lora")) -> dict:
    """For ``/metrics``: per job kind, what the project's latest finished job of that kind skipped,
    ``{kind: {"job_id", "finished_at", "total", "by_reason"}}``; kinds whose latest job skipped
    nothing (or that never ran) are left out."""
    latest: dict[str, object] = {}
    for job in queue.jobs(project_id, limit=50):  # newest first
        if job.status == "done" and job.kind in kinds:
            latest.setdefault(job.kind, job)
    out = {}
    for kind, job in latest.items():
        report = (job.result or {}).get("skipped_examples") or {}
        if report.get("total"):
            out[kind] = {"job_id": job.job_id, "finished_at": job.finished_at, "total": report["total"],
                         "by_reason": report.get("by_reason", {})}  # fmt: skip
    return out
