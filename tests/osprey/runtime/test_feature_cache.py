"""FeatureCache and content_key: LRU, in-flight dedupe, errors, disk persistence."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from osprey.runtime.disk_tier import read_file
from osprey.runtime.feature_cache import FeatureCache, content_key

ROOT = Path(__file__).resolve().parents[3]


@dataclasses.dataclass(frozen=True)
class _Features:
    tensor: torch.Tensor
    size: tuple[int, int]


def _image(seed: int = 0, shape: tuple[int, int] = (8, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


# content_key ------------------------------------------------------------------------------------


def test_content_key_depends_on_pixels_not_on_the_array_object() -> None:
    image = _image()
    assert content_key(image, "m") == content_key(image.copy(), "m")
    # A non-contiguous view with the same pixels hashes like its contiguous copy.
    flipped_view = image[:, ::-1]
    assert content_key(flipped_view, "m") == content_key(np.ascontiguousarray(flipped_view), "m")
    changed = image.copy()
    changed[3, 4, 1] ^= 1
    assert content_key(changed, "m") != content_key(image, "m")


def test_content_key_covers_shape_and_parts() -> None:
    image = _image(shape=(4, 6))
    same_bytes_other_shape = image.reshape(6, 4, 3)
    assert content_key(image) != content_key(same_bytes_other_shape)
    assert content_key(image, "sam_vit_b") != content_key(image, "sam_vit_h")
    assert content_key(image, "ab", "c") != content_key(image, "a", "bc")
    assert len(content_key(image)) == 64


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), [[1, 2, 3]]],
)
def test_content_key_rejects_non_rgb_uint8(bad) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8|numpy array"):
        content_key(bad)


# Memory LRU -------------------------------------------------------------------------------------


def test_lru_hits_misses_and_evictions() -> None:
    cache: FeatureCache[int] = FeatureCache(name="t", max_items=2)
    calls: list[str] = []

    def compute(key: str):
        return lambda: calls.append(key) or len(calls)

    assert cache.get_or_compute("a", compute("a")) == 1
    assert cache.get_or_compute("b", compute("b")) == 2
    assert cache.get_or_compute("a", compute("a")) == 1  # hit; "a" becomes most recent
    assert cache.get_or_compute("c", compute("c")) == 3  # evicts "b", the least recent
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.get_or_compute("b", compute("b")) == 4  # recomputed
    assert calls == ["a", "b", "c", "b"]
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"], stats["items"]) == (1, 4, 2, 2)
    assert stats["disk_hits"] == 0 and stats["disk_bytes"] == 0


def test_exception_propagates_and_nothing_is_cached() -> None:
    cache: FeatureCache[int] = FeatureCache(name="t", max_items=4)

    def boom() -> int:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        cache.get_or_compute("k", boom)
    assert "k" not in cache and len(cache) == 0
    assert cache.get_or_compute("k", lambda: 7) == 7


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_items"):
        FeatureCache(name="t", max_items=0)
    cache: FeatureCache[int] = FeatureCache(name="t", max_items=1)
    with pytest.raises(ValueError, match="cache key"):
        cache.get_or_compute("../etc/passwd", lambda: 1)


def test_clear_drops_items_and_resets_counters(tmp_path) -> None:
    cache: FeatureCache[torch.Tensor] = FeatureCache(name="t", max_items=4, disk_dir=tmp_path)
    cache.get_or_compute("a", lambda: torch.ones(3))
    cache.get_or_compute("a", lambda: torch.ones(3))
    assert list(tmp_path.glob("*.pt"))
    cache.clear()
    stats = cache.stats()
    assert (stats["items"], stats["hits"], stats["misses"], stats["disk_bytes"]) == (0, 0, 0, 0)
    assert not list(tmp_path.glob("*.pt"))


# Concurrency ------------------------------------------------------------------------------------


def test_concurrent_callers_of_one_key_share_one_compute() -> None:
    cache: FeatureCache[object] = FeatureCache(name="t", max_items=4)
    release = threading.Event()
    calls = []

    def slow_compute() -> object:
        calls.append(1)
        assert release.wait(5)
        return object()

    results: list[object] = [None] * 8
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, cache.get_or_compute("k", slow_compute)))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    _wait_for(lambda: cache.stats()["waits"] == 7)  # all but the first are waiting on it
    release.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1
    assert all(r is results[0] for r in results) and results[0] is not None
    assert cache.stats()["misses"] == 1


def test_concurrent_waiters_all_get_the_exception_and_nothing_is_cached() -> None:
    cache: FeatureCache[int] = FeatureCache(name="t", max_items=4)
    release = threading.Event()

    def failing() -> int:
        assert release.wait(5)
        raise OSError("disk gone")

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            cache.get_or_compute("k", failing)
        except OSError as error:
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    _wait_for(lambda: cache.stats()["waits"] == 4)
    release.set()
    for t in threads:
        t.join(5)
    assert len(errors) == 5 and all(str(e) == "disk gone" for e in errors)
    assert len(cache) == 0
    assert cache.get_or_compute("k", lambda: 3) == 3  # the failed key is computed afresh


def test_compute_runs_outside_the_global_lock() -> None:
    """Key "a" computes until key "b" has been computed: a global lock would deadlock here."""
    cache: FeatureCache[str] = FeatureCache(name="t", max_items=4)
    b_done = threading.Event()

    def compute_a() -> str:
        assert b_done.wait(5), "compute of another key was blocked while 'a' was computing"
        return "A"

    thread = threading.Thread(target=lambda: cache.get_or_compute("a", compute_a))
    thread.start()
    _wait_for(lambda: cache.stats()["misses"] == 1)
    assert cache.get_or_compute("b", lambda: "B") == "B"
    b_done.set()
    thread.join(5)
    assert cache.get_or_compute("a", lambda: "recomputed") == "A"


# Disk persistence -------------------------------------------------------------------------------


def test_disk_hit_in_a_new_cache_skips_compute(tmp_path) -> None:
    value = _Features(tensor=torch.arange(6.0).reshape(2, 3), size=(2, 3))
    first: FeatureCache[_Features] = FeatureCache(
        name="t", max_items=2, disk_dir=tmp_path, value_types=[_Features]
    )
    first.get_or_compute("img1", lambda: value)
    assert (tmp_path / "img1.pt").is_file()
    assert not list(tmp_path.glob("*.tmp"))  # temp file replaced, not left behind

    second: FeatureCache[_Features] = FeatureCache(
        name="t", max_items=2, disk_dir=tmp_path, value_types=[_Features]
    )
    loaded = second.get_or_compute("img1", lambda: pytest.fail("should load from disk"))
    assert isinstance(loaded, _Features) and loaded.size == (2, 3)
    assert torch.equal(loaded.tensor, value.tensor) and loaded.tensor.device.type == "cpu"
    stats = second.stats()
    assert (stats["disk_hits"], stats["misses"], stats["items"]) == (1, 0, 1)
    assert stats["disk_bytes"] == (tmp_path / "img1.pt").stat().st_size
    assert second.get_or_compute("img1", lambda: pytest.fail("memory hit expected")) is loaded


def test_disk_is_bounded_by_evicting_the_oldest(tmp_path) -> None:
    probe: FeatureCache[torch.Tensor] = FeatureCache(name="probe", max_items=1, disk_dir=tmp_path / "probe")
    probe.get_or_compute("x", lambda: torch.zeros(256))
    one_file = probe.stats()["disk_bytes"]

    cache: FeatureCache[torch.Tensor] = FeatureCache(
        name="t", max_items=1, disk_dir=tmp_path / "c", max_disk_bytes=int(2.5 * one_file)
    )
    for i, key in enumerate(["k0", "k1"]):
        cache.get_or_compute(key, lambda: torch.zeros(256))
        os.utime(tmp_path / "c" / f"{key}.pt", (1000 + i, 1000 + i))  # k0 older than k1
    cache.get_or_compute("k2", lambda: torch.zeros(256))
    assert sorted(p.name for p in (tmp_path / "c").glob("*.pt")) == ["k1.pt", "k2.pt"]
    assert cache.stats()["disk_bytes"] <= int(2.5 * one_file)


def test_corrupt_disk_file_is_logged_deleted_and_recomputed(tmp_path, caplog) -> None:
    (tmp_path / "bad.pt").write_bytes(b"this is not a torch file")
    cache: FeatureCache[torch.Tensor] = FeatureCache(name="t", max_items=2, disk_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="osprey.runtime"):
        value = cache.get_or_compute("bad", lambda: torch.full((2,), 5.0))
    assert torch.equal(value, torch.full((2,), 5.0))
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    stats = cache.stats()
    assert (stats["misses"], stats["disk_hits"]) == (1, 0)
    # The recomputed value replaced the corrupt file and loads in a fresh cache.
    fresh: FeatureCache[torch.Tensor] = FeatureCache(name="t", max_items=2, disk_dir=tmp_path)
    assert torch.equal(fresh.get_or_compute("bad", lambda: pytest.fail("expected disk hit")), value)


# tiers in bytes -----------------------------------------------------------------------------------


def _value(seed: int, floats: int = 1024) -> _Features:
    return _Features(torch.full((floats,), float(seed)), (seed, seed))  # 4 KiB of tensor


def test_device_tier_evicts_by_bytes_and_a_value_over_the_budget_is_not_kept() -> None:
    cache = FeatureCache(name="t", max_bytes=int(2.5 * 4096))
    for i in range(3):
        cache.get_or_compute(f"k{i}", lambda i=i: _value(i))
    stats = cache.stats()
    assert (stats["items"], stats["bytes"], stats["evictions"]) == (2, 2 * 4096, 1)
    assert "k0" not in cache and "k2" in cache
    big = cache.get_or_compute("big", lambda: _value(9, floats=4096))  # 16 KiB: over the budget alone
    assert big.tensor.numel() == 4096 and "big" not in cache and cache.stats()["bytes"] <= 2.5 * 4096


def test_host_tier_keeps_the_slim_form_of_what_the_device_evicts_and_restore_rebuilds_it() -> None:
    slimmed, restored = [], []

    def slim(value: _Features) -> _Features:
        slimmed.append(value.size)
        return _Features(value.tensor[:256].clone(), value.size)  # a quarter: the cheap-to-store part

    def restore(kept: _Features) -> _Features:
        restored.append(kept.size)
        return _Features(kept.tensor.repeat(4), kept.size)

    cache = FeatureCache(name="t", max_items=1, host_max_bytes=1024, slim=slim)
    computed = []

    def compute(i):
        computed.append(i)
        return _value(i)

    cache.get_or_compute("a", lambda: compute(0), restore)
    cache.get_or_compute("b", lambda: compute(1), restore)  # "a" demoted: slim, on the host
    stats = cache.stats()
    assert (stats["items"], stats["host_items"], stats["host_bytes"]) == (1, 1, 1024)
    again = cache.get_or_compute("a", lambda: compute(0), restore)  # from the host: no compute
    assert computed == [0, 1] and restored == [(0, 0)] and torch.equal(again.tensor, _value(0).tensor)
    stats = cache.stats()
    assert stats["host_hits"] == 1 and stats["items"] == 1 and stats["host_items"] == 1  # "b" demoted now
    cache.get_or_compute("c", lambda: compute(2), restore)  # "a" demoted, pushes "b" out of the host
    assert cache.stats()["host_evictions"] == 1 and cache.peek("b", restore) is None


def test_disk_tier_writes_only_the_slim_form(tmp_path) -> None:
    cache = FeatureCache(
        name="t", max_items=2, disk_dir=tmp_path, value_types=[_Features],
        slim=lambda v: _Features(v.tensor[:8].clone(), v.size),
    )  # fmt: skip
    cache.get_or_compute("a", lambda: _value(3))
    (path,) = tmp_path.glob("*.pt")
    on_disk = read_file(path)
    assert on_disk.tensor.numel() == 8 and on_disk.size == (3, 3)
    fresh = FeatureCache(name="t", max_items=2, disk_dir=tmp_path, value_types=[_Features])
    got = fresh.get_or_compute(
        "a", lambda: pytest.fail("recomputed"), lambda kept: _Features(kept.tensor.repeat(128), kept.size)
    )
    assert torch.equal(got.tensor, _value(3).tensor) and fresh.stats()["disk_hits"] == 1


# Disk files that verify what they read, leftovers of killed writers, the budget -------------------


def payload(path: Path) -> bytes:
    """What ``torch.save`` wrote into a cache file, without the checksum line in front of it."""
    header, _, rest = path.read_bytes().partition(b"\n")
    assert header.startswith(b"osprey-feature-cache/1 sha256:") and len(header) == 30 + 64
    return rest


def flip_inside(path: Path, tensor: torch.Tensor) -> None:
    """Flip one low mantissa bit of an element in the middle of ``tensor``'s bytes as stored in ``path``
    (so the file still loads, with a value off by a few 1e-5)."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().cpu().numpy().tobytes()
    at = bytes(data).find(raw[:256])
    assert at > 0, "the tensor's bytes are not stored contiguously"
    data[at + 129] ^= 0x01  # element 32's second byte (little endian float32): a relative change ~ 2^-15
    path.write_bytes(bytes(data))


