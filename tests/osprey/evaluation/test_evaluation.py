"""osprey.evaluation: files, masks, normalisation, metrics and the scoring loop, on files and images
the tests write, with answers known by construction."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from osprey.evaluation import metrics
from osprey.evaluation.data import (
    decode_segmentation,
    find_image,
    load_caption_file,
    load_classification_file,
)
from osprey.evaluation.metrics import (
    caption_scores,
    caption_tokens,
    labels_match,
    normalize_caption,
    normalize_category_pixelrefer,
    normalize_ground_truth,
    normalize_prediction,
    semantic_iou,
)
from osprey.evaluation.run import CategoryPrediction, evaluate_captions, evaluate_classification

H, W = 40, 60


# ---------------------------------------------------------------- helpers shared with test_eval_cli
class BagOfWords:
    """A stand-in sentence embedder whose cosine is hand-computable: word-count vectors."""

    name = "bag-of-words"

    def _cos(self, a: str, b: str) -> float:
        ca, cb = Counter(a.lower().split()), Counter(b.lower().split())
        dot = sum(ca[w] * cb[w] for w in ca)
        norm = math.sqrt(sum(v * v for v in ca.values())) * math.sqrt(sum(v * v for v in cb.values()))
        return dot / norm if norm else 0.0

    def similarity(self, a, b):
        return [self._cos(x, y) for x, y in zip(a, b, strict=True)]

    def max_similarity(self, candidates, references):
        return [max(self._cos(c, r) for r in refs) for c, refs in zip(candidates, references, strict=True)]


class ScriptedPredictor:
    """Answers from a script, in file order; records the mask areas it was given."""

    model_id = "scripted"
    untrained = False

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    def predict(self, image, masks):
        self.calls.append((image.shape, [int(m.sum()) for m in masks]))
        out, self.answers = self.answers[: len(masks)], self.answers[len(masks) :]
        return out


def rect(x0, y0, x1, y1):
    """COCO polygon of a rectangle; it rasterises to ``mask[y0:y1, x0:x1]``."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def rect_mask(x0, y0, x1, y1, shape=(H, W)):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written out by hand: column-major run lengths starting with zeros."""
    flat = mask.flatten(order="F").astype(int)
    runs, current, length = [], 0, 0
    for value in flat:
        if value != current:
            runs.append(length)
            current, length = value, 0
        length += 1
    runs.append(length)
    return {"size": list(mask.shape), "counts": runs}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def write_image(path, shape=(H, W)):
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def lvis_paco(tmp_path):
    """An LVIS-layout file (polygons) and a PACO-layout file (RLE, ``object:part`` names) over real
    PNG/JPEG files, with an empty mask, a missing image and an image of the wrong size."""
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "a.png")
    write_image(images / "b.jpg")
    write_image(images / "small.png", shape=(20, 30))
    lvis = [
        {
            "file_name": "a.png", "height": H, "width": W, "id": 1,
            "categories": ["baseball_bat", "red_car", "cup"],
            "annotations": [
                {"segmentation": rect(5, 5, 25, 15), "bbox": [5, 5, 20, 10], "category_id": 3, "id": 11},
                {"segmentation": rect(30, 10, 50, 30) + rect(0, 30, 10, 40), "category_id": 4, "id": 12},
                {"segmentation": [[10, 10, 12, 10, 12, 10]], "category_id": 5, "id": 13},  # zero area
            ],
        },
        {
            "file_name": "missing.png", "height": H, "width": W,
            "categories": ["cat", "dog"],
            "annotations": [{"segmentation": rect(0, 0, 5, 5)}, {"segmentation": rect(5, 5, 9, 9)}],
        },
        {
            "file_name": "small.png", "height": H, "width": W,
            "categories": ["cat"], "annotations": [{"segmentation": rect(0, 0, 5, 5)}],
        },
    ]  # fmt: skip
    paco = [
        {
            "file_name": "b.jpg", "height": H, "width": W,
            "categories": ["person:hand", "dog", "bench:leg"],
            "annotations": [
                {"segmentation": compressed_rle(rect_mask(0, 0, 10, 10))},
                {"segmentation": uncompressed_rle(rect_mask(20, 5, 40, 35))},
                {"segmentation": uncompressed_rle(np.zeros((H, W), bool))},
            ],
        }
    ]  # fmt: skip
    (tmp_path / "lvis.json").write_text(json.dumps(lvis))
    (tmp_path / "paco.json").write_text(json.dumps(paco))
    return {"dir": tmp_path, "images": images, "lvis": tmp_path / "lvis.json", "paco": tmp_path / "paco.json"}


