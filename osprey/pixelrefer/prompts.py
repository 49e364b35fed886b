"""PixelRefer-Lite's conversation, the prompts its weights were trained and evaluated on, and tokenisation.

Every question string here is data (``PixelRefer/evaluation/pixelrefer_lite/*.py`` at 2a18ec7, the
scripts behind the paper's tables), reproduced byte for byte. A region is written into a question as
``<region>`` and reaches the model as ``[`` + ``<REGION>`` x 32 + ``]``, each ``<REGION>`` replaced by
one of the region's 32 object tokens. The conversation is the release's own chat template (no system
turn): ``<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``; an answer ends with
``<|im_end|>``. The model sees no image tokens, so every prompt shares the prefix
``<|im_start|>user\\n`` and each question shares its text up to the first region.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from osprey.model.prompts import clean_answer

REGION = "<region>"
REGION_TOKEN = "<REGION>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_PREFIX = f"{IM_START}user\n"  # what every prompt begins with
# Tokens the release's tokenizer carries besides Qwen2.5's own (added by the authors' training script).
ADDED_TOKENS = ("<image>", "<|stream_start|>", "<|stream_end|>", REGION_TOKEN)

# infer_paco_lvis.py: the LVIS question (categories) ...
CATEGORY_QUESTION = "What is the category of <region>? Using only one word or phrase."
# ... and the PACO one (categories with parts, answered "category:subcategory").
PART_QUESTION = (
    "What is the category of <region>? It maybe a subpart of an object. If it is a subpart, output in "
    "the format of 'category:subcategory', else just output the category."
)
# infer_vg.py (Visual Genome region captions) and infer_refl4_detail.py (detailed descriptions).
CAPTION_QUESTION = "Please describe <region> briefly."
DESCRIPTION_QUESTION = "Please describe <region> in detail."
# No upstream prompt asks for attributes: a yes/no region question with the short-answer suffix that
# VideoLLaMA3's and Osprey's instruction data share, answered "Yes"/"No".
SHORT_ANSWER = " Answer the question using a single word or phrase."
YES, NO = "Yes", "No"


def region_text(num_tokens: int) -> str:
    """How one region is written into the prompt: ``[`` + ``<REGION>`` x ``num_tokens`` + ``]``."""
    return "[" + REGION_TOKEN * num_tokens + "]"


class PixelReferPrompts:
    """The prompt set the shared planner (:class:`osprey.inference.plan.Planner`) asks PixelRefer-Lite
    with; ``num_tokens`` is the model's tokens per region (``mask_num``, 32)."""

    YES, NO = YES, NO

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens

    def _with_region(self, question: str) -> str:
        return question.replace(REGION, region_text(self.num_tokens), 1)

    def conversation(self, first_turn: str) -> str:
        """One user turn and an open assistant turn in the release's chat template."""
        return f"{CHAT_PREFIX}{first_turn.strip()}{IM_END}\n{IM_START}assistant\n"

    def caption_turn(self) -> str:
        return self._with_region(CAPTION_QUESTION)

    def description_turn(self) -> str:
        return self._with_region(DESCRIPTION_QUESTION)

    def open_category_turn(self) -> str:
        return self._with_region(CATEGORY_QUESTION)

    def paco_category_turn(self) -> str:
        """``infer_paco_lvis.py``'s PACO question (answers ``category:subcategory``)."""
        return self._with_region(PART_QUESTION)

    def attribute_turn(self, attribute: str) -> str:
        return self._with_region(f"Is {REGION} {attribute}?{SHORT_ANSWER}")

    def category_turn(self, categories: Sequence[str], parts: Sequence[str] = ()) -> str:
        """PACO's question when parts are asked (answers ``category:subcategory``), else LVIS's. Neither
        lists labels: the label set enters as the scored candidates. A part set without categories is
        asked with LVIS's question."""
        del categories
        return self.paco_category_turn() if parts else self.open_category_turn()

    def tokenize_prompt(self, tokenizer, prompt: str) -> list[int]:
        return list(tokenizer(prompt, add_special_tokens=False).input_ids)

    def answer_ids(
        self, tokenizer, prompt_ids: list[int], prompt: str, answer: str, *, finished: bool
    ) -> list[int]:
        """Ids of ``answer`` as the assistant's reply (tokenised in context), plus ``<|im_end|>`` when
        ``finished``."""
        full = self.tokenize_prompt(tokenizer, prompt + answer)
        if full[: len(prompt_ids)] != list(prompt_ids) or len(full) == len(prompt_ids):
            raise ValueError(f"answer {answer!r} does not tokenise as a continuation of the prompt")
        ids = full[len(prompt_ids) :]
        return ids + [tokenizer.convert_tokens_to_ids(IM_END)] if finished else ids

    @staticmethod
    def clean_answer(text: str, *, keep_after_colon: bool) -> str:
        """:func:`osprey.model.prompts.clean_answer` (the same answer rules) with ``<|im_end|>`` as the stop."""
        return clean_answer(text, keep_after_colon=keep_after_colon, stop=IM_END)


def tokenizer_training_corpus() -> Iterator[str]:
    """Text the random-weight presets' tokenizer is trained on: every question plus a small vocabulary."""
    words = (
        "person man woman child dog cat bird horse car bus truck bicycle boat chair table sofa bed "
        "bottle cup bowl plate knife fork tree grass sky road building window door wall floor "
        "head hand arm leg foot tail wing wheel seat handle screen body eye ear mouth nose "
        "red green blue yellow orange purple white black gray brown pink Yes No yes no "
        "circle square triangle rectangle star round small large tall short wooden metal plastic "
        "a an the of in on with and is are this that there it its left right top bottom front back"
    )
    pieces = [
        CATEGORY_QUESTION,
        PART_QUESTION,
        CAPTION_QUESTION,
        DESCRIPTION_QUESTION,
        f"Is [ ] red?{SHORT_ANSWER}",
        "user\nassistant\n[]:",
        "dog:head cat:tail category:subcategory",
        words,
    ]
    for _ in range(4):
        yield from pieces
