"""Osprey and its CLIP tower from the Hugging Face Hub: fetching, and checking what loading needs.

Osprey (``sunshine-lwt/Osprey-7b``, ``sunshine-lwt/Osprey-Chat-7b``) comes through
``huggingface_hub.snapshot_download``, into the Hugging Face cache (where
:func:`osprey.model.checkpoint.resolve_checkpoint` finds it with ``local_files_only``) or into a plain
folder. Only what loading reads is fetched: ``config.json``, the tokenizer files, and the weight files
the index lists (or the single weight file). The ConvNeXt CLIP tower (``open_clip_pytorch_model.bin``
of the LAION repo) is fetched only when the checkpoint has no vision tower: into the cache, or next to
``config.json`` of a plain folder; :func:`osprey.model.checkpoint.resolve_clip_file` looks in both places.

The hub checks every LFS file against its sha256 while downloading. :func:`check_osprey` runs the
checks ``osprey-label serve`` runs before starting (resolve the checkpoint, list its weight files),
plus the config, tokenizer and vision-tower checks that loading would otherwise fail on later,
without building the model.

:mod:`osprey.model.checkpoint` (and with it torch) and ``huggingface_hub`` are imported inside the
functions, so that importing :mod:`osprey.download` stays cheap.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .report import DownloadError, FileStatus, NetworkUnavailableError, file_digests, file_size

logger = logging.getLogger(__name__)

# What loading reads besides the weights: the config and every file a Llama tokenizer may come as.
CONFIG_AND_TOKENIZER_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

SnapshotDownload = Callable[..., str]


def fetch_osprey(
    model: str,
    *,
    local_dir: Path | None = None,
    force: bool = False,
    snapshot_download: SnapshotDownload | None = None,
) -> Path:
    """Fetch a released Osprey checkpoint (and the CLIP tower when it lacks one); return its folder.

    Args:
        model: ``osprey-7b`` or ``osprey-chat-7b`` (see :data:`osprey.model.checkpoint.OSPREY_REPOS`).
        local_dir: a plain folder to fetch into; None fetches into the Hugging Face cache
            (``HF_HOME`` / ``HF_HUB_CACHE``), where ``--model osprey-7b`` later finds it.
        force: fetch every file again even when it is present.
        snapshot_download: stands in for ``huggingface_hub.snapshot_download`` (tests).

    Raises:
        ValueError: unknown ``model``.
        NetworkUnavailableError: the hub cannot be reached.
        DownloadError: any other failure (unknown repo, no weights in it, a full disk...).
    """
    from osprey.model.checkpoint import CLIP_FILE, CLIP_REPO, INDEX_FILES, WEIGHT_FILES

    repo = _osprey_repo(model)
    download = snapshot_download or _hub_snapshot_download
    where = {"local_dir": str(local_dir)} if local_dir is not None else {}
    directory = Path(
        _hub_call(
            download,
            repo,
            allow_patterns=list(CONFIG_AND_TOKENIZER_PATTERNS + INDEX_FILES),
            force_download=force,
            **where,
        )
    )
    shards = _indexed_shards(directory)
    if shards is not None:
        directory = Path(_hub_call(download, repo, allow_patterns=shards, force_download=force, **where))
    else:  # one unsharded file: the first of the names weight_files() accepts that the repo has
        for name in WEIGHT_FILES:
            directory = Path(_hub_call(download, repo, allow_patterns=[name], force_download=force, **where))
            if (directory / name).is_file():
                break
        else:
            raise DownloadError(
                f"{repo} has no weights loading can read ({', '.join(WEIGHT_FILES + INDEX_FILES)})"
            )
    if not _has_vision_tower(checkpoint_tensor_names(directory)) and (
        force or not _clip_file_found(directory, folder_only=local_dir is not None)
    ):
        logger.info("%s has no vision tower; fetching %s from %s", repo, CLIP_FILE, CLIP_REPO)
        # In a plain folder the file lands next to config.json, one of the places loading looks.
        _hub_call(download, CLIP_REPO, allow_patterns=[CLIP_FILE], force_download=force, **where)
    return directory


def check_osprey(
    model: str, *, directory: Path | None = None, verify_hashes: bool = False
) -> list[FileStatus]:
    """What loading ``model`` needs, file by file, with sizes.

    ``directory`` is the plain folder the checkpoint was fetched into (None: the Hugging Face cache).
    The same checks ``osprey-label serve`` runs before it starts (the checkpoint resolves, every weight
    file the index lists is there), plus: ``config.json`` parses as an Osprey config, the tokenizer
    files are there, and the vision tower is in the weights or its open_clip file can be found.
    ``verify_hashes`` also re-reads every weight file whose sha256 the hub recorded and compares.
    """
    from osprey.model.checkpoint import (
        INDEX_FILES,
        WEIGHT_FILES,
        MissingWeightsError,
        resolve_checkpoint,
        weight_files,
    )
    from osprey.model.config import OspreyConfig

    repo = _osprey_repo(model)
    label = repo.split("/")[-1]
    if directory is not None and not directory.is_dir():
        return [
            FileStatus(f"{label}/", str(directory), None, "missing", f"folder {directory} does not exist")
        ]
    try:
        folder = resolve_checkpoint(str(directory) if directory is not None else model)
    except (MissingWeightsError, ValueError) as error:
        return [FileStatus(f"{label}/", _cache_folder(repo), None, "missing", str(error))]
    rows = []
    where = str(folder)

    config_path = folder / "config.json"
    try:
        config = _read_config(folder)
        OspreyConfig.from_checkpoint_config(config, name=label)
        rows.append(_present(f"{label}/config.json", config_path))
    except FileNotFoundError:
        config = {}
        rows.append(FileStatus(f"{label}/config.json", where, None, "missing", "no config.json"))
    except ValueError as error:
        config = {}
        rows.append(FileStatus(f"{label}/config.json", where, file_size(config_path), "bad", str(error)))

    rows.append(_status_of(f"{label}/tokenizer_config.json", folder / "tokenizer_config.json"))
    tokenizer = next((folder / n for n in TOKENIZER_FILES if (folder / n).is_file()), None)
    if tokenizer is None:
        rows.append(
            FileStatus(
                f"{label}/tokenizer.model", where, None, "missing", f"no {' or '.join(TOKENIZER_FILES)}"
            )
        )
    else:
        rows.append(_present(f"{label}/{tokenizer.name}", tokenizer))

    index = next((folder / n for n in INDEX_FILES if (folder / n).is_file()), None)
    if index is not None:
        rows.append(_present(f"{label}/{index.name}", index))
        for shard in _indexed_shards(folder) or []:
            rows.append(_status_of(f"{label}/{shard}", folder / shard, verify_hashes=verify_hashes))
    try:
        files = weight_files(folder)  # what serve's check_weights runs
        if index is None:
            rows += [_status_of(f"{label}/{p.name}", p, verify_hashes=verify_hashes) for p in files]
    except MissingWeightsError as error:
        if index is None:
            rows.append(FileStatus(f"{label}/{WEIGHT_FILES[0]}", where, None, "missing", str(error)))
    rows.append(_vision_tower_status(folder, config, verify_hashes=verify_hashes))
    return rows


def checkpoint_tensor_names(directory: Path) -> set[str]:
    """Released tensor names of a checkpoint, from its index or the weight files' headers.

    Reads no tensor data: safetensors headers only, and ``.bin`` files memory-mapped.
    """
    from osprey.model.checkpoint import INDEX_FILES, iter_tensors, weight_files

    for index_name in INDEX_FILES:
        index = directory / index_name
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                names.update(handle.keys())
        else:
            names.update(name for name, _ in iter_tensors(path))
    return names


def osprey_offline_help(model: str, directory: Path | None) -> str:
    """How to bring ``model`` in by hand, into ``directory`` (None: any folder) or the hub cache."""
    from huggingface_hub import constants

    from osprey.model.checkpoint import CLIP_FILE, CLIP_REPO

    repo = _osprey_repo(model)
    return (
        f"  Osprey: run `osprey-label download --model {model} --sam none --dir DIR` there (or copy the "
        f"files of {constants.ENDPOINT}/{repo}), copy DIR/{repo.split('/')[-1]} to "
        f"{directory or 'any folder here'} and serve with OSPREY_MODEL=<that folder>; it needs "
        f"config.json, the tokenizer files and every weight file the index lists, and {CLIP_FILE} "
        f"(from {constants.ENDPOINT}/{CLIP_REPO}) next to config.json when the weights hold no vision "
        f"tower. Or copy a whole Hugging Face cache folder into {constants.HF_HUB_CACHE}."
    )


def _has_vision_tower(names: Iterable[str]) -> bool:
    from osprey.model.checkpoint import map_key

    return any((map_key(n) or "").startswith("vision_tower.") for n in names)


def _vision_tower_status(folder: Path, config: dict, *, verify_hashes: bool) -> FileStatus:
    from osprey.model.checkpoint import CLIP_FILE, CLIP_REPO, MissingWeightsError, resolve_clip_file

    try:
        names = checkpoint_tensor_names(folder)
    except (MissingWeightsError, OSError, ValueError, RuntimeError) as error:
        return FileStatus("vision tower", str(folder), None, "missing", f"cannot list the weights: {error}")
    if _has_vision_tower(names):
        return FileStatus("vision tower", str(folder), None, "ok", "inside the checkpoint's weights")
    try:
        clip = resolve_clip_file(config.get("mm_vision_tower"), folder)
    except MissingWeightsError as error:
        return FileStatus(f"CLIP {CLIP_FILE}", _cache_folder(CLIP_REPO), None, "missing", str(error))
    return _status_of(f"CLIP {CLIP_FILE}", clip, verify_hashes=verify_hashes)


def _clip_file_found(directory: Path, *, folder_only: bool) -> bool:
    """Whether loading will find the CLIP file; ``folder_only``: inside ``directory`` itself, so that
    the folder can be copied to another machine as it is."""
    from osprey.model.checkpoint import MissingWeightsError, resolve_clip_file

    try:
        found = resolve_clip_file(_read_config(directory).get("mm_vision_tower"), directory)
    except MissingWeightsError:
        return False
    if folder_only and found.parent.resolve() != directory.resolve():
        return False
    logger.info("vision tower file already present: %s", found)
    return True


def _osprey_repo(model: str) -> str:
    from osprey.model.checkpoint import OSPREY_REPOS

    try:
        return OSPREY_REPOS[model.lower()]
    except KeyError:
        raise ValueError(
            f"unknown Osprey model {model!r}; expected one of {', '.join(OSPREY_REPOS)}"
        ) from None


def _indexed_shards(directory: Path) -> list[str] | None:
    from osprey.model.checkpoint import INDEX_FILES

    for index_name in INDEX_FILES:  # the same preference as weight_files()
        index = directory / index_name
        if index.is_file():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return None


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _hub_snapshot_download(repo_id: str, **kwargs) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **kwargs)


def _hub_call(download: SnapshotDownload, repo: str, **kwargs) -> str:
    try:
        return download(repo, **kwargs)
    except Exception as error:  # the hub raises many types; each becomes a message naming the repo
        raise _hub_error(repo, error) from error


def _hub_error(repo: str, error: Exception) -> DownloadError:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    cause = f"{type(error).__name__}: {error}".splitlines()[0]
    if (
        isinstance(error, LocalEntryNotFoundError | ConnectionError | TimeoutError)
        or constants.HF_HUB_OFFLINE
    ):
        return NetworkUnavailableError(
            f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) to fetch {repo} ({cause}); "
            "this machine looks offline (HF_ENDPOINT selects a mirror, HTTPS_PROXY a proxy, "
            "HF_HUB_OFFLINE must be unset)"
        )
    if isinstance(error, GatedRepoError | RepositoryNotFoundError):
        return DownloadError(
            f"the hub refused {repo} ({cause}); check the name, or log in (`hf auth login` or HF_TOKEN)"
        )
    return DownloadError(f"fetching {repo} failed: {cause}")


def _cache_folder(repo: str) -> str:
    from huggingface_hub import constants

    return str(Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")))


def _present(label: str, path: Path) -> FileStatus:
    return FileStatus(label, str(path.parent), file_size(path), "ok")


def _status_of(label: str, path: Path, *, verify_hashes: bool = False) -> FileStatus:
    if not path.is_file():
        return FileStatus(
            label, str(path.parent), None, "missing", f"{path} is not there; run `osprey-label download`"
        )
    if path.stat().st_size == 0:
        return FileStatus(
            label, str(path.parent), 0, "bad", f"{path} is empty; run `osprey-label download --force`"
        )
    if verify_hashes:
        expected = _recorded_sha256(path)
        if expected is not None:
            actual = file_digests(path)[1]
            if actual != expected:
                return FileStatus(
                    label,
                    str(path.parent),
                    file_size(path),
                    "bad",
                    f"sha256 {actual} but the hub recorded {expected}; run `osprey-label download --force`",
                )
            return FileStatus(label, str(path.parent), file_size(path), "ok", "sha256 matches the hub's")
    return _present(label, path)


def _recorded_sha256(path: Path) -> str | None:
    """The sha256 the hub recorded for ``path``: the blob name in the cache (LFS files are stored
    under their sha256), or the etag in a plain folder's ``.cache/huggingface/download`` metadata."""
    blob = path.resolve()
    if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return blob.name
    metadata = path.parent / ".cache" / "huggingface" / "download" / (path.name + ".metadata")
    try:
        lines = metadata.read_text().splitlines()
    except OSError:
        return None
    etag = lines[1].strip() if len(lines) > 1 else ""
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


