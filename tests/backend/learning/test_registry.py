"""Model registry: atomic versions, promotion, rollback, the promotion gate."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backend.learning.registry import ModelRegistry, RegistryError, not_worse

ROOT = Path(__file__).resolve().parents[3]


def write_weights(payload: str):
    def write(folder):
        (folder / "head").mkdir()
        (folder / "head" / "weights.json").write_text(json.dumps({"w": payload}))
        return {"train_examples": 10, "metrics": {"category_accuracy": 0.5}}

    return write


def test_versions_are_numbered_written_whole_and_listed(tmp_path):
    registry = ModelRegistry(root=tmp_path)
    first = registry.create("7", kind="head", base_model_version="tiny+sam-tiny", write=write_weights("a"))
    second = registry.create("7", kind="head", base_model_version="tiny+sam-tiny", write=write_weights("b"))
    assert [v.version for v in registry.versions("7")] == ["v0001", "v0002"]
    assert second.model_version() == "tiny+sam-tiny+p7-v0002"
    assert json.loads((registry.path("7", "v0001") / "head" / "weights.json").read_text()) == {"w": "a"}
    assert first.train_examples == 10 and first.metrics == {"category_accuracy": 0.5}
    assert registry.current("7") is None  # written is not promoted


def test_a_crash_while_writing_leaves_no_version(tmp_path):
    registry = ModelRegistry(root=tmp_path)

    def crash(folder):
        (folder / "head").mkdir()
        (folder / "head" / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        registry.create("7", kind="head", base_model_version="b", write=crash)
    assert registry.versions("7") == []
    assert not list((tmp_path / "7").glob(".tmp-*"))
    # A process killed outright leaves its temporary folder: it is never listed, and is cleaned up.
    (tmp_path / "7" / ".tmp-deadbeef").mkdir()
    (tmp_path / "7" / ".tmp-deadbeef" / "meta.json").write_text("{}")
    assert registry.versions("7") == []
    assert registry.clean_unfinished("7") == 1


def test_promote_and_rollback_walk_the_history(tmp_path):
    registry = ModelRegistry(root=tmp_path)
    for payload in "abc":
        registry.create("7", kind="head", base_model_version="b", write=write_weights(payload))
    stamp0 = registry.current_stamp("7")
    registry.promote("7", "v0001")
    registry.promote("7", "v0003")
    assert registry.current("7").version == "v0003"
    assert registry.current_stamp("7") != stamp0
    assert registry.rollback("7").version == "v0001"
    assert registry.rollback("7") is None  # back to the base model
    assert registry.current("7") is None
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback("7")
    with pytest.raises(RegistryError, match=r"no version 'v0009' \(versions: v0001, v0002, v0003\)"):
        registry.promote("7", "v0009")
    assert [(h["action"], h["version"]) for h in registry.history("7")] == [
        ("promote", "v0001"), ("promote", "v0003"), ("rollback", "v0001"), ("rollback", None)]  # fmt: skip


def _create_many(root: str, count: int) -> None:
    registry = ModelRegistry(root=root)
    for _ in range(count):
        registry.create("9", kind="head", base_model_version="b", write=write_weights("p"))


def test_concurrent_writers_get_distinct_versions(tmp_path):
    threads = [threading.Thread(target=_create_many, args=(str(tmp_path), 3)) for _ in range(3)]
    processes = [multiprocessing.get_context("spawn").Process(target=_create_many, args=(str(tmp_path), 3))
                 for _ in range(2)]  # fmt: skip
    for worker in [*threads, *processes]:
        worker.start()
    for worker in [*threads, *processes]:
        worker.join(timeout=120)
    versions = [v.version for v in ModelRegistry(root=tmp_path).versions("9")]
    assert versions == [f"v{i:04d}" for i in range(1, 16)]


def test_the_gate_refuses_a_worse_candidate():
    assert not_worse({"acc": 0.9, "map": 0.8}, {"acc": 0.85, "map": 0.8}) == (
        True, "no metric worse than the current version")  # fmt: skip
    ok, reason = not_worse({"acc": 0.8, "map": 0.9}, {"acc": 0.85, "map": 0.8})
    assert not ok and reason == "acc 0.8000 < current 0.8500"
    assert not_worse({"acc": 0.84}, {"acc": 0.85}, tolerance=0.02)[0]
    assert not not_worse({}, {"acc": 0.1})[0]


def test_bad_project_ids_are_refused(tmp_path):
    with pytest.raises(RegistryError, match="project id"):
        ModelRegistry(root=tmp_path).versions("../etc")


def test_models_command_lists_promotes_and_rolls_back(tmp_path, capsys):
    from backend.cli import main

    registry = ModelRegistry(root=tmp_path)
    for payload in "ab":
        registry.create("7", kind="head", base_model_version="tiny+sam-tiny", write=write_weights(payload))
    assert main(["models", "list", "7", "--model-dir", str(tmp_path)]) == 0
    assert "current: base model" in capsys.readouterr().out
    assert main(["models", "promote", "7", "v0002", "--model-dir", str(tmp_path)]) == 0
    assert "now serving tiny+sam-tiny+p7-v0002" in capsys.readouterr().out
    main(["models", "list", "7", "--model-dir", str(tmp_path)])
    listing = capsys.readouterr().out
    assert "* v0002" in listing and "  v0001" in listing and "category_accuracy 0.500" in listing
    assert main(["models", "rollback", "7", "--model-dir", str(tmp_path)]) == 0
    assert "now serving the base model" in capsys.readouterr().out
    assert main(["models", "promote", "7", "v0042", "--model-dir", str(tmp_path)]) == 2
    assert "no version 'v0042'" in capsys.readouterr().err


def test_reading_an_unknown_project_creates_nothing(tmp_path):
    registry = ModelRegistry(root=tmp_path)
    assert registry.current("42") is None and registry.versions("42") == [] and registry.history("42") == []
    assert registry.current_stamp("42") == 0
    assert not (tmp_path / "42").exists()


# --- what a killed writer leaves behind, removed at start ------------------------------------------


def test_starting_removes_unfinished_writes_and_keeps_every_version(tmp_path, caplog):
    registry = ModelRegistry(root=tmp_path)
    for payload in "ab":
        registry.create("7", kind="head", base_model_version="b", write=write_weights(payload))
    registry.promote("7", "v0001")
    half = tmp_path / "7" / ".tmp-0123456789abcdef0123456789abcdef"  # killed before its rename
    (half / "head").mkdir(parents=True)
    (half / "head" / "weights.json").write_text('{"w": "hal')
    only = tmp_path / "8" / ".tmp-fedcba9876543210fedcba9876543210"  # a first write, killed
    only.mkdir(parents=True)
    pointer = tmp_path / "7" / ".CURRENT.00112233445566778899aabbccddeeff.tmp"  # killed mid-promotion
    pointer.write_text("v0002")
    kept = [tmp_path / "7" / "notes.txt", tmp_path / "7" / ".tmp-not-ours", tmp_path / "training.sqlite3"]
    for path in kept:
        path.write_text("x")
    before = {p: p.read_bytes() for p in (tmp_path / "7").rglob("*") if p.is_file() and half not in p.parents}
    before.pop(pointer)

    with caplog.at_level("WARNING", logger="backend.learning.registry"):
        started = ModelRegistry(root=tmp_path)

    assert not half.exists() and not only.exists() and not pointer.exists()
    assert {p: p.read_bytes() for p in (tmp_path / "7").rglob("*") if p.is_file()} == before
    assert [v.version for v in started.versions("7")] == ["v0001", "v0002"]
    assert started.current("7").version == "v0001"
    assert started.history("7")[-1]["version"] == "v0001"
    assert all(path.exists() for path in kept)
    for path in (half, only, pointer):
        assert f"removed {path}, left by a write that did not finish" in caplog.text
    assert started.remove_unfinished() == []  # nothing left to remove


def test_a_write_in_progress_is_not_taken_for_a_leftover(tmp_path):
    registry = ModelRegistry(root=tmp_path)
    writing, finish = threading.Event(), threading.Event()

    def slow(folder):
        (folder / "head").mkdir()
        (folder / "head" / "weights.json").write_text("{}")
        writing.set()
        assert finish.wait(30)
        return {"train_examples": 3}

    writer = threading.Thread(
        target=lambda: registry.create("7", kind="head", base_model_version="b", write=slow)
    )
    writer.start()
    assert writing.wait(30)
    (in_progress,) = (tmp_path / "7").glob(".tmp-*")
    assert ModelRegistry(root=tmp_path).remove_unfinished() == []  # its writer holds it
    assert (in_progress / "head" / "weights.json").is_file()
    finish.set()
    writer.join(30)
    assert registry.info("7", "v0001").train_examples == 3
    assert not list((tmp_path / "7").glob(".tmp-*"))


WRITER = """
import sys, time
from pathlib import Path
from backend.learning.registry import ModelRegistry

