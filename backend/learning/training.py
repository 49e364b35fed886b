"""Training jobs: a project's accepted regions -> a fast head version, gated and promoted.

The job splits the accepted regions by task (a stable 1-in-5 hash of the task id is held out), builds
region features for every usable region (one cached vision forward per image; regions whose image is
gone or of another size, or whose mask is unreadable, are skipped and reported by reason, see
:mod:`backend.learning.examples`), fits the head on the training side, and fits the head's weight in
the served blend per field by cross-validation over the training side, grouped by task
(:func:`osprey.learning.blend.cross_validated_blend`; Osprey's answers for the last ``BLEND_FIT_MAX``
training regions are what it is fitted on), so the held-out regions stay unseen by both the head and
its blend. It then compares what would be served, Osprey's probabilities blended with the new head,
against what is served now (Osprey alone, or blended with the current head) on the held-out regions.
The new version, with the fitted weights saved in its head, is always written; it is promoted only
when no metric is worse.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from backend.labelstudio.schema import ProjectSchema
from osprey.inference.fields import LabelRequest
from osprey.learning.blend import blend_labels, closed_set_probs, cross_validated_blend
from osprey.learning.head import FastHead, HeadField, HeadTrainer
from osprey.learning.region_features import feature_layout, region_features

from .examples import SkipReport, usable_regions
from .heldout import heldout_flags
from .lora_training import LoraJob
from .registry import not_worse

logger = logging.getLogger(__name__)
CLOSED_FIELDS = ("category", "part", "attributes")
BLEND_FIT_MAX = 400  # training regions Osprey answers to fit the blend on (the most recently accepted)


def head_fields(schema: ProjectSchema) -> list[HeadField]:
    """The project's closed-set fields, with their label sets, as the head sees them."""
    out = []
    for spec in schema.fields:
        if spec.field in CLOSED_FIELDS and spec.is_closed_set and spec.labels:
            out.append(
                HeadField(name=spec.field, labels=tuple(spec.labels), multi_label=spec.field == "attributes")
            )
    return out


def served_probs(model_answer, head_probs: dict, head: FastHead | None) -> dict:
    """Field -> {label: probability} served for one region: the model's answer blended with the head's
    probabilities by the rule serving uses (:func:`osprey.learning.blend.blend_labels`)."""
    labels = blend_labels(model_answer, head_probs, head.head_weights()) if head is not None else model_answer
    return closed_set_probs(labels)


def served_metrics(answers: list[dict], truths: list[dict], fields: list[HeadField]) -> dict[str, float]:
    """``<field>_accuracy`` for category/part (argmax), ``attributes_accuracy`` (each attribute at 0.5)."""
    metrics = {}
    for spec in fields:
        hits = []
        for answer, truth in zip(answers, truths, strict=True):
            if spec.name not in answer or truth.get(spec.name) is None:
                continue
            probs = answer[spec.name]
            if spec.multi_label:
                chosen = set(truth[spec.name])
                hits.extend((probs[label] >= 0.5) == (label in chosen) for label in spec.labels)
            else:
                hits.append(max(probs, key=probs.get) == truth[spec.name])
        if hits:
            metrics[f"{spec.name}_accuracy"] = float(np.mean(hits))
    return metrics


def label_request(fields: list[HeadField]) -> LabelRequest:
    """What Osprey is asked for the project's closed-set fields."""
    by_name = {f.name: f for f in fields}
    return LabelRequest(
        categories=by_name["category"].labels if "category" in by_name else None,
        parts=by_name["part"].labels if "part" in by_name else None,
        attributes=by_name["attributes"].labels if "attributes" in by_name else None,
    )


@dataclass
class Example:
    image_ref: str
    truth: dict  # field -> accepted value
    test: bool  # held out (see backend.learning.heldout)
    task: object = None  # the task (or annotation) key: cross-validation folds never split one


