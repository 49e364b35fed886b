"""``osprey-label download``: fetched files land where the loaders look, and are verified.

No test leaves 127.0.0.1: SAM files come from a local HTTP server (ranges supported, connections
cut on demand), and the Hugging Face Hub is replaced by a fake ``snapshot_download`` that writes the
cache layout ``huggingface_hub`` reads (``models--org--name/{blobs,snapshots,refs}``) or a plain
folder with the hub's download metadata. What reads the files back is the real code: the hub's
``local_files_only`` lookups and :mod:`osprey.model.checkpoint`.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from osprey import download
from osprey.download.cli import add_download_command, run_download
from osprey.model.checkpoint import CLIP_FILE, CLIP_REPO, resolve_checkpoint, resolve_clip_file, weight_files
from osprey.sam.build import SAM_ARCHITECTURES

OSPREY_REPO = "sunshine-lwt/Osprey-7b"

# ------------------------------------------------------------------------------------------ SAM server


class _FileHandler(BaseHTTPRequestHandler):
    """Serves ``server.files`` by name; honours ``Range: bytes=N-`` and ``server.cut_after``."""

    def do_GET(self) -> None:
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        server.log.append((self.path, self.headers.get("Range")))
        data = server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = server.cut_after.pop(name, None)
        self.wfile.write(body if cut is None else body[:cut])  # a cut connection: fewer bytes, then EOF

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def sam_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    server.files, server.cut_after, server.log = {}, {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}/segment_anything/"
    yield server
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/segment_anything/"


@pytest.fixture
def fake_sam(monkeypatch):
    """Random bytes published as ``vit_b``: named by their MD5 prefix, with their sha256."""
    data = np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    md5 = hashlib.md5(data).hexdigest()
    entry = download.SamCheckpoint(name=f"sam_vit_b_{md5[:6]}.pth", sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(download.SAM_CHECKPOINTS, "vit_b", entry)
    return entry, data


def test_published_table_matches_the_architectures_and_their_name_suffixes():
    assert {k: v.name for k, v in download.SAM_CHECKPOINTS.items()} == {
        k: a.checkpoint_file for k, a in SAM_ARCHITECTURES.items() if a.checkpoint_file
    }
    assert [c.md5_prefix for c in download.SAM_CHECKPOINTS.values()] == ["4b8939", "0b3195", "01ec64"]
    assert all(c.sha256 and len(c.sha256) == 64 for c in download.SAM_CHECKPOINTS.values())
    with pytest.raises(ValueError, match="_<6 hex digits>.pth"):
        download.SamCheckpoint(name="sam_vit_b.pth")


def test_sam_is_fetched_verified_and_kept_on_the_next_run(sam_server, fake_sam, tmp_path):
    entry, data = fake_sam
    sam_server.files[entry.name] = data
    models = tmp_path / "models"
    path, fetched = download.fetch_sam("vit_b", models, base_url=sam_server.base_url, progress=False)
    assert fetched and path == models / entry.name and path.read_bytes() == data
    assert sorted(p.name for p in models.iterdir()) == [entry.name]  # no .part left behind
    assert download.check_sam("vit_b", models)[0].status == "ok"

    requests = len(sam_server.log)
    path, fetched = download.fetch_sam("vit_b", models, base_url=sam_server.base_url, progress=False)
    assert not fetched and len(sam_server.log) == requests  # verified in place, not fetched again
    path, fetched = download.fetch_sam(
        "vit_b", models, base_url=sam_server.base_url, force=True, progress=False
    )
    assert fetched and len(sam_server.log) == requests + 1 and path.read_bytes() == data


def test_a_corrupt_download_is_refused_and_deleted(sam_server, fake_sam, tmp_path):
    entry, data = fake_sam
    sam_server.files[entry.name] = data[:-1] + bytes([data[-1] ^ 1])  # one flipped bit
    with pytest.raises(download.ChecksumError, match=f"MD5 beginning {entry.md5_prefix}.*deleted"):
        download.fetch_sam("vit_b", tmp_path, base_url=sam_server.base_url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_full_sha256_is_checked_not_only_the_name_suffix(sam_server, fake_sam, tmp_path, monkeypatch):
    entry, data = fake_sam
    monkeypatch.setitem(
        download.SAM_CHECKPOINTS, "vit_b", download.SamCheckpoint(entry.name, sha256="0" * 64)
    )
    sam_server.files[entry.name] = data
    with pytest.raises(download.ChecksumError, match="sha256"):
        download.fetch_sam("vit_b", tmp_path, base_url=sam_server.base_url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_cut_transfer_keeps_the_part_file_and_the_next_run_resumes_it(sam_server, fake_sam, tmp_path):
    entry, data = fake_sam
    sam_server.files[entry.name] = data
    sam_server.cut_after[entry.name] = 100_000
    with pytest.raises(download.DownloadError, match="stopped after 100000 of 300000 bytes.*resume"):
        download.fetch_sam("vit_b", tmp_path, base_url=sam_server.base_url, progress=False)
    part = tmp_path / (entry.name + ".part")
    assert part.stat().st_size == 100_000 and not (tmp_path / entry.name).exists()

    path, fetched = download.fetch_sam("vit_b", tmp_path, base_url=sam_server.base_url, progress=False)
    assert fetched and path.read_bytes() == data and not part.exists()
    assert sam_server.log[-1][1] == "bytes=100000-"  # only the rest was asked for


def test_an_existing_bad_file_is_replaced(sam_server, fake_sam, tmp_path):
    entry, data = fake_sam
    sam_server.files[entry.name] = data
    (tmp_path / entry.name).write_bytes(b"not a checkpoint")
    row = download.check_sam("vit_b", tmp_path)[0]
    assert row.status == "bad" and "MD5" in row.detail
    path, fetched = download.fetch_sam("vit_b", tmp_path, base_url=sam_server.base_url, progress=False)
    assert fetched and path.read_bytes() == data


def test_server_down_and_http_errors_are_clear(sam_server, fake_sam, tmp_path):
    with pytest.raises(download.NetworkUnavailableError, match="cannot reach http://127.0.0.1.*offline"):
        download.fetch_sam("vit_b", tmp_path, base_url=closed_port_url(), progress=False)
    with pytest.raises(download.DownloadError, match="HTTP 404"):
        download.fetch_sam("vit_b", tmp_path, base_url=sam_server.base_url, progress=False)
    with pytest.raises(ValueError, match="no published checkpoint"):
        download.fetch_sam("tiny", tmp_path)


# ----------------------------------------------------------------------------------------- fake hub


def _safetensors(names: list[str]) -> bytes:
    return save({name: torch.full((2, 2), float(i)) for i, name in enumerate(names)})


def osprey_repo_files(*, vision_inside: bool = False) -> dict[str, bytes]:
    """A released-layout repo in miniature, plus files loading never reads (they must stay remote)."""
    config = {
        "model_type": "osprey",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 1000,
        "mm_vision_tower": "/home/authors/open_clip_pytorch_model.bin",
    }
    shard1 = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    shard2 = ["mask_extractor.feat_linear.weight", "model.mm_projector.0.weight"]
    if vision_inside:
        shard2.append("model.vision_tower.vision_tower.visual.trunk.stem.0.weight")
    shards = {"model-00001-of-00002.safetensors": shard1, "model-00002-of-00002.safetensors": shard2}
    weight_map = {name: shard for shard, names in shards.items() for name in names}
    return {
        "config.json": json.dumps(config).encode(),
        "tokenizer_config.json": b'{"tokenizer_class": "LlamaTokenizer"}',
        "tokenizer.model": b"sentencepiece model bytes",
        "special_tokens_map.json": b"{}",
        "model.safetensors.index.json": json.dumps({"metadata": {}, "weight_map": weight_map}).encode(),
        **{shard: _safetensors(names) for shard, names in shards.items()},
        "README.md": b"# Osprey",
        "training_args.bin": b"x" * 10,
        "trainer_state.json": b"{}",
    }


CLIP_REPO_FILES = {CLIP_FILE: b"open_clip weights", "open_clip_config.json": b"{}", "README.md": b"#"}


class FakeHub:
    """``snapshot_download`` as the hub does it, from in-memory repos, with ``allow_patterns``."""

    def __init__(self, cache: Path, repos: dict[str, dict[str, bytes]]):
        self.cache, self.repos, self.calls = cache, repos, []

    def __call__(self, repo_id, *, allow_patterns=None, local_dir=None, force_download=False, **kwargs):
        from huggingface_hub._local_folder import write_download_metadata

        self.calls.append((repo_id, tuple(allow_patterns or ()), local_dir))
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        chosen = {
            name: data
            for name, data in self.repos[repo_id].items()
            if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns)
        }
        if local_dir is not None:
            folder = Path(local_dir)
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in chosen.items():
                (folder / name).write_bytes(data)
                write_download_metadata(folder, name, commit, hashlib.sha256(data).hexdigest())
            return str(folder)
        root = self.cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, data in chosen.items():
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / name
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        return str(snapshot)

    def fetched(self, repo_id: str) -> set[str]:
        return {name for repo, patterns, _ in self.calls if repo == repo_id for name in patterns}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


NEEDED = {
    "config.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
}


def snapshot_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_file()}


def test_osprey_lands_in_the_cache_where_the_loader_finds_it(hf_cache):
    hub = FakeHub(hf_cache, {OSPREY_REPO: osprey_repo_files(), CLIP_REPO: CLIP_REPO_FILES})
    directory = download.fetch_osprey("osprey-7b", snapshot_download=hub)

    assert snapshot_files(directory) == NEEDED  # nothing loading does not read
    # the real lookups serve and loading run: hub cache (local_files_only), index, CLIP file
    assert resolve_checkpoint("osprey-7b") == directory
    assert [p.name for p in weight_files(directory)] == sorted(n for n in NEEDED if n.startswith("model-"))
    clip = resolve_clip_file("/home/authors/open_clip_pytorch_model.bin", directory)
    assert clip.read_bytes() == CLIP_REPO_FILES[CLIP_FILE] and "models--laion--" in str(clip)
    assert hub.fetched(CLIP_REPO) == {CLIP_FILE}

    rows = download.check_osprey("osprey-7b", verify_hashes=True)
    assert [r.status for r in rows] == ["ok"] * len(rows), download.format_table(rows)
    assert {r.file.split("/")[-1] for r in rows} >= NEEDED - {"special_tokens_map.json"}
    assert rows[-1].file == f"CLIP {CLIP_FILE}" and rows[-1].detail == "sha256 matches the hub's"

    hub.calls.clear()  # a second run asks the hub again (it skips what it has) but not for the CLIP file
    download.fetch_osprey("osprey-7b", snapshot_download=hub)
    assert CLIP_REPO not in {call[0] for call in hub.calls}


def test_a_checkpoint_with_its_vision_tower_needs_no_clip_file(hf_cache):
    hub = FakeHub(hf_cache, {OSPREY_REPO: osprey_repo_files(vision_inside=True), CLIP_REPO: CLIP_REPO_FILES})
    download.fetch_osprey("osprey-7b", snapshot_download=hub)
    assert CLIP_REPO not in {call[0] for call in hub.calls}
    rows = download.check_osprey("osprey-7b")
    assert rows[-1].file == "vision tower" and rows[-1].ok and "inside" in rows[-1].detail


def test_a_plain_folder_gets_the_clip_file_next_to_config_json(tmp_path, hf_cache):
    hub = FakeHub(hf_cache, {OSPREY_REPO: osprey_repo_files(), CLIP_REPO: CLIP_REPO_FILES})
    folder = tmp_path / "weights" / "Osprey-7b"
    assert download.fetch_osprey("osprey-7b", local_dir=folder, snapshot_download=hub) == folder
    assert snapshot_files(folder) == NEEDED | {CLIP_FILE}
    assert resolve_clip_file("/home/authors/open_clip_pytorch_model.bin", folder) == folder / CLIP_FILE
    assert not any(hf_cache.iterdir())  # nothing went to the cache
    rows = download.check_osprey("osprey-7b", directory=folder, verify_hashes=True)
    assert all(r.ok for r in rows), download.format_table(rows)

    (folder / "model-00002-of-00002.safetensors").write_bytes(b"tampered")
    rows = {r.file: r for r in download.check_osprey("osprey-7b", directory=folder, verify_hashes=True)}
    assert rows["Osprey-7b/model-00002-of-00002.safetensors"].status == "bad"
    assert "the hub recorded" in rows["Osprey-7b/model-00002-of-00002.safetensors"].detail


def test_a_plain_folder_gets_its_own_clip_file_even_when_the_cache_has_one(tmp_path, hf_cache):
    hub = FakeHub(hf_cache, {OSPREY_REPO: osprey_repo_files(), CLIP_REPO: CLIP_REPO_FILES})
    download.fetch_osprey("osprey-7b", snapshot_download=hub)  # the cache now holds the CLIP file
    folder = tmp_path / "to-copy" / "Osprey-7b"
    download.fetch_osprey("osprey-7b", local_dir=folder, snapshot_download=hub)
    assert (folder / CLIP_FILE).read_bytes() == CLIP_REPO_FILES[CLIP_FILE]  # the folder travels alone


def test_check_names_each_missing_or_corrupt_file(hf_cache):
    hub = FakeHub(hf_cache, {OSPREY_REPO: osprey_repo_files(), CLIP_REPO: CLIP_REPO_FILES})
    directory = download.fetch_osprey("osprey-7b", snapshot_download=hub)
    (directory / "model-00001-of-00002.safetensors").unlink()
    blob = (directory / "model-00002-of-00002.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")

    rows = {r.file: r for r in download.check_osprey("osprey-7b", verify_hashes=True)}
    assert rows["Osprey-7b/model-00001-of-00002.safetensors"].status == "missing"
    assert rows["Osprey-7b/model-00002-of-00002.safetensors"].status == "bad"
    assert rows["Osprey-7b/config.json"].ok and rows["Osprey-7b/tokenizer.model"].ok
    # without --verify-hashes the size-only check passes the corrupted file
    rows = {r.file: r for r in download.check_osprey("osprey-7b")}
    assert rows["Osprey-7b/model-00002-of-00002.safetensors"].ok

    missing = download.check_osprey("osprey-chat-7b")
    assert [r.status for r in missing] == ["missing"]
    assert "osprey-label download --model osprey-chat-7b" in missing[0].detail
    assert missing[0].where.endswith("models--sunshine-lwt--Osprey-Chat-7b")


def test_hub_unreachable_is_a_network_error_naming_the_repo(hf_cache, monkeypatch):
    from huggingface_hub import constants, snapshot_download

    monkeypatch.setattr(constants, "ENDPOINT", closed_port_url().split("/segment")[0])
    with pytest.raises(
        download.NetworkUnavailableError, match="cannot reach the Hugging Face Hub.*Osprey-7b"
    ):
        download.fetch_osprey("osprey-7b", snapshot_download=snapshot_download)  # the real client
    with pytest.raises(ValueError, match="unknown Osprey model"):
        download.fetch_osprey("osprey-13b")


# ---------------------------------------------------------------------------------------------- CLI


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_download_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["download", *argv])


def test_cli_fetches_everything_then_check_passes(tmp_path, hf_cache, sam_server, fake_sam, capsys):
    entry, data = fake_sam
    sam_server.files[entry.name] = data
    hub = FakeHub(hf_cache, {OSPREY_REPO: osprey_repo_files(), CLIP_REPO: CLIP_REPO_FILES})
    where = ("--model-dir", str(tmp_path / "models"), "--sam-base-url", sam_server.base_url)

    assert parse("--check", "--sam", "vit_b").func is run_download
    assert run_download(parse("--check", "--sam", "vit_b", *where)) == 1
    out = capsys.readouterr().out
    assert out.count("missing") >= 2 and entry.name in out

    assert run_download(parse("--sam", "vit_b", "--quiet", *where), snapshot_download=hub) == 0
    out = capsys.readouterr().out
    assert f"{entry.name}: fetched and verified" in out
    assert (tmp_path / "models" / entry.name).is_file()
    assert "OSPREY_MODEL=osprey-7b SAM_MODEL=vit_b MODEL_DIR=" in out
    assert run_download(parse("--check", "--sam", "vit_b", *where)) == 0
    out = capsys.readouterr().out
    assert "missing" not in out and " bad" not in out and entry.name in out

    assert run_download(parse("--sam", "vit_b", "--model", "none", "--quiet", *where)) == 0
    assert "already present and verified" in capsys.readouterr().out


def test_cli_dir_puts_everything_in_one_folder(tmp_path, hf_cache, sam_server, fake_sam, capsys):
    entry, data = fake_sam
    sam_server.files[entry.name] = data
    hub = FakeHub(hf_cache, {OSPREY_REPO: osprey_repo_files(), CLIP_REPO: CLIP_REPO_FILES})
    folder = tmp_path / "w"
    args = parse("--sam", "vit_b", "--dir", str(folder), "--sam-base-url", sam_server.base_url, "--quiet")
    assert run_download(args, snapshot_download=hub) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["Osprey-7b", entry.name]
    assert f"OSPREY_MODEL={folder / 'Osprey-7b'}" in capsys.readouterr().out


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend.service", "download", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_cli_offline_gives_a_clear_error_and_how_to_copy_by_hand(tmp_path):
    dead = closed_port_url()
    env = {
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_ENDPOINT": dead.split("/segment")[0],
        "SAM_BASE_URL": dead,
        "MODEL_DIR": str(tmp_path / "models"),
    }
    result = run_cli("--sam", "vit_b", "--quiet", **env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        "cannot reach the Hugging Face Hub" in result.stderr
        and "cannot reach http://127.0.0.1" in result.stderr
    )
    assert "copy sam_vit_b_01ec64.pth (358 MB, https://dl.fbaipublicfiles.com" in result.stderr
    assert f"into {tmp_path / 'models'} (MODEL_DIR)" in result.stderr
    assert "OSPREY_MODEL=<that folder>" in result.stderr

    (tmp_path / "models" / "sam_vit_b_01ec64.pth").write_bytes(b"truncated")
    result = run_cli("--check", "--model", "none", "--sam", "vit_b", **env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(r"SAM vit_b sam_vit_b_01ec64.pth .* 9 B  bad", result.stdout), result.stdout