def write(folder):
    (folder / "head").mkdir()
    (folder / "head" / "head.safetensors").write_bytes(bytes(1 << 20))
    Path(sys.argv[2]).write_text(str(folder))
    time.sleep(600)  # killed here, mid-write

ModelRegistry(root=sys.argv[1]).create("7", kind="head", base_model_version="b", write=write)
"""


def test_a_writer_killed_with_sigkill_leaves_a_folder_the_next_start_removes(tmp_path):
    root = tmp_path / "models"
    ModelRegistry(root=root).create("7", kind="head", base_model_version="b", write=write_weights("a"))
    ready = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(ready)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the writer did not start writing (exit code {process.poll()})"
        half = Path(ready.read_text())
        assert half.parent == root / "7" and half.name.startswith(".tmp-")
        assert ModelRegistry(root=root).remove_unfinished() == []  # alive: its folder is kept
        assert half.is_dir()
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    assert process.returncode == -signal.SIGKILL and half.is_dir()  # kill -9 left it behind

    started = ModelRegistry(root=root)
    assert not half.exists()
    assert [v.version for v in started.versions("7")] == ["v0001"]
    assert json.loads((started.path("7", "v0001") / "head" / "weights.json").read_text()) == {"w": "a"}
    assert (
        started.create("7", kind="head", base_model_version="b", write=write_weights("b")).version == "v0002"
    )
