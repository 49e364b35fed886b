"""Checkpoint files on this machine: the weight files of a checkpoint directory (one file or shards with
an index), reading them tensor by tensor (``.bin`` with ``weights_only=True``, or safetensors), and
finding a checkpoint directory from a path, a released model's name or a Hugging Face repo id already
in the cache. Nothing is ever downloaded here; ``osprey-label download`` does that.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class MissingWeightsError(FileNotFoundError):
    """Weights are not on this machine; the message names the files and how to fetch them."""


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


def read_weights(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of every file of a checkpoint, one file after the other; a log line names each file."""
    for path in files:
        logger.info("reading %s", path.name)
        yield from iter_tensors(path)


def read_config(directory: Path, *, architecture: str) -> dict:
    """A checkpoint directory's ``config.json``; ValueError when there is none."""
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{directory} has no config.json; it is not a released {architecture} checkpoint directory"
        )
    return json.loads(path.read_text())


def find_checkpoint(name_or_path: str, *, repo: str | None, known: Iterable[str]) -> Path:
    """A local checkpoint directory, or a released one already in the Hugging Face cache.

    ``repo`` is the Hugging Face repo ``name_or_path`` names (a released model's name or a repo id), or
    None when it names none; ``known`` are the names to suggest then. Raises ValueError for a file or an
    unknown name, :class:`MissingWeightsError` when the repo is not in the cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    if repo is None:
        raise ValueError(
            f"{name_or_path!r} is neither a checkpoint directory nor a known model; use a directory, "
            f"a preset ({', '.join(known)}) or a Hugging Face repo id"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as error:  # the hub raises several types for "not cached"
        raise MissingWeightsError(
            f"weights for {name_or_path!r} ({repo}) are not in the Hugging Face cache and are never "
            f"downloaded at run time; run `osprey-label download --model {name_or_path}` where a network "
            "exists, or pass the local checkpoint directory"
        ) from error
