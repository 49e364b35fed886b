import pytest
import torch

from osprey.model import prompts as P
from osprey.model.llm import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(1024)


def test_osprey_v1_conversation_text():
    text = P.conversation(P.caption_turn())
    assert text == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\nThis provides an "
        "overview of the picture.\nPlease give me a short description of <mask><pos>. Using a short phrase. "
        "ASSISTANT:"
    )
    assert P.description_turn().endswith("Can you give me a detailed description of <mask><pos>?")
    assert P.attribute_turn("red").endswith(
        "Is <mask><pos> red? Answer the question using a single word or phrase."
    )


def test_category_turns_are_the_stage2_training_prompts_byte_for_byte():
    """osprey/datasets/stage2_data.py after preprocess_multimodal: PascalPart with both label lists
    (parts joined without a space, "seein" as upstream has it), COCO with none."""
    assert P.category_turn(["cat", "dog"], ["head", "tail"]) == (
        "<image>\nIn the conversation below, you simply answer the category and subcategory name based on "
        "what you seein the image inside a particular region. It maybe a subpart of an object. I will give "
        "you only one region each time. Your answer should in the format of category:subcategory. "
        "Categories Containing cat, dog. Subcategories Containing head,tail.\n<mask><pos>"
    )
    coco = (
        "<image>\nIn the conversation below, you simply answer the category name based on what you see in "
        "the imagery inside a particular region. I will give you only one region each time.\n<mask><pos>"
    )
    assert P.category_turn(["cat"]) == P.category_turn(["person", "car"]) == coco
    assert P.category_turn(["head", "tail"]) == coco  # a part set alone has no trained prompt


def test_evaluation_turns_are_the_authors_questions():
    assert P.open_category_turn() == (
        "<image>\nThis provides an overview of the picture.\nWhat is the category of <mask><pos>? Using "
        "only one word or phrase."
    )
    assert P.REFCOCOG_CAPTION_TURN == (
        "<image>\n.\nThis provides an overview of the picture.\nPlease give me a short description of "
        "<mask><pos>."
    )


def test_tokenize_prompt_splits_at_the_image_and_keeps_one_bos(tokenizer):
    prompt = P.conversation(P.caption_turn())
    ids = P.tokenize_prompt(tokenizer, prompt)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(P.IMAGE_PLACEHOLDER_ID) == 1
    before, after = prompt.split("<image>")
    assert ids[: ids.index(P.IMAGE_PLACEHOLDER_ID)] == tokenizer(before).input_ids
    assert ids[ids.index(P.IMAGE_PLACEHOLDER_ID) + 1 :] == tokenizer(after).input_ids[1:]
    mask_id, pos_id = tokenizer.convert_tokens_to_ids(["<mask>", "<pos>"])
    assert (mask_id, pos_id) == (1024, 1025)  # outside a 1024-row table, as in the release
    assert ids.count(mask_id) == 1 and ids[ids.index(mask_id) + 1] == pos_id
    assert len(P.expand_image_placeholder(ids, 64)) == len(ids) + 63


def test_answers_are_tokenised_in_context_and_end_with_eos(tokenizer):
    prompt = P.conversation(P.category_turn(["red dog"]))
    ids = P.tokenize_prompt(tokenizer, prompt)
    answer = P.answer_ids(tokenizer, ids, prompt, "red dog", finished=True)
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "red dog"
    assert P.answer_ids(tokenizer, ids, prompt, "red dog", finished=False) == answer[:-1]


def test_clean_answer_keeps_the_part_after_the_colon_only_when_asked():
    assert P.clean_answer(" dog:head</s>", keep_after_colon=True) == "head"
    assert P.clean_answer(" dog:head</s>", keep_after_colon=False) == "dog:head"
    assert P.clean_answer("a brown dog.", keep_after_colon=True) == "a brown dog."


def test_placeholder_count_mismatch_raises_with_both_numbers(tiny_osprey):
    model = tiny_osprey.model
    ids = torch.tensor([1, 5, model.mask_token_id, model.pos_token_id, 7])
    one = torch.zeros(1, model.config.llm.hidden_size)
    with pytest.raises(
        ValueError, match="<mask> placeholders and features do not match: 1 placeholder tokens, 2"
    ):
        model.embed(ids, mask_tokens=one.repeat(2, 1), spatial_tokens=one)
    with pytest.raises(
        ValueError, match="image placeholders and features do not match: 3 placeholder tokens, 2"
    ):
        model.embed(torch.tensor([P.IMAGE_PLACEHOLDER_ID] * 3), image_tokens=one.repeat(2, 1))


def test_placeholders_are_filled_in_order_and_never_looked_up(tiny_osprey):
    model = tiny_osprey.model
    hidden = model.config.llm.hidden_size
    ids = torch.tensor(
        [1, model.mask_token_id, model.pos_token_id, 9, model.mask_token_id, model.pos_token_id]
    )
    mask_tokens = torch.stack([torch.full((hidden,), 1.0), torch.full((hidden,), 2.0)])
    spatial = torch.stack([torch.full((hidden,), 3.0), torch.full((hidden,), 4.0)])
    with torch.no_grad():
        out = model.embed(ids, mask_tokens=mask_tokens, spatial_tokens=spatial)
        table = model.llm.get_input_embeddings().weight
    assert out.shape == (6, hidden)
    assert [float(out[i, 0]) for i in (1, 2, 4, 5)] == [1.0, 3.0, 2.0, 4.0]
    assert torch.equal(out[3], table[9])