# ---------------------------------------------------------------- normalisation and IoU
@pytest.mark.parametrize(
    ("prediction", "truth", "expected"),
    [
        ("red car", "car", 0.5),
        ("Red Car", "car red", 1.0),
        ("a b c", "c d", 0.25),
        ("dog", "cat", 0.0),
        ("hand ", "hand", 1.0),
        ("car car red", "car", 0.5),  # word sets, not counts
        ("", "", 1.0),
        ("", "dog", 0.0),
    ],
)
def test_semantic_iou_hand_cases(prediction, truth, expected):
    assert semantic_iou(prediction, truth) == pytest.approx(expected)


def test_normalisation_follows_the_authors_script():
    assert normalize_prediction("person:hand.") == "hand "
    assert normalize_prediction("  dog, brown.  ") == "dog  brown "
    assert normalize_prediction("a:b:c") == "b"  # between the first and second colon
    assert normalize_prediction("bench:") == ""
    assert normalize_ground_truth("person:hand") == "person hand"
    assert normalize_ground_truth("baseball_bat") == "baseball bat"
    assert normalize_caption("  region: a man in a red shirt ") == "a man in a red shirt"
    assert labels_match("baseball bat", "baseball_bat") and labels_match("person:hand", "person:hand")
    assert not labels_match("car", "red_car")


# ---------------------------------------------------------------- masks
def test_polygons_decode_to_the_drawn_rectangles():
    mask = decode_segmentation(rect(5, 5, 25, 15), H, W)
    assert np.array_equal(mask, rect_mask(5, 5, 25, 15))
    both = decode_segmentation(rect(30, 10, 50, 30) + rect(0, 30, 10, 40), H, W)
    assert np.array_equal(both, rect_mask(30, 10, 50, 30) | rect_mask(0, 30, 10, 40))
    assert not decode_segmentation([[10, 10, 12, 10, 12, 10]], H, W).any()  # zero-area polygon
    assert not decode_segmentation([[1, 2, 3, 4]], H, W).any()  # too few points: nothing drawn


def test_rle_decodes_compressed_and_uncompressed():
    rng = np.random.default_rng(0)
    drawn = rng.random((H, W)) > 0.7
    assert np.array_equal(decode_segmentation(compressed_rle(drawn), H, W), drawn)
    as_bytes = mask_utils.encode(np.asfortranarray(drawn.astype(np.uint8)))
    assert np.array_equal(decode_segmentation(as_bytes, H, W), drawn)
    assert np.array_equal(decode_segmentation(uncompressed_rle(drawn), H, W), drawn)
    with pytest.raises(ValueError, match="RLE size"):
        decode_segmentation(compressed_rle(drawn), H + 1, W)
    with pytest.raises(ValueError, match="polygons .* or RLE"):
        decode_segmentation("nope", H, W)


# ---------------------------------------------------------------- files
def test_lvis_and_paco_layouts_load(lvis_paco):
    lvis = load_classification_file(lvis_paco["lvis"])
    assert [i.file_name for i in lvis] == ["a.png", "missing.png", "small.png"]
    assert [o.category for o in lvis[0].objects] == ["baseball_bat", "red_car", "cup"]
    assert [o.annotation_id for o in lvis[0].objects] == [11, 12, 13]
    paco = load_classification_file(lvis_paco["paco"])
    assert [o.category for o in paco[0].objects] == ["person:hand", "dog", "bench:leg"]
    assert decode_segmentation(paco[0].objects[1].segmentation, H, W).sum() == 20 * 30


