"""What is served: Osprey's closed-set probabilities pooled with the project's fast head, and the
per-field head weight fitted on held-out labels.

Pooling is log-linear (a weighted geometric mean, the pooling rule that commutes with Bayesian
updating) with one head weight ``w`` in ``[0, 1]`` per field; ``w = 0`` serves Osprey exactly and
``w = 1`` the head. Single-label fields (category, part)::

    p(l) = p_osprey(l)^(1 - w) * p_head(l)^w / sum_l' p_osprey(l')^(1 - w) * p_head(l')^w

Attributes (independent yes/no probabilities), the same rule for each two-outcome variable, which is
linear pooling in logit space::

    p(a) = sigmoid((1 - w) * logit(p_osprey(a)) + w * logit(p_head(a)))

Probabilities are clipped to ``[1e-9, 1 - 1e-9]`` before logs.

Choosing ``w`` (:func:`fit_blend_weight`, :func:`cross_validated_blend`): on regions the head did not
train on, every ``w`` of the grid ``0, 0.05, ..., 1`` is scored; the one with the best accuracy wins
(category/part: the argmax is the accepted label; attributes: each attribute on the right side of 0.5,
the metrics the promotion gate reads). Among equally accurate weights the one nearest the more
accurate end wins (the ends tied: the one with the lower mean log loss), so a second opinion is mixed
in only where it makes answers right that the better one alone gets wrong. Both ends of the grid are Osprey alone and the head alone, so on those
regions the served blend is never less accurate than the better of the two. Held-out regions come
from ``folds``-fold cross-validation over the training regions, grouped by task: each region is
scored by a head trained without its task. A field with fewer than ``MIN_FIT_EXAMPLES`` such regions
keeps the prior rule ``w = n / (n + 20)``, ``n`` the field's accepted examples (:func:`prior_weight`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from osprey.inference.fields import ClosedSetAnswer, RegionLabels

BLEND_K = 20.0
MIN_FIT_EXAMPLES = 10
WEIGHT_GRID = tuple(i / 20 for i in range(21))
CV_FOLDS = 5
_EPS = 1e-9


@dataclass(frozen=True)
class FieldBlend:
    """A field's head weight and how it was chosen: ``method`` is ``cross-validation`` (``examples``
    held-out regions scored; the accuracies of Osprey alone, the head alone and the blend on them) or
    ``prior`` (too few held-out regions: ``w = n / (n + 20)``)."""

    weight: float
    method: str
    examples: int = 0
    osprey_accuracy: float | None = None
    head_accuracy: float | None = None
    blend_accuracy: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0 or self.method not in ("cross-validation", "prior"):
            raise ValueError(
                f"a blend needs a weight in [0, 1] and method 'cross-validation' or 'prior', got "
                f"{self.weight!r} and {self.method!r}; retrain the head"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> FieldBlend:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def prior_weight(n_train_examples_for_field: int, k: float = BLEND_K) -> float:
    """The fallback head weight ``n / (n + k)``: 0.2 at ``n = 5``, 0.5 at ``k = 20``, 0.8 at 80 (the
    shrinkage a posterior mean makes towards a prior worth ``k`` observations)."""
    if n_train_examples_for_field < 0 or k <= 0:
        raise ValueError(
            f"expected n_train_examples_for_field >= 0 and k > 0, got {n_train_examples_for_field} and {k}"
        )
    return n_train_examples_for_field / (n_train_examples_for_field + k)


def pool_arrays(osprey: np.ndarray, head: np.ndarray, weight: float, *, multi_label: bool) -> np.ndarray:
    """``(..., L)`` probabilities of both, pooled with head weight ``weight`` (module docstring)."""
    po = np.clip(np.asarray(osprey, dtype=np.float64), _EPS, 1 - _EPS)
    ph = np.clip(np.asarray(head, dtype=np.float64), _EPS, 1 - _EPS)
    if multi_label:
        logit = (1 - weight) * np.log(po / (1 - po)) + weight * np.log(ph / (1 - ph))
        return 1.0 / (1.0 + np.exp(-logit))
    log_p = (1 - weight) * np.log(po) + weight * np.log(ph)
    pooled = np.exp(log_p - log_p.max(axis=-1, keepdims=True))
    return pooled / pooled.sum(axis=-1, keepdims=True)


def pool(
    osprey_probs: Mapping[str, float], head_probs: Mapping[str, float], weight: float, *, multi_label: bool
) -> dict[str, float]:
    """label -> pooled probability, in ``osprey_probs`` order. ``weight = 0`` returns Osprey's
    probabilities unchanged. Both dicts must have the same labels (a head trained on an older label
    set must be retrained, or not blended)."""
    if set(osprey_probs) != set(head_probs):
        raise ValueError(
            f"Osprey and head label sets differ: only Osprey {sorted(set(osprey_probs) - set(head_probs))}, "
            f"only head {sorted(set(head_probs) - set(osprey_probs))}; retrain the head on the current labels"
        )
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the head weight must be in [0, 1], got {weight}")
    if weight == 0.0:
        return dict(osprey_probs)
    labels = list(osprey_probs)
    pooled = pool_arrays(
        np.array([osprey_probs[label] for label in labels]),
        np.array([head_probs[label] for label in labels]),
        weight,
        multi_label=multi_label,
    )
    return {label: float(p) for label, p in zip(labels, pooled, strict=True)}


def blend(
    osprey_probs: Mapping[str, float],
    head_probs: Mapping[str, float],
    n_train_examples_for_field: int,
    *,
    k: float = BLEND_K,
    multi_label: bool = False,
) -> dict[str, float]:
    """:func:`pool` with the prior rule's weight ``n / (n + k)`` (:func:`prior_weight`)."""
    weight = prior_weight(n_train_examples_for_field, k)
    return pool(osprey_probs, head_probs, weight, multi_label=multi_label)


