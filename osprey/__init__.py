"""Osprey model library: vision tower, mask extractor, Osprey LLM, prompts, SAM refinement.

Nothing heavy happens at import time; import the submodules you need.
"""

__version__ = "0.1.0"
