"""Text normalisation and scores for Osprey's region benchmarks.

Referring object classification (LVIS, PACO), as Osprey's authors score it:

- ground truth: ``_`` and ``:`` become spaces (``person:hand`` -> ``person hand``);
- prediction: stripped; when it holds a ``:``, only the text between the first and second colon is
  kept (``person:hand.`` -> ``hand.``); then ``.``, ``:`` and ``,`` become spaces;
- semantic similarity: cosine of the two strings' sentence embeddings (:mod:`.embedder`);
- semantic IoU: ``|W(pred) & W(gt)| / |W(pred) | W(gt)|`` over the lowercased, whitespace-split
  word *sets*.

PixelRefer-Lite's authors score the same two numbers (``eval_paco_lvis.py``) after another clean-up,
the same for answer and ground truth: ``_ : , . ( )`` become spaces, stripped, lowercased, no colon cut
(a PACO answer ``person:hand`` scores as ``person hand``). :data:`CATEGORY_SCORING` holds both.

Region captions: BLEU-1..4, ROUGE-L and CIDEr-D from ``pycocoevalcap`` (pure Python), METEOR from the
same package when ``java`` is on PATH. Captions are tokenised here (lowercase, words and ``'``
clitics, punctuation dropped) instead of by the Java PTB tokenizer that COCO's caption evaluation
runs, so scores can differ from it slightly.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+|'[^\W_]+")


def normalize_ground_truth(category: str) -> str:
    """``person:hand`` -> ``person hand``, ``baseball_bat`` -> ``baseball bat``."""
    return category.replace("_", " ").replace(":", " ")


def _colon_cut(text: str) -> str:
    """The authors' cut: stripped, then only the text between the first and second colon when it
    holds one (``'a:b:c'`` -> ``'b'``; the text is not stripped again)."""
    text = text.strip()
    return text.split(":")[1] if ":" in text else text


def normalize_prediction(text: str) -> str:
    """The authors' category answer clean-up: the colon cut, then ``.``, ``:`` and ``,`` become
    spaces (``' person:hand.'`` -> ``'hand '``)."""
    return _colon_cut(text).replace(".", " ").replace(":", " ").replace(",", " ")


def normalize_category_pixelrefer(text: str) -> str:
    """PixelRefer-Lite's clean-up of answers and ground truth alike
    (``' Person:hand.'`` -> ``'person hand'``)."""
    for char in "_:,.()":
        text = text.replace(char, " ")
    return text.strip().lower()


# Each model's authors' (ground truth, answer) normalisation before category scoring, by model family.
CATEGORY_SCORING = {
    "osprey": (normalize_ground_truth, normalize_prediction),
    "pixelrefer-lite": (normalize_category_pixelrefer, normalize_category_pixelrefer),
}
SCORING_PROTOCOL = {  # the same, in words, for the report
    "osprey": {
        "ground_truth_normalisation": "'_' and ':' -> ' '",
        "prediction_normalisation": "strip; text between the 1st and 2nd ':' if any; '.', ':', ',' -> ' '",
    },
    "pixelrefer-lite": {
        "ground_truth_normalisation": "'_', ':', ',', '.', '(', ')' -> ' '; strip; lowercase",
        "prediction_normalisation": "'_', ':', ',', '.', '(', ')' -> ' '; strip; lowercase (no colon cut)",
    },
}


def normalize_caption(text: str) -> str:
    """A generated caption as the authors score it: the colon cut, stripped."""
    return _colon_cut(text).strip()


def semantic_iou(prediction: str, ground_truth: str) -> float:
    """Word-set IoU of the lowercased strings; two strings without words count as equal (1.0)."""
    pred = set(prediction.lower().split())
    gt = set(ground_truth.lower().split())
    union = pred | gt
    if not union:
        return 1.0
    return len(pred & gt) / len(union)


def labels_match(prediction: str, ground_truth: str) -> bool:
    """Closed-set top-1 correctness: equal after ground-truth normalisation, whitespace collapsed,
    case ignored (``baseball_bat`` matches ``baseball bat``)."""

    def norm(text: str) -> str:
        return " ".join(normalize_ground_truth(text).lower().split())

    return norm(prediction) == norm(ground_truth)


def caption_tokens(text: str) -> list[str]:
    """Lowercase word tokens without punctuation; ``'s``-style clitics are split off as the PTB
    tokenizer does (``"dog's"`` -> ``["dog", "'s"]``)."""
    return _WORD.findall(text.lower())


def mean(values: Sequence[float]) -> float | None:
    """The mean, or None for no values."""
    return math.fsum(values) / len(values) if values else None


def java_available() -> bool:
    return shutil.which("java") is not None


@dataclass
class CaptionScores:
    """Corpus-level caption metrics (None when not computed, see ``notes``) and per-item scores."""

    corpus: dict[str, float | None]
    per_item: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def caption_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]], *, meteor: bool | None = None
) -> CaptionScores:
    """BLEU-1..4, ROUGE-L, CIDEr-D and (optionally) METEOR of ``candidates[i]`` against
    ``references[i]`` (one or more strings each).

    ``meteor``: True runs it (needs ``java``), False skips it, None runs it when ``java`` is on PATH.
    Scores are fractions (COCO papers print them x100); CIDEr-D's maximum is 10.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(candidates) != len(references):
        raise ValueError(
            f"one reference list per candidate expected, got {len(candidates)} candidates and "
            f"{len(references)} reference lists"
        )
    if any(not refs for refs in references):
        raise ValueError("every candidate needs at least one reference caption")
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "METEOR"]
    if not candidates:
        return CaptionScores(corpus=dict.fromkeys(names), notes=["no captions to score"])
    res = {i: [" ".join(caption_tokens(c))] for i, c in enumerate(candidates)}
    gts = {i: [" ".join(caption_tokens(r)) for r in refs] for i, refs in enumerate(references)}
    out = CaptionScores(corpus={})
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out.corpus[f"BLEU-{n + 1}"] = float(bleu[n])
        out.per_item[f"BLEU-{n + 1}"] = [float(v) for v in bleu_items[n]]
    rouge, rouge_items = Rouge().compute_score(gts, res)
    out.corpus["ROUGE-L"] = float(rouge)
    out.per_item["ROUGE-L"] = [float(v) for v in rouge_items]
    cider, cider_items = Cider().compute_score(gts, res)
    out.corpus["CIDEr"] = float(cider)
    out.per_item["CIDEr"] = [float(v) for v in cider_items]
    if len(candidates) == 1:
        out.notes.append("CIDEr needs several items: with one, every n-gram's IDF is 0 and so is CIDEr")
    out.corpus["METEOR"] = None
    if meteor is None:
        meteor = java_available()
        if not meteor:
            out.notes.append("METEOR not computed: `java` is not on PATH (install a Java runtime)")
    if meteor:
        try:
            value, items = _meteor(gts, res)
        except (OSError, ValueError, BrokenPipeError) as error:
            logger.warning("METEOR failed: %s", error)
            out.notes.append(f"METEOR failed: {error}")
        else:
            out.corpus["METEOR"] = value
            out.per_item["METEOR"] = items
    return out


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    """METEOR 1.5 through pycocoevalcap's Java wrapper (loads ~60 MB of paraphrase tables)."""
    if not java_available():
        raise OSError("METEOR needs `java` on PATH; install a Java runtime or turn METEOR off")
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        value, items = scorer.compute_score(gts, res)
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        scorer.meteor_p.stdout.close()
        scorer.meteor_p.stderr.close()
    return float(value), [float(v) for v in items]
