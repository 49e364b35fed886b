"""Fixtures for the backend tests: Label Studio's upload storage over real HTTP, the tiny models."""

from __future__ import annotations

import pytest
from lsfakes import FileStore


@pytest.fixture(scope="session")
def file_store():
    store = FileStore()
    yield store
    store.close()


@pytest.fixture(scope="session")
def tiny_models():
    """Tiny Osprey + tiny SAM, loaded once for the backend tests."""
    from backend.runtime.models import load_models
    from backend.runtime.settings import Settings

    settings = Settings.from_env(
        {}, osprey_model="tiny", sam_model="tiny", device="cpu", points_per_side=4, max_masks=3,
        pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=0,
    )  # fmt: skip
    return load_models(settings, device="cpu")
