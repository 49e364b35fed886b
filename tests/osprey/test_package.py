"""The package's front door: ``from osprey import Osprey`` works, and importing osprey (and SAM's light
modules) stays cheap."""

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


def test_sam_checkpoint_table_and_mask_geometry_load_without_torch_or_segment_anything():
    code = (
        "import sys, osprey.sam, osprey.sam.checkpoints, osprey.sam.masks, osprey.sam.prompts; "
        "print(sorted(m for m in ('torch', 'segment_anything') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sam_public_names_resolve_on_first_use():
    import osprey.sam
    from osprey.sam import build_tiny_sam
    from osprey.sam.build import build_tiny_sam as full_path

    assert build_tiny_sam is full_path
    assert all(getattr(osprey.sam, name) is not None for name in osprey.sam.__all__)
    assert set(osprey.sam.__all__) <= set(dir(osprey.sam))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        osprey.sam.Nope  # noqa: B018
