"""The model version a process can name without loading the models (``prelabel --ray``'s driver) is
the one loading them gives, and a runtime built without models coordinates without a device."""

from __future__ import annotations

import threading

import pytest

from backend.runtime.models import base_version, load_models
from backend.runtime.runtime import build_runtime
from backend.runtime.settings import Settings


def settings_for(tmp_path, model: str) -> Settings:
    return Settings.from_env(
        {}, model_dir=tmp_path / "models", region_model=model, sam_model="tiny", device="cpu", points_per_side=4,
        max_masks=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pixelrefer_checkpoint(tmp_path_factory):
    """A PixelRefer-Lite checkpoint in the authors' layout: a released model is named by its folder."""
    from osprey.inference.region_model import load_region_model
    from osprey.pixelrefer.loading import save_released_layout

    tiny = load_region_model("pixelrefer-lite-tiny", device="cpu")
    return save_released_layout(
        tiny.model, tiny.tokenizer, tmp_path_factory.mktemp("ckpt") / "PixelRefer-Lite-ours"
    )


@pytest.mark.parametrize("model", ["tiny", "pixelrefer-lite-tiny", "checkpoint"])
def test_the_version_named_without_loading_is_the_loaded_models_version(
    tmp_path, model, pixelrefer_checkpoint
):
    settings = settings_for(tmp_path, str(pixelrefer_checkpoint) if model == "checkpoint" else model)
    named = base_version(settings)
    assert named == load_models(settings, device="cpu").version
    if model == "checkpoint":
        assert named == "PixelRefer-Lite-ours+sam-tiny-untrained"  # SAM tiny has random weights


def test_a_released_model_that_is_not_here_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-model"):
        base_version(settings_for(tmp_path, str(tmp_path / "missing-model")))


def test_a_runtime_without_models_knows_versions_and_claims_but_never_predicts(tmp_path):
    before = set(threading.enumerate())
    with build_runtime(settings_for(tmp_path, "tiny"), load_models=False) as runtime:
        assert runtime.models is None
        assert runtime.projects.version("7") == "tiny+sam-tiny-untrained"
        claimer = runtime.claimer("7", "tiny+sam-tiny-untrained", "prelabel")
        assert claimer.claim([1, 2]) == {1, 2}
        with pytest.raises(RuntimeError, match="without models"):
            runtime.tasks_for("7")
        with pytest.raises(RuntimeError, match="without models"):
            runtime.start()
    assert runtime.close() and runtime.threads() == []
    assert {t for t in threading.enumerate() if t not in before and t.is_alive()} == set()
