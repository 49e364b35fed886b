"""Building an :class:`~osprey.model.modeling.OspreyModel` from a preset or a released checkpoint."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from .checkpoint import (
    CLIP_FILE,
    MissingWeightsError,
    iter_tensors,
    map_key,
    resolve_checkpoint,
    resolve_clip_file,
    weight_files,
)
from .config import OspreyConfig, load_preset
from .llm import MASK_TOKEN, POS_TOKEN, build_tiny_tokenizer, load_tokenizer
from .modeling import OspreyModel, build_osprey_model

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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


def load_strict(
    model: OspreyModel,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    source: str,
    scope: str = "",
    optional_prefix: str | None = None,
    only: set[str] | None = None,
    map_name=map_key,
    architecture: str = "Osprey",
) -> set[str]:
    """Assign released tensors onto ``model`` (built on the meta device); ``map_name`` turns a released
    name into ours (None: a tensor the model never runs), ``architecture`` names the model in errors.

    Only parameters whose names start with ``scope`` (and, with ``only``, are in it) are expected from
    this source. Raises
    ValueError naming every unexpected, mis-shaped or missing tensor; parameters under
    ``optional_prefix`` may stay missing (they are loaded from elsewhere). Returns the names loaded.
    """
    expected = {
        name: tuple(t.shape)
        for name, t in model.state_dict().items()
        if name.startswith(scope) and (only is None or name in only)
    }
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    skipped = 0
    batch: dict[str, torch.Tensor] = {}
    for released, tensor in tensors:
        name = map_name(released)
        if name is None:
            skipped += 1
            continue
        if name not in expected:
            unexpected.append(released)
            continue
        if tuple(tensor.shape) != expected[name]:
            mismatched.append(f"{released}: checkpoint {tuple(tensor.shape)}, model {expected[name]}")
            continue
        batch[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        loaded.add(name)
        if len(batch) >= 64:
            model.load_state_dict(batch, strict=False, assign=True)
            batch = {}
    if batch:
        model.load_state_dict(batch, strict=False, assign=True)
    missing = sorted(
        n for n in expected if n not in loaded and not (optional_prefix and n.startswith(optional_prefix))
    )
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors of the wrong shape: {_names(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} missing tensors: {_names(missing)}")
    if problems:
        raise ValueError(f"{source} does not match the {architecture} architecture: " + "; ".join(problems))
    logger.info("loaded %d tensors from %s (%d known-unused skipped)", len(loaded), source, skipped)
    return loaded


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_checkpoint(name_or_path: str, *, device: torch.device, dtype: torch.dtype):
    """A released Osprey checkpoint: returns ``(model, tokenizer, config)``."""
    from accelerate import init_empty_weights

    directory = resolve_checkpoint(name_or_path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory} has no config.json; it is not an Osprey checkpoint directory")
    hf_config = json.loads(config_path.read_text())
    config = OspreyConfig.from_checkpoint_config(hf_config, name=directory.name)
    files = weight_files(directory)
    tokenizer = load_tokenizer(directory)
    mask_id, pos_id = _token_ids(tokenizer)
    with init_empty_weights(include_buffers=False):
        model = build_osprey_model(config, mask_token_id=mask_id, pos_token_id=pos_id, device="meta")
    loaded = load_strict(
        model,
        _chain(files),
        device=device,
        dtype=dtype,
        source=str(directory),
        optional_prefix="vision_tower.",
    )
    vision_names = {n for n in model.state_dict() if n.startswith("vision_tower.")}
    if not loaded & vision_names:
        clip_file = resolve_clip_file(hf_config.get("mm_vision_tower"), directory)
        logger.info("vision tower not in the checkpoint; loading it from %s", clip_file)
        load_strict(
            model,
            (("model.vision_tower.vision_tower." + k, v) for k, v in iter_tensors(clip_file)),
            device=device,
            dtype=dtype,
            source=str(clip_file),
            scope="vision_tower.",
        )
    elif loaded & vision_names != vision_names:
        raise ValueError(
            f"{directory} holds only part of the vision tower: missing {_names(sorted(vision_names - loaded))}"
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
        ("model.vision_tower.vision_tower." + key, tensor)
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


def _chain(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        logger.info("reading %s", path.name)
        yield from iter_tensors(path)


def load_model(
    name_or_path: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    random_weights: bool = False,
    seed: int = 0,
):
    """Preset or checkpoint -> ``(model, tokenizer, config)``; see :meth:`osprey.inference.api.Osprey.from_pretrained`."""
    from .config import preset_names

    if name_or_path in preset_names():
        config = load_preset(name_or_path)
        if config.untrained or random_weights:
            model, tokenizer = build_random(config, device=device, dtype=dtype, seed=seed)
            return model, tokenizer, config
    elif random_weights:
        raise ValueError(f"random_weights needs a preset ({', '.join(preset_names())}), got {name_or_path!r}")
    return load_checkpoint(name_or_path, device=device, dtype=dtype)
