"""Shared fixtures: tiny random-weight Osprey and real image/mask files made by the tests."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

logging.getLogger("root").setLevel(logging.ERROR)  # open_clip warns that random presets have no weights


@pytest.fixture(scope="session")
def tiny_osprey():
    """The ``tiny`` preset on CPU. Its extractor outputs are scaled up so that, with random weights,
    each region visibly changes the answers (tests can then tell regions apart)."""
    from osprey.inference.api import Osprey

    osprey = Osprey.from_pretrained("tiny", device="cpu")
    with torch.no_grad():
        osprey.model.mask_extractor.feat_linear.weight.mul_(30)
        osprey.model.mask_extractor.mask_linear.layers[2].weight.mul_(30)
    return osprey


def ellipse(shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    """Boolean ``(H, W)`` ellipse; ``center``/``radii`` are (y, x) in pixels."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 <= 1


@pytest.fixture(scope="session")
def scene(tmp_path_factory) -> dict:
    """A 240x320 picture saved as PNG (read back from disk) and four region masks saved as PNGs."""
    folder: Path = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(7)
    picture = np.zeros((240, 320, 3), dtype=np.uint8)
    picture[:, :160] = (200, 40, 40)
    picture[:, 160:] = (40, 40, 200)
    picture = np.clip(picture + rng.integers(0, 40, picture.shape), 0, 255).astype(np.uint8)
    Image.fromarray(picture).save(folder / "scene.png")
    masks = [
        ellipse((240, 320), (60, 70), (40, 50)),
        ellipse((240, 320), (170, 240), (50, 60)),
        np.pad(np.ones((60, 200), bool), ((90, 90), (60, 60))),
        ellipse((240, 320), (120, 160), (12, 12)),
    ]
    paths = []
    for i, mask in enumerate(masks):
        path = folder / f"mask{i}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        paths.append(path)
    image = np.asarray(Image.open(folder / "scene.png").convert("RGB"))
    loaded = [np.asarray(Image.open(p)) > 0 for p in paths]
    return {"image": image, "masks": loaded, "image_path": folder / "scene.png", "mask_paths": paths}