def test_bad_files_say_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps([{"file_name": "a.png", "height": 4, "width": 4, "categories": ["a"], "annotations": []}])
    )
    with pytest.raises(ValueError, match="1 categories for 0 annotations"):
        load_classification_file(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="LVIS/PACO layout"):
        load_classification_file(bad)
    with pytest.raises(FileNotFoundError):
        load_classification_file(tmp_path / "nope.json")


def test_caption_files_in_both_layouts(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{
        "file_name": "a.png", "height": H, "width": W,
        "captions": ["a red car", ["a dog", "a brown dog"]],
        "annotations": [{"segmentation": rect(0, 0, 5, 5)}, {"segmentation": rect(5, 5, 9, 9)}],
    }]))  # fmt: skip
    objects = load_caption_file(listed)[0].objects
    assert [o.captions for o in objects] == [("a red car",), ("a dog", "a brown dog")]
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [
            {"id": 1, "file_name": "COCO_train2014_0001.jpg", "height": H, "width": W, "caption": "the man on the left"},
            {"id": 2, "file_name": "COCO_train2014_0001.jpg", "height": H, "width": W, "caption": "a woman"},
            {"id": 3, "file_name": "COCO_train2014_0002.jpg", "height": H, "width": W, "caption": "unused"},
        ],
        "annotations": [
            {"id": 7, "image_id": 1, "segmentation": rect(0, 0, 5, 5)},
            {"id": 8, "image_id": 2, "segmentation": rect(5, 5, 9, 9)},
            {"id": 9, "image_id": 3, "segmentation": rect(5, 5, 9, 9), "sentences": [{"sent": "own"}, {"sent": "two"}]},
        ],
    }))  # fmt: skip
    images = load_caption_file(coco)
    assert [i.file_name for i in images] == ["COCO_train2014_0001.jpg", "COCO_train2014_0002.jpg"]
    assert [(o.annotation_id, o.captions) for o in images[0].objects] == [
        (7, ("the man on the left",)),
        (8, ("a woman",)),
    ]  # two entries naming one file: one image, encoded once
    assert images[1].objects[0].captions == ("own", "two")


def test_find_image_falls_back_to_the_coco_base_name(tmp_path):
    write_image(tmp_path / "000000123.jpg")
    assert find_image(tmp_path, "000000123.jpg") == tmp_path / "000000123.jpg"
    assert find_image(tmp_path, "COCO_train2014_000000123.jpg") == tmp_path / "000000123.jpg"
    assert find_image(tmp_path, "val2017/000000123.jpg") == tmp_path / "000000123.jpg"
    assert find_image(tmp_path, "other.jpg") is None


# ---------------------------------------------------------------- the scoring loop
def test_classification_means_match_hand_computed_values(lvis_paco):
    images = load_classification_file(lvis_paco["lvis"]) + load_classification_file(lvis_paco["paco"])
    predictor = ScriptedPredictor(
        [
            CategoryPrediction("baseball bat.", closed="baseball bat"),  # SS 1, IoU 1, correct
            CategoryPrediction(" car", closed="car"),  # vs "red car": SS 1/sqrt(2), IoU 1/2, wrong
            CategoryPrediction("person:hand.", closed="person:hand"),  # "hand " vs "person hand"
            CategoryPrediction("cat", closed="dog"),  # SS 0, IoU 0, correct
        ]
    )
    records = []
    report = evaluate_classification(
        images, lvis_paco["images"], predictor, embedder=BagOfWords(), on_record=records.append
    )
    # a.png: the two drawn regions (the zero-area one is skipped); b.jpg: the two non-empty RLEs
    assert predictor.calls == [((H, W, 3), [200, 400 + 100]), ((H, W, 3), [100, 600])]
    assert report.metrics["semantic_similarity"] == {
        "value": pytest.approx((1 + math.sqrt(2)) / 4),
        "count": 4,
    }
    assert report.metrics["semantic_iou"] == {"value": pytest.approx(0.5), "count": 4}
    assert report.metrics["closed_set_accuracy"] == {"value": pytest.approx(0.75), "count": 4}
    assert (report.images_total, report.images_evaluated) == (4, 2)
    assert (report.objects_total, report.objects_evaluated) == (9, 4)
    assert report.skip_counts() == {
        "empty mask": 2,
        "missing image file": 2,
        "image size differs from the annotation": 1,
    }
    assert [r["prediction"] for r in records] == ["baseball bat ", "car", "hand ", "cat"]
    assert records[1]["semantic_iou"] == 0.5 and records[1]["correct"] is False
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["objects"] == {
        "total": 9,
        "evaluated": 4,
        "skipped": 5,
        "skipped_by_reason": report.skip_counts(),
    }
    assert {
        "file_name": "missing.png",
        "object": None,
        "objects": 2,
        "reason": "missing image file",
    }.items() <= doc["skipped"][1].items()


