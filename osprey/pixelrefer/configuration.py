"""Architecture and processing configuration of PixelRefer-Lite, as validated dataclasses loaded from JSON.

Three parts mirror the model: the SigLIP-NaViT vision tower (VideoLLaMA3's, transformers'
``VideoLlama3VisionModel``), the object tokenizer (region encoder) and the Qwen2 language model.
Presets live in ``osprey/pixelrefer/model_configs/<name>.json``; a released checkpoint's
``config.json`` (``model_type: pixelreferlite_qwen2``) is translated by
:meth:`PixelReferConfig.from_checkpoint_config`.

The processing numbers are those the released weights were trained with (``PixelRefer/pixelreferlite``
at 2a18ec7 and its stage-1 recipe): 14-pixel patches, a crop padded by 2 patches around the region's
box, 32 tokens per region, the whole image at 336x336 and the region's crop at 224x224 for the
infusion, a vision budget of ``mm_max_length`` tokens at ``spatial_merge_size`` 2 (the pixel cap), the
SigLIP mean/std of 0.5, and the checkpoint's repetition penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from osprey.loading.configs import JsonConfig, PresetFolder, check_keys, language_model_fields, require

CONFIG_DIR = Path(__file__).parent / "model_configs"
MODEL_TYPE = "pixelreferlite_qwen2"


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP-NaViT (VideoLLaMA3's tower, ``DAMO-NLP-SG/VL3-SigLIP-NaViT``): a ViT over 14-pixel patches
    of any image size, 2D rotary positions, no class token."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        require(
            self.hidden_size % self.num_attention_heads == 0,
            f"vision.hidden_size {self.hidden_size} must be divisible by num_attention_heads "
            f"{self.num_attention_heads}",
        )
        require(
            (self.hidden_size // self.num_attention_heads) % 4 == 0,
            "vision head size must be a multiple of 4",
        )


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 causal LM (Qwen2.5-1.5B-Instruct for Lite-2B, Qwen2.5-7B-Instruct for Lite-7B)."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        require(
            self.hidden_size % self.num_attention_heads == 0
            and self.num_attention_heads % self.num_key_value_heads == 0,
            f"text: hidden_size {self.hidden_size}, num_attention_heads {self.num_attention_heads} and "
            f"num_key_value_heads {self.num_key_value_heads} must divide evenly",
        )


@dataclass(frozen=True)
class PixelReferConfig(JsonConfig):
    """The whole model. ``mask_num`` tokens per region; ``region_heads`` heads in the object-centric
    infusion's cross-attention; the sizes and caps below are processing constants of the release."""

    name: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mask_num: int = 32
    region_heads: int = 8
    crop_padding_patches: int = 2  # the crop around a region's box: 2 patches on every side
    global_size: int = 336  # the whole image, for the global infusion
    local_size: int = 224  # the region's crop, for the local infusion
    min_pixels: int = 56 * 56
    mm_max_length: int = 8192  # vision tokens at spatial_merge_size (the release's stage-1 recipe)
    spatial_merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    repetition_penalty: float = 1.1  # the checkpoint's generation_config.json
    repo: str | None = None
    untrained: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        require(self.mask_num >= 1, f"mask_num must be >= 1, got {self.mask_num}")
        require(
            self.vision.hidden_size % self.region_heads == 0,
            f"vision.hidden_size {self.vision.hidden_size} must be divisible by region_heads {self.region_heads}",
        )
        for name in ("global_size", "local_size"):
            require(
                getattr(self, name) % self.vision.patch_size == 0,
                f"{name} must be a multiple of the patch size {self.vision.patch_size}",
            )
        require(self.repetition_penalty > 0, "repetition_penalty must be > 0")

    @property
    def max_pixels(self) -> int:
        """The image processor's pixel cap at ``image_downsampling`` 1, before dividing it by the number
        of masks in a call: ``mm_max_length * (merge * patch)^2 / merge^2``."""
        merge, patch = self.spatial_merge_size, self.vision.patch_size
        return int(self.mm_max_length * (merge**2 * patch**2) / merge**2)

    # ---- (de)serialisation -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelReferConfig:
        data = dict(data)
        check_keys(data, {f.name for f in fields(cls)}, what="PixelRefer config")
        data["vision"] = VisionConfig(**data.get("vision", {}))
        data["text"] = TextConfig(**data.get("text", {}))
        return cls(**data)

    @classmethod
    def from_checkpoint_config(
        cls, hf_config: dict[str, Any], *, name: str, generation: dict[str, Any] | None = None
    ) -> PixelReferConfig:
        """Translate a released checkpoint's ``config.json`` (and its ``generation_config.json``).

        The Qwen2 fields are read as they are; the vision tower's, when ``vision_encoder_config`` is
        absent (the release names the tower by its repository, ``mm_vision_encoder``), are SigLIP-NaViT's.
        """
        text = language_model_fields(
            hf_config, TextConfig, model_types=(MODEL_TYPE,), architecture="PixelRefer-Lite"
        )
        vision_keys = {f.name for f in fields(VisionConfig)}
        vision = {k: v for k, v in (hf_config.get("vision_encoder_config") or {}).items() if k in vision_keys}
        options: dict[str, Any] = {}
        for key in ("mask_num", "mm_max_length", "spatial_merge_size"):
            if hf_config.get(key) is not None:
                options[key] = int(hf_config[key])
        penalty = (generation or {}).get("repetition_penalty")
        if penalty is not None:
            options["repetition_penalty"] = float(penalty)
        return cls(name=name, vision=VisionConfig(**vision), text=TextConfig(**text), **options)


PRESETS = PresetFolder(folder=CONFIG_DIR, config_type=PixelReferConfig, architecture="PixelRefer-Lite")


def preset_names() -> list[str]:
    """Names of the presets shipped in ``osprey/pixelrefer/model_configs``."""
    return PRESETS.names()


def load_preset(name: str) -> PixelReferConfig:
    return PRESETS.load(name)
