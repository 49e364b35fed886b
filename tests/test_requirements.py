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
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(normalise(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
    return names


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
