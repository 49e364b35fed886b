"""The architecture as the folders show it: which package may import which (DESIGN.md section 2).

Each subpackage's ``__init__.py`` states the same rule in words; this test keeps both true.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_TOOL = ROOT.parent / "shared" / "tools" / "layout_check.py"

# package -> the project packages it may import (besides itself); dependencies point one way
ALLOWED = {
    "osprey.runtime": set(),
    "osprey.loading": set(),
    "osprey.model": {"osprey.loading"},
    "osprey.pixelrefer": {"osprey.loading", "osprey.model", "osprey.runtime"},
    "osprey.inference": {"osprey.loading", "osprey.model", "osprey.pixelrefer", "osprey.runtime"},
    "osprey.learning": {"osprey.model", "osprey.pixelrefer", "osprey.inference", "osprey.runtime"},
    "osprey.evaluation": {"osprey.model", "osprey.inference"},
    "osprey.download": {"osprey.model", "osprey.pixelrefer", "osprey.sam"},
    "osprey.sam": {"osprey.runtime"},
    "backend.errors": set(),
    "backend.database": set(),
    "backend.labelstudio": {"backend.errors", "osprey.sam"},
    "backend.jobs": {"backend.labelstudio", "backend.database", "backend.errors"},
    "backend.acceptance": {"backend.labelstudio", "backend.errors"},
    "backend.learning": {
        "backend.labelstudio",
        "backend.acceptance",
        "backend.jobs",
        "backend.database",
        "backend.errors",
        "osprey.*",
    },
    "backend.predict": {"backend.labelstudio", "backend.errors", "osprey.*"},
    "backend.prelabel": {
        "backend.labelstudio",
        "backend.predict",
        "backend.jobs",
        "backend.database",  # the claims table, in the training store's file
        "backend.errors",
        "osprey.*",
    },
    "backend.runtime": {
        "backend.labelstudio",
        "backend.predict",
        "backend.prelabel",
        "backend.jobs",
        "backend.learning",
        "backend.acceptance",
        "backend.database",
        "backend.errors",
        "osprey.*",
    },
    "backend.service": {"backend.*", "osprey.*"},
    # the command line: everything but the HTTP layer, which gives it ``serve`` (backend.service.command)
    "backend.cli": {
        "backend.errors",
        "backend.database",
        "backend.labelstudio",
        "backend.jobs",
        "backend.acceptance",
        "backend.learning",
        "backend.predict",
        "backend.prelabel",
        "backend.runtime",
        "backend.cli",
        "osprey.*",
    },
}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in ALLOWED:
            return ".".join(parts[:n])
    return None


def imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            stem = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join([*stem, node.module] if node.module else stem)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("osprey", "backend")}


def allowed(source: str, target: str) -> bool:
    rules = ALLOWED[source]
    return any(target == rule or (rule.endswith(".*") and target.startswith(rule[:-1])) for rule in rules)


def test_every_project_module_belongs_to_a_known_package():
    orphans = []
    for path in [*ROOT.glob("osprey/**/*.py"), *ROOT.glob("backend/**/*.py")]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module not in ("osprey", "backend") and package_of(module) is None:
            orphans.append(module)
    assert not orphans, f"modules outside the packages of DESIGN.md section 2: {orphans}"


def test_dependencies_point_one_way():
    bad = []
    for path in [*ROOT.glob("osprey/**/*.py"), *ROOT.glob("backend/**/*.py")]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        source = package_of(module)
        if source is None:
            continue
        for name in imports(path, module):
            target = package_of(name)
            if target is not None and target != source and not allowed(source, target):
                bad.append(f"{module} imports {name}")
    assert not bad, "imports against the layout:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.skipif(
    not LAYOUT_TOOL.exists(), reason="../shared/tools/layout_check.py is not beside the checkout"
)
def test_the_shared_layout_check_passes():
    """No import cycle, no osprey -> backend import, no module over 600 lines, >= 3 subpackages each."""
    out = subprocess.run(
        [sys.executable, str(LAYOUT_TOOL), "--max-lines", "600", "--min-subpackages", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