# ---- PixelRefer-Lite (Alibaba-DAMO-Academy/PixelRefer-Lite-2B, -7B) ----------------------------------

PIXELREFER_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def pixelrefer_repo(model: str) -> str:
    """The hub repository of a released PixelRefer-Lite preset (``pixelrefer-lite-2b``, ``-7b``)."""
    from osprey.pixelrefer.configuration import load_preset, preset_names

    repo = load_preset(model).repo if model in preset_names() else None
    if repo is None:
        raise ValueError(
            f"unknown released PixelRefer-Lite model {model!r}; expected pixelrefer-lite-2b or -7b"
        )
    return repo


def fetch_pixelrefer(
    model: str,
    *,
    local_dir: Path | None = None,
    force: bool = False,
    snapshot_download: SnapshotDownload | None = None,
) -> Path:
    """Fetch a released PixelRefer-Lite checkpoint (config, generation config, Qwen2 tokenizer, the ``.bin``
    weights its index lists); return its folder. Errors as :func:`fetch_osprey`."""
    from osprey.model.checkpoint import INDEX_FILES, WEIGHT_FILES

    repo = pixelrefer_repo(model)
    download = snapshot_download or _hub_snapshot_download
    where = {"local_dir": str(local_dir)} if local_dir is not None else {}
    patterns = list(CONFIG_AND_TOKENIZER_PATTERNS + PIXELREFER_TOKENIZER_FILES + INDEX_FILES)
    directory = Path(_hub_call(download, repo, allow_patterns=patterns, force_download=force, **where))
    shards = _indexed_shards(directory)
    names = shards if shards is not None else list(WEIGHT_FILES)
    directory = Path(_hub_call(download, repo, allow_patterns=names, force_download=force, **where))
    if shards is None and not any((directory / n).is_file() for n in WEIGHT_FILES):
        raise DownloadError(
            f"{repo} has no weights loading can read ({', '.join(WEIGHT_FILES + INDEX_FILES)})"
        )
    return directory


