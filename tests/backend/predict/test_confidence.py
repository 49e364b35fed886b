"""The prediction score: a region's smallest category/part margin times SAM's predicted IoU, a task's
least confident region, checked by hand against the tiny model's real answers on a real PNG."""

from __future__ import annotations

import pytest

from backend.labelstudio.schema import parse_label_config
from backend.predict.answers import answer_tasks
from backend.predict.confidence import margin, region_confidence, task_confidence
from backend.predict.options import PredictOptions
from backend.predict.regions import Region
from backend.predict.results import task_results
from osprey.inference.fields import ClosedSetAnswer, RegionLabels

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="label" toName="image">
    <Label value="object"/>
  </BrushLabels>
  <Choices name="category" toName="image" perRegion="true">
    <Choice value="person"/><Choice value="car"/><Choice value="dog"/><Choice value="tree"/>
  </Choices>
  <Choices name="part" toName="image" perRegion="true">
    <Choice value="whole"/><Choice value="head"/><Choice value="wheel"/>
  </Choices>
  <Choices name="attributes" toName="image" perRegion="true" choice="multiple">
    <Choice value="red"/><Choice value="blue"/>
  </Choices>
</View>"""


def by_hand(scores: dict[str, float]) -> float:
    first, second = sorted(scores.values(), reverse=True)[:2]
    return first - second


def test_region_and_task_scores_on_the_tiny_models_answers(tiny_osprey, scene):
    schema = parse_label_config(CONFIG)
    masks = scene["masks"]  # read back from the PNG files the fixture wrote
    regions = [
        Region(mask=masks[0], region_id="drawn"),  # an annotator's region: no SAM IoU
        Region(mask=masks[1], region_id="sam", score=0.8),  # SAM drew it
        Region(mask=masks[2], region_id="over", score=1.04),  # SAM's IoU head can overshoot 1
    ]
    options = PredictOptions(segment_everything=False)
    items = [(scene["image"], regions), (scene["image"], [])]
    answers = answer_tasks(items, schema=schema, osprey=tiny_osprey, options=options)
    (results, task_score), (empty_results, empty_score) = task_results(
        items, answers, schema=schema, options=options
    )

    expected = {}
    for region, labels, iou in zip(regions, answers[0].regions, (1.0, 0.8, 1.0), strict=True):
        category, part = labels.category.scores, labels.part.scores
        expected[region.region_id] = min(by_hand(category), by_hand(part)) * iou
    scored = {item["id"]: item["score"] for item in results if item["type"] == "brushlabels"}
    assert scored == pytest.approx(expected, abs=1e-6)
    assert task_score == pytest.approx(min(expected.values()), abs=1e-6)
    assert 0.0 < task_score < 1.0
    # The category's Choices result still carries the category's probability.
    choices = [i for i in results if i["type"] == "choices" and i["from_name"] == "category"]
    for item, labels in zip(choices, answers[0].regions, strict=True):
        assert item["score"] == pytest.approx(labels.category.score)
    assert (empty_results, empty_score) == ([], 0.0)  # nothing found: first in line too


def test_margin_and_what_counts():
    assert margin({"a": 0.5, "b": 0.49, "c": 0.01}) == pytest.approx(0.01)  # top 0.5, yet a coin toss
    assert margin({"a": 0.5, "b": 0.25, "c": 0.25}) == pytest.approx(0.25)
    assert margin({"only": 1.0}) == 1.0
    confident = ClosedSetAnswer("a", 0.9, {"a": 0.9, "b": 0.1})
    doubtful = ClosedSetAnswer("x", 0.6, {"x": 0.6, "y": 0.4})
    labels = RegionLabels(category=confident, part=doubtful, attributes={"red": 0.5})
    assert region_confidence(labels, None) == pytest.approx(0.2)  # the part decides; attributes do not
    assert region_confidence(labels, 0.5) == pytest.approx(0.1)
    generated = RegionLabels(category="a kite", text_scores={"category": 0.7})
    assert region_confidence(generated, 0.9) == pytest.approx(0.63)
    assert region_confidence(RegionLabels(caption="a kite"), 0.9) == pytest.approx(0.9)  # the mask alone
    assert region_confidence(None, None) == 1.0
    assert task_confidence([0.7, 0.2, 0.9]) == 0.2 and task_confidence([]) == 0.0
