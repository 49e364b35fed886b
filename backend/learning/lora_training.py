"""LoRA training jobs: a project's accepted regions -> an adapter version, gated on held-out loss.

Whichever region model serves (Osprey, PixelRefer-Lite), the samples are written in its own prompts and
the adapter wraps its own language model's layers (:mod:`osprey.learning.lora`). The adapter is trained
on the served model itself (no second copy of the base weights: peft adds the
adapter beside the served ones, :mod:`osprey.learning.lora`), starting from the project's current
adapter when it has one. Each training or evaluation step takes the model through ``step_session`` at
background priority and runs its language-model part as one uninterrupted block with the training
adapter active; between two steps the served adapters are back, so clicks and pre-labels interleave
and answer exactly as before the job. Regions whose image is gone or of another
size, or whose mask is unreadable, are skipped and reported by reason (:mod:`backend.learning.examples`).
The held-out regions (the same 1-in-5 task split as the head) give the answer-token loss of what is
served now and of the new adapter; the version is always written, carrying the current head along, and
promoted only when the loss is not worse.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable

from osprey.learning.lora import LoraSettings, LoraTrainer, RegionExample, instruction_samples, load_adapter

from .examples import SkipReport, usable_regions
from .heldout import heldout_flags

logger = logging.getLogger(__name__)


def region_example(region, rgb, mask) -> RegionExample:
    """One accepted region as a LoRA example: ``rgb`` its ``(H, W, 3)`` uint8 image, ``mask`` its
    ``(H, W)`` bool mask."""
    fields = region.fields or {}
    attributes = fields.get("attributes") or ()
    return RegionExample(
        image=rgb,
        mask=mask,
        category=fields.get("category"),
        part=fields.get("part"),
        attributes=tuple(attributes) if isinstance(attributes, list | tuple) else (),
        caption=fields.get("caption"),
        description=fields.get("description"),
    )


class LoraJob:
    """The ``lora`` job handler: ``job(project_id) -> dict``.

    Collaborators: ``served`` (the served region model, which the adapter is trained on), ``store``,
    ``registry``, ``loader``, ``projects`` (a project's ``schema``), ``base_version`` and
    ``step_session()``: the model for one training step at background priority (the scheduler's
    session: serving work more urgent than it goes first, and takes the model between steps)."""

    def __init__(
        self,
        *,
        served,
        store,
        registry,
        loader,
        projects,
        base_version: str,
        settings: LoraSettings | None = None,
        min_examples: int = 5,
        step_session: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.served = served
        self.store = store
        self.registry = registry
        self.loader = loader
        self.projects = projects
        self.base_version = base_version
        self.settings = settings or LoraSettings()
        self.min_examples = min_examples
        self.step_session = step_session  # each training step shares the GPU at the lowest priority

    def __call__(self, project_id: str) -> dict:
        schema = self.projects.schema(project_id)
        label_sets = {spec.field: tuple(spec.labels) for spec in schema.fields if spec.labels}
        regions = self.store.accepted_regions(project_id)
        if len(regions) < self.min_examples:
            return {
                "status": "skipped",
                "reason": f"{len(regions)} accepted regions; {self.min_examples} needed",
            }
        # the split is drawn over every stored region, as the head job draws it: a skip moves no other
        flags = heldout_flags([(r.task_id, r.annotation_id) for r in regions])
        held_out = {id(r): flag for r, flag in zip(regions, flags, strict=True)}
        skipped = SkipReport()
        train, test = [], []
        for image in usable_regions(regions, self.loader, skipped):
            for region, mask in zip(image.regions, image.masks, strict=True):
                (test if held_out[id(region)] else train).append(region_example(region, image.rgb, mask))
        skipped.log(project_id, "lora", len(regions))
        if len(train) + len(test) < self.min_examples:
            return {
                "status": "skipped",
                "reason": f"{len(train) + len(test)} usable accepted regions after skipping {skipped.total}; "
                f"{self.min_examples} needed",
                "skipped_examples": skipped.as_dict(),
            }
        sets = dict(
            categories=label_sets.get("category", ()),
            parts=label_sets.get("part", ()),
            attributes=label_sets.get("attributes", ()),
        )
        prompts = self.served.lora_sequences().prompts  # the served model's own prompt set
        train_samples = instruction_samples(train, **sets, prompts=prompts)
        test_samples = instruction_samples(test, **sets, prompts=prompts)
        if not train_samples or not test_samples:
            return {
                "status": "skipped",
                "reason": "the usable accepted regions give no question to train on, or none held out",
                "skipped_examples": skipped.as_dict(),
            }

        served = self.registry.served(project_id)  # a new version's parent is what is served
        current, current_dir = served.info, served.folder
        step = self.step_session
        with step():  # adding (or loading) the training adapter changes the served model's layers
            if current_dir is not None and (current_dir / "lora").is_dir():
                trainer = load_adapter(self.served, current_dir / "lora")
            else:
                trainer = LoraTrainer(osprey=self.served, settings=self.settings)
        try:
            served_loss = trainer.evaluate(test_samples, test, step_session=step)
            history = trainer.fit(train_samples, train, progress=False, step_session=step)
            new_loss = trainer.evaluate(test_samples, test, step_session=step)

            def write(folder):
                trainer.save(folder / "lora")
                if current_dir is not None and (current_dir / "head").is_dir():
                    shutil.copytree(current_dir / "head", folder / "head")  # keep the served head
                return {
                    "train_examples": len(train_samples),
                    "heldout_examples": len(test_samples),
                    "metrics": {**(current.metrics if current else {}), "heldout_answer_loss": new_loss},
                    "notes": f"held-out answer loss {served_loss:.4f} -> {new_loss:.4f}; "
                    f"epochs {history['epoch_losses']}; skipped regions: {skipped.total}",
                }

            kind = "head+lora" if current_dir is not None and (current_dir / "head").is_dir() else "lora"
            info = self.registry.create(
                project_id, kind=kind, base_model_version=self.base_version, write=write,
                parent=current.version if current else None,
            )  # fmt: skip
        finally:
            with step():  # the training adapter (and its optimiser state) freed; serving as it was
                trainer.close()
        promote = new_loss <= served_loss
        reason = f"held-out answer loss {served_loss:.4f} -> {new_loss:.4f}"
        if promote:
            self.registry.promote(project_id, info.version, reason=reason)
        return {
            "status": "promoted" if promote else "not promoted",
            "version": info.version,
            "model_version": info.model_version(),
            "heldout_answer_loss": new_loss,
            "served_answer_loss": served_loss,
            "reason": reason,
            "skipped_examples": skipped.as_dict(),
        }
