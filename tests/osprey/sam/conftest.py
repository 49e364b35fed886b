"""Fixtures shared by the SAM test files."""

from __future__ import annotations

import pytest
import torch

from osprey.sam import build_tiny_sam


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny SAM is all per-op overhead: one intra-op thread is faster and immune to a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sam():
    return build_tiny_sam(seed=0)
