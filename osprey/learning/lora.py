"""LoRA fine-tuning of Osprey's language model on accepted region labels, on the model that serves.

Accepted regions become instruction samples in Osprey's own conversation format (the same prompts
the fast path asks): the label-set question answered with the category (``category:part`` when
parts are asked), one yes/no question per attribute, and the caption and description questions
answered with the annotator's text. The loss is the cross-entropy of the answer tokens and
``</s>`` only.

The adapter is trained on the served model itself: peft adds it beside the served adapters, without a
copy of the base weights (:mod:`osprey.learning.adapters`), and each training step makes it active, runs
the forward, the backward and the optimiser step as one :func:`~osprey.runtime.steps.atomic` block, and
hands the model back with the adapter that served before active again, in eval mode. So serving between
two training steps answers exactly as it did before the job began. The frozen vision tower runs without
gradients, before the block (a click may take the model there). A trained mask extractor or projector is
a private copy: the served ones never change. ``accelerate`` drives the loop, so ``accelerate launch``
runs the same code on several GPUs; on a CPU it runs as is.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from osprey.inference.api import Osprey
from osprey.model import prompts as P
from osprey.model.preprocess import preprocess_image
from osprey.runtime.steps import atomic

from .adapters import AdapterSet, LoraSettings, read_adapter

__all__ = [
    "AdapterSet", "InstructionSample", "LoraSettings", "LoraTrainer", "RegionExample", "instruction_samples",
    "load_adapter",
]  # fmt: skip

logger = logging.getLogger(__name__)
IGNORE = -100
TRAINING_ADAPTER = "lora-training"


@dataclass(frozen=True)
class RegionExample:
    """One accepted region: ``image`` (H, W, 3) uint8, ``mask`` (H, W) bool, and its field values."""

    image: np.ndarray
    mask: np.ndarray
    category: str | None = None
    part: str | None = None
    attributes: tuple[str, ...] = ()
    caption: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class InstructionSample:
    example: int  # index into the examples list (their images and masks)
    prompt: str  # full conversation text, ending with "ASSISTANT:"
    answer: str


def instruction_samples(
    examples: Sequence[RegionExample],
    *,
    categories: Sequence[str] = (),
    parts: Sequence[str] = (),
    attributes: Sequence[str] = (),
) -> list[InstructionSample]:
    """Osprey-format questions and the annotator's answers for every accepted region."""
    samples = []
    category_prompt = P.conversation(P.category_turn(categories, parts)) if categories else None
    for i, ex in enumerate(examples):
        if category_prompt and ex.category:
            answer = f"{ex.category}:{ex.part}" if parts and ex.part else ex.category
            samples.append(InstructionSample(i, category_prompt, answer))
        for attribute in attributes:
            answer = P.YES if attribute in ex.attributes else P.NO
            samples.append(InstructionSample(i, P.conversation(P.attribute_turn(attribute)), answer))
        if ex.caption:
            samples.append(InstructionSample(i, P.conversation(P.caption_turn()), ex.caption))
        if ex.description:
            samples.append(InstructionSample(i, P.conversation(P.description_turn()), ex.description))
    return samples


