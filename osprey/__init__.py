"""Osprey model library: the network (``osprey.model``), labelling regions (``osprey.inference``),
per-project learning (``osprey.learning``), SAM refinement (``osprey.sam``), Osprey's benchmarks
(``osprey.evaluation``) and fetching weights (``osprey.download``).

``from osprey import Osprey`` gives the class users reach for first. Nothing heavy happens at import
time: ``Osprey`` (and torch with it) is imported on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Osprey", "__version__"]


def __getattr__(name: str):
    if name == "Osprey":
        from .inference.api import Osprey

        return Osprey
    raise AttributeError(f"module 'osprey' has no attribute {name!r}")
