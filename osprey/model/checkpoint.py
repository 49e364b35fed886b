"""Osprey's released checkpoint layout, loaded strictly.

A checkpoint directory is what the authors published (``model_type: osprey``): ``config.json``,
the tokenizer, and weights as one file or shards (``.bin`` or ``.safetensors`` with an index).
Every tensor is accounted for: it maps onto a parameter of :class:`~osprey.model.modeling.OspreyModel`
(through :data:`KEY_MAP`), or it is one of the tensors Osprey never runs
(:data:`UNUSED_KEYS`), or loading fails naming it. Any parameter left without a tensor also
fails, naming it. Reading the files and finding them is every model's (:mod:`osprey.loading.files`);
nothing is ever downloaded here; ``osprey-label download`` does that.
"""

from __future__ import annotations

import re
from pathlib import Path

# the checkpoint files' names and readers, named from here by the download command and the tests
from osprey.loading.files import INDEX_FILES as INDEX_FILES
from osprey.loading.files import WEIGHT_FILES as WEIGHT_FILES
from osprey.loading.files import MissingWeightsError as MissingWeightsError
from osprey.loading.files import find_checkpoint
from osprey.loading.files import iter_tensors as iter_tensors
from osprey.loading.files import weight_files as weight_files
from osprey.loading.strict import map_by_prefix

from .vision import UNUSED_VISION_KEYS

# Released checkpoint prefix -> our module prefix. Order matters: the first match wins.
VISION_PREFIX = "model.vision_tower.vision_tower."
KEY_MAP: tuple[tuple[str, str], ...] = (
    (VISION_PREFIX, "vision_tower."),
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


def map_key(name: str) -> str | None:
    """Our parameter name for a released tensor name; None for tensors Osprey never uses;
    the name unchanged when nothing maps it (it will then be reported as unexpected)."""
    if UNUSED_KEYS.match(name):
        return None
    if name.startswith(VISION_PREFIX) and UNUSED_VISION_KEYS.match(name[len(VISION_PREFIX) :]):
        return None
    return map_by_prefix(name, KEY_MAP)


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local directory, or a released checkpoint already in the Hugging Face cache."""
    repo = OSPREY_REPOS.get(name_or_path.lower(), name_or_path if "/" in name_or_path else None)
    return find_checkpoint(name_or_path, repo=repo, known=(*OSPREY_REPOS, "tiny", "small"))


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
