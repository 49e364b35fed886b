"""LoRA fine-tuning of Osprey's language model on accepted region labels.

Accepted regions become instruction samples in Osprey's own conversation format (the same prompts
the fast path asks): the label-set question answered with the category (``category:part`` when
parts are asked), one yes/no question per attribute, and the caption and description questions
answered with the annotator's text. The loss is the cross-entropy of the answer tokens and
``</s>`` only. LoRA adapters (peft) go on the attention projections; the mask extractor and the
projector can be trained too. ``accelerate`` drives the loop, so ``accelerate launch`` runs the same
code on several GPUs; on a CPU it runs as is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from osprey.inference.api import Osprey
from osprey.model import prompts as P

logger = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    epochs: int = 3
    grad_accum: int = 4
    max_grad_norm: float = 1.0
    train_mask_extractor: bool = False
    train_projector: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.epochs < 1 or self.grad_accum < 1 or self.learning_rate <= 0:
            raise ValueError("rank, epochs and grad_accum must be >= 1 and learning_rate > 0")


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
    """Adds LoRA adapters to ``osprey``'s LLM and trains them (the model is changed in place: train
    a copy loaded for the purpose, not the one serving requests)."""

    def __init__(self, *, osprey: Osprey, settings: LoraSettings | None = None) -> None:
        from peft import LoraConfig, get_peft_model

        self.osprey = osprey
        self.settings = settings or LoraSettings()
        s = self.settings
        model = osprey.model
        for param in model.parameters():
            param.requires_grad_(False)
        config = LoraConfig(
            r=s.rank,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            target_modules=list(s.target_modules),
            bias="none",
        )
        model.llm = get_peft_model(model.llm, config)  # the runners share this OspreyModel
        for part, wanted in (
            (model.mask_extractor, s.train_mask_extractor),
            (model.mm_projector, s.train_projector),
        ):
            for param in part.parameters():
                param.requires_grad_(wanted)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.osprey.model.parameters() if p.requires_grad]

    def _loss(self, sample: InstructionSample, examples: Sequence[RegionExample]) -> torch.Tensor:
        osprey, model = self.osprey, self.osprey.model
        example = examples[sample.example]
        encoded = osprey.encode_image(example.image)
        # Cached encodings were made under inference mode; clones can take part in autograd.
        features = {level: f.clone() for level, f in encoded.features.items()}
        if self.settings.train_projector:
            level = model.config.vision.image_token_level
            image_tokens = model.mm_projector(features[level].flatten(1).transpose(0, 1))
        else:
            image_tokens = encoded.image_tokens.clone()
        mask = torch.from_numpy(np.asarray(example.mask, dtype=np.float32))[None]
        mask_tokens, spatial_tokens = model.region_tokens(features, mask)
        prompt_ids = P.tokenize_prompt(osprey.tokenizer, sample.prompt)
        answer = P.answer_ids(osprey.tokenizer, prompt_ids, sample.prompt, sample.answer, finished=True)
        ids = P.expand_image_placeholder(prompt_ids, image_tokens.shape[0]) + answer
        embeds = model.embed(
            torch.tensor(ids, device=model.device),
            image_tokens=image_tokens,
            mask_tokens=mask_tokens,
            spatial_tokens=spatial_tokens,
        )
        labels = torch.tensor([IGNORE] * (len(ids) - len(answer)) + answer, device=model.device)
        return model.llm(inputs_embeds=embeds[None], labels=labels[None]).loss

    @torch.no_grad()
    def evaluate(
        self,
        samples: Sequence[InstructionSample],
        examples: Sequence[RegionExample],
        *,
        step_session: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> float:
        """Mean answer-token cross-entropy over ``samples`` (lower is better). ``step_session`` is
        entered around each sample's forward (a scheduler sharing the GPU with serving)."""
        self.osprey.model.eval()
        losses = []
        for sample in samples:
            with step_session():
                losses.append(float(self._loss(sample, examples)))
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
        each optimisation step (a scheduler sharing the GPU with serving)."""
        from accelerate import Accelerator

        if not samples:
            raise ValueError("no training samples: accept some labelled regions first")
        s = self.settings
        accelerator = Accelerator(
            gradient_accumulation_steps=s.grad_accum, cpu=self.osprey.device.type == "cpu"
        )
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=s.learning_rate)
        optimizer = accelerator.prepare(optimizer)
        rng = random.Random(s.seed)
        order = list(range(len(samples)))
        epoch_losses = []
        self.osprey.model.train()
        self.osprey.model.vision_tower.eval()  # frozen; its features come from the cache
        bar = tqdm(total=s.epochs * len(order), desc="LoRA", unit="sample", disable=not progress)
        for _ in range(s.epochs):
            rng.shuffle(order)
            total = 0.0
            for index in order:
                with step_session(), accelerator.accumulate(self.osprey.model):
                    loss = self._loss(samples[index], examples)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(self.trainable_parameters(), s.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                total += float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            epoch_losses.append(total / len(order))
            logger.info("LoRA epoch %d: mean loss %.4f", len(epoch_losses), epoch_losses[-1])
        bar.close()
        self.osprey.model.eval()
        return {"epoch_losses": epoch_losses, "samples": len(samples)}

    def save(self, directory: str | Path) -> None:
        """``adapter.safetensors`` (LoRA weights, plus extractor/projector when trained) and
        ``lora.json`` (settings)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = self.osprey.model
        tensors = {f"llm.{k}": v for k, v in get_peft_model_state_dict(model.llm).items()}
        if self.settings.train_mask_extractor:
            tensors.update({f"mask_extractor.{k}": v for k, v in model.mask_extractor.state_dict().items()})
        if self.settings.train_projector:
            tensors.update({f"mm_projector.{k}": v for k, v in model.mm_projector.state_dict().items()})
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(directory / "adapter.safetensors"),
        )
        (directory / "lora.json").write_text(json.dumps(asdict(self.settings), indent=2))


