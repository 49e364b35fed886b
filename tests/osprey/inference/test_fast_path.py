"""The fast path must give the baseline's answers: same greedy text, same scores."""

import numpy as np
import pytest
import torch

from osprey.inference.fields import ClosedSetAnswer, LabelRequest

ALL_FIELDS = LabelRequest(
    categories=("cat", "dog", "red bird"),
    parts=("head", "tail", "left wing"),
    attributes=("red", "round", "wooden"),
    caption=True,
    description=True,
    max_caption_tokens=8,
    max_description_tokens=12,
)


def assert_same(fast, base, tol=1e-4):
    assert len(fast) == len(base)
    for f, b in zip(fast, base, strict=True):
        assert f.caption == b.caption and f.description == b.description
        for name in ("category", "part"):
            fa, ba = getattr(f, name), getattr(b, name)
            if isinstance(fa, ClosedSetAnswer):
                assert fa.label == ba.label
                for label, p in fa.scores.items():
                    assert p == pytest.approx(ba.scores[label], abs=tol)
            else:
                assert fa == ba
        if f.attributes is not None:
            for label, p in f.attributes.items():
                assert p == pytest.approx(b.attributes[label], abs=tol)


@pytest.fixture(scope="module")
def results(tiny_osprey, scene):
    fast = tiny_osprey.label(scene["image"], scene["masks"], ALL_FIELDS)
    base = tiny_osprey.label_baseline(scene["image"], scene["masks"], ALL_FIELDS)
    return fast, base


def test_fast_equals_baseline_for_every_region_and_field(results):
    fast, base = results
    assert_same(fast, base)
    for region in fast:
        assert set(region.to_dict()) == {
            "category", "part", "attributes", "caption", "description", "text_scores", "warning"
        }  # fmt: skip
        assert sum(region.category.scores.values()) == pytest.approx(1.0)
        assert region.category.score == max(region.category.scores.values())
        assert list(region.attributes) == ["red", "round", "wooden"]
        assert all(0.0 < p < 1.0 for p in region.attributes.values())
        assert region.caption  # greedy text was produced


def test_answers_depend_on_the_region(results):
    fast, _ = results
    # With the fixture's region-sensitive random weights, regions must not all look alike.
    signatures = {(r.caption, round(r.category.scores["cat"], 4)) for r in fast}
    assert len(signatures) > 1


def test_region_order_is_kept(tiny_osprey, scene, results):
    fast, _ = results
    order = [2, 0, 3, 1]
    shuffled = tiny_osprey.label(scene["image"], [scene["masks"][i] for i in order], ALL_FIELDS)
    for got, i in zip(shuffled, order, strict=True):
        assert got.caption == fast[i].caption
        assert got.category.scores["dog"] == pytest.approx(fast[i].category.scores["dog"], abs=1e-5)


def test_small_token_budget_chunks_the_same_answers(tiny_osprey, scene, results):
    fast, _ = results
    budget = tiny_osprey.fast.max_batch_tokens
    tiny_osprey.fast.max_batch_tokens = 40  # forces one region's questions per forward
    try:
        chunked = tiny_osprey.label(scene["image"], scene["masks"], ALL_FIELDS)
    finally:
        tiny_osprey.fast.max_batch_tokens = budget
    assert_same(chunked, fast)


@pytest.mark.parametrize(
    "request_",
    [
        LabelRequest(categories=("cat", "dog")),
        LabelRequest(parts=("head", "tail")),
        LabelRequest(categories=(), max_category_tokens=6),
        LabelRequest(attributes=("red",), caption=True, max_caption_tokens=5),
    ],
    ids=["categories", "parts-only", "open-category", "attribute+caption"],
)
def test_each_field_combination_matches_the_baseline(tiny_osprey, scene, request_):
    masks = scene["masks"][:2]
    fast = tiny_osprey.label(scene["image"], masks, request_)
    base = tiny_osprey.label_baseline(scene["image"], masks, request_)
    assert_same(fast, base)
    assert [sorted(r.to_dict()) for r in fast] == [sorted(r.to_dict()) for r in base]
    if request_.open_category:
        assert all(isinstance(r.category, str) for r in fast)


def test_image_is_encoded_once_for_many_calls(tiny_osprey, scene):
    calls = []
    tower = tiny_osprey.model.vision_tower
    hook = tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        encoded = tiny_osprey.encode_image(scene["image"])
        tiny_osprey.label(scene["image"], scene["masks"][:1], ALL_FIELDS, encoded=encoded)
        shared_after_first = dict(encoded.shared)
        tiny_osprey.label(scene["image"], scene["masks"][1:], ALL_FIELDS, encoded=encoded)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert encoded.shared == shared_after_first  # the shared question text was run once too


def test_bad_inputs_raise_clear_errors(tiny_osprey, scene):
    image = scene["image"]
    with pytest.raises(ValueError, match="mask 0 is empty"):
        tiny_osprey.label(image, [np.zeros(image.shape[:2], bool)], ALL_FIELDS)
    with pytest.raises(ValueError, match="masks must be at the image's resolution"):
        tiny_osprey.label(image, [np.ones((10, 10), bool)], ALL_FIELDS)
    with pytest.raises(ValueError, match="nothing to label"):
        LabelRequest()
    with pytest.raises(ValueError, match="duplicate labels"):
        LabelRequest(categories=("cat", "cat"))
    small = np.ascontiguousarray(image[:100, :100])
    encoded = tiny_osprey.encode_image(small)
    with pytest.raises(ValueError, match="encoded image is"):
        tiny_osprey.label(image, scene["masks"][:1], ALL_FIELDS, encoded=encoded)


