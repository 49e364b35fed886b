"""Several images' regions in the same forward passes and decoding loop: the answers each image gets
alone, with the vision tower run once per batch."""

from __future__ import annotations

import numpy as np
import pytest

from osprey.inference.api import image_feature_cache
from osprey.inference.fast import batch_images
from osprey.inference.fields import ClosedSetAnswer, LabelRequest

REQUEST = LabelRequest(
    categories=("cat", "dog", "red bird"),
    parts=("head", "tail"),
    attributes=("red", "round"),
    caption=True,
    description=True,
    max_caption_tokens=6,
    max_description_tokens=8,
)


def assert_same_answers(batched, alone, tol=1e-5):
    assert len(batched) == len(alone)
    for b, a in zip(batched, alone, strict=True):
        assert (b.caption, b.description) == (a.caption, a.description)
        for name in ("category", "part"):
            bb, aa = getattr(b, name), getattr(a, name)
            assert isinstance(bb, ClosedSetAnswer) and bb.label == aa.label
            assert bb.scores == pytest.approx(aa.scores, abs=tol)
        assert b.attributes == pytest.approx(a.attributes, abs=tol)
        assert b.text_scores == pytest.approx(a.text_scores, abs=tol)


@pytest.fixture(scope="module")
def three_images(scene):
    image, masks = scene["image"], scene["masks"]
    flipped = np.ascontiguousarray(image[::-1, ::-1])
    cropped = np.ascontiguousarray(image[20:200, 40:300])  # another size: 180x260
    return [
        (image, masks[:3]),
        (flipped, [m[::-1, ::-1] for m in masks[1:3]]),
        (cropped, [m[20:200, 40:300] for m in (masks[0], masks[3])]),
    ]


def test_a_batch_gives_every_image_its_own_answers_in_fewer_forwards(tiny_osprey, three_images, monkeypatch):
    from osprey.inference import fast

    forwards = []

    def counting(original):
        def forward(*args, **kwargs):
            forwards.append(kwargs["embeds"].shape[0])
            return original(*args, **kwargs)

        return forward

    for name in ("forward_on_state", "forward_on_buffer"):  # kept text, scoring and prefill forwards
        monkeypatch.setattr(fast, name, counting(getattr(fast, name)))
    encoded = tiny_osprey.encode_images([image for image, _ in three_images])
    forwards.clear()
    batched = tiny_osprey.label_many(three_images, REQUEST, encoded=encoded)
    batched_forwards = len(forwards)
    assert [len(b) for b in batched] == [3, 2, 2]
    forwards.clear()
    for (image, masks), answers, enc in zip(three_images, batched, encoded, strict=True):
        assert_same_answers(answers, tiny_osprey.label(image, masks, REQUEST, encoded=enc))
    assert batched_forwards < len(forwards) / 2  # one decoding loop for all images instead of three


def test_items_without_regions_get_empty_answers(tiny_osprey, three_images):
    image, masks = three_images[0]
    out = tiny_osprey.label_many(
        [(image, []), (image, masks[:1])], LabelRequest(caption=True, max_caption_tokens=3)
    )
    assert out[0] == [] and len(out[1]) == 1
    assert tiny_osprey.label_many([(image, [])], REQUEST) == [[]]


def test_encode_images_runs_the_tower_once_for_the_misses_and_fills_the_cache(tiny_osprey, three_images):
    cached = type(tiny_osprey)(
        model=tiny_osprey.model, tokenizer=tiny_osprey.tokenizer, config=tiny_osprey.config,
        model_id=tiny_osprey.model_id, cache=image_feature_cache(max_images=4),
    )  # fmt: skip
    images = [image for image, _ in three_images]
    calls = []
    original = cached.model.encode_pixels_batch

    def counting(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)

    cached.model.encode_pixels_batch = counting
    try:
        first = cached.encode_images(images)
        again = cached.encode_images([images[1], images[0]])
    finally:
        del cached.model.encode_pixels_batch
    assert calls == [3]  # one tower forward for the three misses, none for the hits
    assert again[0] is first[1] and again[1] is first[0]
    stats = cached.cache.stats()
    assert (stats["misses"], stats["hits"], stats["items"]) == (3, 2, 3)
    alone = tiny_osprey._encode(images[2])
    np.testing.assert_allclose(
        first[2].image_tokens.numpy(), alone.image_tokens.numpy(), rtol=1e-4, atol=1e-5
    )


def test_batching_needs_images_of_the_same_prefix(tiny_osprey, three_images):
    with pytest.raises(ValueError, match="at least one"):
        batch_images([])
    encoded = tiny_osprey.encode_images([three_images[0][0]])[0]
    other = type(encoded)(
        **{**encoded.__getstate__(), "prefix_ids": encoded.prefix_ids[:-2] + encoded.prefix_ids[-1:]}
    )
    with pytest.raises(ValueError, match="different conversation prefixes"):
        batch_images([encoded, other])