class ProjectTrainer:
    """The training lane's job handler: ``trainer(project, kind, payload) -> dict`` for ``train`` (a fast
    head) and ``lora`` (delegated to ``lora``, a :class:`~backend.learning.lora_training.LoraJob`).

    Collaborators: ``osprey`` (the served model: region features and what is served now), ``store``
    (accepted regions), ``registry`` (versions), ``loader`` (task images), ``projects`` (``schema`` and
    ``head`` of a project), ``base_version`` (the loaded models' ``model_version``) and ``session(project)``,
    the served model for one step at background priority with the project's adapter."""

    def __init__(
        self,
        *,
        osprey,
        store,
        registry,
        loader,
        projects,
        base_version: str,
        session: Callable[[str], contextlib.AbstractContextManager] = lambda project: (
            contextlib.nullcontext()
        ),
        lora: LoraJob | None = None,
        min_examples: int = 5,
        tolerance: float = 0.0,
    ) -> None:
        self.osprey = osprey
        self.store = store
        self.registry = registry
        self.loader = loader
        self.projects = projects
        self.base_version = base_version
        self.session = session
        self.lora = lora
        self.min_examples = min_examples
        self.tolerance = tolerance

    def __call__(self, project_id: str, kind: str, payload: dict) -> dict:
        if kind == "train":
            return self.train_head(project_id)
        if kind == "lora":
            if self.lora is None:
                raise RuntimeError("a lora job reached a process with LoRA training off (OSPREY_LORA=false)")
            return self.lora(project_id)
        raise ValueError(f"unknown job kind {kind!r}; expected 'train' or 'lora'")

    def train_head(self, project_id: str) -> dict:
        schema = self.projects.schema(project_id)
        fields = head_fields(schema)
        if not fields:
            return {"status": "skipped", "reason": "the label config has no closed-set field to learn"}
        regions = [
            r for r in self.store.accepted_regions(project_id) if any(r.fields.get(f.name) for f in fields)
        ]
        if len(regions) < self.min_examples:
            return {
                "status": "skipped",
                "reason": f"{len(regions)} accepted regions; {self.min_examples} needed",
            }
        skipped = SkipReport()
        features, examples, served_now = self._features(project_id, regions, fields, skipped)
        train = [i for i, e in enumerate(examples) if not e.test]
        test = [i for i, e in enumerate(examples) if e.test]
        if len(examples) < self.min_examples or not train or not test:
            return {
                "status": "skipped",
                "reason": f"{len(examples)} usable accepted regions ({len(train)} to train on, {len(test)} "
                f"held out) after skipping {skipped.total}; {self.min_examples} needed, on both sides",
                "skipped_examples": skipped.as_dict(),
            }
        labels = {f.name: [examples[i].truth.get(f.name) for i in train] for f in fields}
        trainer = HeadTrainer(fields=fields, layout=feature_layout(self.osprey))
        head = trainer.fit(features[train], labels)
        head = head.with_blend(
            cross_validated_blend(
                trainer,
                features[train],
                labels,
                _osprey_arrays([served_now.get(i) for i in train], fields),
                groups=[examples[i].task for i in train],
                n_train=head.n_train,
            )
        )
        current = self.projects.head(project_id)
        candidate_metrics, current_metrics = self._compare(
            examples, features, served_now, test, fields, head, current
        )
        promote, reason = not_worse(candidate_metrics, current_metrics, tolerance=self.tolerance)
        blend = {name: round(weight, 4) for name, weight in head.head_weights().items()}

        served = self.registry.served(project_id)  # a new version's parent is what is served
        parent, parent_dir = served.info, served.folder
        keep_lora = parent_dir is not None and (parent_dir / "lora").is_dir()

        def write(folder):
            head.save(folder / "head")
            if keep_lora:
                shutil.copytree(parent_dir / "lora", folder / "lora")  # the served adapter stays
            return {
                "train_examples": len(train),
                "heldout_examples": len(test),
                "metrics": candidate_metrics,
                "notes": f"served now: {current_metrics}; {reason}; head weights: {blend}; "
                f"skipped regions: {skipped.total}",
            }

        info = self.registry.create(
            project_id, kind="head+lora" if keep_lora else "head", base_model_version=self.base_version,
            write=write,
            parent=parent.version if parent else None,
        )  # fmt: skip
        if promote:
            self.registry.promote(project_id, info.version, reason=reason)
        logger.info(
            "project %s: %s %s (%s)",
            project_id,
            info.version,
            "promoted" if promote else "kept aside",
            reason,
        )
        return {
            "status": "promoted" if promote else "not promoted",
            "version": info.version,
            "model_version": info.model_version(),
            "metrics": candidate_metrics,
            "current_metrics": current_metrics,
            "blend": head.head_weights(),
            "reason": reason,
            "skipped_examples": skipped.as_dict(),
        }

    def _features(
        self, project_id: str, regions, fields, skipped: SkipReport
    ) -> tuple[np.ndarray, list[Example], dict[int, object]]:
        """``(N, F)`` features of the N usable regions, their examples, and (by example index) Osprey's
        answers as served now, with the project's adapter, for each held-out region and the last
        ``BLEND_FIT_MAX`` training regions. Each image is loaded once; the held-out split is drawn over
        all ``regions``, so a skipped region moves no other."""
        osprey = self.osprey
        request = label_request(fields)
        flags = heldout_flags([(r.task_id, r.annotation_id) for r in regions])
        held_out = {id(r): flag for r, flag in zip(regions, flags, strict=True)}
        training = [r for r, flag in zip(regions, flags, strict=True) if not flag]
        answered = {id(r) for r in training[-BLEND_FIT_MAX:]} | {id(r) for r in regions if held_out[id(r)]}
        rows, examples, served_now = [], [], {}
        for image in usable_regions(regions, self.loader, skipped):
            with self.session(project_id):
                rows.append(region_features(osprey, image.rgb, image.masks))
            asked = [i for i, region in enumerate(image.regions) if id(region) in answered]
            if asked:
                with self.session(project_id):  # what is served now: its adapter too
                    answers = osprey.label(image.rgb, [image.masks[i] for i in asked], request)
                served_now.update((len(examples) + i, out) for i, out in zip(asked, answers, strict=True))
            for region in image.regions:
                truth = {f.name: region.fields.get(f.name) for f in fields}
                task = region.task_id if region.task_id is not None else f"a{region.annotation_id}"
                examples.append(Example(image.image_ref, truth, test=held_out[id(region)], task=task))
        skipped.log(project_id, "train", len(regions))
        dim = feature_layout(osprey).dim
        features = np.concatenate(rows) if rows else np.zeros((0, dim))
        return features.astype(np.float32), examples, served_now

    def _compare(self, examples, features, served_now, test, fields, head, current):
        truths = [examples[i].truth for i in test]
        new_probs = head.label_probs(features[test])
        candidate = [served_probs(served_now[i], p, head) for i, p in zip(test, new_probs, strict=True)]
        if current is not None and current.compatible_with(head.layout):
            old_probs = current.label_probs(features[test])
            served = [served_probs(served_now[i], p, current) for i, p in zip(test, old_probs, strict=True)]
        else:
            served = [served_probs(served_now[i], {}, None) for i in test]
        return served_metrics(candidate, truths, fields), served_metrics(served, truths, fields)


def _osprey_arrays(answers: list, fields: list[HeadField]) -> dict[str, np.ndarray]:
    """Field -> ``(N, L)`` Osprey's probabilities in the field's label order, NaN rows where a region has
    no answer for it (not asked, or another label set)."""
    out = {}
    for spec in fields:
        probs = np.full((len(answers), len(spec.labels)), np.nan)
        for i, answer in enumerate(answers):
            given = closed_set_probs(answer).get(spec.name) if answer is not None else None
            if given is not None and set(given) == set(spec.labels):
                probs[i] = [given[label] for label in spec.labels]
        out[spec.name] = probs
    return out
