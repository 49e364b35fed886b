"""A real Label Studio for the end-to-end tests: installed in its own virtual environment, started on
127.0.0.1 with an admin user, and driven through its own REST API with a personal access token."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from serving import Process

# CI sets this so that a missing browser or a failed install fails the run instead of skipping it
REQUIRED = os.environ.get("OSPREY_REQUIRE_E2E", "") == "1"
LABEL_STUDIO_VERSION = "1.23.2"  # the version DESIGN.md's Label Studio facts were observed on
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "osprey-e2e-password"


def skip_or_fail(reason: str) -> None:
    """Skip, or fail when ``OSPREY_REQUIRE_E2E=1``."""
    if REQUIRED:
        pytest.fail(f"{reason} (OSPREY_REQUIRE_E2E=1)")
    pytest.skip(reason)


def ensure_label_studio(venv: Path) -> Path:
    """The ``label-studio`` executable of ``venv``, creating the environment and installing the pinned
    version on first use (a few minutes); later runs reuse it."""
    executable = venv / "bin" / "label-studio"
    marker = venv / f".label-studio-{LABEL_STUDIO_VERSION}"
    if executable.exists() and marker.exists():
        return executable
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"label-studio=={LABEL_STUDIO_VERSION}"],
        check=True,
    )
    marker.touch()
    return executable


def start_label_studio(executable: Path, data_dir: Path, port: int, **extra_env: str) -> Process:
    """Label Studio on 127.0.0.1:``port``; ``extra_env`` sets more of its settings (e.g.
    ``ML_TIMEOUT_PREDICT``)."""
    env = dict(
        os.environ,
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_USERNAME=ADMIN_EMAIL,
        LABEL_STUDIO_PASSWORD=ADMIN_PASSWORD,
        LATEST_VERSION_CHECK="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        ML_BLOCK_LOCAL_IP="false",  # the backend runs on loopback
        SSRF_PROTECTION_ENABLED="false",  # otherwise the webhook to a loopback backend is skipped
        **extra_env,
    )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    argv = [str(executable), "start", "--internal-host", "127.0.0.1", "--port", str(port), "--no-browser"]
    process = Process(argv, env, data_dir / "label-studio.log")
    try:  # the first start creates and migrates its database: minutes on a small machine
        process.wait_until_up(f"http://127.0.0.1:{port}/health", 900, "Label Studio")
    except Exception:
        process.stop()
        raise
    return process


def login(url: str) -> requests.Session:
    """A browser-like session logged in as the admin (Django form login with its CSRF token)."""
    session = requests.Session()
    session.get(f"{url}/user/login/", timeout=30).raise_for_status()
    response = session.post(
        f"{url}/user/login/",
        data={
            "email": ADMIN_EMAIL,
            "password": ADMIN_PASSWORD,
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
        headers={"Referer": f"{url}/user/login/"},
        allow_redirects=False,
        timeout=30,
    )
    if response.status_code != 302 or "login" in response.headers.get("Location", ""):
        raise RuntimeError(f"admin login failed: HTTP {response.status_code}")
    return session


def personal_access_token(url: str) -> str:
    """Create the admin's personal access token, the supported kind in 1.23 (legacy tokens are off by
    default). It is a JWT refresh token; clients trade it for short-lived access tokens."""
    session = login(url)
    response = session.post(
        f"{url}/api/token/",
        headers={"X-CSRFToken": session.cookies["csrftoken"], "Referer": url},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["token"]


class LabelStudioAPI:
    """The few Label Studio API calls the tests make, authorised with a refreshed access token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self._access: tuple[str, float] | None = None

    def _headers(self) -> dict:
        if self._access is None or self._access[1] < time.time():
            response = requests.post(
                f"{self.url}/api/token/refresh/", json={"refresh": self.token}, timeout=30
            )
            response.raise_for_status()
            self._access = (response.json()["access"], time.time() + 120)
        return {"Authorization": f"Bearer {self._access[0]}"}

    def call(self, method: str, path: str, *, expect: int = 200, timeout: float = 300, **kwargs):
        response = requests.request(
            method, f"{self.url}{path}", headers=self._headers(), timeout=timeout, **kwargs
        )
        if response.status_code != expect:
            raise AssertionError(
                f"{method} {path}: HTTP {response.status_code}, expected {expect}: {response.text}"
            )
        return response.json() if response.content else None

    def create_project(self, title: str, label_config: str) -> dict:
        return self.call(
            "POST", "/api/projects/", expect=201, json={"title": title, "label_config": label_config}
        )

    def import_images(self, project_id: int, images: dict[str, bytes]) -> list[dict]:
        """Upload image files (Label Studio stores them and makes one task per file)."""
        # one form field per file: Label Studio reads a single file from each field
        files = {
            f"file{i}": (name, io.BytesIO(body), "image/png") for i, (name, body) in enumerate(images.items())
        }
        self.call("POST", f"/api/projects/{project_id}/import", expect=201, files=files)
        return self.tasks(project_id)

    def tasks(self, project_id: int) -> list[dict]:
        found, page = [], 1
        while True:
            batch = self.call("GET", f"/api/tasks/?project={project_id}&page_size=100&page={page}")["tasks"]
            found += batch
            if len(batch) < 100:
                return sorted(found, key=lambda task: task["id"])
            page += 1

    def connect_backend(self, project_id: int, backend_url: str, extra_params: dict | None = None) -> dict:
        body = {"url": backend_url, "project": project_id, "title": "osprey", "is_interactive": True}
        if extra_params is not None:  # the connection's *extra params*, sent to the backend at /setup
            body["extra_params"] = extra_params
        return self.call("POST", "/api/ml/", expect=201, json=body)

    def ml_backend(self, ml_id: int) -> dict:
        return self.call("GET", f"/api/ml/{ml_id}")

    def retrieve_predictions(self, project_id: int, task_ids: list[int] | None = None) -> dict:
        """The Data Manager's *Retrieve Predictions* action (all tasks, or the given ones)."""
        selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
        return self.call(
            "POST",
            f"/api/dm/actions?id=retrieve_tasks_predictions&project={project_id}",
            json={"selectedItems": selected},
        )

    def predictions(self, project_id: int) -> list[dict]:
        return self.call("GET", f"/api/predictions/?project={project_id}")

    def wait_for_predictions(self, project_id: int, tasks: int, timeout_s: float = 300) -> list[dict]:
        """The project's predictions once ``tasks`` tasks have one: a retrieve that outlives the backend's
        budget is finished by its background pre-label job a little later."""
        deadline = time.time() + timeout_s
        while True:
            found = self.predictions(project_id)
            if len({p["task"] for p in found}) >= tasks or time.time() > deadline:
                return found
            time.sleep(1)

    def import_tasks(self, project_id: int, tasks: list[dict]) -> None:
        """Import tasks as JSON (``[{"image": url}, ...]``), e.g. pointing at files that do not exist."""
        self.call("POST", f"/api/projects/{project_id}/import", expect=201, json=tasks)

    def annotate(self, task_id: int, result: list[dict]) -> dict:
        body = {"result": result, "was_cancelled": False, "ground_truth": False, "lead_time": 4.0}
        return self.call("POST", f"/api/tasks/{task_id}/annotations/", expect=201, json=body)

    def interactive(self, ml_id: int, task_id: int, context: dict) -> dict:
        """What the labeling UI's smart tools send: one interactive pre-annotation request."""
        body = {"task": task_id, "context": context}
        return self.call("POST", f"/api/ml/{ml_id}/interactive-annotating", json=body)

    def train(self, ml_id: int) -> None:
        """The *Start Training* button of the model settings."""
        self.call("POST", f"/api/ml/{ml_id}/train", json={})


def scene_png(seed: int, width: int = 320, height: int = 240) -> bytes:
    """A picture with two solid objects on a textured background (different for each seed)."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = (70, 130, 70)
    x0, y0 = rng.integers(10, width // 3), rng.integers(10, height // 3)
    rgb[y0 : y0 + height // 2, x0 : x0 + width // 3] = (210, 40, 40)
    x1, y1 = rng.integers(width // 2, width - width // 4), rng.integers(height // 3, height // 2)
    rgb[y1 : y1 + height // 3, x1 : x1 + width // 5] = (40, 60, 200)
    rgb = np.clip(rgb.astype(int) + rng.integers(-12, 12, rgb.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
