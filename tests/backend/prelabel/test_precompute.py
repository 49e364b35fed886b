"""``osprey-label precompute`` fills the on-disk caches that a restarted backend then reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lsfakes import API_KEY, scene_png

from backend.prelabel.precompute import precompute, task_image_references
from backend.runtime.models import load_models
from backend.runtime.runtime import image_loader
from backend.runtime.settings import Settings


def settings_for(file_store, cache_dir) -> Settings:
    return Settings.from_env(
        {}, label_studio_url=file_store.url, label_studio_api_key=API_KEY, osprey_model="tiny", sam_model="tiny",
        device="cpu", cache_dir=str(cache_dir),
    )  # fmt: skip


def encode(settings: Settings, refs: list[str]):
    """What the command does: fresh models with their disk tier, the service's image loader."""
    return precompute(load_models(settings, device="cpu"), image_loader(settings, cache_size=1), refs)


def test_precompute_encodes_each_task_image_once_and_survives_a_restart(file_store, tmp_path):
    for i in range(2):
        file_store.add(f"/data/upload/3/img{i}.png", scene_png(seed=10 + i))
    tasks = [{"id": i, "data": {"image": f"/data/upload/3/img{i % 2}.png"}} for i in range(3)]  # one repeat
    tasks.append({"id": 9, "data": {"image": "/data/upload/3/missing.png"}})
    task_file = tmp_path / "tasks.json"
    task_file.write_text(json.dumps(tasks))
    refs = task_image_references(task_file, "image")
    assert refs == ["/data/upload/3/img0.png", "/data/upload/3/img1.png", "/data/upload/3/missing.png"]

    report = encode(settings_for(file_store, tmp_path / "cache"), refs)
    assert report.encoded == {"sam": 2, "osprey": 2}
    assert [error for _, error in report.failed] and "404" in report.failed[0][1]
    assert len(list((tmp_path / "cache" / "osprey").glob("*.pt"))) == 2
    assert len(list((tmp_path / "cache" / "sam").glob("*.pt"))) == 2

    again = encode(settings_for(file_store, tmp_path / "cache"), refs)  # a new process: new models
    assert again.encoded == {} and again.already_cached == {"sam": 2, "osprey": 2}


def test_precompute_command_reads_a_folder_and_shows_progress(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(scene_png(seed=20 + i))
    (folder / "notes.txt").write_text("not an image")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OSPREY_MODEL="tiny", SAM_MODEL="tiny", OSPREY_DEVICE="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "backend.service", "precompute", str(folder), "--cache-dir", str(tmp_path / "c"), "--only", "sam"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 images" in result.stdout and "encoded {'sam': 2}" in result.stdout
    assert "encoding images" in result.stderr and "2/2" in result.stderr  # the tqdm progress bar
    missing = subprocess.run(
        [sys.executable, "-m", "backend.service", "precompute", str(folder)], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "OSPREY_CACHE_DIR" in missing.stderr