def check_pixelrefer(
    model: str, *, directory: Path | None = None, verify_hashes: bool = False
) -> list[FileStatus]:
    """What loading the PixelRefer-Lite ``model`` needs, file by file: the checkpoint resolves, its
    ``config.json`` is a PixelRefer-Lite config, the tokenizer and every weight file are there."""
    from osprey.model.checkpoint import MissingWeightsError, weight_files
    from osprey.pixelrefer.configuration import PixelReferConfig
    from osprey.pixelrefer.loading import resolve_checkpoint

    repo = pixelrefer_repo(model)
    label = repo.split("/")[-1]
    try:
        folder = resolve_checkpoint(str(directory) if directory is not None else model)
    except (MissingWeightsError, ValueError) as error:
        return [FileStatus(f"{label}/", str(directory or _cache_folder(repo)), None, "missing", str(error))]
    rows, where = [], str(folder)
    try:
        PixelReferConfig.from_checkpoint_config(_read_config(folder), name=label)
        rows.append(_present(f"{label}/config.json", folder / "config.json"))
    except (FileNotFoundError, ValueError) as error:
        rows.append(
            FileStatus(f"{label}/config.json", where, file_size(folder / "config.json"), "bad", str(error))
        )
    present = [n for n in PIXELREFER_TOKENIZER_FILES if (folder / n).is_file()]
    if "tokenizer.json" in present or {"vocab.json", "merges.txt"} <= set(present):
        rows += [_present(f"{label}/{n}", folder / n) for n in present]
    else:
        rows.append(
            FileStatus(
                f"{label}/tokenizer.json",
                where,
                None,
                "missing",
                "no tokenizer.json nor vocab.json + merges.txt",
            )
        )
    try:
        rows += [
            _status_of(f"{label}/{p.name}", p, verify_hashes=verify_hashes) for p in weight_files(folder)
        ]
    except MissingWeightsError as error:
        rows.append(FileStatus(f"{label}/pytorch_model.bin", where, None, "missing", str(error)))
    return rows