class LoraTrainer:
    """Trains a LoRA adapter named ``name`` on ``osprey``'s served language model (see the module
    docstring); :meth:`close` removes it. Only its weights (and any private extractor/projector copy)
    get gradients."""

    def __init__(
        self, *, osprey: Osprey, settings: LoraSettings | None = None, name: str = TRAINING_ADAPTER
    ) -> None:
        self.osprey = osprey
        self.settings = settings or LoraSettings()
        self.name = name
        self._run = uuid.uuid4().hex[:12]  # this trainer's adapter, among others of the same name
        self.updates = 0  # training steps taken (the image cache key of :meth:`active` follows it)
        self.adapters = AdapterSet.of(osprey)
        s, model = self.settings, osprey.model
        for param in model.parameters():
            param.requires_grad_(False)
        self.adapters.remove(name)  # a job that ended without closing
        self.adapters.add(name, s.lora_config(inference=False))
        self.adapters.use(self.adapters.active)  # adding made it active: serving stays as it was
        base = self.llm.get_base_model()
        # activations of one layer at a time in the backward (a 7B step: ~0.5 GB instead of ~6 GB);
        # transformers checkpoints only in train mode, and serving never runs its layers' forward
        self._checkpointing = s.gradient_checkpointing and not getattr(
            base, "is_activation_checkpointing", False
        )
        if self._checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        marker = f".{name}."
        self._adapter_params = [p for n, p in self.llm.named_parameters() if marker in n]
        for param in self._adapter_params:
            param.requires_grad_(True)
        # private copies, so the served extractor and projector never change
        self.extractor = (
            copy.deepcopy(model.mask_extractor) if s.train_mask_extractor else model.mask_extractor
        )
        self.projector = copy.deepcopy(model.mm_projector) if s.train_projector else model.mm_projector
        for part, wanted in ((self.extractor, s.train_mask_extractor), (self.projector, s.train_projector)):
            if wanted:
                part.requires_grad_(True)

    @property
    def llm(self):
        return self.osprey.model.llm

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self._adapter_params)
        for part, wanted in (
            (self.extractor, self.settings.train_mask_extractor),
            (self.projector, self.settings.train_projector),
        ):
            if wanted:
                params += list(part.parameters())
        return params

    def close(self) -> None:
        """Remove the training adapter from the served model (its weights are freed)."""
        if self._checkpointing:
            self.llm.get_base_model().activation_checkpointing_disable()
            self._checkpointing = False
        self.adapters.remove(self.name)

    @contextlib.contextmanager
    def active(self) -> contextlib.AbstractContextManager:
        """Inside, the served model answers with the adapter being trained (eval mode; its image cache
        keyed by that adapter's weights as they are now, so no encoding made before a later step is
        reused)."""
        tag = self.osprey.adapter_tag
        self.osprey.adapter_tag = f"{self.name}-{self._run}-{self.updates}"
        try:
            with self.adapters.borrow(self.name, train=False):
                yield
        finally:
            self.osprey.adapter_tag = tag

    # ---- one sample ----
    @torch.no_grad()
    def _image_features(self, image: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The frozen vision tower's features and projected image tokens (no gradients; it may hand the
        model over at its block boundaries, before the adapter is made active)."""
        model = self.osprey.model
        pixels = preprocess_image(np.asarray(image), image_size=self.osprey.config.vision.image_size)
        return model.encode_pixels(pixels)

    def _loss(self, sample: InstructionSample, features, image_tokens, mask: np.ndarray) -> torch.Tensor:
        """The answer tokens' cross-entropy (the training adapter active: inside :meth:`_step`)."""
        osprey, model = self.osprey, self.osprey.model
        if self.settings.train_projector:
            level = model.config.vision.image_token_level
            image_tokens = self.projector(features[level].flatten(1).transpose(0, 1))
        masks = torch.from_numpy(np.asarray(mask) > 0)[None].to(model.device)
        mask_tokens, spatial_tokens = self.extractor(features, masks)
        prompt_ids = P.tokenize_prompt(osprey.tokenizer, sample.prompt)
        answer = P.answer_ids(osprey.tokenizer, prompt_ids, sample.prompt, sample.answer, finished=True)
        ids = P.expand_image_placeholder(prompt_ids, image_tokens.shape[0]) + answer
        embeds = model.embed(
            torch.tensor(ids, device=model.device), image_tokens=image_tokens, mask_tokens=mask_tokens,
            spatial_tokens=spatial_tokens,
            counts={"image": image_tokens.shape[0], "<mask>": ids.count(model.mask_token_id),
                    "<pos>": ids.count(model.pos_token_id)},
        )  # fmt: skip
        labels = torch.tensor([IGNORE] * (len(ids) - len(answer)) + answer, device=model.device)
        return self.llm(inputs_embeds=embeds[None], labels=labels[None], use_cache=False).loss

    @contextlib.contextmanager
    def _step(self, *, train: bool):
        """The adapter active for one uninterrupted step; the served state back after it."""
        model = self.osprey.model
        private = [
            p for p in (self.extractor, self.projector) if p not in (model.mask_extractor, model.mm_projector)
        ]
        with atomic(), self.adapters.borrow(self.name, train=train):
            for part in private:
                part.train(train)
            yield

    @torch.no_grad()
    def evaluate(
        self,
        samples: Sequence[InstructionSample],
        examples: Sequence[RegionExample],
        *,
        step_session: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> float:
        """Mean answer-token cross-entropy over ``samples`` (lower is better) with the adapter being
        trained. ``step_session`` is entered around each sample (a scheduler sharing the GPU with serving)."""
        losses = []
        for sample in samples:
            example = examples[sample.example]
            with step_session():
                features, image_tokens = self._image_features(example.image)
                with self._step(train=False):
                    losses.append(float(self._loss(sample, features, image_tokens, example.mask)))
        return float(np.mean(losses)) if losses else float("nan")

    def fit(
        self,
        samples: Sequence[InstructionSample],
        examples: Sequence[RegionExample],
        *,
        progress: bool = True,
        step_session: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> dict:
        """Train on ``samples``; returns the mean loss of each epoch. ``step_session`` is entered around
        each optimisation step (a scheduler sharing the GPU with serving, at background priority)."""
        from accelerate import Accelerator

        if not samples:
            raise ValueError("no training samples: accept some labelled regions first")
        s = self.settings
        accelerator = Accelerator(
            gradient_accumulation_steps=s.grad_accum, cpu=self.osprey.device.type == "cpu"
        )
        optimizer = accelerator.prepare(torch.optim.AdamW(self.trainable_parameters(), lr=s.learning_rate))
        rng = random.Random(s.seed)
        order = list(range(len(samples)))
        epoch_losses = []
        bar = tqdm(total=s.epochs * len(order), desc="LoRA", unit="sample", disable=not progress)
        for _ in range(s.epochs):
            rng.shuffle(order)
            total = 0.0
            for index in order:
                sample = samples[index]
                example = examples[sample.example]
                with step_session():
                    features, image_tokens = self._image_features(example.image)
                    with self._step(train=True), accelerator.accumulate(self.llm):
                        loss = self._loss(sample, features, image_tokens, example.mask)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(self.trainable_parameters(), s.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad()
                        self.updates += 1
                total += float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            epoch_losses.append(total / len(order))
            logger.info("LoRA epoch %d: mean loss %.4f", len(epoch_losses), epoch_losses[-1])
        bar.close()
        return {"epoch_losses": epoch_losses, "samples": len(samples)}

    def save(self, directory: str | Path) -> None:
        """``adapter.safetensors`` (LoRA weights, plus extractor/projector when trained) and
        ``lora.json`` (settings)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(self.llm, adapter_name=self.name)
        tensors = {f"llm.{k}": v for k, v in weights.items()}
        if self.settings.train_mask_extractor:
            tensors.update({f"mask_extractor.{k}": v for k, v in self.extractor.state_dict().items()})
        if self.settings.train_projector:
            tensors.update({f"mm_projector.{k}": v for k, v in self.projector.state_dict().items()})
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(directory / "adapter.safetensors"),
        )
        (directory / "lora.json").write_text(json.dumps(asdict(self.settings), indent=2))

    def load(self, directory: str | Path) -> None:
        """Start from a saved adapter (and its trained extractor/projector)."""
        from peft import set_peft_model_state_dict

        directory = Path(directory)
        _, tensors = read_adapter(directory)
        device = self.osprey.device
        llm = {k[len("llm.") :]: v.to(device) for k, v in tensors.items() if k.startswith("llm.")}
        result = set_peft_model_state_dict(self.llm, llm, adapter_name=self.name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{directory} has adapter tensors this model does not know: {unexpected[:5]}")
        for name, part in (("mask_extractor", self.extractor), ("mm_projector", self.projector)):
            sub = {k[len(name) + 1 :]: v.to(device) for k, v in tensors.items() if k.startswith(name + ".")}
            if sub:
                if part is getattr(self.osprey.model, name):
                    raise ValueError(
                        f"{directory} trained the {name}; train it too (LoraSettings) to load it"
                    )
                part.load_state_dict(sub, strict=True)


def load_adapter(osprey: Osprey, directory: str | Path, *, name: str = TRAINING_ADAPTER) -> LoraTrainer:
    """A trainer on ``osprey`` starting from the saved adapter in ``directory`` (its settings too)."""
    settings, _ = read_adapter(Path(directory))
    trainer = LoraTrainer(osprey=osprey, settings=settings, name=name)
    trainer.load(directory)
    return trainer