def test_a_file_whose_tensor_bytes_changed_is_caught_deleted_and_recomputed(tmp_path, caplog) -> None:
    def compute() -> _Features:
        return _Features(torch.linspace(-1.0, 1.0, 4096), (64, 64))

    FeatureCache(name="t", max_items=2, disk_dir=tmp_path, value_types=[_Features]).get_or_compute(
        "img", compute
    )
    path = tmp_path / "img.pt"
    flip_inside(path, compute().tensor)
    tampered = torch.load(io.BytesIO(payload(path)), weights_only=True)  # loads: only a checksum tells
    difference = (tampered.tensor - compute().tensor).abs().max().item()
    assert 0 < difference < 1e-3
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_file(path)

    calls = []
    fresh = FeatureCache(name="t", max_items=2, disk_dir=tmp_path, value_types=[_Features])
    with caplog.at_level(logging.WARNING, logger="osprey.runtime"):
        got = fresh.get_or_compute("img", lambda: calls.append(1) or compute())
    assert calls == [1] and torch.equal(got.tensor, compute().tensor)
    assert "deleting unreadable file img.pt (checksum mismatch" in caplog.text
    assert (fresh.stats()["misses"], fresh.stats()["disk_hits"]) == (1, 0)
    again = FeatureCache(name="t", max_items=2, disk_dir=tmp_path, value_types=[_Features])  # rewritten whole
    assert torch.equal(
        again.get_or_compute("img", lambda: pytest.fail("recomputed")).tensor, compute().tensor
    )


