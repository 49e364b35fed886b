"""``osprey-label eval classify|captions``: the parser, the report and predictions files, a scripted
predictor whose scores are known, runs with the real tiny Osprey (in-process and as a process), and the
whole command with either region model asking its own evaluation questions."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from backend.cli import build_parser, main
from osprey.evaluation.cli import file_label_set, run_captions, run_classify
from osprey.evaluation.data import load_classification_file
from osprey.evaluation.metrics import normalize_prediction
from osprey.evaluation.predictors import CaptionPredictor, CategoryPredictor
from osprey.evaluation.predictors import generate_answers as generate
from osprey.evaluation.run import CategoryPrediction
from osprey.inference.fields import LabelRequest
from osprey.model import prompts as P
from osprey.model.prompts import REFCOCOG_CAPTION_TURN, caption_turn, clean_answer
from osprey.pixelrefer import prompts as PR

H, W = 48, 64


class WordOverlap:
    """Stand-in embedder with a hand-computable cosine: binary word vectors."""

    name = "word-overlap"

    def _cos(self, a, b):
        sa, sb = set(a.lower().split()), set(b.lower().split())
        return len(sa & sb) / math.sqrt(len(sa) * len(sb)) if sa and sb else 0.0

    def similarity(self, a, b):
        return [self._cos(x, y) for x, y in zip(a, b, strict=True)]

    def max_similarity(self, candidates, references):
        return [max(self._cos(c, r) for r in refs) for c, refs in zip(candidates, references, strict=True)]


class Scripted:
    model_id = "scripted"
    untrained = False

    def __init__(self, answers):
        self.answers = list(answers)

    def predict(self, image, masks):
        out, self.answers = self.answers[: len(masks)], self.answers[len(masks) :]
        return out


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def files(tmp_path):
    """Two real pictures (PNG, JPEG), an LVIS-layout file over them plus a missing image, and a
    RefCOCOg-style COCO caption file."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for name in ("one.png", "two.jpg"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images / name)
    lvis = [
        {"file_name": "one.png", "height": H, "width": W, "categories": ["traffic_light", "dog"],
         "annotations": [{"segmentation": rect(4, 4, 30, 20)}, {"segmentation": rect(34, 10, 60, 44)}]},
        {"file_name": "two.jpg", "height": H, "width": W, "categories": ["person:hand"],
         "annotations": [{"segmentation": rect(10, 10, 40, 40)}]},
        {"file_name": "gone.png", "height": H, "width": W, "categories": ["cat"],
         "annotations": [{"segmentation": rect(0, 0, 8, 8)}]},
    ]  # fmt: skip
    coco = {
        "images": [
            {
                "id": 1,
                "file_name": "COCO_train2014_one.png",
                "height": H,
                "width": W,
                "caption": "a small dog",
            },
            {"id": 2, "file_name": "COCO_train2014_one.png", "height": H, "width": W, "caption": "the light"},
        ],
        "annotations": [
            {"id": 5, "image_id": 1, "segmentation": rect(34, 10, 60, 44)},
            {"id": 6, "image_id": 2, "segmentation": rect(4, 4, 30, 20)},
        ],
    }
    (tmp_path / "lvis.json").write_text(json.dumps(lvis))
    (tmp_path / "refcocog.json").write_text(json.dumps(coco))
    return tmp_path


def parse(*argv):
    return build_parser().parse_args(["eval", *argv])


