"""Loading released Osprey checkpoints strictly.

A checkpoint directory is what the authors published (``model_type: osprey``): ``config.json``,
the tokenizer, and weights as one file or shards (``.bin`` or ``.safetensors`` with an index).
Every tensor is accounted for: it maps onto a parameter of :class:`~osprey.model.modeling.OspreyModel`
(through :data:`KEY_MAP`), or it is one of the tensors Osprey never runs
(:data:`UNUSED_KEYS`), or loading fails naming it. Any parameter left without a tensor also
fails, naming it. Nothing is ever downloaded here; ``osprey-label download`` does that.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from .vision import UNUSED_VISION_KEYS

logger = logging.getLogger(__name__)

# Released checkpoint prefix -> our module prefix. Order matters: the first match wins.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.mm_projector.", "mm_projector."),
    ("model.embed_tokens.", "llm.model.embed_tokens."),
    ("model.layers.", "llm.model.layers."),
    ("model.norm.", "llm.model.norm."),
    ("lm_head.", "llm.lm_head."),
    ("mask_extractor.", "mask_extractor."),
)
# Old transformers saved the rotary frequencies; they are recomputed from rope_theta.
UNUSED_KEYS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

OSPREY_REPOS = {"osprey-7b": "sunshine-lwt/Osprey-7b", "osprey-chat-7b": "sunshine-lwt/Osprey-Chat-7b"}
CLIP_REPO = "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
CLIP_FILE = "open_clip_pytorch_model.bin"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class MissingWeightsError(FileNotFoundError):
    """Weights are not on this machine; the message names the files and how to fetch them."""


def map_key(name: str) -> str | None:
    """Our parameter name for a released tensor name; None for tensors Osprey never uses;
    the name unchanged when nothing maps it (it will then be reported as unexpected)."""
    if UNUSED_KEYS.match(name):
        return None
    for released, ours in KEY_MAP:
        if name.startswith(released):
            rest = name[len(released) :]
            if ours == "vision_tower." and UNUSED_VISION_KEYS.match(rest):
                return None
            return ours + rest
    return name


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, from its index when sharded."""
    for index_name in INDEX_FILES:
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise MissingWeightsError(
                    f"{directory} lists shards that are not there: {', '.join(missing)}; "
                    "re-run `osprey-label download` or copy the complete checkpoint"
                )
            return [directory / s for s in shards]
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise MissingWeightsError(
        f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES + INDEX_FILES)}; "
        "fetch the released checkpoint with `osprey-label download`"
    )


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of one weight file, without loading the whole file at once."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
        return
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    yield from state.items()


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local directory, or a released checkpoint already in the Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    repo = OSPREY_REPOS.get(name_or_path.lower(), name_or_path if "/" in name_or_path else None)
    if repo is None:
        raise ValueError(
            f"{name_or_path!r} is neither a checkpoint directory nor a known model; use a directory, "
            f"a preset ({', '.join(OSPREY_REPOS)}, tiny, small) or a Hugging Face repo id"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as error:  # the hub raises several types for "not cached"
        raise MissingWeightsError(
            f"weights for {name_or_path!r} ({repo}) are not in the Hugging Face cache and are never "
            f"downloaded at run time; run `osprey-label download --model {name_or_path}` where a "
            "network exists, or pass the local checkpoint directory"
        ) from error


def resolve_clip_file(mm_vision_tower: str | None, checkpoint_dir: Path) -> Path:
    """The open_clip weight file named by ``mm_vision_tower``: as given, relative to the checkpoint,
    its file name inside the checkpoint, or the LAION file in the Hugging Face cache."""
    candidates = []
    if mm_vision_tower:
        given = Path(mm_vision_tower).expanduser()
        candidates += [given, checkpoint_dir / given, checkpoint_dir / given.name]
    candidates.append(checkpoint_dir / CLIP_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(CLIP_REPO, CLIP_FILE)
    if isinstance(cached, str):
        return Path(cached)
    raise MissingWeightsError(
        f"the checkpoint has no vision tower and its open_clip file ({mm_vision_tower or CLIP_FILE}) "
        f"was not found in {checkpoint_dir} nor in the Hugging Face cache ({CLIP_REPO}/{CLIP_FILE}); "
        "run `osprey-label download` or put the file next to config.json"
    )