def test_a_file_copied_under_another_key_is_not_served(tmp_path) -> None:
    cache: FeatureCache[torch.Tensor] = FeatureCache(name="t", max_items=2, disk_dir=tmp_path)
    cache.get_or_compute("a", lambda: torch.zeros(8))
    (tmp_path / "b.pt").write_bytes((tmp_path / "a.pt").read_bytes())
    fresh: FeatureCache[torch.Tensor] = FeatureCache(name="t", max_items=2, disk_dir=tmp_path)
    assert torch.equal(fresh.get_or_compute("b", lambda: torch.ones(8)), torch.ones(8))


def test_a_file_written_before_checksums_is_recomputed(tmp_path, caplog) -> None:
    torch.save(torch.full((4,), 7.0), tmp_path / "old.pt")  # what earlier versions wrote
    cache: FeatureCache[torch.Tensor] = FeatureCache(name="t", max_items=2, disk_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="osprey.runtime"):
        assert torch.equal(cache.get_or_compute("old", lambda: torch.full((4,), 8.0)), torch.full((4,), 8.0))
    assert "old.pt (no checksum header" in caplog.text
    assert torch.equal(read_file(tmp_path / "old.pt"), torch.full((4,), 8.0))  # rewritten with a checksum


def test_changed_bytes_in_a_stored_encoding_give_the_answers_of_a_fresh_compute(tiny_osprey, scene, tmp_path):
    from osprey.inference.api import image_feature_cache
    from osprey.inference.fields import LabelRequest

    calls = []
    hook = tiny_osprey.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    request = LabelRequest(categories=("cat", "dog"), attributes=("red",))
    try:
        tiny_osprey.cache = image_feature_cache(max_images=2, disk_dir=tmp_path)
        fresh = tiny_osprey.label(scene["image"], scene["masks"][:2], request)
        (path,) = tmp_path.glob("*.pt")
        stored = torch.load(io.BytesIO(payload(path)), weights_only=True)
        tensors = [getattr(stored, f.name) for f in dataclasses.fields(stored)]
        largest = max((t for t in tensors if isinstance(t, torch.Tensor)), key=torch.Tensor.numel)
        flip_inside(path, largest)
        tiny_osprey.cache = image_feature_cache(max_images=2, disk_dir=tmp_path)  # a restarted process
        again = tiny_osprey.label(scene["image"], scene["masks"][:2], request)
        assert len(calls) == 2  # not served from the altered file: encoded again
        for a, b in zip(again, fresh, strict=True):
            assert a.category.scores == b.category.scores and a.attributes == b.attributes
    finally:
        hook.remove()
        tiny_osprey.cache = None


