"""Osprey's ``osprey_v1`` conversation, the prompts its weights were trained on, and prompt tokenisation.

Every string here is data the weights were trained on (or that the authors' evaluation asks), so it is
reproduced byte for byte, typos and missing spaces included; each constant names its upstream source
(CircleRadon/Osprey at deb0e57). A prompt reaches the model as the authors' ``preprocess_multimodal``
leaves it: ``<image>`` moved to the front, followed by one newline, the rest stripped.

A prompt is tokenised the way the authors' code does it: the text is split at ``<image>``, each
chunk is tokenised on its own (BOS kept only on the first chunk) and a single image placeholder
id sits between the chunks; :func:`expand_image_placeholder` widens it to one id per image token.
Within a chunk every text piece between added tokens (``<mask>``, ``<pos>``) is normalised on its
own, as transformers 4.31's Llama tokenizer did (see :func:`osprey.model.llm.load_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

IMAGE_TOKEN = "<image>"
REGION_TOKENS = "<mask><pos>"
IMAGE_PLACEHOLDER_ID = -200

# conv_templates["osprey_v1"] (osprey/conversation.py), the template of every evaluation script and of
# the demo. (Training used conv_vicuna_v1, whose system prompt says "user" where this says "human".)
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER, ASSISTANT = "USER", "ASSISTANT"
SEP, SEP2 = " ", "</s>"

# The first turn of region captions, descriptions and short answers: osprey/datasets/vg.py:54 and
# osprey_724k.py:52 (training), osprey/eval/lvis_paco_eval.py (evaluation).
OVERVIEW = f"{IMAGE_TOKEN}\nThis provides an overview of the picture.\n"
# The short-answer suffix of Osprey-724K's short-form questions (osprey/datasets/osprey_724k.py:152,224).
SHORT_ANSWER = " Answer the question using a single word or phrase."
# demo/osprey_inference.py:66 and :76: the questions the authors' own inference code asks.
CAPTION_QUESTION = f"Please give me a short description of {REGION_TOKENS}. Using a short phrase."
DESCRIPTION_QUESTION = f"Can you give me a detailed description of {REGION_TOKENS}?"
# osprey/eval/lvis_paco_eval.py (get_init_inputs): the open-vocabulary category question.
OPEN_CATEGORY_QUESTION = f"What is the category of {REGION_TOKENS}? Using only one word or phrase."
# osprey/eval/refcocog_eval.py:208,212: "<image>.\nThis provides ..." - preprocess_multimodal moves
# "<image>" to the front, which leaves the stray "." on a line of its own.
REFCOCOG_CAPTION_TURN = (
    f"{IMAGE_TOKEN}\n.\nThis provides an overview of the picture.\n"
    f"Please give me a short description of {REGION_TOKENS}."
)
# Stage-2 category training, osprey/datasets/stage2_data.py: COCODataset.begin_str (no label list) ...
COCO_CATEGORY_INSTRUCTION = (
    "In the conversation below, you simply answer the category name based on what you see "
    "in the imagery inside a particular region. I will give you only one region each time.\n"
)
# ... and PascalPart.begin_str (its leading space is stripped by preprocess_multimodal; "seein" is
# upstream's), followed by the label lists: categories joined by ", ", parts by "," (no space).
PART_INSTRUCTION = (
    "In the conversation below, you simply answer the category and subcategory name based on what you see"
    "in the image inside a particular region. It maybe a subpart of an object. "
    "I will give you only one region each time. Your answer should in the format of "
    "category:subcategory. "
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
    """A yes/no question about one attribute. No upstream prompt asks for attributes: the question form
    and its suffix are those of Osprey-724K's short-form region QA (osprey_724k.py, whose questions live
    in the dataset files), answered ``Yes``/``No``."""
    return OVERVIEW + f"Is {REGION_TOKENS} {attribute}?{SHORT_ANSWER}"


def category_turn(categories: Sequence[str], parts: Sequence[str] = ()) -> str:
    """The stage-2 category prompt, then the bare region, as the category training asked it.

    With ``parts``: PascalPart's instruction, answers ``category:subcategory``, with both label lists in
    the first turn (the training's label-set conditioning). Without: COCO's instruction, which lists no
    labels (the label set then enters only as the scored candidates). A part label set without
    categories has no trained form; it is asked with COCO's instruction.
    """
    if parts:
        labels = (
            "Categories Containing " + ", ".join(categories) + ". "
            "Subcategories Containing " + ",".join(parts) + ".\n"
        )
        return f"{IMAGE_TOKEN}\n{PART_INSTRUCTION}{labels}{REGION_TOKENS}"
    return f"{IMAGE_TOKEN}\n{COCO_CATEGORY_INSTRUCTION}{REGION_TOKENS}"


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


def clean_answer(text: str, *, keep_after_colon: bool, stop: str = SEP2) -> str:
    """Strip a generated answer and the model's ``stop`` token (Osprey's ``</s>`` by default); for
    ``category:subcategory`` answers keep the part after the colon when only one of the two was asked for."""
    text = text.strip()
    if text.endswith(stop):
        text = text[: -len(stop)].strip()
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
        conversation(REFCOCOG_CAPTION_TURN),
        f"{YES} {NO} yes no category:subcategory dog:head cat:tail",
        words,
    ]
    for _ in range(4):
        yield from pieces
