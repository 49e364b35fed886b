"""Building a :class:`~osprey.pixelrefer.modeling.PixelReferModel` from a preset or a released checkpoint.

A released checkpoint (``Alibaba-DAMO-Academy/PixelRefer-Lite-2B``, ``model_type: pixelreferlite_qwen2``)
holds ``config.json``, ``generation_config.json``, Qwen2's tokenizer and the weights as ``.bin`` files
(read with ``weights_only=True``) or safetensors, one file or shards with an index. Loading is strict: every
tensor maps onto the model through :data:`KEY_MAP` (names derived from the authors' module tree), or is
one the Lite path never runs (:data:`UNUSED_KEYS`: the image-token projector, the unused mask
embedding, old rotary buffers), or loading fails naming it; every parameter must get a tensor (with tied
embeddings ``lm_head`` may be absent). Nothing is downloaded here: ``osprey-label download --model
pixelrefer-lite-2b`` does that. What every model's loading shares (devices, files, strict loading,
preset or checkpoint) is :mod:`osprey.loading`'s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from osprey.loading.files import find_checkpoint, read_config, weight_files
from osprey.loading.loader import ModelLoader, build_and_load
from osprey.loading.strict import map_by_prefix

from .configuration import PixelReferConfig, load_preset, preset_names
from .modeling import PixelReferModel, build_pixelrefer_model
from .tokenization import build_tiny_tokenizer, load_tokenizer, region_token_id

ARCHITECTURE = "PixelRefer-Lite"
# Released prefix -> our prefix; the first match wins.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.vision_encoder.vision_encoder.", "vision_encoder."),
    ("model.region_encoder.", "region_encoder."),
    ("model.embed_tokens.", "llm.model.embed_tokens."),
    ("model.layers.", "llm.model.layers."),
    ("model.norm.", "llm.model.norm."),
    ("lm_head.", "llm.lm_head."),
)
UNUSED_KEYS = re.compile(
    r"^model\.mm_projector\."  # projects image tokens, which the Lite path never gives the LLM
    r"|^model\.region_encoder\.mask_embedding\."  # built by the authors' region encoder, never run
    r"|rotary_emb\.inv_freq$"  # recomputed from rope_theta
)


def map_key(name: str) -> str | None:
    """Our parameter name for a released tensor name; None for one the model never runs; the name
    unchanged when nothing maps it (it is then reported as unexpected)."""
    if UNUSED_KEYS.search(name):
        return None
    return map_by_prefix(name, KEY_MAP)


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local checkpoint directory, or a released one already in the Hugging Face cache."""
    repo = load_preset(name_or_path).repo if name_or_path in preset_names() else None
    if repo is None and "/" in name_or_path:
        repo = name_or_path
    return find_checkpoint(name_or_path, repo=repo, known=preset_names())


def checkpoint_config(directory: Path) -> PixelReferConfig:
    generation_path = directory / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    return PixelReferConfig.from_checkpoint_config(
        read_config(directory, architecture=ARCHITECTURE), name=directory.name, generation=generation
    )


def build_random(config: PixelReferConfig, *, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A model of ``config``'s dimensions with seeded random weights, and a built tokenizer."""
    tokenizer = build_tiny_tokenizer(config.text.vocab_size)
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_pixelrefer_model(config, region_token_id=region_token_id(tokenizer))
    return model.to(dtype=dtype).eval(), tokenizer


def load_checkpoint(name_or_path: str, *, device: torch.device, dtype: torch.dtype):
    """A released PixelRefer-Lite checkpoint: returns ``(model, tokenizer, config)``."""
    directory = resolve_checkpoint(name_or_path)
    config = checkpoint_config(directory)
    files = weight_files(directory)
    tokenizer = load_tokenizer(directory)
    tied = config.text.tie_word_embeddings
    model, _ = build_and_load(
        lambda: build_pixelrefer_model(config, region_token_id=region_token_id(tokenizer)),
        files, device=device, dtype=dtype, source=str(directory), map_name=map_key,
        architecture=ARCHITECTURE, optional_prefix="llm.lm_head." if tied else None,
    )  # fmt: skip
    if tied:
        model.llm.tie_weights()
    model.to(device)
    return model.eval(), tokenizer, config


PIXELREFER = ModelLoader(
    architecture=ARCHITECTURE,
    preset_names=preset_names,
    load_preset=load_preset,
    build_random=build_random,
    load_checkpoint=load_checkpoint,
)


def released_state_dict(model: PixelReferModel) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the released names (the inverse of :data:`KEY_MAP`), without the tied
    ``lm_head`` when the embeddings are tied; for writing checkpoints in the released layout."""
    out = {}
    tied = model.config.text.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if tied and name == "llm.lm_head.weight":
            continue
        released = next(rel + name[len(ours) :] for rel, ours in KEY_MAP if name.startswith(ours))
        out[released] = tensor.detach().cpu().contiguous()
    return out


def save_released_layout(
    model: PixelReferModel, tokenizer, directory: str | Path, *, extra: dict | None = None
) -> Path:
    """Write ``model`` as the authors' code saves a checkpoint: ``config.json`` (``model_type:
    pixelreferlite_qwen2``, the Qwen2 fields, the processing settings), ``generation_config.json``, the
    tokenizer and ``pytorch_model.bin``, plus ``extra`` released tensors (e.g. the unused projector).
    Used to test strict loading on random weights and by the parity harness."""
    from dataclasses import asdict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf = {
        "model_type": "pixelreferlite_qwen2",
        "architectures": ["PixelreferliteQwen2ForCausalLM"],
        **asdict(config.text),
        "hidden_act": "silu",
        "use_sliding_window": False,
        "mm_vision_encoder": "DAMO-NLP-SG/VL3-SigLIP-NaViT",
        "vision_encoder_config": asdict(config.vision),
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": config.vision.hidden_size,
        "mask_num": config.mask_num,
        "mm_max_length": config.mm_max_length,
        "spatial_merge_size": config.spatial_merge_size,
        "use_token_compression": True,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "repetition_penalty": config.repetition_penalty}, indent=2)
    )
    tokenizer.save_pretrained(str(directory))
    torch.save({**released_state_dict(model), **(extra or {})}, directory / "pytorch_model.bin")
    return directory