WRITER = """
import os, sys, time
from pathlib import Path

import torch

from osprey.runtime.feature_cache import FeatureCache


def stall(src, dst):  # SIGKILLed here: the temporary file is written, never renamed
    Path(sys.argv[2]).write_text(str(src))
    time.sleep(600)


os.replace = stall
FeatureCache(name="t", max_items=1, disk_dir=sys.argv[1]).put("k", torch.zeros(1 << 18))
"""


def test_a_writer_killed_mid_write_leaves_a_file_the_next_open_removes(tmp_path, caplog) -> None:
    folder, ready = tmp_path / "cache", tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(ready)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the writer did not start writing (exit code {process.poll()})"
        half = Path(ready.read_text())
        assert (
            half.parent == folder
            and half.name.startswith(f".k.{process.pid}.")
            and half.name.endswith(".tmp")
        )
        assert half.stat().st_size > 1 << 20
        alive: FeatureCache[torch.Tensor] = FeatureCache(name="t", max_items=1, disk_dir=folder)
        assert half.is_file()  # its writer is alive: kept
        assert alive.stats()["disk_bytes"] == 0  # and counted against nothing
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    assert process.returncode == -signal.SIGKILL and half.is_file()  # kill -9 left it behind

    with caplog.at_level(logging.WARNING, logger="osprey.runtime"):
        reopened: FeatureCache[torch.Tensor] = FeatureCache(name="t", max_items=1, disk_dir=folder)
    assert not half.exists()
    assert f"removed {half}, left by a writer that did not finish" in caplog.text
    reopened.get_or_compute("k", lambda: torch.ones(4))
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "k.pt"]


