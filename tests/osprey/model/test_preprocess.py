import numpy as np
import pytest
import torch

from osprey.model.preprocess import CLIP_MEAN, CLIP_STD, preprocess_image, stack_masks, to_rgb_array


def test_constant_image_normalises_to_clip_statistics():
    image = np.full((300, 500, 3), (255, 128, 0), dtype=np.uint8)
    pixels = preprocess_image(image, image_size=512)
    assert pixels.shape == (1, 3, 512, 512)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), CLIP_MEAN, CLIP_STD, strict=True)]
    assert torch.allclose(pixels[0].mean(dim=(1, 2)), torch.tensor(expected), atol=1e-3)


def test_whole_image_is_stretched_not_cropped():
    image = np.zeros((100, 400, 3), dtype=np.uint8)
    image[:, 300:] = 255  # right quarter white: must survive (a centre crop would drop it)
    pixels = preprocess_image(image, image_size=64)
    assert pixels[0, 0, :, -4:].mean() > 1.5 and pixels[0, 0, :, :40].mean() < -1.5


def test_rgb_conversion_and_bad_arrays():
    assert to_rgb_array(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert to_rgb_array(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="uint8"):
        to_rgb_array(np.zeros((4, 5, 3), np.float32))


def test_masks_are_validated_against_the_image():
    good = np.zeros((10, 20), bool)
    good[2:5, 3:9] = True
    assert stack_masks([good, good], image_hw=(10, 20)).shape == (2, 10, 20)
    with pytest.raises(ValueError, match="mask 1 is empty"):
        stack_masks([good, np.zeros((10, 20), bool)], image_hw=(10, 20))
    with pytest.raises(ValueError, match=r"mask 0 is 10x20 \(WxH\) but the image is 20x10"):
        stack_masks([np.ones((20, 10), bool)], image_hw=(10, 20))
    with pytest.raises(ValueError, match="no region masks"):
        stack_masks([], image_hw=(10, 20))
