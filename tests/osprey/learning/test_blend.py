"""The served blend: its head weight fitted per field on held-out labels (cross-validation by task, a
prior rule when there are too few), stored in the head and read back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from osprey.inference.fields import ClosedSetAnswer, RegionLabels
from osprey.learning.blend import (
    MIN_FIT_EXAMPLES,
    FieldBlend,
    blend_labels,
    cross_validated_blend,
    fit_blend_weight,
    pool,
    pool_arrays,
    prior_weight,
    task_folds,
)
from osprey.learning.head import FastHead, HeadConfig, HeadField, HeadTrainer

LABELS = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")


def one_hot_probs(index: np.ndarray, n_labels: int, confidence: float) -> np.ndarray:
    """``(N, L)`` probabilities putting ``confidence`` on ``index`` and the rest evenly elsewhere."""
    probs = np.full((len(index), n_labels), (1 - confidence) / (n_labels - 1))
    probs[np.arange(len(index)), index] = confidence
    return probs


def held_out(seed: int = 0, n: int = 60):
    """Truth, an informed ``good`` opinion (right on 90% of rows) and a ``noise`` one (random)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, n)
    guess = np.where(rng.random(n) < 0.9, truth, (truth + 1) % 3)
    good = one_hot_probs(guess, 3, 0.8)
    noise = rng.dirichlet(np.ones(3) * 2, n)
    return truth, good, noise


def test_the_fitted_blend_serves_the_better_opinion():
    truth, good, noise = held_out()
    # The head is clearly better: what is served is the head's answer on every held-out region.
    fitted = fit_blend_weight(noise, good, truth, multi_label=False, prior=0.5)
    served = pool_arrays(noise, good, fitted.weight, multi_label=False)
    assert fitted.method == "cross-validation" and fitted.examples == 60
    assert fitted.weight >= 0.9 and (served.argmax(1) == good.argmax(1)).all()
    assert fitted.blend_accuracy == fitted.head_accuracy == pytest.approx((good.argmax(1) == truth).mean())
    assert fitted.osprey_accuracy < 0.6
    # Osprey is better: Osprey's answer is served.
    fitted = fit_blend_weight(good, noise, truth, multi_label=False, prior=0.5)
    served = pool_arrays(good, noise, fitted.weight, multi_label=False)
    assert fitted.weight <= 0.1 and (served.argmax(1) == good.argmax(1)).all()
    assert fitted.blend_accuracy == fitted.osprey_accuracy >= fitted.head_accuracy


def test_attributes_are_fitted_on_yes_no_accuracy():
    rng = np.random.default_rng(1)
    truth = rng.random((40, 3)) < 0.4
    informed = np.where(truth, 0.85, 0.15)
    random = rng.random((40, 3))
    fitted = fit_blend_weight(random, informed, truth, multi_label=True, prior=0.2)
    assert fitted.weight >= 0.9 and fitted.blend_accuracy == fitted.head_accuracy == 1.0
    fitted = fit_blend_weight(informed, random, truth, multi_label=True, prior=0.8)
    assert fitted.weight <= 0.1 and fitted.blend_accuracy == 1.0


def test_too_few_held_out_labels_keep_the_prior_rule():
    truth, good, noise = held_out(n=MIN_FIT_EXAMPLES - 1)
    fitted = fit_blend_weight(noise, good, truth, multi_label=False, prior=prior_weight(30))
    assert fitted == FieldBlend(weight=0.6, method="prior", examples=MIN_FIT_EXAMPLES - 1)
    assert prior_weight(0) == 0.0 and prior_weight(20) == 0.5 and prior_weight(80) == 0.8
    with pytest.raises(ValueError, match="one truth per row"):
        fit_blend_weight(noise, good[:3], truth, multi_label=False, prior=0.5)


def test_pool_ends_are_osprey_and_the_head():
    osprey, head = {"a": 0.7, "b": 0.2, "c": 0.1}, {"a": 0.05, "b": 0.9, "c": 0.05}
    assert pool(osprey, head, 0.0, multi_label=False) == osprey
    assert pool(osprey, head, 1.0, multi_label=False) == pytest.approx(head)
    assert pool({"x": 0.2}, {"x": 0.9}, 1.0, multi_label=True) == pytest.approx({"x": 0.9})
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        pool(osprey, head, 1.5, multi_label=False)
    answer = RegionLabels(category=ClosedSetAnswer("a", 0.7, osprey), attributes={"red": 0.9})
    served = blend_labels(answer, {"category": head, "attributes": {"red": 0.1}}, {"category": 1.0})
    assert served.category.label == "b" and served.attributes == {"red": 0.9}  # attributes: weight 0
    assert answer.category.label == "a"  # not changed


