"""Prompt ids exactly as the authors' code produces them (transformers 4.31 fast Llama tokenizer), for
every prompt kind and every tokenizer layout a checkpoint may ship.

The expected ids in ``tests/fixtures/llama_tokenizer/expected_ids.json`` were computed with the
authors' ``tokenizer_image_token`` under transformers 4.31 (see the folder's README). transformers 5
normalises only the first text piece between added tokens, so without
``osprey.model.llm.finish_tokenizer`` every prompt differs right after ``<pos>``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from osprey.model import prompts as P
from osprey.model.llm import load_tokenizer

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "llama_tokenizer"
EXPECTED = json.loads((FIXTURE / "expected_ids.json").read_text())
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
LAYOUTS = {
    "tokenizer.json": ("tokenizer.json", "tokenizer.model", "added_tokens.json", *CONFIG_FILES),
    "tokenizer.model + added_tokens.json": ("tokenizer.model", "added_tokens.json", *CONFIG_FILES),
    "tokenizer.model only": ("tokenizer.model", *CONFIG_FILES),
}
# The prompt of each kind as the backend builds it today: a wording change must fail here.
PROMPTS = {
    "caption": P.conversation(P.caption_turn()),
    "description": P.conversation(P.description_turn()),
    "open_category": P.conversation(P.open_category_turn()),
    "refcocog_caption": P.conversation(P.REFCOCOG_CAPTION_TURN),
    "attribute": P.conversation(P.attribute_turn("red")),
    "category": P.conversation(P.category_turn(["cat", "dog", "traffic light"])),
    "category_with_parts": P.conversation(P.category_turn(["dog", "cat"], ["head", "tail", "leg"])),
    "part_only": P.conversation(P.category_turn(["head", "tail", "leg"])),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def tokenizer(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    for name in LAYOUTS[request.param]:
        shutil.copy(FIXTURE / name, folder / name)
    return load_tokenizer(folder)


def test_every_prompt_kind_is_pinned():
    assert set(PROMPTS) == set(EXPECTED["kinds"])
    for kind, prompt in PROMPTS.items():
        assert prompt == EXPECTED["kinds"][kind]["prompt"], (
            f"the {kind} prompt is not the one the ids were made for"
        )


def test_added_tokens_sit_after_the_table_and_pad_is_unk(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<mask>", "<pos>"]) == EXPECTED["mask_pos_ids"] == [600, 601]
    assert tokenizer.pad_token == tokenizer.unk_token == "<unk>"


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_prompt_ids_equal_the_authors(tokenizer, kind):
    expected = EXPECTED["kinds"][kind]
    ids = P.tokenize_prompt(tokenizer, PROMPTS[kind])
    assert ids == expected["ids"], (
        f"{kind}: ours {tokenizer.convert_ids_to_tokens([i for i in ids if i >= 0])[-12:]}, "
        f"authors' {expected['tokens'][-12:]}"
    )


@pytest.mark.parametrize("kind", sorted(k for k, v in EXPECTED["kinds"].items() if v["answers"]))
def test_candidate_answer_ids_equal_the_authors(tokenizer, kind):
    expected = EXPECTED["kinds"][kind]
    for answer in expected["answers"]:
        ids = P.answer_ids(
            tokenizer, expected["ids"], expected["prompt"], answer["answer"], finished=answer["finished"]
        )
        assert ids == answer["ids"], (kind, answer["answer"])


def test_the_piece_after_pos_starts_a_word_as_in_training(tokenizer):
    """The trained form: ``<pos>`` then ``▁.`` (caption) and ``<pos>`` ``▁`` ``▁ASSISTANT`` (category)."""

    def tokens(prompt):
        return tokenizer.convert_ids_to_tokens([i for i in P.tokenize_prompt(tokenizer, prompt) if i >= 0])

    caption = tokens(PROMPTS["caption"])
    assert caption[caption.index("<pos>") + 1] == "▁."
    category = tokens(PROMPTS["category"])
    assert category[category.index("<pos>") + 1 : category.index("<pos>") + 3] == ["▁", "▁ASSISTANT"]


def test_a_folder_without_tokenizer_files_is_refused_naming_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises((ValueError, OSError), match="tokenizer"):
        load_tokenizer(tmp_path)
