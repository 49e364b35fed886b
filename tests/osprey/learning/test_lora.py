"""LoRA fine-tuning on accepted labels lowers the held-out loss, and a saved adapter reloads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from osprey.inference.api import Osprey
from osprey.inference.fields import LabelRequest
from osprey.learning.lora import LoraSettings, LoraTrainer, RegionExample, instruction_samples, load_adapter

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def shape_example(index: int) -> RegionExample:
    rng = np.random.default_rng(index)
    shape, colour = SHAPES[index % 3], list(COLOURS)[(index // 3) % 3]
    image = Image.new("RGB", (96, 96), tuple(int(v) for v in rng.integers(0, 60, 3)))
    mask = Image.new("L", (96, 96), 0)
    x, y, r = int(rng.integers(30, 66)), int(rng.integers(30, 66)), int(rng.integers(14, 26))
    box = [x - r, y - r, x + r, y + r]
    for canvas, fill in ((ImageDraw.Draw(image), COLOURS[colour]), (ImageDraw.Draw(mask), 255)):
        if shape == "circle":
            canvas.ellipse(box, fill=fill)
        elif shape == "square":
            canvas.rectangle(box, fill=fill)
        else:
            canvas.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return RegionExample(
        image=np.asarray(image), mask=np.asarray(mask) > 0, category=shape, attributes=(colour,),
        caption=f"a {colour} {shape}",
    )  # fmt: skip


def test_instruction_samples_use_osprey_prompts():
    examples = [shape_example(0), shape_example(4)]
    samples = instruction_samples(examples, categories=SHAPES, attributes=("red", "green"))
    answers = [(s.example, s.answer) for s in samples]
    assert answers == [(0, "circle"), (0, "Yes"), (0, "No"), (0, "a red circle"),
                       (1, "square"), (1, "No"), (1, "Yes"), (1, "a green square")]  # fmt: skip
    assert samples[0].prompt.endswith(  # COCO's category training prompt, as the weights learned it
        "I will give you only one region each time.\n<mask><pos> ASSISTANT:"
    )
    with_parts = instruction_samples([RegionExample(image=examples[0].image, mask=examples[0].mask,
                                                     category="dog", part="head")],
                                     categories=("dog",), parts=("head", "tail"))  # fmt: skip
    assert with_parts[0].answer == "dog:head"
    assert (
        "Categories Containing dog. Subcategories Containing head,tail.\n<mask><pos>" in with_parts[0].prompt
    )


def fit_lowers_held_out_loss(trainer: LoraTrainer, train, examples, heldout, heldout_examples) -> float:
    """Fit ``trainer``: its training loss goes down and its held-out answer loss ends below 0.8x where it
    started. Returns the held-out loss after training."""
    before = trainer.evaluate(heldout, heldout_examples)
    history = trainer.fit(train, examples, progress=False)
    after = trainer.evaluate(heldout, heldout_examples)
    assert history["epoch_losses"][-1] < history["epoch_losses"][0]
    assert after < before * 0.8, (before, after)
    return after


def test_lora_lowers_held_out_loss_and_the_saved_adapter_reloads(tmp_path):
    examples = [shape_example(i) for i in range(18)]
    train = instruction_samples(examples[:12], categories=SHAPES)
    heldout_examples = examples[12:]
    heldout = instruction_samples(heldout_examples, categories=SHAPES)
    osprey = Osprey.from_pretrained("tiny", device="cpu")
    trainer = LoraTrainer(
        osprey=osprey,
        settings=LoraSettings(
            rank=8, alpha=16, learning_rate=3e-3, epochs=4, grad_accum=2, train_mask_extractor=True
        ),
    )
    after = fit_lowers_held_out_loss(trainer, train, examples, heldout, heldout_examples)
    trainer.save(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter.safetensors").is_file()

    fresh = Osprey.from_pretrained("tiny", device="cpu")  # same seed: the same base weights
    reloaded = load_adapter(fresh, tmp_path / "lora")
    assert reloaded.evaluate(heldout, heldout_examples) == pytest.approx(after, rel=1e-4)
    # The adapted model still serves the fast path.
    out = fresh.label(examples[12].image, [examples[12].mask], LabelRequest(categories=SHAPES))
    assert out[0].category.label in SHAPES


def test_adapter_set_switches_projects_adapters_on_one_served_model(tmp_path):
    from osprey.inference.api import image_feature_cache
    from osprey.learning.lora import AdapterSet

    examples = [shape_example(i) for i in range(9)]
    trained = Osprey.from_pretrained("tiny", device="cpu")
    trainer = LoraTrainer(
        osprey=trained, settings=LoraSettings(rank=4, learning_rate=1e-2, epochs=2, grad_accum=1)
    )
    trainer.fit(instruction_samples(examples, categories=SHAPES), examples, progress=False)
    trainer.save(tmp_path / "a")
    request = LabelRequest(categories=SHAPES, caption=True, max_caption_tokens=4)
    image, mask = examples[0].image, [examples[0].mask]
    with trainer.active():  # the trained adapter answering on the model it was trained on
        expected = trained.label(image, mask, request)[0]

    served = Osprey.from_pretrained("tiny", device="cpu", cache=image_feature_cache(max_images=4))
    base = served.label(image, mask, request)[0]
    adapters = AdapterSet(osprey=served)
    adapters.activate("project-a", tmp_path / "a")
    with_adapter = served.label(image, mask, request)[0]
    assert with_adapter.category.scores == pytest.approx(expected.category.scores, abs=1e-5)
    assert with_adapter.caption == expected.caption
    assert with_adapter.category.scores != pytest.approx(base.category.scores, abs=1e-3)
    adapters.activate(None, None)
    again = served.label(image, mask, request)[0]  # the base model again, its cached encoding reused
    assert again.category.scores == pytest.approx(base.category.scores, abs=1e-6)
    assert served.cache.stats()["items"] == 2  # one encoding per adapter


def test_training_on_the_served_model_keeps_one_copy_of_its_weights_and_its_answers(monkeypatch):
    """The adapter trains on the served model: no second model is loaded, the base weights stay the
    very same tensors, and a click between two training steps gets the answer it got before the job."""
    import contextlib
    import gc

    import torch

    from osprey.model.modeling import OspreyModel
    from osprey.runtime.memory import weight_bytes

    osprey = Osprey.from_pretrained("tiny", device="cpu")
    examples = [shape_example(i) for i in range(6)]
    request = LabelRequest(categories=SHAPES, caption=True, max_caption_tokens=4)
    click = examples[0].image, [examples[0].mask]
    before = osprey.label(*click, request)[0]
    base = {name: p.data_ptr() for name, p in osprey.model.named_parameters()}
    base_bytes = weight_bytes(osprey.model)
    table = osprey.model.llm.get_input_embeddings().weight

    def tables() -> int:  # tensors the size of the embedding table alive (it, and the untied LM head)
        alive = (t for t in gc.get_objects() if type(t) in (torch.Tensor, torch.nn.Parameter))
        return sum(1 for t in alive if t.shape == table.shape)

    def models() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is OspreyModel)  # type(): asks no proxy its class

    gc.collect()  # what other tests left behind is counted once here, and never changes after
    alone, models_alone = tables(), models()

    def no_second_model(*args, **kwargs):
        raise AssertionError("a LoRA job must not load another copy of the model")

    monkeypatch.setattr(Osprey, "from_pretrained", no_second_model)
    seen = {"steps": 0, "answers": []}

    @contextlib.contextmanager
    def step_session():
        yield
        seen["steps"] += 1  # between two training steps: a click on the served model
        seen["answers"].append(osprey.label(*click, request)[0])
        seen.setdefault("tables", set()).add(tables())
        seen.setdefault("models", set()).add(models())

    trainer = LoraTrainer(
        osprey=osprey, settings=LoraSettings(rank=4, learning_rate=1e-2, epochs=2, grad_accum=1)
    )
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainer.trainable_parameters())
    samples = instruction_samples(examples, categories=SHAPES)
    trainer.fit(samples, examples, progress=False, step_session=step_session)
    assert seen["steps"] == 2 * len(samples)
    assert seen["tables"] == {alone} and seen["models"] == {models_alone}  # no second copy, ever
    assert weight_bytes(osprey.model) == base_bytes + adapter_bytes  # base + adapter, nothing more
    current = {name.replace("base_model.model.", "").replace(".base_layer", ""): p.data_ptr()
               for name, p in osprey.model.named_parameters() if "lora_" not in name}  # fmt: skip
    assert current == base  # the same tensors, not copies
    for answer in seen["answers"]:
        assert (answer.caption, answer.category.label) == (before.caption, before.category.label)
        assert answer.category.scores == pytest.approx(before.category.scores, abs=1e-6)
    with trainer.active():
        adapted = osprey.label(*click, request)[0]
    assert adapted.category.scores != pytest.approx(before.category.scores, abs=1e-4)  # it did train
    trainer.close()
    assert osprey.label(*click, request)[0].category.scores == pytest.approx(before.category.scores, abs=1e-6)
    assert weight_bytes(osprey.model) == base_bytes  # the adapter is gone
