"""Architecture configuration for Osprey, as validated dataclasses loaded from JSON.

Three parts mirror the model: the ConvNeXt CLIP vision tower, the mask-aware extractor and the
Llama language model. Presets live in ``osprey/model_configs/<name>.json``; a released Osprey
checkpoint's ``config.json`` is translated by :meth:`OspreyConfig.from_checkpoint_config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osprey.loading.configs import JsonConfig, PresetFolder, check_keys, language_model_fields, require

CONFIG_DIR = Path(__file__).parent / "model_configs"
LEVELS = ("res2", "res3", "res4", "res5")
_PROJECTOR_RE = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass(frozen=True)
class VisionConfig:
    """ConvNeXt CLIP trunk run at ``image_size``; its four stages are res2..res5."""

    open_clip_model: str = "convnext_large_d_320"
    image_size: int = 512
    channels: tuple[int, ...] = (192, 384, 768, 1536)
    strides: tuple[int, ...] = (4, 8, 16, 32)
    image_token_level: str = "res4"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "strides", tuple(self.strides))
        require(len(self.channels) == 4, f"vision.channels needs 4 entries (res2..res5), got {self.channels}")
        require(len(self.strides) == 4, f"vision.strides needs 4 entries (res2..res5), got {self.strides}")
        require(self.image_token_level in LEVELS, f"image_token_level must be one of {LEVELS}")
        for stride in self.strides:
            require(
                self.image_size % stride == 0,
                f"vision.image_size {self.image_size} must be divisible by every stride {self.strides}",
            )

    def level_channels(self, level: str) -> int:
        return self.channels[LEVELS.index(level)]

    def level_size(self, level: str) -> int:
        """Side of the square feature map of ``level`` at ``image_size`` input."""
        return self.image_size // self.strides[LEVELS.index(level)]

    @property
    def num_image_tokens(self) -> int:
        return self.level_size(self.image_token_level) ** 2


@dataclass(frozen=True)
class ExtractorConfig:
    """Mask-aware visual extractor: per-level linears to ``embed_dim``, spatial MLP on a
    ``mask_shape`` x ``mask_shape`` resized mask."""

    embed_dim: int = 1024
    mask_shape: int = 112

    def __post_init__(self) -> None:
        require(self.embed_dim > 0 and self.mask_shape > 0, "extractor dims must be positive")


@dataclass(frozen=True)
class LLMConfig:
    """Llama decoder dimensions (Vicuna-7B v1.5 by default)."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02  # std of random init (random-weight presets only)

    def __post_init__(self) -> None:
        require(
            self.hidden_size % self.num_attention_heads == 0,
            f"llm.hidden_size {self.hidden_size} must be divisible by num_attention_heads "
            f"{self.num_attention_heads}",
        )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "llm.num_attention_heads must be a multiple of num_key_value_heads",
        )
        require(self.num_hidden_layers > 0 and self.vocab_size > 0, "llm sizes must be positive")


@dataclass(frozen=True)
class OspreyConfig(JsonConfig):
    """Whole-model architecture. ``untrained`` marks presets whose weights are random."""

    name: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int = 768
    conversation: str = "osprey_v1"
    untrained: bool = False

    def __post_init__(self) -> None:
        require(
            self.projector_type == "linear" or _PROJECTOR_RE.match(self.projector_type) is not None,
            f"projector_type must be 'linear' or 'mlp<N>x_gelu', got {self.projector_type!r}",
        )
        token_channels = self.vision.level_channels(self.vision.image_token_level)
        require(
            self.mm_hidden_size == token_channels,
            f"mm_hidden_size {self.mm_hidden_size} must equal the channels of the image-token level "
            f"{self.vision.image_token_level} ({token_channels})",
        )
        require(
            self.conversation == "osprey_v1",
            f"only the osprey_v1 conversation is supported, got {self.conversation!r}",
        )

    @property
    def projector_depth(self) -> int:
        match = _PROJECTOR_RE.match(self.projector_type)
        return int(match.group(1)) if match else 1

    # ---- (de)serialisation -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OspreyConfig:
        data = dict(data)
        known = {
            "name",
            "vision",
            "extractor",
            "llm",
            "projector_type",
            "mm_hidden_size",
            "conversation",
            "untrained",
        }
        check_keys(data, known, what="Osprey config")
        return cls(
            name=data["name"],
            vision=VisionConfig(**data.get("vision", {})),
            extractor=ExtractorConfig(**data.get("extractor", {})),
            llm=LLMConfig(**data.get("llm", {})),
            **{
                k: data[k]
                for k in ("projector_type", "mm_hidden_size", "conversation", "untrained")
                if k in data
            },
        )

    @classmethod
    def from_checkpoint_config(cls, hf_config: dict[str, Any], *, name: str) -> OspreyConfig:
        """Translate a released checkpoint's ``config.json`` (``model_type: osprey``).

        ``mm_hidden_size`` is usually absent there; the projector input then defaults to 768
        (the res4 width of ConvNeXt-Large), as the authors' code does.
        """
        llm = language_model_fields(
            hf_config, LLMConfig, model_types=("osprey", "llama"), architecture="Osprey"
        )
        llm.setdefault("num_key_value_heads", llm.get("num_attention_heads", LLMConfig.num_attention_heads))
        return cls(
            name=name,
            llm=LLMConfig(**llm),
            projector_type=hf_config.get("mm_projector_type", "mlp2x_gelu"),
            mm_hidden_size=int(hf_config.get("mm_hidden_size") or 768),
        )


PRESETS = PresetFolder(
    folder=CONFIG_DIR, config_type=OspreyConfig, architecture="Osprey", skip_prefix="open_clip_"
)


def preset_names() -> list[str]:
    """Names of the architecture presets shipped in ``osprey/model/model_configs``."""
    return PRESETS.names()


def load_preset(name: str) -> OspreyConfig:
    return PRESETS.load(name)
