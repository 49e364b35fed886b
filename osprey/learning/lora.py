"""LoRA fine-tuning of the served region model's language model on accepted region labels.

One trainer for every region model (Osprey, PixelRefer-Lite): the model supplies its training sequences
(``region_model.lora_sequences()``, :class:`~osprey.inference.region_model.TrainingSequences`) and this
module does the rest. Accepted regions become instruction samples in the serving model's own prompts
(the ones the fast path asks, which its weights were trained on): the label-set question answered with
the category (``category:part`` when parts are asked), one yes/no question per attribute, and the
caption and description questions answered with the annotator's text. The model turns a sample into
input embeddings (its image and region tokens in place) and labels; the loss is the cross-entropy of
the answer tokens and the model's end-of-answer token (``</s>``, ``<|im_end|>``) only. The adapter wraps
the architecture's own layers (:data:`~osprey.learning.adapters.LORA_TARGETS`).

The adapter is trained on the served model itself: peft adds it beside the served adapters, without a
copy of the base weights (:mod:`osprey.learning.adapters`), and each training step makes it active, runs
the forward, the backward and the optimiser step as one :func:`~osprey.runtime.steps.atomic` block, and
hands the model back with the adapter that served before active again, in eval mode. So serving between
two training steps answers exactly as it did before the job began. The frozen vision tower (and, for
PixelRefer-Lite, the frozen object tokenizer) runs without gradients, before the block (a click may take
the model there). An Osprey mask extractor or projector trained beside the adapter is a private copy:
the served ones never change. ``accelerate`` drives the loop, so ``accelerate launch``
runs the same code on several GPUs; on a CPU it runs as is.
"""

from __future__ import annotations

import contextlib
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

from osprey.inference.region_model import RegionModel
from osprey.model import prompts as P
from osprey.runtime.steps import atomic

from .adapters import AdapterSet, LoraSettings, read_adapter

__all__ = [
    "AdapterSet", "InstructionSample", "LoraSettings", "LoraTrainer", "RegionExample", "instruction_samples",
    "load_adapter",
]  # fmt: skip

logger = logging.getLogger(__name__)
TRAINING_ADAPTER = "lora-training"
# LoraSettings' switches for the parts trained beside the adapter (Osprey's), by part name
TRAINED_PARTS = {"mask_extractor": "train_mask_extractor", "mm_projector": "train_projector"}


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
    prompt: str  # full conversation text, ending where the assistant's answer begins
    answer: str


def instruction_samples(
    examples: Sequence[RegionExample],
    *,
    categories: Sequence[str] = (),
    parts: Sequence[str] = (),
    attributes: Sequence[str] = (),
    prompts=P,
) -> list[InstructionSample]:
    """The questions in ``prompts`` (the region model's prompt set, ``lora_sequences().prompts``;
    Osprey's by default) and the annotator's answers, for every accepted region."""
    samples = []
    category_prompt = prompts.conversation(prompts.category_turn(categories, parts)) if categories else None
    for i, ex in enumerate(examples):
        if category_prompt and ex.category:
            answer = f"{ex.category}:{ex.part}" if parts and ex.part else ex.category
            samples.append(InstructionSample(i, category_prompt, answer))
        for attribute in attributes:
            answer = prompts.YES if attribute in ex.attributes else prompts.NO
            samples.append(
                InstructionSample(i, prompts.conversation(prompts.attribute_turn(attribute)), answer)
            )
        if ex.caption:
            samples.append(InstructionSample(i, prompts.conversation(prompts.caption_turn()), ex.caption))
        if ex.description:
            samples.append(
                InstructionSample(i, prompts.conversation(prompts.description_turn()), ex.description)
            )
    return samples


class LoraTrainer:
    """Trains a LoRA adapter named ``name`` on the served language model of ``osprey`` (any region model:
    Osprey or PixelRefer-Lite; see the module docstring); :meth:`close` removes it. Only its weights (and
    any private copy of a part trained beside it) get gradients."""

    def __init__(
        self, *, osprey: RegionModel, settings: LoraSettings | None = None, name: str = TRAINING_ADAPTER
    ) -> None:
        self.osprey = osprey
        s = self.settings = (settings or LoraSettings()).for_llm(osprey.model.llm.config)
        self.name = name
        self._run = uuid.uuid4().hex[:12]  # this trainer's adapter, among others of the same name
        self.updates = 0  # training steps taken (the image cache key of :meth:`active` follows it)
        model = osprey.model
        for param in model.parameters():
            param.requires_grad_(False)
        # the model's own training sequences; parts trained beside the adapter are private copies
        self.sequences = osprey.lora_sequences(
            train=[p for p, flag in TRAINED_PARTS.items() if getattr(s, flag)]
        )
        self.adapters = AdapterSet.of(osprey)
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

    @property
    def llm(self):
        return self.osprey.model.llm

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self._adapter_params)
        for part in self.sequences.trained.values():
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
    def _prepare(self, example: RegionExample):
        """The frozen work of one sample (the vision tower, without gradients; it may hand the model over
        at its block boundaries, before the adapter is made active)."""
        return self.sequences.prepare(example.image, example.mask)

    def _loss(self, sample: InstructionSample, prepared) -> torch.Tensor:
        """The answer tokens' cross-entropy (the training adapter active: inside :meth:`_step`)."""
        embeds, labels = self.sequences.sequence(prepared, sample.prompt, sample.answer)
        return self.llm(inputs_embeds=embeds[None], labels=labels[None], use_cache=False).loss

    @contextlib.contextmanager
    def _step(self, *, train: bool):
        """The adapter active for one uninterrupted step; the served state back after it."""
        with atomic(), self.adapters.borrow(self.name, train=train):
            for part in self.sequences.trained.values():
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
                prepared = self._prepare(example)
                with self._step(train=False):
                    losses.append(float(self._loss(sample, prepared)))
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
                    prepared = self._prepare(example)
                    with self._step(train=True), accelerator.accumulate(self.llm):
                        loss = self._loss(sample, prepared)
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
        ``lora.json`` (settings, the adapted layers named)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(self.llm, adapter_name=self.name)
        tensors = {f"llm.{k}": v for k, v in weights.items()}
        for part_name, part in self.sequences.trained.items():
            tensors.update({f"{part_name}.{k}": v for k, v in part.state_dict().items()})
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
        parts = sorted({k.split(".", 1)[0] for k in tensors if not k.startswith("llm.")})
        for part_name in parts:
            part = self.sequences.trained.get(part_name)
            if part is None and part_name in TRAINED_PARTS:
                raise ValueError(
                    f"{directory} trained the {part_name}; train it too "
                    f"(LoraSettings.{TRAINED_PARTS[part_name]}) to load it"
                )
            if part is None:
                raise ValueError(f"{directory} has tensors of a part this model does not have: {part_name}")
            prefix = part_name + "."
            sub = {k[len(prefix) :]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
            part.load_state_dict(sub, strict=True)


def load_adapter(osprey: RegionModel, directory: str | Path, *, name: str = TRAINING_ADAPTER) -> LoraTrainer:
    """A trainer on ``osprey`` starting from the saved adapter in ``directory`` (its settings too)."""
    settings, _ = read_adapter(Path(directory))
    trainer = LoraTrainer(osprey=osprey, settings=settings, name=name)
    trainer.load(directory)
    return trainer