def test_pixelrefer_normalisation_follows_its_authors_script():
    """eval_paco_lvis.py: the same clean-up for answer and truth, no colon cut, lowercased."""
    assert normalize_category_pixelrefer(" Person:Hand.") == "person hand"
    assert normalize_category_pixelrefer("a:b:c") == "a b c"
    assert normalize_category_pixelrefer("bench_(leg), wooden") == "bench  leg   wooden"
    assert normalize_category_pixelrefer("baseball_bat") == "baseball bat"


def test_pixelrefer_answers_are_scored_as_its_authors_score_them(lvis_paco):
    """A PACO ``category:subcategory`` answer counts whole for PixelRefer-Lite; Osprey's protocol keeps
    only the part after the colon."""
    images = load_classification_file(lvis_paco["paco"])
    answers = [CategoryPrediction("Person:hand."), CategoryPrediction("a dog")]
    by_scoring = {}
    for scoring in ("osprey", "pixelrefer-lite"):
        predictor = ScriptedPredictor(answers)
        predictor.scoring = scoring
        records = []
        report = evaluate_classification(
            images, lvis_paco["images"], predictor, embedder=BagOfWords(), on_record=records.append
        )
        by_scoring[scoring] = [r["prediction"] for r in records], report.metrics["semantic_iou"]["value"]
    assert by_scoring["pixelrefer-lite"] == (["person hand", "a dog"], pytest.approx((1 + 1 / 2) / 2))
    assert by_scoring["osprey"] == (["hand ", "a dog"], pytest.approx((1 / 2 + 1 / 2) / 2))


def test_limit_and_a_predictor_that_miscounts(lvis_paco):
    images = load_classification_file(lvis_paco["lvis"])
    report = evaluate_classification(
        images,
        lvis_paco["images"],
        ScriptedPredictor([CategoryPrediction("x")] * 2),
        embedder=BagOfWords(),
        limit=1,
    )
    assert (report.images_total, report.objects_total, report.objects_evaluated) == (1, 3, 2)
    assert "closed_set_accuracy" not in report.metrics
    with pytest.raises(RuntimeError, match="1 answers for 2 regions"):
        evaluate_classification(
            images, lvis_paco["images"], ScriptedPredictor([CategoryPrediction("x")]), embedder=BagOfWords()
        )


def test_caption_scores_semantic_similarity_is_the_best_reference(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "c.json").write_text(json.dumps([{
        "file_name": "a.png", "height": H, "width": W,
        "captions": [["a red car", "a car"], "a dog", []],
        "annotations": [{"segmentation": rect(0, 0, 5, 5)}, {"segmentation": rect(5, 5, 9, 9)},
                        {"segmentation": rect(9, 9, 19, 19)}],
    }]))  # fmt: skip
    images = load_caption_file(tmp_path / "c.json")
    predictor = ScriptedPredictor(["answer: a red car", "a cat"])
    report = evaluate_captions(images, tmp_path, predictor, embedder=BagOfWords(), meteor=False)
    # "a red car" = reference 1 exactly (1.0); "a cat" vs "a dog": 1/2
    assert report.metrics["semantic_similarity"] == {"value": pytest.approx(0.75), "count": 2}
    assert report.skip_counts() == {"no reference caption": 1}
    assert report.metrics["METEOR"] == {"value": None, "count": 0}
    # BLEU-1, 'closest' reference lengths: 3/3 words of "a red car" + 1/2 of "a cat" matched
    assert report.metrics["BLEU-1"]["value"] == pytest.approx(4 / 5, abs=1e-6)


