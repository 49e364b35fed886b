"""Osprey as an evaluation predictor: each image encoded once, all its regions answered together.

Questions (greedy decoding on the fast path; the authors sampled with temperature 0.2):

- category: Osprey's open-vocabulary question, ``What is the category of <mask><pos>? Using only
  one word or phrase.``, answered raw (the protocol's normalisation does the colon cut); with a label
  set, also the closed-set scoring the backend serves (``categories=label_set``);
- caption, ``osprey`` prompt: the short-description question the backend asks
  (``... Using a short phrase.``, :data:`osprey.model.prompts.CAPTION_QUESTION`);
- caption, ``refcocog`` prompt: the question of the authors' RefCOCOg captioning evaluation, which
  the RefCOCOg-finetuned checkpoint was scored with (:data:`osprey.model.prompts.REFCOCOG_CAPTION_TURN`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from osprey.inference.fields import LabelRequest
from osprey.model import prompts as P

from .run import CategoryPrediction

CAPTION_PROMPTS = ("osprey", "refcocog")


class OspreyCategoryPredictor:
    """Open-vocabulary category answers, and closed-set top-1 labels when ``label_set`` is given."""

    def __init__(self, osprey, *, label_set: Sequence[str] | None = None, max_new_tokens: int = 16) -> None:
        self.osprey = osprey
        self.model_id = osprey.model_id
        self.untrained = osprey.untrained
        self.max_new_tokens = max_new_tokens
        self.closed_request = LabelRequest(categories=tuple(label_set)) if label_set else None

    @property
    def question(self) -> str:
        return P.conversation(P.open_category_turn())

    def predict(self, image: np.ndarray, masks: list[np.ndarray]) -> list[CategoryPrediction]:
        encoded = self.osprey.encode_image(image)
        # The raw answers, colons included: the protocol's normalisation cuts at the colon itself
        # (``Osprey.label`` would already keep only the text after the first one).
        texts = generate_answers(
            self.osprey, image, masks, P.open_category_turn(), self.max_new_tokens, encoded=encoded
        )
        out = [CategoryPrediction(text=text) for text in texts]
        if self.closed_request is not None:
            closed = self.osprey.label(image, masks, self.closed_request, encoded=encoded)
            for prediction, answer in zip(out, closed, strict=True):
                prediction.closed = answer.category.label
                prediction.closed_score = answer.category.score
        return out


class OspreyCaptionPredictor:
    """Region captions from one of :data:`CAPTION_PROMPTS`, greedy, up to ``max_new_tokens``."""

    def __init__(self, osprey, *, prompt: str = "osprey", max_new_tokens: int = 64) -> None:
        if prompt not in CAPTION_PROMPTS:
            raise ValueError(f"caption prompt must be one of {CAPTION_PROMPTS}, got {prompt!r}")
        self.osprey = osprey
        self.model_id = osprey.model_id
        self.untrained = osprey.untrained
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    @property
    def question(self) -> str:
        turn = P.caption_turn() if self.prompt == "osprey" else P.REFCOCOG_CAPTION_TURN
        return P.conversation(turn)

    def predict(self, image: np.ndarray, masks: list[np.ndarray]) -> list[str]:
        if self.prompt == "osprey":
            request = LabelRequest(caption=True, max_caption_tokens=self.max_new_tokens)
            return [a.caption for a in self.osprey.label(image, masks, request)]
        return generate_answers(self.osprey, image, masks, P.REFCOCOG_CAPTION_TURN, self.max_new_tokens)


def generate_answers(
    osprey,
    image: np.ndarray,
    masks: list[np.ndarray],
    first_turn: str,
    max_new_tokens: int,
    *,
    encoded=None,
) -> list[str]:
    """Greedy answers to a custom single-region question (``first_turn`` starts with ``<image>`` and
    holds one ``<mask><pos>``) for every mask, on the fast path: the image is encoded once (through
    the model's cache when it has one; ``encoded`` reuses an encoding the caller already has) and all
    regions decode together. Answers are stripped, nothing else."""
    from osprey.inference.plan import GenerateTask, Planner
    from osprey.model.preprocess import stack_masks, to_rgb_array

    if not first_turn.startswith(P.IMAGE_TOKEN) or first_turn.count(P.REGION_TOKENS) != 1:
        raise ValueError("a custom question must start with <image> and hold exactly one <mask><pos>")
    rgb = to_rgb_array(image)
    mask_t = stack_masks(masks, image_hw=rgb.shape[:2])
    encoded = encoded if encoded is not None else osprey.encode_image(rgb)
    planner = Planner(tokenizer=osprey.tokenizer, request=LabelRequest(caption=True))
    question = planner.question(f"custom:{first_turn}", first_turn)
    tasks = [
        GenerateTask(region=i, question=question, max_new_tokens=max_new_tokens) for i in range(len(mask_t))
    ]
    with torch.inference_mode():
        region_tokens = osprey.model.region_tokens(encoded.features, mask_t)
    osprey.fast.generate(encoded, tasks, region_tokens)
    texts = [osprey.tokenizer.decode(t.token_ids, skip_special_tokens=True) for t in tasks]
    return [P.clean_answer(text, keep_after_colon=False) for text in texts]