def blend_labels(
    labels: RegionLabels, head_probs: Mapping[str, Mapping[str, float]], weights
) -> RegionLabels:
    """One region's answers as they are served: each closed-set field (category, part, attributes)
    pooled with the head's probabilities for it with head weight ``weights[field]`` (a head's
    :meth:`~osprey.learning.head.FastHead.head_weights`) when the head answers the same label set;
    every other field as the model gave it. ``labels`` is not changed."""
    out = dataclasses.replace(labels, text_scores=dict(labels.text_scores))
    for name in ("category", "part"):
        answer = getattr(labels, name)
        probs = head_probs.get(name)
        if isinstance(answer, ClosedSetAnswer) and probs is not None and set(probs) == set(answer.scores):
            scores = pool(answer.scores, probs, weights.get(name, 0.0), multi_label=False)
            best = max(scores, key=scores.get)
            setattr(out, name, ClosedSetAnswer(label=best, score=scores[best], scores=scores))
    probs = head_probs.get("attributes")
    if labels.attributes and probs is not None and set(probs) == set(labels.attributes):
        out.attributes = pool(labels.attributes, probs, weights.get("attributes", 0.0), multi_label=True)
    return out


def closed_set_probs(labels: RegionLabels) -> dict[str, dict[str, float]]:
    """Field -> {label: probability} of a region's closed-set answers (what held-out metrics score)."""
    out = {}
    for name in ("category", "part"):
        answer = getattr(labels, name)
        if isinstance(answer, ClosedSetAnswer):
            out[name] = dict(answer.scores)
    if labels.attributes:
        out["attributes"] = dict(labels.attributes)
    return out


def _accuracy_and_loss(probs: np.ndarray, truth: np.ndarray, *, multi_label: bool) -> tuple[float, float]:
    """``probs (N, L)``; ``truth``: ``(N,)`` label indices, or ``(N, L)`` bool for attributes."""
    if multi_label:
        hits = (probs >= 0.5) == truth
        p_true = np.where(truth, probs, 1 - probs)
    else:
        hits = probs.argmax(1) == truth
        p_true = probs[np.arange(len(truth)), truth]
    return float(hits.mean()), float(-np.log(np.clip(p_true, _EPS, 1)).mean())


