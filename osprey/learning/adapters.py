"""LoRA adapters on the one served model: named, switchable, loaded from disk or trained in place.

peft adds an adapter to a model's linear layers without copying them (the base weights stay where they
are; a LoRA layer wraps each one), keeps several adapters side by side under their names, and runs the
one made active. :class:`AdapterSet` is the one place that switches them, one per served model
(:meth:`AdapterSet.of`): serving activates a project's promoted adapter (loaded from its folder the first
time) or none; a training job adds its own adapter, makes it active for each step and hands back the
state it found (:meth:`AdapterSet.borrow`); nothing else touches peft's active adapter. Encoded images
depend on the active adapter (the prompt prefix's keys/values do), so serving sets ``adapter_tag``,
part of the image cache key.

Which layers an adapter wraps depends on the language model's architecture: :data:`LORA_TARGETS`, the
one list per architecture (:meth:`LoraSettings.for_llm` picks it unless the settings name their own).

Adapter folders: ``adapter.safetensors`` (``llm.*`` LoRA weights, plus ``mask_extractor.*`` /
``mm_projector.*`` when those were trained) and ``lora.json`` (the :class:`LoraSettings`, the targeted
layers named).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

__all__ = ["LORA_TARGETS", "AdapterSet", "LoraSettings", "read_adapter"]

_OF_LOCK = threading.Lock()

# The language model's layers a LoRA adapter wraps, by its transformers ``model_type``: Osprey's Llama
# (Vicuna) its attention projections; PixelRefer-Lite's Qwen2 every linear layer of its decoder, as the
# authors' LoRA fine-tuning targets (every ``nn.Linear`` of the LLM but the LM head).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: the architecture's own (LORA_TARGETS)
    learning_rate: float = 2e-4
    epochs: int = 3
    grad_accum: int = 4
    max_grad_norm: float = 1.0
    train_mask_extractor: bool = False
    train_projector: bool = False
    seed: int = 0
    gradient_checkpointing: bool = True  # keep each layer's input only; recompute the rest in backward

    def __post_init__(self) -> None:
        if self.rank < 1 or self.epochs < 1 or self.grad_accum < 1 or self.learning_rate <= 0:
            raise ValueError("rank, epochs and grad_accum must be >= 1 and learning_rate > 0")

    def for_llm(self, llm_config) -> LoraSettings:
        """These settings with the targeted layers named: the architecture's own (:data:`LORA_TARGETS`,
        by ``llm_config.model_type``) unless they name theirs."""
        if self.target_modules is not None:
            return self
        model_type = getattr(llm_config, "model_type", None)
        if model_type not in LORA_TARGETS:
            raise ValueError(
                f"no LoRA target layers known for a {model_type!r} language model (known: "
                f"{sorted(LORA_TARGETS)}); name them in LoraSettings(target_modules=...)"
            )
        return replace(self, target_modules=LORA_TARGETS[model_type])

    def lora_config(self, *, inference: bool):
        from peft import LoraConfig

        if self.target_modules is None:
            raise RuntimeError("LoraSettings.target_modules is not resolved: call for_llm(llm_config) first")
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0 if inference else self.dropout,
            target_modules=list(self.target_modules), bias="none", inference_mode=inference,
        )  # fmt: skip


def read_adapter(directory: Path) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    """The settings and tensors of an adapter folder."""
    from safetensors.torch import load_file

    settings = json.loads((directory / "lora.json").read_text())
    if settings.get("target_modules") is not None:
        settings["target_modules"] = tuple(settings["target_modules"])
    return LoraSettings(**settings), load_file(str(directory / "adapter.safetensors"))


class AdapterSet:
    """The adapters on one served model, one active at a time (see the module docstring). The caller
    serialises model work (the backend's scheduler: serving activates a project's adapter whenever its
    work takes the model)."""

    def __init__(self, *, osprey) -> None:
        self.osprey = osprey
        self.loaded: dict[str, Path] = {}  # served adapters -> the folder each was read from
        self.active: str | None = None

    @classmethod
    def of(cls, osprey) -> AdapterSet:
        """The one adapter set of ``osprey`` (made the first time it is asked for)."""
        with _OF_LOCK:
            adapters = osprey.__dict__.get("_adapter_set")
            if adapters is None:
                adapters = osprey.__dict__["_adapter_set"] = cls(osprey=osprey)
        return adapters

    @property
    def llm(self):
        return self.osprey.model.llm

    def _peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.llm, PeftModel)

    def add(self, name: str, config) -> None:
        """Add an (empty) adapter ``name``; the base weights are not copied."""
        from peft import get_peft_model

        if self._peft():
            self.llm.add_adapter(name, config)
        else:
            self.osprey.model.llm = get_peft_model(self.llm, config, adapter_name=name)

    def use(self, name: str | None) -> None:
        """Make ``name`` (None: no adapter, the base model) the active one."""
        if not self._peft():
            if name is not None:
                raise RuntimeError(f"adapter {name!r} was never added to this model")
            return
        if name is None:
            self.llm.base_model.disable_adapter_layers()
        else:
            self.llm.base_model.enable_adapter_layers()
            self.llm.set_adapter(name)
        self.active = name

    def remove(self, name: str) -> None:
        """Delete adapter ``name`` (its weights are freed). The adapter active before stays active (the
        base model when it was ``name``). The last adapter gone, the model is the plain transformers model
        again (peft's layers unloaded, the base weights untouched)."""
        previous = self.active
        if self._peft() and name in self.llm.peft_config:
            self.llm.delete_adapter(name)
            left = list(self.llm.peft_config)
            if left:
                self.llm.set_adapter(left[0])  # peft needs an existing active adapter
                self.llm.base_model.disable_adapter_layers()
            else:
                base = self.llm.unload()
                base.disable_input_require_grads()  # peft's hook for training: no trace left on serving
                self.osprey.model.llm = base
        self.loaded.pop(name, None)
        self.active = None
        if previous is not None and previous != name:
            self.use(previous)
        elif previous == name:
            self.osprey.adapter_tag = ""

    def activate(self, name: str | None, directory: Path | None) -> None:
        """Serve with adapter ``name`` (read from ``directory`` the first time it is named) or, for None,
        the base model; eval mode, and ``adapter_tag`` set for the image cache."""
        from peft import set_peft_model_state_dict

        if name is not None and name in self.loaded and self.loaded[name] != Path(directory).resolve():
            self.remove(name)  # the same name for another folder (another registry): read it again
        if name is not None and name not in self.loaded:
            settings, tensors = read_adapter(Path(directory))
            if any(not k.startswith("llm.") for k in tensors):
                raise ValueError(
                    f"{directory}: serving adapters that also change the extractor or projector is not supported"
                )
            self.add(name, settings.for_llm(self.llm.config).lora_config(inference=True))
            device = self.osprey.device
            weights = {k[len("llm.") :]: v.to(device) for k, v in tensors.items()}
            set_peft_model_state_dict(self.llm, weights, adapter_name=name)
            self.loaded[name] = Path(directory).resolve()
        self.use(name)
        self.llm.eval()
        self.osprey.adapter_tag = name or ""

    @contextlib.contextmanager
    def borrow(self, name: str, *, train: bool) -> Iterator[None]:
        """Inside, adapter ``name`` is the active one (the model in train mode when ``train``); after,
        the adapter that was active before is again, in eval mode, so serving answers as before."""
        previous = self.active
        self.use(name)
        self.llm.train(train)
        try:
            yield
        finally:
            self.llm.eval()
            self.use(previous)
