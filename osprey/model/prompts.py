"""Osprey's ``osprey_v1`` conversation, the questions it was trained on, and prompt tokenisation.

A prompt is tokenised the way the authors' code does it: the text is split at ``<image>``, each
chunk is tokenised on its own (BOS kept only on the first chunk) and a single image placeholder
id sits between the chunks; :func:`expand_image_placeholder` widens it to one id per image token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

IMAGE_TOKEN = "<image>"
REGION_TOKENS = "<mask><pos>"
IMAGE_PLACEHOLDER_ID = -200

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER, ASSISTANT = "USER", "ASSISTANT"
SEP, SEP2 = " ", "</s>"

OVERVIEW = f"{IMAGE_TOKEN}\nThis provides an overview of the picture.\n"
SHORT_ANSWER = " Answer the question using a single word or phrase."
CAPTION_QUESTION = f"Please give me a short description of {REGION_TOKENS}. Using a short phrase."
DESCRIPTION_QUESTION = f"Can you give me a detailed description of {REGION_TOKENS}?"
OPEN_CATEGORY_QUESTION = f"What is the category of {REGION_TOKENS}? Using only one word or phrase."
CATEGORY_INSTRUCTION = (
    "Below you answer with the category name of what is inside one given region of the image. "
    "Only one region is given each time."
)
PART_INSTRUCTION = (
    "Below you answer with the category and subcategory name of what is inside one given region of "
    "the image; the region may be a part of an object. Only one region is given each time. "
    "Answer in the format category:subcategory."
)
YES, NO = "Yes", "No"


def conversation(first_turn: str) -> str:
    """One user turn and an open assistant turn in ``osprey_v1`` form."""
    return f"{SYSTEM}{SEP}{USER}: {first_turn}{SEP}{ASSISTANT}:"


def caption_turn() -> str:
    return OVERVIEW + CAPTION_QUESTION


def description_turn() -> str:
    return OVERVIEW + DESCRIPTION_QUESTION


def open_category_turn() -> str:
    return OVERVIEW + OPEN_CATEGORY_QUESTION


def attribute_turn(attribute: str) -> str:
    return OVERVIEW + f"Is {REGION_TOKENS} {attribute}?{SHORT_ANSWER}"


def category_turn(categories: Sequence[str], parts: Sequence[str] = ()) -> str:
    """The label set goes into the first turn, as in Osprey's category/part training; the
    question itself is the bare region."""
    if parts:
        vocabulary = (
            f"Categories Containing {', '.join(categories)}. Subcategories Containing {', '.join(parts)}."
        )
        return f"{IMAGE_TOKEN}\n{PART_INSTRUCTION} {vocabulary}\n{REGION_TOKENS}"
    vocabulary = f"Categories Containing {', '.join(categories)}."
    return f"{IMAGE_TOKEN}\n{CATEGORY_INSTRUCTION} {vocabulary}\n{REGION_TOKENS}"


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with one :data:`IMAGE_PLACEHOLDER_ID` per ``<image>``."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:1] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_PLACEHOLDER_ID)
        ids.extend(chunk[offset:])
    return ids


def answer_ids(tokenizer, prompt_ids: list[int], prompt: str, answer: str, *, finished: bool) -> list[int]:
    """Ids of ``answer`` as the assistant's reply to ``prompt`` (tokenised in context, so the
    SentencePiece word boundary after ``ASSISTANT:`` is the one the model saw in training), plus
    ``</s>`` when ``finished``."""
    full = tokenize_prompt(tokenizer, f"{prompt} {answer}")
    if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
        raise ValueError(f"answer {answer!r} does not tokenise as a continuation of the prompt")
    ids = full[len(prompt_ids) :]
    return ids + [tokenizer.eos_token_id] if finished else ids


def expand_image_placeholder(ids: list[int], num_image_tokens: int) -> list[int]:
    out: list[int] = []
    for token in ids:
        out.extend([token] * num_image_tokens if token == IMAGE_PLACEHOLDER_ID else [token])
    return out


def clean_answer(text: str, *, keep_after_colon: bool) -> str:
    """Strip a generated answer; for ``category:subcategory`` answers keep the part after the colon
    when only one of the two was asked for."""
    text = text.strip()
    if text.endswith(SEP2):
        text = text[: -len(SEP2)].strip()
    if keep_after_colon and ":" in text:
        text = text.split(":", 1)[1].strip()
    return text


def tokenizer_training_corpus() -> Iterator[str]:
    """Text that the random-weight presets' tokenizer is trained on: every prompt piece plus a
    small vocabulary of object, part, colour and shape words."""
    words = (
        "person man woman child dog cat bird horse car bus truck bicycle boat chair table sofa bed "
        "bottle cup bowl plate knife fork tree grass sky road building window door wall floor "
        "head hand arm leg foot tail wing wheel seat handle screen body eye ear mouth nose "
        "red green blue yellow orange purple white black gray brown pink "
        "circle square triangle rectangle star round small large tall short wooden metal plastic "
        "a an the of in on with and is are this that there it its left right top bottom front back"
    )
    pieces = [
        SYSTEM,
        conversation(caption_turn()),
        conversation(description_turn()),
        conversation(open_category_turn()),
        conversation(attribute_turn("red")),
        conversation(category_turn(["cat", "dog"], ["head", "tail"])),
        conversation(category_turn(["person", "car"])),
        f"{YES} {NO} yes no category:subcategory dog:head cat:tail",
        words,
    ]
    for _ in range(4):
        yield from pieces