def load_adapter(osprey: Osprey, directory: str | Path) -> LoraTrainer:
    """Add the saved adapter (and any trained extractor/projector) to ``osprey`` for training on."""
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    settings, tensors = _read_adapter(directory)
    trainer = LoraTrainer(osprey=osprey, settings=settings)
    model = osprey.model
    llm = {k[len("llm.") :]: v.to(osprey.device) for k, v in tensors.items() if k.startswith("llm.")}
    result = set_peft_model_state_dict(model.llm, llm)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{directory} has adapter tensors this model does not know: {unexpected[:5]}")
    for name, part in (("mask_extractor", model.mask_extractor), ("mm_projector", model.mm_projector)):
        sub = {
            k[len(name) + 1 :]: v.to(osprey.device) for k, v in tensors.items() if k.startswith(name + ".")
        }
        if sub:
            part.load_state_dict(sub, strict=True)
    model.eval()
    return trainer


def _read_adapter(directory: Path) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    settings_dict = json.loads((directory / "lora.json").read_text())
    settings_dict["target_modules"] = tuple(settings_dict["target_modules"])
    return LoraSettings(**settings_dict), load_file(str(directory / "adapter.safetensors"))


class AdapterSet:
    """Several projects' LoRA adapters on one served model, one active at a time.

    ``activate(name, directory)`` loads the adapter the first time it is named and makes it the one
    used; ``activate(None, None)`` serves the base model. The caller serialises model work (the
    backend's scheduler activates a project's adapter whenever its work takes the model). Encoded images depend on the
    active adapter (the prompt prefix's keys/values do), so ``osprey.adapter_tag`` becomes part of the
    image cache key.
    """

    def __init__(self, *, osprey: Osprey) -> None:
        self.osprey = osprey
        self.loaded: set[str] = set()
        self.active: str | None = None

    def activate(self, name: str | None, directory: Path | None) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

        model = self.osprey.model
        if name is None:
            if isinstance(model.llm, PeftModel) and self.active is not None:
                model.llm.base_model.disable_adapter_layers()
            self.active = None
            self.osprey.adapter_tag = ""
            return
        if name not in self.loaded:
            settings, tensors = _read_adapter(Path(directory))
            if any(not k.startswith("llm.") for k in tensors):
                raise ValueError(
                    f"{directory}: serving adapters that also change the extractor or projector is not supported"
                )
            config = LoraConfig(
                r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                target_modules=list(settings.target_modules), bias="none", inference_mode=True,
            )  # fmt: skip
            if isinstance(model.llm, PeftModel):
                model.llm.add_adapter(name, config)
            else:
                model.llm = get_peft_model(model.llm, config, adapter_name=name)
            weights = {k[len("llm.") :]: v.to(self.osprey.device) for k, v in tensors.items()}
            set_peft_model_state_dict(model.llm, weights, adapter_name=name)
            model.llm.eval()
            self.loaded.add(name)
        model.llm.base_model.enable_adapter_layers()
        model.llm.set_adapter(name)
        self.active = name
        self.osprey.adapter_tag = name