def test_classify_report_and_predictions_match_hand_computed_values(files, capsys):
    args = parse(
        "classify", "--annotations", str(files / "lvis.json"), "--images", str(files / "images"),
        "--closed-set", "--json", str(files / "out/report.json"), "--predictions", str(files / "out/p.jsonl"),
        "--quiet",
    )  # fmt: skip
    predictor = Scripted(
        [
            CategoryPrediction(
                "traffic light.", closed="traffic light", closed_score=0.9
            ),  # SS 1, IoU 1, right
            CategoryPrediction("brown dog", closed="cat", closed_score=0.6),  # SS 1/sqrt 2, IoU 1/2, wrong
            CategoryPrediction("person: arm", closed="person:hand", closed_score=0.5),  # " arm": SS 0, IoU 0
        ]
    )
    assert run_classify(args, predictor=predictor, embedder=WordOverlap()) == 0
    report = json.loads((files / "out/report.json").read_text())
    assert report["model"] == "scripted" and report["untrained"] is False
    assert report["metrics"] == {
        "semantic_similarity": {"value": pytest.approx((1 + 1 / math.sqrt(2)) / 3), "count": 3},
        "semantic_iou": {"value": pytest.approx(0.5), "count": 3},
        "closed_set_accuracy": {"value": pytest.approx(2 / 3), "count": 3},
    }
    assert report["images"] == {"total": 3, "evaluated": 2, "skipped": 1}
    assert report["objects"]["skipped_by_reason"] == {"missing image file": 1}
    assert report["protocol"]["label_set"] == ["cat", "dog", "person:hand", "traffic light"]
    assert report["protocol"]["decoding"] == "greedy" and report["protocol"]["embedder"] == "word-overlap"
    lines = [json.loads(line) for line in (files / "out/p.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["object"], r["prediction"], r["correct"]) for r in lines] == [
        ("one.png", 0, "traffic light ", True),
        ("one.png", 1, "brown dog", False),
        ("two.jpg", 0, " arm", True),
    ]
    out = capsys.readouterr().out
    assert "semantic_iou" in out and "0.5000" in out and "50.00" in out
    assert "skipped 1 objects: missing image file" in out


def test_label_set_options(files, capsys):
    images = load_classification_file(files / "lvis.json")
    assert file_label_set(images) == ("cat", "dog", "person:hand", "traffic light")
    with pytest.raises(SystemExit):
        parse("classify", "--annotations", "a", "--images", "b", "--categories", "a,b", "--closed-set")
    assert "not allowed with" in capsys.readouterr().err
    args = parse(
        "classify", "--annotations", str(files / "lvis.json"), "--images", str(files), "--categories", " ,"
    )
    with pytest.raises(ValueError, match="--categories is empty"):
        run_classify(args, predictor=Scripted([]), embedder=WordOverlap())
    args = parse(
        "classify", "--annotations", str(files / "lvis.json"), "--images", str(files), "--categories", "dog"
    )
    predictor = Scripted([CategoryPrediction("x", closed="dog")] * 3)
    assert run_classify(args, predictor=predictor, embedder=WordOverlap()) == 1  # no image in that folder
    assert "no object could be evaluated" in capsys.readouterr().err


def test_category_predictor_on_tiny_osprey(tiny_osprey, scene):
    predictor = CategoryPredictor(tiny_osprey, label_set=("cat", "dog", "car"), max_new_tokens=4)
    masks = scene["masks"][:3]
    answers = predictor.predict(scene["image"], masks)
    reference = tiny_osprey.label(scene["image"], masks, LabelRequest(categories=(), max_category_tokens=4))
    # the same question and decoding as the library; the predictor keeps the raw text for the protocol
    assert [clean_answer(a.text, keep_after_colon=True) for a in answers] == [r.category for r in reference]
    assert all(a.closed in {"cat", "dog", "car"} and 0 < a.closed_score <= 1 for a in answers)


def test_category_answers_are_cut_at_colons_once_as_the_authors_do(tiny_osprey, scene, monkeypatch):
    """``a:b:c`` scores as ``b`` (the authors' ``split(':')[1]``), not as ``c``, which a library-side
    cut followed by the protocol's cut would give."""
    import osprey.evaluation.predictors as predictors

    monkeypatch.setattr(predictors, "generate_answers", lambda *args, **kwargs: ["person:hand:left"])
    [answer] = CategoryPredictor(tiny_osprey).predict(scene["image"], scene["masks"][:1])
    assert answer.text == "person:hand:left"
    assert normalize_prediction(answer.text).split() == ["hand"]


def test_custom_question_path_matches_the_library(tiny_osprey, scene):
    """generate_answers (used for the RefCOCOg prompt) asked Osprey's own caption question gives the
    library's captions, so the RefCOCOg prompt runs the same machinery."""
    masks = scene["masks"][:2]
    library = tiny_osprey.label(scene["image"], masks, LabelRequest(caption=True, max_caption_tokens=5))
    assert generate(tiny_osprey, scene["image"], masks, caption_turn(), 5) == [r.caption for r in library]
    assert len(generate(tiny_osprey, scene["image"], masks, REFCOCOG_CAPTION_TURN, 5)) == 2
    with pytest.raises(ValueError, match="holds no region in tiny's prompt form"):
        generate(tiny_osprey, scene["image"], masks, "<image>\nWhat is this?", 5)


def test_captions_command_on_tiny_osprey(tiny_osprey, files):
    args = parse(
        "captions", "--annotations", str(files / "refcocog.json"), "--images", str(files / "images"),
        "--model", "tiny", "--prompt", "refcocog", "--max-new-tokens", "6", "--meteor", "off",
        "--json", str(files / "captions.json"), "--predictions", str(files / "captions.jsonl"), "--quiet",
    )  # fmt: skip
    predictor = CaptionPredictor(tiny_osprey, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    assert run_captions(args, predictor=predictor, embedder=WordOverlap()) == 0
    report = json.loads((files / "captions.json").read_text())
    assert report["model"] == "tiny" and report["untrained"] is True
    assert report["images"] == {"total": 1, "evaluated": 1, "skipped": 0}  # two entries, one picture
    assert report["objects"]["evaluated"] == 2
    assert report["protocol"]["prompt"] == "refcocog"
    assert "Please give me a short description of <mask><pos>." in report["protocol"]["question"]
    assert set(report["metrics"]) == {
        "semantic_similarity", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "METEOR",
    }  # fmt: skip
    assert report["metrics"]["METEOR"]["value"] is None
    lines = [json.loads(line) for line in (files / "captions.jsonl").read_text().splitlines()]
    assert [(r["annotation_id"], r["references"]) for r in lines] == [
        (5, ["a small dog"]),
        (6, ["the light"]),
    ]


def test_classify_as_a_process_on_tiny_osprey(files):
    """The real command: tiny Osprey, the real MiniLM embedder, the closed set from the file."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [
            sys.executable, "-m", "backend.service", "eval", "classify", "--model", "tiny", "--device", "cpu",
            "--annotations", str(files / "lvis.json"), "--images", str(files / "images"),
            "--closed-set", "--max-new-tokens", "4", "--json", str(files / "r.json"),
            "--predictions", str(files / "p.jsonl"),
        ],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stdout and "semantic_similarity" in result.stdout
    report = json.loads((files / "r.json").read_text())
    assert (report["model"], report["untrained"]) == ("tiny", True)
    assert report["images"] == {"total": 3, "evaluated": 2, "skipped": 1}
    assert report["objects"] == {
        "total": 4,
        "evaluated": 3,
        "skipped": 1,
        "skipped_by_reason": {"missing image file": 1},
    }
    assert report["protocol"]["embedder"] == "all-MiniLM-L6-v2"
    for name in ("semantic_similarity", "semantic_iou", "closed_set_accuracy"):
        assert report["metrics"][name]["count"] == 3
        assert -1.0 <= report["metrics"][name]["value"] <= 1.0
    lines = [json.loads(line) for line in (files / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert all(r["closed_set"] in report["protocol"]["label_set"] for r in lines)
    assert "Traceback" not in result.stderr


# ---- either region model, through the whole command ----
MODELS = ("tiny", "pixelrefer-lite-tiny")
CATEGORY_QUESTIONS = {  # what each model's authors ask LVIS and PACO
    ("tiny", "lvis"): P.OPEN_CATEGORY_QUESTION,
    ("tiny", "paco"): P.OPEN_CATEGORY_QUESTION,
    ("pixelrefer-lite-tiny", "lvis"): PR.CATEGORY_QUESTION,
    ("pixelrefer-lite-tiny", "paco"): PR.PART_QUESTION,
}
CAPTION_QUESTIONS = {"tiny": P.CAPTION_QUESTION, "pixelrefer-lite-tiny": PR.CAPTION_QUESTION}


def asked(model, question):
    """The recorded prompt, checked to be in ``model``'s own conversation, as its authors' scripts write
    the question (PixelRefer-Lite's region, ``[<REGION> x mask_num]``, read back as ``<region>``)."""
    if model == "tiny":
        assert question.startswith(P.SYSTEM) and question.endswith(f"{P.ASSISTANT}:")
        assert question.count(P.REGION_TOKENS) == 1 and question.count(P.IMAGE_TOKEN) == 1
        return question
    head, tail = PR.CHAT_PREFIX, f"{PR.IM_END}\n{PR.IM_START}assistant\n"
    assert question.startswith(head) and question.endswith(tail)
    return re.sub(r"\[(?:<REGION>)+\]", PR.REGION, question[len(head) : -len(tail)])


def run_eval(capsys, *argv):
    code = main(["eval", *argv, "--device", "cpu", "--quiet"])
    return code, capsys.readouterr()


@pytest.mark.parametrize("benchmark", ("lvis", "paco"))
@pytest.mark.parametrize("model", MODELS)
def test_classify_asks_each_model_its_own_question(files, capsys, model, benchmark):
    """``--benchmark auto`` reads the file's name as the authors' script does: PixelRefer-Lite is asked
    PACO's part question, Osprey the same question for both."""
    annotations = files / f"{benchmark}_val_1k_category.json"
    annotations.write_text((files / "lvis.json").read_text())
    code, out = run_eval(
        capsys, "classify", "--model", model, "--annotations", str(annotations), "--images",
        str(files / "images"), "--closed-set", "--max-new-tokens", "3", "--json", str(files / "r.json"),
        "--predictions", str(files / "p.jsonl"),
    )  # fmt: skip
    assert code == 0, out.err
    report = json.loads((files / "r.json").read_text())
    assert (report["model"], report["untrained"]) == (model, True)
    assert report["protocol"]["benchmark"] == benchmark
    assert report["protocol"]["scoring"] == ("osprey" if model == "tiny" else "pixelrefer-lite")
    question = asked(model, report["protocol"]["question"])
    assert CATEGORY_QUESTIONS[model, benchmark] in question
    assert all(
        report["metrics"][name]["count"] == 3 for name in ("semantic_similarity", "closed_set_accuracy")
    )
    lines = [json.loads(line) for line in (files / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(r["closed_set"] in report["protocol"]["label_set"] for r in lines)


@pytest.mark.parametrize("model", MODELS)
def test_captions_asks_each_model_its_own_question(files, capsys, model):
    code, out = run_eval(
        capsys, "captions", "--model", model, "--annotations", str(files / "refcocog.json"), "--images",
        str(files / "images"), "--max-new-tokens", "4", "--meteor", "off", "--json", str(files / "c.json"),
    )  # fmt: skip
    assert code == 0, out.err
    report = json.loads((files / "c.json").read_text())
    assert (report["model"], report["protocol"]["prompt"]) == (model, "short")
    assert CAPTION_QUESTIONS[model] in asked(model, report["protocol"]["question"])
    assert report["objects"]["evaluated"] == 2 and report["metrics"]["CIDEr"]["count"] == 2


def test_refcocog_prompt_is_refused_for_pixelrefer(files, capsys):
    code, out = run_eval(
        capsys, "captions", "--model", "pixelrefer-lite-tiny", "--prompt", "refcocog", "--annotations",
        str(files / "refcocog.json"), "--images", str(files / "images"), "--meteor", "off",
    )  # fmt: skip
    assert code == 2
    assert "--prompt refcocog is Osprey's RefCOCOg question" in out.err and "Traceback" not in out.err


def test_custom_question_path_matches_the_library_for_pixelrefer(scene):
    """The evaluation's generation path gives PixelRefer-Lite's library captions for its own question."""
    from osprey.evaluation.predictors import caption_turn as model_caption_turn
    from osprey.inference.pixelrefer import PixelReferLite

    model = PixelReferLite.from_pretrained("pixelrefer-lite-tiny", device="cpu")
    masks = scene["masks"][:2]
    library = model.label(scene["image"], masks, LabelRequest(caption=True, max_caption_tokens=5))
    assert generate(model, scene["image"], masks, model_caption_turn(model), 5) == [
        r.caption for r in library
    ]
    with pytest.raises(ValueError, match="holds no region"):
        generate(model, scene["image"], masks, caption_turn(), 5)  # Osprey's form: no <REGION> here
