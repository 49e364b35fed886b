"""Training jobs: a project's accepted regions -> a fast head version, gated and promoted.

The job builds region features for every accepted region (one cached vision forward per image),
splits the regions by task (a stable 1-in-5 hash of the task id is held out), fits the head on the
rest, and compares what would be served, Osprey's probabilities blended with the new head, against
what is served now (Osprey alone, or blended with the current head) on the held-out regions. The
new version is always written; it is promoted only when no metric is worse.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from backend.labelstudio.schema import ProjectSchema
from osprey.inference.fields import LabelRequest
from osprey.learning.head import FastHead, FieldSpec, HeadTrainer, blend
from osprey.learning.region_features import feature_layout, region_features

from .heldout import heldout_flags
from .lora_training import LoraJob
from .registry import not_worse

logger = logging.getLogger(__name__)
CLOSED_FIELDS = ("category", "part", "attributes")


def head_fields(schema: ProjectSchema) -> list[FieldSpec]:
    """The project's closed-set fields, with their label sets, as the head sees them."""
    out = []
    for spec in schema.fields:
        if spec.field in CLOSED_FIELDS and spec.is_closed_set and spec.labels:
            out.append(
                FieldSpec(name=spec.field, labels=tuple(spec.labels), multi_label=spec.field == "attributes")
            )
    return out


def blended_answers(osprey_out, head_probs: dict, head: FastHead | None) -> dict:
    """Field -> {label: probability} served for one region: Osprey's, blended with the head's."""
    served = {}
    for name in ("category", "part"):
        answer = getattr(osprey_out, name, None)
        if answer is not None and hasattr(answer, "scores"):
            served[name] = dict(answer.scores)
    if osprey_out.attributes:
        served["attributes"] = dict(osprey_out.attributes)
    if head is None:
        return served
    for name, probs in served.items():
        if name in head_probs and set(head_probs[name]) == set(probs):
            served[name] = blend(
                probs, head_probs[name], head.n_train.get(name, 0), multi_label=name == "attributes"
            )
    return served


def served_metrics(answers: list[dict], truths: list[dict], fields: list[FieldSpec]) -> dict[str, float]:
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


@dataclass
class Example:
    image_ref: str
    mask: np.ndarray  # (H, W) bool
    truth: dict  # field -> accepted value
    test: bool  # held out (see backend.learning.heldout)


class ProjectTrainer:
    """The job handler (``backend.learning.queue.redis_queue.Worker`` calls it): ``trainer(project, kind, payload) -> dict``."""

    def __init__(
        self, *, service, min_examples: int = 5, tolerance: float = 0.0, lock: threading.Lock | None = None
    ) -> None:
        self.service = service  # OspreyService: models, store, registry, loader, label configs
        self.min_examples = min_examples
        self.tolerance = tolerance
        self.lock = lock or service.model_lock

    def __call__(self, project_id: str, kind: str, payload: dict) -> dict:
        if kind == "train":
            return self.train_head(project_id)
        if kind == "lora":
            return LoraJob(service=self.service, min_examples=self.min_examples)(project_id)
        raise ValueError(f"unknown job kind {kind!r}; expected 'train' or 'lora'")

    def train_head(self, project_id: str) -> dict:
        service = self.service
        schema = service.project_schema(project_id)
        fields = head_fields(schema)
        if not fields:
            return {"status": "skipped", "reason": "the label config has no closed-set field to learn"}
        regions = service.store.accepted_regions(project_id)
        usable = [r for r in regions if r.image_ref and any(r.fields.get(f.name) for f in fields)]
        if len(usable) < self.min_examples:
            return {
                "status": "skipped",
                "reason": f"{len(usable)} accepted regions; {self.min_examples} needed",
            }
        features, examples = self._features(project_id, usable, fields)
        train = [i for i, e in enumerate(examples) if not e.test]
        test = [i for i, e in enumerate(examples) if e.test]
        labels = {f.name: [examples[i].truth.get(f.name) for i in train] for f in fields}
        head = HeadTrainer(fields=fields, layout=feature_layout(service.models.osprey)).fit(
            features[train], labels
        )
        current = service.current_head(project_id)
        candidate_metrics, current_metrics = self._compare(
            project_id, examples, features, test, fields, head, current
        )
        promote, reason = not_worse(candidate_metrics, current_metrics, tolerance=self.tolerance)

        parent = service.registry.current(project_id)
        parent_dir = service.registry.path(project_id, parent.version) if parent else None
        keep_lora = parent_dir is not None and (parent_dir / "lora").is_dir()

        def write(folder):
            head.save(folder / "head")
            if keep_lora:
                shutil.copytree(parent_dir / "lora", folder / "lora")  # the served adapter stays
            return {
                "train_examples": len(train),
                "heldout_examples": len(test),
                "metrics": candidate_metrics,
                "notes": f"served now: {current_metrics}; {reason}",
            }

        info = service.registry.create(
            project_id, kind="head+lora" if keep_lora else "head", base_model_version=service.models.version,
            write=write,
            parent=parent.version if parent else None,
        )  # fmt: skip
        if promote:
            service.registry.promote(project_id, info.version, reason=reason)
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
            "reason": reason,
        }

    def _features(self, project_id: str, regions, fields) -> tuple[np.ndarray, list[Example]]:
        by_image: dict[str, list] = defaultdict(list)
        for region in regions:
            by_image[region.image_ref].append(region)
        rows, examples, keys = [], [], []
        for ref, group in by_image.items():
            rgb = self.service.loader.load(ref).rgb
            masks = [r.mask() for r in group]
            with self.lock:
                self.service.activate_project(project_id)
                rows.append(region_features(self.service.models.osprey, rgb, masks))
            for region, mask in zip(group, masks, strict=True):
                truth = {f.name: region.fields.get(f.name) for f in fields}
                examples.append(Example(ref, mask, truth, test=False))
                keys.append((region.task_id, region.annotation_id))
        for example, test in zip(examples, heldout_flags(keys), strict=True):
            example.test = test
        return np.concatenate(rows).astype(np.float32), examples

    def _compare(self, project_id: str, examples, features, test, fields, head, current):
        osprey = self.service.models.osprey
        by_name = {f.name: f for f in fields}
        request = LabelRequest(
            categories=by_name["category"].labels if "category" in by_name else None,
            parts=by_name["part"].labels if "part" in by_name else None,
            attributes=by_name["attributes"].labels if "attributes" in by_name else None,
        )
        by_image: dict[str, list[int]] = defaultdict(list)
        for i in test:
            by_image[examples[i].image_ref].append(i)
        outputs: dict[int, object] = {}
        for ref, indices in by_image.items():
            rgb = self.service.loader.load(ref).rgb
            masks = [examples[i].mask for i in indices]
            with self.lock:
                self.service.activate_project(project_id)  # what is served now: its adapter too
                for i, out in zip(indices, osprey.label(rgb, masks, request), strict=True):
                    outputs[i] = out
        truths = [examples[i].truth for i in test]
        new_probs = head.label_probs(features[test])
        candidate = [blended_answers(outputs[i], p, head) for i, p in zip(test, new_probs, strict=True)]
        if current is not None and current.compatible_with(head.layout):
            old_probs = current.label_probs(features[test])
            served = [blended_answers(outputs[i], p, current) for i, p in zip(test, old_probs, strict=True)]
        else:
            served = [blended_answers(outputs[i], {}, None) for i in test]
        return served_metrics(candidate, truths, fields), served_metrics(served, truths, fields)