def test_folds_keep_a_task_together_and_stay_balanced():
    groups = [7, 7, 8, 9, 9, 9, 10, 11, 12, 13, 14]
    folds = task_folds(groups, 5)
    assert folds.tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 0, 1, 2]


def synthetic(seed: int, n_tasks: int = 40):
    """Regions of ``n_tasks`` tasks (1-3 each) whose 8 features carry the shape and the colour clearly."""
    rng = np.random.default_rng(seed)
    groups = [t for t in range(n_tasks) for _ in range(rng.integers(1, 4))]
    shapes = rng.integers(0, 3, len(groups))
    colours = rng.integers(0, 3, len(groups))
    features = rng.normal(0, 1, (len(groups), 8)).astype(np.float32)
    features[np.arange(len(groups)), shapes] += 4.0
    features[np.arange(len(groups)), 3 + colours] += 4.0
    labels = {"category": [LABELS[i] for i in shapes], "attributes": [[COLOURS[i]] for i in colours]}
    return features, labels, groups, shapes, colours


FIELDS = [HeadField("category", LABELS), HeadField("attributes", COLOURS, multi_label=True)]
QUICK = HeadConfig(max_iter=40)  # 8 features: converged long before; keeps the 10 fits per test short


def test_cross_validation_trusts_a_head_that_learned_and_osprey_when_it_did_not():
    features, labels, groups, shapes, colours = synthetic(0)
    trainer = HeadTrainer(fields=FIELDS, config=QUICK)
    rng = np.random.default_rng(5)
    n = len(groups)
    clueless = {"category": rng.dirichlet(np.ones(3), n), "attributes": rng.random((n, 3))}
    n_train = {"category": n, "attributes": n}
    fitted = cross_validated_blend(trainer, features, labels, clueless, groups=groups, n_train=n_train)
    assert fitted["category"].method == "cross-validation" and fitted["category"].examples == n
    assert fitted["category"].weight >= 0.8 and fitted["attributes"].weight >= 0.8
    assert fitted["category"].blend_accuracy >= fitted["category"].head_accuracy >= 0.9

    # The same Osprey answers right this time, and the head's features are noise: Osprey is kept.
    noise = np.random.default_rng(6).normal(0, 1, features.shape).astype(np.float32)
    knows = {"category": one_hot_probs(shapes, 3, 0.7), "attributes": np.eye(3)[colours] * 0.8 + 0.1}
    fitted = cross_validated_blend(trainer, noise, labels, knows, groups=groups, n_train=n_train)
    assert fitted["category"].weight <= 0.2 and fitted["category"].blend_accuracy == 1.0
    assert fitted["attributes"].weight <= 0.2


def test_rows_without_an_osprey_answer_only_train():
    features, labels, groups, _, _ = synthetic(2, n_tasks=12)
    probs = np.full((len(groups), 3), np.nan)
    probs[:5] = 1 / 3
    fitted = cross_validated_blend(
        HeadTrainer(fields=FIELDS[:1], config=QUICK), features, {"category": labels["category"]}, {"category": probs}, groups=groups,
        n_train={"category": len(groups)},
    )  # fmt: skip
    assert fitted["category"] == FieldBlend(weight=prior_weight(len(groups)), method="prior", examples=5)


def test_the_fitted_blend_is_saved_with_the_head(tmp_path):
    features, labels, groups, _, _ = synthetic(3)
    trainer = HeadTrainer(fields=FIELDS, config=QUICK)
    head = trainer.fit(features, labels)
    assert head.head_weights() == {
        "category": prior_weight(len(groups)),
        "attributes": prior_weight(len(groups)),
    }
    blend = {"category": FieldBlend(0.95, "cross-validation", 50, 0.3, 0.9, 0.92)}
    fitted = head.with_blend(blend)
    assert head.blend == {} and fitted.head_weights()["category"] == 0.95
    loaded = FastHead.load(fitted.save(tmp_path / "head"))
    assert loaded.blend == blend and loaded.head_weights() == fitted.head_weights()

    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["fields"][0]["blend"]["weight"] == 0.95 and "blend" not in meta["fields"][1]
    meta["fields"][0]["blend"] = {"weight": 3.0, "method": "cross-validation"}
    (tmp_path / "head" / "head.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="weight in \\[0, 1\\]"):
        FastHead.load(tmp_path / "head")
    with pytest.raises(ValueError, match="unknown fields"):
        head.with_blend({"part": blend["category"]})