def fit_blend_weight(
    osprey: np.ndarray, head: np.ndarray, truth: np.ndarray, *, multi_label: bool, prior: float
) -> FieldBlend:
    """The head weight for one field, chosen on regions the head did not train on (module docstring).

    Args:
        osprey, head: ``(N, L)`` probabilities of the N held-out regions, columns in one label order.
        truth: the accepted labels, ``(N,)`` column indices (single-label) or ``(N, L)`` bool (attributes).
        prior: the weight kept when ``N < MIN_FIT_EXAMPLES``.
    """
    osprey, head, truth = np.asarray(osprey), np.asarray(head), np.asarray(truth)
    if osprey.shape != head.shape or len(truth) != len(osprey):
        raise ValueError(
            f"expected Osprey and head probabilities of one shape and one truth per row, got "
            f"{osprey.shape}, {head.shape} and {len(truth)} truths"
        )
    if len(truth) < MIN_FIT_EXAMPLES:
        return FieldBlend(weight=prior, method="prior", examples=len(truth))
    scored = {
        w: _accuracy_and_loss(
            pool_arrays(osprey, head, w, multi_label=multi_label), truth, multi_label=multi_label
        )
        for w in WEIGHT_GRID
    }
    better_end = min((0.0, 1.0), key=lambda w: (-scored[w][0], scored[w][1]))
    best = min(WEIGHT_GRID, key=lambda w: (-scored[w][0], abs(w - better_end)))
    return FieldBlend(
        weight=best,
        method="cross-validation",
        examples=len(truth),
        osprey_accuracy=scored[0.0][0],
        head_accuracy=scored[1.0][0],
        blend_accuracy=scored[best][0],
    )


def task_folds(groups: Sequence, folds: int = CV_FOLDS) -> np.ndarray:
    """A fold per row: the distinct ``groups`` (task ids), in order of first appearance, dealt round
    robin into ``folds`` folds, so one task's regions share a fold and the folds stay balanced."""
    order: dict = {}
    for group in groups:
        order.setdefault(group, len(order))
    return np.array([order[group] % folds for group in groups], dtype=np.int64)


def cross_validated_blend(
    trainer,
    features: np.ndarray,
    labels: Mapping[str, Sequence],
    osprey_probs: Mapping[str, np.ndarray],
    *,
    groups: Sequence,
    n_train: Mapping[str, int],
    folds: int = CV_FOLDS,
) -> dict[str, FieldBlend]:
    """Field -> :class:`FieldBlend` chosen by ``folds``-fold cross-validation, grouped by task.

    Args:
        trainer: a :class:`~osprey.learning.head.HeadTrainer` (``fields``, ``fit``): the one that fits
            the head being blended.
        features, labels: what that head is trained on (``(N, F)`` and field -> N labels, as
            :meth:`HeadTrainer.fit` takes them).
        osprey_probs: field -> ``(N, L)`` Osprey's probabilities in the field's label order; rows of NaN
            where Osprey gave no answer (those rows only train).
        groups: N task ids; a task's regions are always on the same side of a split.
        n_train: field -> accepted examples of the final head (the prior rule's ``n``).
    """
    features = np.asarray(features, dtype=np.float32)
    fold_of = task_folds(groups, folds)
    out_of_fold = {
        name: np.full((len(features), len(spec.labels)), np.nan) for name, spec in trainer.fields.items()
    }
    for fold in range(folds):
        rest, held = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        if not len(rest) or not len(held):
            continue
        head = trainer.fit(
            features[rest], {name: [values[i] for i in rest] for name, values in labels.items()}
        )
        for name, probs in head.predict_proba(features[held]).items():
            out_of_fold[name][held] = probs
    out = {}
    for name, spec in trainer.fields.items():
        values = labels.get(name, [None] * len(features))
        ospr = osprey_probs.get(name)
        rows = [
            i for i, v in enumerate(values)
            if v is not None and ospr is not None and np.isfinite(ospr[i]).all()
            and np.isfinite(out_of_fold[name][i]).all() and (spec.multi_label or v in spec.labels)
        ]  # fmt: skip
        if spec.multi_label:
            truth = np.array([[label in values[i] for label in spec.labels] for i in rows], dtype=bool)
        else:
            truth = np.array([spec.labels.index(values[i]) for i in rows], dtype=np.int64)
        truth = truth.reshape(len(rows), len(spec.labels)) if spec.multi_label else truth
        empty = np.zeros((0, len(spec.labels)))
        out[name] = fit_blend_weight(
            ospr[rows] if ospr is not None else empty,
            out_of_fold[name][rows],
            truth,
            multi_label=spec.multi_label,
            prior=prior_weight(n_train.get(name, 0)),
        )
    return out
