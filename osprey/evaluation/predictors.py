"""A region model (Osprey or PixelRefer-Lite) as an evaluation predictor: each image encoded once, all
its regions answered together, greedily, on the fast path.

Each model is asked the questions its authors evaluated it with, in its own conversation (the prompt
set its ``planner`` words questions in):

- category (LVIS / PACO, open vocabulary), answered raw (the protocol's normalisation does the colon
  cut): Osprey asks both benchmarks ``What is the category of <mask><pos>? Using only one word or
  phrase.`` after its image overview (:func:`osprey.model.prompts.open_category_turn`); PixelRefer-Lite
  asks LVIS :data:`osprey.pixelrefer.prompts.CATEGORY_QUESTION` and PACO
  :data:`~osprey.pixelrefer.prompts.PART_QUESTION` (``infer_paco_lvis.py``), and its answers are scored
  as its authors score them (``scoring``). With a label set, also the closed-set scoring the backend
  serves (``categories=label_set``);
- caption, ``short`` prompt: the model's short-description question, the one the backend asks
  (Osprey: :data:`osprey.model.prompts.CAPTION_QUESTION`; PixelRefer-Lite: ``infer_vg.py``'s
  :data:`osprey.pixelrefer.prompts.CAPTION_QUESTION`);
- caption, ``refcocog`` prompt (Osprey only): the question of Osprey's RefCOCOg captioning evaluation,
  which the RefCOCOg-finetuned checkpoint was scored with
  (:data:`osprey.model.prompts.REFCOCOG_CAPTION_TURN`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from osprey.inference.fields import LabelRequest
from osprey.model import prompts as P

from .run import CategoryPrediction

CAPTION_PROMPTS = ("short", "refcocog")
BENCHMARKS = ("lvis", "paco")
_PIXELREFER = "pixelrefer-lite"
# A planner for custom questions: only its prompt set and ``question`` are used, so any request will do.
_CUSTOM = LabelRequest(caption=True)


def prompt_set(model):
    """The prompt set ``model`` is asked in: its planner's (Osprey's module, or PixelRefer-Lite's)."""
    return model.planner(_CUSTOM).prompts


def category_turn(model, benchmark: str = "lvis") -> str:
    """The first turn of ``model``'s own open-vocabulary category question for ``benchmark``."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    prompts = prompt_set(model)
    if benchmark == "paco" and model.family == _PIXELREFER:
        return prompts.paco_category_turn()
    return prompts.open_category_turn()  # Osprey's evaluation asks PACO the LVIS question


def caption_turn(model, prompt: str = "short") -> str:
    """The first turn of ``model``'s caption question for one of :data:`CAPTION_PROMPTS`."""
    if prompt not in CAPTION_PROMPTS:
        raise ValueError(f"caption prompt must be one of {CAPTION_PROMPTS}, got {prompt!r}")
    if prompt == "short":
        return prompt_set(model).caption_turn()
    if model.family == _PIXELREFER:
        raise ValueError(
            f"--prompt refcocog is Osprey's RefCOCOg question; {model.model_id} is asked its own caption "
            "question with --prompt short"
        )
    return P.REFCOCOG_CAPTION_TURN


class _Predictor:
    """One question asked of every region of an image; ``question`` is the full prompt as text."""

    def __init__(self, model, turn: str, max_new_tokens: int) -> None:
        self.model = model
        self.model_id = model.model_id
        self.untrained = model.untrained
        self.turn = turn
        self.max_new_tokens = max_new_tokens

    @property
    def question(self) -> str:
        return prompt_set(self.model).conversation(self.turn)

    def _answers(self, image: np.ndarray, masks: list[np.ndarray], encoded=None) -> list[str]:
        return generate_answers(self.model, image, masks, self.turn, self.max_new_tokens, encoded=encoded)


class CategoryPredictor(_Predictor):
    """Open-vocabulary category answers, and closed-set top-1 labels when ``label_set`` is given."""

    def __init__(
        self,
        model,
        *,
        benchmark: str = "lvis",
        label_set: Sequence[str] | None = None,
        max_new_tokens: int = 16,
    ) -> None:
        super().__init__(model, category_turn(model, benchmark), max_new_tokens)
        self.benchmark = benchmark
        # whose authors' normalisation scores the answers (a .metrics.CATEGORY_SCORING key)
        self.scoring = model.family
        self.closed_request = LabelRequest(categories=tuple(label_set)) if label_set else None

    def predict(self, image: np.ndarray, masks: list[np.ndarray]) -> list[CategoryPrediction]:
        encoded = self.model.encode_image(image)
        # The raw answers, colons included: the protocol's normalisation cuts at the colon itself
        # (``label`` would already keep only the text after the first one).
        out = [CategoryPrediction(text=text) for text in self._answers(image, masks, encoded)]
        if self.closed_request is not None:
            closed = self.model.label(image, masks, self.closed_request, encoded=encoded)
            for prediction, answer in zip(out, closed, strict=True):
                prediction.closed = answer.category.label
                prediction.closed_score = answer.category.score
        return out


class CaptionPredictor(_Predictor):
    """Region captions from one of :data:`CAPTION_PROMPTS`, greedy, up to ``max_new_tokens``."""

    def __init__(self, model, *, prompt: str = "short", max_new_tokens: int = 64) -> None:
        super().__init__(model, caption_turn(model, prompt), max_new_tokens)
        self.prompt = prompt

    def predict(self, image: np.ndarray, masks: list[np.ndarray]) -> list[str]:
        return self._answers(image, masks)


def generate_answers(
    model,
    image: np.ndarray,
    masks: list[np.ndarray],
    first_turn: str,
    max_new_tokens: int,
    *,
    encoded=None,
) -> list[str]:
    """Greedy answers of a region model to a single-region question (``first_turn``, in the model's own
    prompt set, e.g. from :func:`category_turn`) for every mask, on the fast path: the image is encoded
    once (through the model's cache when it has one; ``encoded`` reuses an encoding the caller already
    has) and all regions decode together. Answers are stripped, nothing else."""
    from osprey.inference.plan import GenerateTask
    from osprey.model.preprocess import stack_masks, to_rgb_array

    planner = model.planner(_CUSTOM)
    question = planner.question(f"custom:{first_turn}", first_turn)
    if model.model.mask_token_id not in question.ids:
        raise ValueError(f"{first_turn!r} holds no region in {model.model_id}'s prompt form")
    rgb = to_rgb_array(image)
    mask_t = stack_masks(masks, image_hw=rgb.shape[:2])
    encoded = encoded if encoded is not None else model.encode_image(rgb)
    tasks = [
        GenerateTask(region=i, question=question, max_new_tokens=max_new_tokens) for i in range(len(mask_t))
    ]
    with torch.inference_mode():
        region_tokens = model.region_tokens_of(rgb, mask_t, encoded)
    model.fast.generate(encoded, tasks, region_tokens)
    texts = [model.tokenizer.decode(t.token_ids, skip_special_tokens=True) for t in tasks]
    return [planner.prompts.clean_answer(text, keep_after_colon=False) for text in texts]