def test_leftovers_of_dead_writers_go_at_open_and_a_live_writers_file_stays(tmp_path) -> None:
    dead = [tmp_path / ".k1.999999.0123456789abcdef0123456789abcdef.tmp", tmp_path / ".k2.x7_ab3qz.tmp"]
    for path in dead:  # a dead pid's name, and the name an earlier version's writer used
        path.write_bytes(b"\0" * 4096)
    live = tmp_path / f".k3.{os.getpid()}.fedcba9876543210fedcba9876543210.tmp"
    kept = [tmp_path / "notes.txt", tmp_path / "k4.tmp", live]
    for path in kept:
        path.write_bytes(b"x")
    holder = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # a writer in this process, mid-write
        FeatureCache(name="t", max_items=1, disk_dir=tmp_path)
        assert not any(path.exists() for path in dead) and all(path.exists() for path in kept)
    finally:
        os.close(holder)
    FeatureCache(name="t", max_items=1, disk_dir=tmp_path)  # its writer gone now
    assert not live.exists() and (tmp_path / "notes.txt").exists()


def _fill(folder: Path, count: int, floats: int = 1024) -> int:
    """``count`` files of ``floats`` float32 each, oldest first (one second apart); returns one's size."""
    cache: FeatureCache[torch.Tensor] = FeatureCache(
        name="fill", max_items=1, disk_dir=folder, max_disk_bytes=2**30
    )
    for i in range(count):
        cache.put(f"f{i}", torch.full((floats,), float(i)))
        os.utime(folder / f"f{i}.pt", (1000 + i, 1000 + i))
    return (folder / "f0.pt").stat().st_size


