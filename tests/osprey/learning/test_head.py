"""The fast per-project head: training, unseen labels, save/load, evaluation, blending, and the
learning curve on synthetic shapes (category = shape, attribute = colour)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from osprey.learning.blend import blend
from osprey.learning.head import FastHead, HeadConfig, HeadField, HeadTrainer
from osprey.learning.region_features import FeatureLayout, feature_layout

CATEGORIES = ("cat", "dog", "bird", "fish")
ATTRIBUTES = ("red", "small", "furry")
LAYOUT = FeatureLayout(groups=(("a", 6), ("b", 2)), backbone="test")


@pytest.fixture(autouse=True)
def two_threads():
    """Same thread count on every machine (reproducible sums), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def fields() -> list[HeadField]:
    return [
        HeadField(name="category", labels=CATEGORIES),
        HeadField(name="attributes", labels=ATTRIBUTES, multi_label=True),
    ]


def toy_data(n: int, seed: int = 0, n_classes: int = 3):
    """Features whose first dims encode the class (first ``n_classes`` categories) and attribute."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, n_classes, n)
    features = rng.normal(0, 0.3, (n, 8)).astype(np.float32)
    features[np.arange(n), classes] += 3.0
    red = rng.random(n) < 0.5
    features[:, 6] += np.where(red, 2.0, -2.0)
    labels = {
        "category": [CATEGORIES[c] for c in classes],
        "attributes": [["red", "small"] if r else ["small"] for r in red],
    }
    return features, labels


def test_fit_predict_and_evaluate():
    features, labels = toy_data(60)
    head = HeadTrainer(fields=fields(), layout=LAYOUT).fit(features, labels)
    test_x, test_labels = toy_data(40, seed=1)
    probs = head.predict_proba(test_x)
    assert probs["category"].shape == (40, 4) and probs["attributes"].shape == (40, 3)
    np.testing.assert_allclose(probs["category"].sum(1), 1.0, rtol=1e-5)
    scores = head.evaluate(test_x, test_labels)
    assert scores["category"] == 1.0
    assert scores["attributes"] == 1.0  # only "red" varies: mAP over attributes with both outcomes
    assert head.n_train == {"category": 60, "attributes": 60}
    assert probs["attributes"][:, 1].min() == pytest.approx(61 / 62)  # "small" always ticked: (60+1)/(60+2)
    assert probs["attributes"][:, 2].max() == pytest.approx(1 / 62)  # "furry" never: (0+1)/(60+2)


def test_unseen_labels_get_the_laplace_share():
    features, labels = toy_data(30, n_classes=3)  # "fish" never appears
    head = HeadTrainer(fields=fields(), layout=LAYOUT).fit(features, labels)
    fish = head.predict_proba(features)["category"][:, 3]
    np.testing.assert_allclose(fish, 1 / (30 + 4))  # U a / (N + L a) with U = 1, a = 1, L = 4
    empty = HeadTrainer(fields=fields(), layout=LAYOUT).fit(np.zeros((0, 8), np.float32), {})
    probs = empty.predict_proba(features)
    np.testing.assert_allclose(probs["category"], 0.25)  # no data: uniform
    np.testing.assert_allclose(probs["attributes"], 0.5)
    one = HeadTrainer(fields=fields(), layout=LAYOUT).fit(features[:5], {"category": ["dog"] * 5})
    np.testing.assert_allclose(one.predict_proba(features)["category"][:, 1], 1 - 3 / (5 + 4), rtol=1e-6)
    assert one.n_train == {"category": 5, "attributes": 0}


def test_missing_and_unknown_labels(caplog):
    features, labels = toy_data(20)
    labels["category"][0] = None
    labels["category"][1] = "unicorn"
    labels["attributes"][2] = None
    labels["attributes"][3] = ["red", "sparkly"]
    with caplog.at_level(logging.WARNING, logger="osprey.learning.head"):
        head = HeadTrainer(fields=fields(), layout=LAYOUT).fit(features, labels)
    assert head.n_train == {"category": 18, "attributes": 19}
    assert "ignored 1 labels" in caplog.text
    with pytest.raises(ValueError, match="unknown fields"):
        HeadTrainer(fields=fields(), layout=LAYOUT).fit(features, {"colour": ["red"] * 20})
    with pytest.raises(ValueError, match="one per feature row"):
        HeadTrainer(fields=fields(), layout=LAYOUT).fit(features, {"category": ["cat"]})
    with pytest.raises(ValueError, match="lists of labels"):
        HeadTrainer(fields=fields(), layout=LAYOUT).fit(features, {"attributes": ["red"] * 20})
    with pytest.raises(ValueError, match="columns"):
        HeadTrainer(fields=fields(), layout=LAYOUT).fit(features[:, :5], labels)
    with pytest.raises(ValueError, match=r"\(R, 8\)"):
        head.predict_proba(features[:, :5])
    with pytest.raises(ValueError, match="distinct labels"):
        HeadField(name="category", labels=("a", "a"))
    with pytest.raises(ValueError, match="weight_decay"):
        HeadConfig(weight_decay=0)


@pytest.mark.parametrize("hidden_dim", [0, 8])
def test_save_load_round_trip(tmp_path, hidden_dim):
    features, labels = toy_data(50)
    head = HeadTrainer(fields=fields(), layout=LAYOUT, config=HeadConfig(hidden_dim=hidden_dim)).fit(
        features, labels
    )
    again = HeadTrainer(fields=fields(), layout=LAYOUT, config=HeadConfig(hidden_dim=hidden_dim)).fit(
        features, labels
    )
    target = tmp_path / "v3" / "head"
    head.save(target)
    assert sorted(p.name for p in target.iterdir()) == ["head.json", "head.safetensors"]
    assert [p.name for p in target.parent.iterdir()] == ["head"]  # no temporary directory left behind
    meta = json.loads((target / "head.json").read_text())
    assert meta["fields"][0]["labels"] == list(CATEGORIES) and meta["layout"]["backbone"] == "test"
    loaded = FastHead.load(target)
    test_x, _ = toy_data(30, seed=2)
    for name, probs in head.predict_proba(test_x).items():
        np.testing.assert_array_equal(loaded.predict_proba(test_x)[name], probs)
        np.testing.assert_array_equal(again.predict_proba(test_x)[name], probs)  # seeded: deterministic
    assert loaded.n_train == head.n_train and loaded.config == head.config
    assert loaded.compatible_with(LAYOUT) and not loaded.compatible_with(
        FeatureLayout(groups=(("a", 8),), backbone="x")
    )
    with pytest.raises(ValueError, match="already exists"):
        head.save(target)
    with pytest.raises(ValueError, match="not a saved head"):
        FastHead.load(tmp_path)
    meta["version"] = 99
    (target / "head.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="retrain"):
        FastHead.load(target)


def test_blend_known_numbers():
    osprey, head = {"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}
    assert blend(osprey, head, 20) == pytest.approx({"a": 0.75, "b": 0.25})  # w = 0.5: sqrt(.9) : sqrt(.1)
    assert blend({"a": 0.8, "b": 0.2}, {"a": 0.2, "b": 0.8}, 20) == pytest.approx({"a": 0.5, "b": 0.5})
    # w = 60 / 80 = 0.75: p(a) : p(b) = (.8 * .2^3)^(1/4) : (.2 * .8^3)^(1/4) = 1 : 2
    assert blend({"a": 0.8, "b": 0.2}, {"a": 0.2, "b": 0.8}, 60) == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    assert blend({"a": 0.8, "b": 0.2}, {"a": 0.2, "b": 0.8}, 5, k=5) == pytest.approx({"a": 0.5, "b": 0.5})
    # attributes: logit pooling, logit = 0.5 * 0 + 0.5 * log 9 = log 3
    attrs = blend({"red": 0.5, "big": 0.3}, {"red": 0.9, "big": 0.3}, 20, multi_label=True)
    assert attrs == pytest.approx({"red": 0.75, "big": 0.3})


def test_blend_limits():
    osprey = {"a": 0.7, "b": 0.2, "c": 0.1}
    head = {"a": 0.05, "b": 0.9, "c": 0.05}
    assert blend(osprey, head, 0) == osprey  # no accepted examples: Osprey decides, exactly
    assert blend(osprey, head, 0, multi_label=True) == osprey
    many = blend(osprey, head, 10**7)
    assert many == pytest.approx(head, abs=1e-5)
    assert list(many) == ["a", "b", "c"] and math.isclose(sum(many.values()), 1.0)
    assert blend(osprey, head, 10**7, multi_label=True) == pytest.approx(head, abs=1e-5)
    assert blend({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, 20) == pytest.approx({"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="label sets differ"):
        blend(osprey, {"a": 1.0}, 5)
    with pytest.raises(ValueError, match="n_train_examples_for_field >= 0"):
        blend(osprey, head, -1)


def _learning_curve_module():
    path = Path(__file__).resolve().parents[3] / "bench" / "learning_curve.py"
    name = "bench_learning_curve"
    if name not in sys.modules:  # dataclasses look their module up in sys.modules
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_learning_curve_on_synthetic_shapes(tiny_osprey):
    """Item 6 of "Retrain on accepted labels": on the random-weight tiny Osprey's region features,
    the head trained on the first k accepted regions climbs from chance to >= 90% on held-out images."""
    lc = _learning_curve_module()
    rng = np.random.default_rng(0)
    train_scenes = []
    while sum(len(s.masks) for s in train_scenes) < 80:
        train_scenes.append(lc.make_scene(rng))
    train = lc.region_set(tiny_osprey, train_scenes)
    test = lc.region_set(tiny_osprey, lc.make_scenes(40, seed=1000))
    assert len(test.shapes) >= 60 and set(test.shapes) == set(lc.SHAPES)
    run = lc.fast_head_version(feature_layout(tiny_osprey))
    curve = {k: run(k, train, test) for k in (0, 5, 10, 20, 40, 80)}
    category = [curve[k]["category_acc"] for k in curve]
    colour = [curve[k]["colour_acc"] for k in curve]
    assert category[0] < 0.45 and colour[0] < 0.4  # no labels: chance
    assert category[-1] >= 0.9 and colour[-1] >= 0.9
    assert curve[80]["attributes_map"] >= 0.9
    for earlier, later in zip(category, category[1:], strict=False):
        assert later >= earlier - 0.1, category  # climbs (small dips allowed)
    assert category[-1] - category[0] >= 0.45
