"""Building an :class:`~osprey.model.modeling.OspreyModel` from a preset or a released checkpoint.

What every model's loading shares (devices, files, strict loading, preset or checkpoint) is
:mod:`osprey.loading`'s; here is what is Osprey's: its key map, a vision tower that may come from the
open_clip file instead of the checkpoint, and the layer scales the authors' code reads from that file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from osprey.loading import strict
from osprey.loading.files import iter_tensors, read_config, weight_files
from osprey.loading.loader import ModelLoader, build_and_load
from osprey.loading.strict import name_list

from .checkpoint import (
    CLIP_FILE,
    VISION_PREFIX,
    MissingWeightsError,
    map_key,
    resolve_checkpoint,
    resolve_clip_file,
)
from .config import OspreyConfig, load_preset, preset_names
from .llm import MASK_TOKEN, POS_TOKEN, build_tiny_tokenizer, load_tokenizer
from .modeling import OspreyModel, build_osprey_model

logger = logging.getLogger(__name__)
ARCHITECTURE = "Osprey"


def _token_ids(tokenizer) -> tuple[int, int]:
    mask_id, pos_id = tokenizer.convert_tokens_to_ids([MASK_TOKEN, POS_TOKEN])
    return int(mask_id), int(pos_id)


def build_random(config: OspreyConfig, *, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A model of ``config``'s dimensions with seeded random weights, and a built tokenizer."""
    tokenizer = build_tiny_tokenizer(config.llm.vocab_size)
    mask_id, pos_id = _token_ids(tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_osprey_model(config, mask_token_id=mask_id, pos_token_id=pos_id, device=device)
    return model.to(dtype=dtype).eval(), tokenizer


def load_strict(model: OspreyModel, tensors: Iterable[tuple[str, torch.Tensor]], **options) -> set[str]:
    """:func:`osprey.loading.strict.load_strict` with Osprey's key map (:func:`map_key`) and name in errors."""
    options.setdefault("map_name", map_key)
    options.setdefault("architecture", ARCHITECTURE)
    return strict.load_strict(model, tensors, **options)


def load_checkpoint(name_or_path: str, *, device: torch.device, dtype: torch.dtype):
    """A released Osprey checkpoint: returns ``(model, tokenizer, config)``."""
    directory = resolve_checkpoint(name_or_path)
    hf_config = read_config(directory, architecture=ARCHITECTURE)
    config = OspreyConfig.from_checkpoint_config(hf_config, name=directory.name)
    files = weight_files(directory)
    tokenizer = load_tokenizer(directory)
    mask_id, pos_id = _token_ids(tokenizer)
    model, loaded = build_and_load(
        lambda: build_osprey_model(config, mask_token_id=mask_id, pos_token_id=pos_id, device="meta"),
        files, device=device, dtype=dtype, source=str(directory), map_name=map_key,
        architecture=ARCHITECTURE, optional_prefix="vision_tower.",
    )  # fmt: skip
    vision_names = {n for n in model.state_dict() if n.startswith("vision_tower.")}
    if not loaded & vision_names:
        clip_file = resolve_clip_file(hf_config.get("mm_vision_tower"), directory)
        logger.info("vision tower not in the checkpoint; loading it from %s", clip_file)
        load_strict(
            model,
            ((VISION_PREFIX + k, v) for k, v in iter_tensors(clip_file)),
            device=device,
            dtype=dtype,
            source=str(clip_file),
            scope="vision_tower.",
        )
    elif loaded & vision_names != vision_names:
        raise ValueError(
            f"{directory} holds only part of the vision tower: missing {name_list(sorted(vision_names - loaded))}"
        )
    else:
        _authors_layer_scales(model, hf_config, directory, device=device, dtype=dtype)
    model.to(device)
    return model.eval(), tokenizer, config


def _authors_layer_scales(model: OspreyModel, hf_config: dict, directory: Path, *, device, dtype) -> None:
    """The ConvNeXt layer scales (``gamma``) from the open_clip file when it can be found, as the
    authors' code ends up with them: transformers 4.31 renames checkpoint keys containing "gamma", so
    their model never reads the checkpoint's (bf16) ``gamma`` and keeps the open_clip file's fp32 ones.
    Without that file the checkpoint's stay. One log line says which."""
    names = {n for n in model.state_dict() if n.startswith("vision_tower.") and n.endswith(".gamma")}
    if not names:
        return
    try:
        clip_file = resolve_clip_file(hf_config.get("mm_vision_tower"), directory)
    except MissingWeightsError:
        logger.info(
            "ConvNeXt layer scales (%d gamma) from the checkpoint: its open_clip file (%s) is not here; "
            "the authors' code reads them from that file (fp32), so features may differ by rounding",
            len(names),
            hf_config.get("mm_vision_tower") or CLIP_FILE,
        )
        return
    gammas = (
        (VISION_PREFIX + key, tensor)
        for key, tensor in iter_tensors(clip_file)
        if key.endswith(".gamma") and key.startswith("visual.")
    )
    load_strict(
        model, gammas, device=device, dtype=dtype, source=f"{clip_file} (layer scales)",
        scope="vision_tower.", only=names,
    )  # fmt: skip
    logger.info(
        "ConvNeXt layer scales (%d gamma) from %s, as the authors' code reads them", len(names), clip_file
    )


OSPREY = ModelLoader(
    architecture=ARCHITECTURE,
    preset_names=preset_names,
    load_preset=load_preset,
    build_random=build_random,
    load_checkpoint=load_checkpoint,
)