# ---------------------------------------------------------------- caption metrics
def test_caption_tokens_drop_punctuation_and_split_clitics():
    assert caption_tokens("A dog's ball, RED!") == ["a", "dog", "'s", "ball", "red"]
    assert caption_tokens("left-most  man.") == ["left", "most", "man"]


def test_identical_captions_get_the_maximum_scores():
    captions = ["a man in a red shirt riding a horse", "two dogs playing with a ball on the grass"]
    scores = caption_scores(captions, [[c] for c in captions], meteor=False)
    for n in range(1, 5):
        assert scores.corpus[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores.corpus["ROUGE-L"] == pytest.approx(1.0)
    assert scores.corpus["CIDEr"] == pytest.approx(10.0)  # CIDEr-D's maximum
    assert scores.corpus["METEOR"] is None and scores.notes == []


def test_bleu_hand_checked_cases():
    # unigram precision 2/3 ("a", "car" of "a red car"), equal lengths: no brevity penalty
    assert caption_scores(["a red car"], [["a blue car"]], meteor=False).corpus["BLEU-1"] == pytest.approx(
        2 / 3
    )
    # precision 1, candidate 2 words against 3: brevity penalty exp(1 - 3/2)
    assert caption_scores(["a car"], [["a red car"]], meteor=False).corpus["BLEU-1"] == pytest.approx(
        math.exp(-0.5)
    )


def test_meteor_absent_without_java(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scores = caption_scores(["a dog"], [["a dog"]])
    assert scores.corpus["METEOR"] is None
    assert any("java" in note for note in scores.notes)


@pytest.mark.slow  # starts Java and loads METEOR's paraphrase tables (~10-15 s)
@pytest.mark.skipif(not metrics.java_available(), reason="METEOR needs java")
def test_meteor_with_java():
    scores = caption_scores(
        ["a red car on the road", "a dog"], [["a red car on the road"], ["a cat"]], meteor=True
    )
    assert scores.per_item["METEOR"][0] == pytest.approx(1.0)
    assert 0 <= scores.per_item["METEOR"][1] < 1.0
    assert 0 < scores.corpus["METEOR"] < 1.0


# ---------------------------------------------------------------- the sentence embedder (real MiniLM)
@pytest.fixture(scope="module")
def minilm():
    from osprey.evaluation.embedder import SentenceEmbedder

    return SentenceEmbedder.from_pretrained(device="cpu")


def test_minilm_similarity(minilm):
    same, near, far = minilm.similarity(["red car", "dog", "dog"], ["red car", "puppy", "airplane"])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert near > far + 0.2
    assert minilm.similarity(["hand "], ["hand"])[0] == pytest.approx(1.0, abs=1e-5)
    assert minilm.max_similarity(["dog"], [["airplane", "puppy"]])[0] == pytest.approx(near, abs=1e-5)


def test_minilm_pooling_matches_a_hand_computation(minilm):
    from osprey.evaluation.embedder import default_embedder_path, read_pooling

    assert read_pooling(default_embedder_path()) == ("mean", True, 256)
    batch = minilm.tokenizer("a dog", return_tensors="pt")
    with torch.inference_mode():
        hidden = minilm.model(**batch).last_hidden_state[0]  # (T, D), no padding
    expected = hidden.mean(0)
    expected = expected / expected.norm()
    got = minilm.encode(["a dog", "a much longer sentence about a brown dog in a park"])  # "a dog" padded
    assert got.shape == (2, 384)
    assert torch.allclose(got[0], expected, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-5)


def test_embedder_folders_are_checked(tmp_path):
    from osprey.evaluation.embedder import SentenceEmbedder, read_pooling

    with pytest.raises(ValueError, match="no config.json"):
        SentenceEmbedder.from_pretrained(tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(
        json.dumps([{"path": "", "type": "x.Transformer"}, {"path": "1_Pooling", "type": "x.Pooling"}])
    )
    (tmp_path / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ValueError, match="not supported"):
        read_pooling(tmp_path)
    (tmp_path / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling(tmp_path) == ("cls", False, None)
