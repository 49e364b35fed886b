"""Fixtures of the pre-label tests: ``ls``, a fault-injecting Label Studio over real HTTP with project 7
(captions_only.xml) and 40 tasks, ids 100..139, each with its own PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
from lsapi_server import FaultyLabelStudio
from lsfakes import scene_png

CONFIG = (Path(__file__).resolve().parents[3] / "label_configs" / "captions_only.xml").read_text()


@pytest.fixture
def ls():
    fake = FaultyLabelStudio()
    fake.add_project(7, CONFIG)
    for i in range(40):
        fake.add_task(7, 100 + i, {"image": fake.add_file(f"/data/upload/7/{i}.png", scene_png(seed=i))})
    yield fake
    fake.close()