def test_untrained_models_say_so(tiny_osprey, scene):
    out = tiny_osprey.label(scene["image"], scene["masks"][:1], LabelRequest(categories=("cat", "dog")))
    assert tiny_osprey.untrained
    assert "untrained" in out[0].to_dict()["warning"]


def test_loading_errors_say_what_to_do(tmp_path):
    from osprey.inference.api import Osprey
    from osprey.model.checkpoint import MissingWeightsError

    with pytest.raises(ValueError, match="neither a checkpoint directory nor a known model"):
        Osprey.from_pretrained("osprey-13b", device="cpu")
    (tmp_path / "config.json").write_text('{"model_type": "osprey"}')
    with pytest.raises(MissingWeightsError, match="no weights in .*osprey-label download"):
        Osprey.from_pretrained(str(tmp_path), device="cpu")
    with pytest.raises(MissingWeightsError, match="not in the Hugging Face cache.*osprey-label download"):
        Osprey.from_pretrained("osprey-7b", device="cpu")


def test_kv_cache_tensors_are_not_modified_by_labelling(tiny_osprey, scene):
    encoded = tiny_osprey.encode_image(scene["image"])
    tiny_osprey.label(scene["image"], scene["masks"][:1], ALL_FIELDS, encoded=encoded)
    keys = [k.clone() for k, _ in encoded.state.layers]
    tiny_osprey.label(scene["image"], scene["masks"], ALL_FIELDS, encoded=encoded)
    assert all(torch.equal(a, b) for a, b in zip(keys, (k for k, _ in encoded.state.layers), strict=True))


def test_feature_cache_encodes_each_image_once_in_memory_and_on_disk(tiny_osprey, scene, tmp_path):
    from osprey.inference.api import image_feature_cache

    calls = []
    hook = tiny_osprey.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    request = LabelRequest(categories=("cat", "dog"))
    try:
        tiny_osprey.cache = image_feature_cache(max_images=2, disk_dir=tmp_path)
        first = tiny_osprey.label(scene["image"], scene["masks"][:1], request)
        tiny_osprey.label(scene["image"].copy(), scene["masks"][1:2], request)  # same pixels, new array
        assert len(calls) == 1 and tiny_osprey.cache.stats()["hits"] == 1
        tiny_osprey.cache = image_feature_cache(max_images=2, disk_dir=tmp_path)  # a restarted process
        again = tiny_osprey.label(scene["image"], scene["masks"][:1], request)
        assert len(calls) == 1 and tiny_osprey.cache.stats()["disk_hits"] == 1
        assert again[0].category.scores == pytest.approx(first[0].category.scores, abs=1e-6)
        tiny_osprey.label(np.ascontiguousarray(scene["image"][:, ::-1]), scene["masks"][:1], request)
        assert len(calls) == 2  # other pixels: encoded again
    finally:
        hook.remove()
        tiny_osprey.cache = None


def test_generated_text_carries_the_same_confidence_in_both_paths(results):
    fast, base = results
    for f, b in zip(fast, base, strict=True):
        assert set(f.text_scores) == {"caption", "description"}
        for key, value in f.text_scores.items():
            assert 0.0 < value <= 1.0
            assert value == pytest.approx(b.text_scores[key], abs=1e-4)


def test_the_fast_path_uses_no_deprecated_transformers_api(tiny_osprey, scene):
    """transformers renamed ``past_key_values`` to ``cache``; the old name warns now and breaks later."""
    import logging
    import warnings

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoded = tiny_osprey._encode(scene["image"])  # the prefix forward, not a cached one
            tiny_osprey.label(scene["image"], scene["masks"][:2], ALL_FIELDS, encoded=encoded)
    finally:
        hf_logger.removeHandler(handler)
    said = [str(w.message) for w in caught] + records
    assert not [m for m in said if "deprecat" in m.lower()], said


def test_host_and_disk_tiers_keep_features_not_the_prefix_cache_and_give_the_same_answers(
    tiny_osprey, scene, tmp_path
):
    from osprey.inference.api import image_feature_cache
    from osprey.inference.fast import ImageFeatures
    from osprey.runtime.disk_tier import read_file
    from osprey.runtime.feature_cache import nbytes

    request = LabelRequest(categories=("cat", "dog"), caption=True, max_caption_tokens=6)
    other = np.ascontiguousarray(scene["image"][::-1])
    calls = []
    hook = tiny_osprey.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        tiny_osprey.cache = image_feature_cache(max_images=1, host_max_bytes=2**30, disk_dir=tmp_path)
        first = tiny_osprey.label(scene["image"], scene["masks"][:2], request)
        encoded = tiny_osprey.encode_image(scene["image"])  # a hit
        slim = nbytes(encoded) - nbytes(encoded.state)  # all but the prefix keys/values
        tiny_osprey.label(other, scene["masks"][:1], request)  # the first image is demoted to the host
        stats = tiny_osprey.cache.stats()
        assert stats["host_items"] == 1 and stats["host_bytes"] == slim
        again = tiny_osprey.label(scene["image"], scene["masks"][:2], request)
        assert len(calls) == 2 and tiny_osprey.cache.stats()["host_hits"] == 1  # only the prefix reran
        assert len(list(tmp_path.glob("*.pt"))) == 2
        for a, b in zip(again, first, strict=True):
            assert (a.category.label, a.caption) == (b.category.label, b.caption)
            assert a.category.scores == pytest.approx(b.category.scores, abs=1e-5)
        for path in tmp_path.glob("*.pt"):
            kept = read_file(path)  # checked as the cache checks it
            assert isinstance(kept, ImageFeatures) and nbytes(kept) < nbytes(encoded)
    finally:
        hook.remove()
        tiny_osprey.cache = None