def folder_bytes(folder: Path) -> int:
    """Bytes of every file in ``folder``, counted while no writer can change it (writers evict and write
    under the folder's ``.lock``), temporary files included."""
    fd = os.open(folder / ".lock", os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    finally:
        os.close(fd)


def test_a_folder_over_its_budget_is_brought_under_it_at_open(tmp_path, caplog) -> None:
    one = _fill(tmp_path, 8)
    assert folder_bytes(tmp_path) == 8 * one
    with caplog.at_level(logging.INFO, logger="osprey.runtime"):
        cache: FeatureCache[torch.Tensor] = FeatureCache(
            name="t", max_items=1, disk_dir=tmp_path, max_disk_bytes=int(3.5 * one)
        )
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["f5.pt", "f6.pt", "f7.pt"]  # the newest
    assert folder_bytes(tmp_path) <= int(3.5 * one) and cache.stats()["disk_bytes"] == 3 * one
    assert "evicted the 5 oldest files" in caplog.text
    assert torch.equal(
        cache.get_or_compute("f7", lambda: pytest.fail("recomputed")), torch.full((1024,), 7.0)
    )


def test_the_budget_holds_after_many_writes_from_several_threads(tmp_path) -> None:
    one = _fill(tmp_path / "probe", 1)
    budget = int(5.5 * one)
    cache: FeatureCache[torch.Tensor] = FeatureCache(
        name="t", max_items=1, disk_dir=tmp_path / "c", max_disk_bytes=budget
    )
    peaks, errors = [], []

    def write(worker: int) -> None:
        rng = np.random.default_rng(worker)
        try:
            for i in range(25):
                floats = int(rng.integers(64, 2048))
                cache.get_or_compute(f"w{worker}-{i}", lambda floats=floats: torch.zeros(floats))
                peaks.append(folder_bytes(tmp_path / "c"))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(peaks) == 100
    assert max(peaks) <= budget and folder_bytes(tmp_path / "c") <= budget
    assert cache.stats()["disk_bytes"] <= budget and cache.stats()["disk_items"] >= 3
    big = cache.get_or_compute("big", lambda: torch.zeros(2 * budget // 4))  # over the budget alone
    assert big.numel() == 2 * budget // 4 and not (tmp_path / "c" / "big.pt").exists()
    assert cache.stats()["disk_items"] >= 3  # nothing was evicted for a value that cannot fit
