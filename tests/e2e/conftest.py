"""Session fixtures for the end-to-end suite: one real Label Studio and one ``osprey-label serve``
(tiny models) on 127.0.0.1, both stopped when the session ends."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from labelstudio import (
    LabelStudioAPI,
    ensure_label_studio,
    personal_access_token,
    skip_or_fail,
    start_label_studio,
)
from serving import ROOT, free_port, start_backend, tiny_backend_env


@dataclass
class LabelStudio:
    url: str
    token: str  # the admin's personal access token
    api: LabelStudioAPI


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudio:
    venv = Path(os.environ.get("OSPREY_LS_VENV", ROOT / ".ls-venv"))
    try:
        executable = ensure_label_studio(venv)
    except Exception as error:  # no package index reachable: nothing to test against
        skip_or_fail(f"cannot install Label Studio into {venv}: {error}")
    port = free_port()
    process = start_label_studio(executable, tmp_path_factory.mktemp("label-studio"), port)
    try:
        url = f"http://127.0.0.1:{port}"
        token = personal_access_token(url)
        yield LabelStudio(url=url, token=token, api=LabelStudioAPI(url, token))
    finally:
        process.stop()


@dataclass
class Backend:
    url: str
    log: Path

    def metrics(self) -> dict:
        return requests.get(f"{self.url}/metrics", timeout=5).json()


@pytest.fixture(scope="session")
def osprey_backend(label_studio, tmp_path_factory) -> Backend:
    env = tiny_backend_env(
        tmp_path_factory.mktemp("models"),
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.token,
        OSPREY_MAX_CAPTION_TOKENS="8",
        OSPREY_MAX_DESCRIPTION_TOKENS="12",
        OSPREY_MIN_TRAIN_EXAMPLES="2",
        OSPREY_TRAIN_EVERY="0",  # train when Label Studio says so (the test presses Start Training)
        OSPREY_LORA="false",
    )
    log = tmp_path_factory.mktemp("osprey") / "serve.log"
    process, url = start_backend(env, log)
    try:
        yield Backend(url=url, log=log)
    finally:
        process.stop()
    logged = log.read_text()
    assert label_studio.token not in logged, "the API token leaked into the backend log"


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        skip_or_fail("Debian chromium is not installed (apt-get install chromium)")
    return path
