"""The package's front door: ``from osprey import Osprey`` works, and importing osprey stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_osprey_is_reexported_at_the_top():
    import osprey
    from osprey import Osprey
    from osprey.inference.api import Osprey as FullPath

    assert Osprey is FullPath
    assert "Osprey" in osprey.__all__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        osprey.Nope  # noqa: B018


def test_importing_the_package_and_its_light_subpackages_does_not_import_torch():
    code = (
        "import sys, osprey, osprey.download, osprey.evaluation, osprey.model, osprey.inference, "
        "osprey.learning; print(sorted(m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
