"""``osprey-label label`` as a user runs it: a real process, real image and mask files."""

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "backend.service", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def json_run(scene):
    args = ["label", "--model", "tiny", "--image", str(scene["image_path"])]
    for path in scene["mask_paths"][:2]:
        args += ["--mask", str(path)]
    args += ["--categories", "cat,dog", "--parts", "head,tail", "--attributes", "red,round", "--caption"]
    args += ["--description", "--max-caption-tokens", "4", "--max-description-tokens", "6", "--device", "cpu"]
    return run_cli(*args, "--json"), run_cli(*args, "--json", "--baseline")


def test_label_prints_one_result_per_mask_as_json(json_run, scene):
    fast, base = json_run
    assert fast.returncode == 0, fast.stderr
    doc = json.loads(fast.stdout)
    assert doc["model"] == "tiny" and doc["untrained"] is True
    assert [r["mask"] for r in doc["regions"]] == [str(p) for p in scene["mask_paths"][:2]]
    for region in doc["regions"]:
        assert region["category"]["label"] in {"cat", "dog"}
        assert region["part"]["label"] in {"head", "tail"}
        assert set(region["attributes"]) == {"red", "round"}
        assert isinstance(region["caption"], str) and isinstance(region["description"], str)
        assert "untrained" in region["warning"]


def test_baseline_flag_gives_the_same_answers(json_run):
    fast, base = (json.loads(r.stdout)["regions"] for r in json_run)
    for f, b in zip(fast, base, strict=True):
        assert f["caption"] == b["caption"] and f["description"] == b["description"]
        assert f["category"]["label"] == b["category"]["label"]
        assert f["category"]["score"] == pytest.approx(b["category"]["score"], abs=1e-4)


def test_text_output_warns_about_random_weights(scene):
    result = run_cli(
        "label", "--model", "tiny", "--image", str(scene["image_path"]), "--mask", str(scene["mask_paths"][0]),
        "--categories", "cat,dog", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stdout and "category: " in result.stdout


def test_bad_input_exits_2_with_a_message(scene, tmp_path):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("L", (10, 10), 255).save(small)
    result = run_cli(
        "label", "--model", "tiny", "--image", str(scene["image_path"]), "--mask", str(small), "--caption"
    )
    assert result.returncode == 2
    assert "masks must be at the image's resolution" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(
        "label", "--model", "nope", "--image", str(scene["image_path"]), "--mask", str(small), "--caption"
    )
    assert result.returncode == 2 and "neither a checkpoint directory nor a known model" in result.stderr
