"""LoRA on PixelRefer-Lite (tiny): samples in its own prompts with its own region tokens, the adapter on
its Qwen2 projections, the held-out loss goes down, and a saved adapter reloads to identical logits and
changes what the served model answers."""

from __future__ import annotations

import pytest
import torch
from test_lora import SHAPES, fit_lowers_held_out_loss, shape_example

from osprey.inference.api import image_feature_cache
from osprey.inference.fields import LabelRequest
from osprey.inference.pixelrefer import PixelReferLite
from osprey.learning.adapters import LORA_TARGETS, AdapterSet
from osprey.learning.lora import LoraSettings, LoraTrainer, instruction_samples, load_adapter
from osprey.pixelrefer.prompts import CATEGORY_QUESTION, IM_END, PART_QUESTION, REGION, region_text

TINY = "pixelrefer-lite-tiny"


@pytest.fixture(scope="module")
def tiny() -> PixelReferLite:
    return PixelReferLite.from_pretrained(TINY, device="cpu")


def chat(question: str) -> str:
    """A question in the release's chat template, the region written as its 32 placeholders."""
    text = question.replace(REGION, region_text(32), 1)
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def test_samples_are_pixelrefer_prompts_and_only_the_answer_and_im_end_are_supervised(tiny):
    example = shape_example(1)
    sequences = tiny.lora_sequences()
    samples = instruction_samples(
        [example], categories=SHAPES, attributes=("red",), prompts=sequences.prompts
    )
    assert [(s.prompt, s.answer) for s in samples] == [
        (chat(CATEGORY_QUESTION), "square"),  # LVIS's question: the label set enters as the answers
        (chat("Is <region> red? Answer the question using a single word or phrase."), "Yes"),
        (chat("Please describe <region> briefly."), "a red square"),
    ]
    with_parts = instruction_samples(
        [example], categories=("dog",), parts=("head",), prompts=sequences.prompts
    )
    assert with_parts[0].prompt == chat(PART_QUESTION)

    prepared = sequences.prepare(example.image, example.mask)
    embeds, labels = sequences.sequence(prepared, samples[2].prompt, samples[2].answer)
    ids = tiny.tokenizer(samples[2].prompt + "a red square", add_special_tokens=False).input_ids
    ids.append(tiny.tokenizer.convert_tokens_to_ids(IM_END))
    answer = len(ids) - len(tiny.tokenizer(samples[2].prompt, add_special_tokens=False).input_ids)
    assert labels.tolist() == [-100] * (len(ids) - answer) + ids[-answer:]
    assert tiny.tokenizer.decode(ids[-answer:]) == "a red square<|im_end|>"
    # the 32 region rows are the tokens serving computes for the region (the same seeded k-means)
    served = tiny.region_tokens(
        example.image, torch.from_numpy(example.mask)[None], tiny.encode_image(example.image)
    )
    where = torch.tensor(ids) == tiny.model.region_token_id
    assert int(where.sum()) == 32 and torch.equal(embeds[where], served[0])
    table = tiny.model.llm.get_input_embeddings().weight
    assert torch.equal(embeds[~where], table[torch.tensor(ids)[~where]])
    with pytest.raises(ValueError, match="PixelRefer-Lite trains its language model's LoRA adapter only"):
        LoraTrainer(osprey=tiny, settings=LoraSettings(train_mask_extractor=True))


def test_the_adapter_wraps_every_projection_of_the_qwen2_decoder(tiny):
    trainer = LoraTrainer(osprey=tiny, settings=LoraSettings(rank=2))
    try:
        names = [n for n, _ in tiny.model.llm.named_parameters() if ".lora_A.lora-training." in n]
        wrapped = {n.split(".lora_A.")[0].split(".")[-1] for n in names}
        layers = {n.split(".layers.")[1].split(".")[0] for n in names}
        assert trainer.settings.target_modules == LORA_TARGETS["qwen2"]
        assert wrapped == set(LORA_TARGETS["qwen2"]) and len(layers) == tiny.config.text.num_hidden_layers
    finally:
        trainer.close()
    assert not any("lora" in n for n, _ in tiny.model.llm.named_parameters())  # the served model as it was


def test_lora_on_tiny_pixelrefer_lowers_held_out_loss_and_the_saved_adapter_reloads_identically(tmp_path):
    examples = [shape_example(i) for i in range(18)]
    trained = PixelReferLite.from_pretrained(TINY, device="cpu")
    prompts = trained.lora_sequences().prompts
    train = instruction_samples(examples[:12], categories=SHAPES, attributes=("red",), prompts=prompts)
    heldout_examples = examples[12:]
    heldout = instruction_samples(heldout_examples, categories=SHAPES, attributes=("red",), prompts=prompts)
    trainer = LoraTrainer(
        osprey=trained, settings=LoraSettings(rank=8, alpha=16, learning_rate=3e-3, epochs=4, grad_accum=2)
    )
    after = fit_lowers_held_out_loss(trainer, train, examples, heldout, heldout_examples)
    trainer.save(tmp_path / "lora")

    sample, example = heldout[0], heldout_examples[heldout[0].example]

    def logits(model_trainer: LoraTrainer) -> torch.Tensor:
        prepared = model_trainer.sequences.prepare(example.image, example.mask)
        with torch.no_grad(), model_trainer.active():
            embeds, _ = model_trainer.sequences.sequence(prepared, sample.prompt, sample.answer)
            return model_trainer.llm(inputs_embeds=embeds[None]).logits

    fresh = PixelReferLite.from_pretrained(TINY, device="cpu")  # same seed: the same base weights
    reloaded = load_adapter(fresh, tmp_path / "lora")
    assert torch.equal(logits(reloaded), logits(trainer))
    assert reloaded.evaluate(heldout, heldout_examples) == after
    reloaded.close()

    # Served: a project's adapter switched on one served model changes its answers, and off again
    # gives the base model's; with it on, the answers are the trained model's own.
    request = LabelRequest(categories=SHAPES, caption=True, max_caption_tokens=4)
    image, mask = example.image, [example.mask]
    with trainer.active():
        expected = trained.label(image, mask, request)[0]
    served = PixelReferLite.from_pretrained(TINY, device="cpu", cache=image_feature_cache(max_images=4))
    base = served.label(image, mask, request)[0]
    adapters = AdapterSet.of(served)
    adapters.activate("project-a", tmp_path / "lora")
    with_adapter = served.label(image, mask, request)[0]
    assert with_adapter.category.scores == pytest.approx(expected.category.scores, abs=1e-5)
    assert with_adapter.caption == expected.caption
    assert with_adapter.category.scores != pytest.approx(base.category.scores, abs=1e-3)
    adapters.activate(None, None)
    again = served.label(image, mask, request)[0]
    assert again.category.scores == pytest.approx(base.category.scores, abs=1e-6)
    assert served.cache.stats()["items"] == 2  # one encoding per adapter
