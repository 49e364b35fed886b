"""Every third-party package the code imports is declared in requirements.txt (a clean install must not
depend on what happens to come along with another package)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_top_level_modules() -> dict[str, list[str]]:
    """Top-level module -> the project files importing it (absolute imports only)."""
    found: dict[str, list[str]] = {}
    for path in [*ROOT.glob("osprey/**/*.py"), *ROOT.glob("backend/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], []).append(str(path.relative_to(ROOT)))
    own = {"osprey", "backend", "__future__"}
    return {m: files for m, files in found.items() if m not in own and m not in sys.stdlib_module_names}


def declared() -> set[str]:
    names = set()
    for line in [*(ROOT / "requirements.txt").read_text().splitlines(), *optional_dependencies()]:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(normalise(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
    return names


def optional_dependencies() -> list[str]:
    """The extras of pyproject.toml (``pip install 'osprey-label[ray]'``): the code imports them only where
    they are used and says how to install them when they are missing."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [req for reqs in project.get("optional-dependencies", {}).values() for req in reqs]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in imported_top_level_modules().items():
        owners = {normalise(d) for d in distributions.get(module, [module])}
        if not owners & declared():
            missing[module] = (sorted(owners), sorted(set(files))[:3])
    assert not missing, f"imported but not in requirements.txt (module: distributions, files): {missing}"


def test_the_dev_requirements_install_every_extra():
    """CI installs requirements-dev.txt, so the code behind an extra (``prelabel --ray``) is tested too."""
    dev = {line.split("#", 1)[0].strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()}
    missing = [requirement for requirement in optional_dependencies() if requirement not in dev]
    assert not missing, f"extras of pyproject.toml not in requirements-dev.txt, as written there: {missing}"
