"""SamRefiner on the tiny SAM: output contract, parity with SamPredictor, cache, threads, errors."""

from __future__ import annotations

import threading
import time
from unittest import mock

import cv2
import numpy as np
import pytest
import torch

from osprey.sam import (
    MaskPromptConfig,
    SamImageEmbedder,
    SamRefiner,
    build_sam,
    build_sam_prompt,
    build_tiny_sam,
    known_model_types,
)
from osprey.sam.build import SamPredictor, _load_checkpoint
from osprey.sam.refine import stability_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shared_refiner(sam):
    """One refiner for tests that do not inspect the cache: the scene is encoded once."""
    return _refiner(sam)


@pytest.fixture(scope="module")
def scene_predictor(sam):
    """segment_anything's own stateful predictor, set to the scene once."""
    predictor = SamPredictor(sam)
    predictor.set_image(_scene())
    return predictor


def _scene(height: int = 75, width: int = 101, seed: int = 0) -> np.ndarray:
    """An odd-sized RGB image: noisy gradient, a red rectangle and a blue disc."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 1] = np.linspace(40, 200, width, dtype=np.uint8)[None, :]
    image[..., 2] = rng.integers(0, 40, (height, width), dtype=np.uint8)
    cv2.rectangle(image, (10, 12), (45, 50), (220, 30, 30), thickness=-1)
    cv2.circle(image, (75, 40), 15, (20, 20, 230), thickness=-1)
    return image


def _refiner(sam, **kwargs) -> SamRefiner:
    return SamRefiner(embedder=SamImageEmbedder(sam=sam, model_id="tiny-seed0", **kwargs))


def _count_encoder(sam, delay_s: float = 0.0):
    """Patch sam.image_encoder.forward with a counting wrapper (optionally slow, to force overlap)."""
    original = sam.image_encoder.forward

    def forward(x):
        if delay_s:
            time.sleep(delay_s)
        return original(x)

    return mock.patch.object(sam.image_encoder, "forward", side_effect=forward)


ROUGH = np.zeros((75, 101), dtype=bool)
ROUGH[14:48, 12:44] = True
PROMPTS = {
    "positive_click": {"points": [[28.0, 30.0]], "point_labels": [1]},
    "clicks": {"points": [[28.0, 30.0], [75.0, 40.0]], "point_labels": [1, 0]},
    "box": {"box_xyxy": [10, 12, 46, 51]},
    "brush": {"mask": ROUGH},
    "polygon": {"polygon": [(10, 12), (46, 12), (46, 51), (10, 51)]},
    "everything_combined": {
        "points": [[80.0, 40.0]],
        "point_labels": [0],
        "box_xyxy": [5, 5, 60, 60],
        "mask": ROUGH,
        "polygon": [(40, 40), (55, 40), (55, 55)],
    },
}


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_refine_returns_a_bool_mask_at_original_size(shared_refiner, kind) -> None:
    result = shared_refiner.refine(_scene(), **PROMPTS[kind])
    assert result.mask.shape == (75, 101) and result.mask.dtype == np.bool_
    assert 0 <= result.candidate_index < result.num_candidates
    assert np.isfinite(result.predicted_iou) and 0.0 <= result.stability_score <= 1.0
    assert result.low_res_logits.shape == (1, 256, 256)
    assert result.area == int(result.mask.sum())
    has_rough = "mask" in PROMPTS[kind] or "polygon" in PROMPTS[kind]
    assert (result.selected_by == "rough_mask_iou") == has_rough
    assert (result.rough_mask_iou is not None) == has_rough
    expected_candidates = 3 if has_rough or kind == "positive_click" else 1
    assert result.num_candidates == expected_candidates


@pytest.mark.parametrize("kind", ["positive_click", "clicks", "box", "brush"])
def test_refine_matches_segment_anythings_predictor(sam, shared_refiner, scene_predictor, kind) -> None:
    """Same prompts through SamPredictor give the same candidates; ours picks as documented."""
    image = _scene()
    result = shared_refiner.refine(image, **PROMPTS[kind])
    prompt = build_sam_prompt(image.shape[:2], **PROMPTS[kind], config=shared_refiner.mask_prompt)
    logits, ious, _ = scene_predictor.predict(
        point_coords=prompt.point_coords,
        point_labels=prompt.point_labels,
        box=prompt.box_xyxy,
        mask_input=prompt.mask_input,
        multimask_output=result.num_candidates == 3,
        return_logits=True,
    )
    masks = logits > sam.mask_threshold
    if prompt.rough_mask is not None:
        rough_iou = [(m & prompt.rough_mask).sum() / (m | prompt.rough_mask).sum() for m in masks]
        expected_index = int(np.argmax(rough_iou))
        assert result.rough_mask_iou == pytest.approx(rough_iou[expected_index])
    else:
        expected_index = int(np.argmax(ious))
    assert result.candidate_index == expected_index
    np.testing.assert_array_equal(result.mask, masks[expected_index])
    assert result.predicted_iou == pytest.approx(float(ious[expected_index]), abs=1e-5)
    expected_stability = stability_score(
        torch.as_tensor(logits[expected_index]), mask_threshold=0.0, offset=1.0
    )
    assert result.stability_score == pytest.approx(float(expected_stability))


def test_stability_score_is_iou_of_offset_thresholds() -> None:
    logits = torch.tensor([[[2.0, 0.5, -0.5, -2.0]]])  # > 1: 1 pixel, > -1: 3 pixels
    assert float(stability_score(logits, mask_threshold=0.0, offset=1.0)[0]) == pytest.approx(1 / 3)
    assert float(stability_score(torch.full((1, 2, 2), -5.0), mask_threshold=0.0, offset=1.0)[0]) == 0.0


# Embedding cache --------------------------------------------------------------------------------


def test_second_click_on_the_same_image_does_not_run_the_encoder(sam) -> None:
    refiner = _refiner(sam)
    image = _scene()
    with _count_encoder(sam) as encoder:
        refiner.refine(image, points=[[20, 20]])
        assert encoder.call_count == 1
        refiner.refine(image, points=[[60, 30]])
        refiner.refine(image.copy(), box_xyxy=[10, 12, 46, 51])  # same pixels, another array
        assert encoder.call_count == 1
        refiner.refine(_scene(seed=1), points=[[20, 20]])  # other pixels: encoded
        assert encoder.call_count == 2
    stats = refiner.cache.stats()
    assert (stats["misses"], stats["hits"], stats["items"]) == (2, 2, 2)


def test_concurrent_requests_on_one_image_encode_it_once_without_cross_talk(sam) -> None:
    image_a, image_b = _scene(seed=0), _scene(seed=1)
    image_b[20:40, 50:90] = 255  # make the two images clearly different
    clicks = [[[10.0 + 9 * i, 20.0 + 5 * i]] for i in range(8)]
    serial = _refiner(sam)
    expected = [serial.refine(image_a if i % 2 else image_b, points=clicks[i]).mask for i in range(8)]

    refiner = _refiner(sam)
    barrier = threading.Barrier(8)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(5)
            results[i] = refiner.refine(image_a if i % 2 else image_b, points=clicks[i]).mask
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    with _count_encoder(sam, delay_s=0.3) as encoder:  # slow encoder: requests overlap it
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors
    assert encoder.call_count == 2  # one per distinct image, not one per request
    for i in range(8):
        np.testing.assert_array_equal(results[i], expected[i], err_msg=f"request {i} got another mask")
    stats = refiner.cache.stats()
    assert stats["misses"] == 2 and stats["waits"] + stats["hits"] == 6


def test_cache_is_bounded_by_max_images(sam) -> None:
    refiner = _refiner(sam, max_images=2)
    images = [_scene(seed=s) for s in range(3)]
    with _count_encoder(sam) as encoder:
        for image in images:
            refiner.refine(image, points=[[20, 20]])
        refiner.refine(images[0], points=[[20, 20]])  # evicted by the third image
        assert encoder.call_count == 4
    assert refiner.cache.stats()["evictions"] == 2 and len(refiner.cache) == 2


def test_embeddings_persist_to_disk(sam, tmp_path) -> None:
    image = _scene()
    first = _refiner(sam, disk_dir=tmp_path).refine(image, points=[[28, 30]])
    fresh = _refiner(sam, disk_dir=tmp_path)  # e.g. after a restart
    with _count_encoder(sam) as encoder:
        again = fresh.refine(image, points=[[28, 30]])
        assert encoder.call_count == 0
    np.testing.assert_array_equal(first.mask, again.mask)
    assert fresh.cache.stats()["disk_hits"] == 1


def test_encoder_dtype_is_part_of_the_cache_key(sam) -> None:
    image = _scene()
    bf16 = build_tiny_sam(seed=0, dtype=torch.bfloat16)
    embedder32 = SamImageEmbedder(sam=sam, model_id="tiny-seed0")
    embedder16 = SamImageEmbedder(sam=bf16, model_id="tiny-seed0")
    assert embedder32.key(image) != embedder16.key(image)
    assert embedder16.embed(image).features.dtype == torch.float32
    result = SamRefiner(embedder=embedder16).refine(image, points=[[28, 30]])
    assert result.mask.shape == (75, 101)


# Errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no prompt"),
        ({"points": [[200, 10]]}, "outside"),
        ({"box_xyxy": [10, 10, 10, 20]}, "non-zero area"),
        ({"mask": np.zeros((75, 101), bool)}, "empty"),
        ({"mask": np.ones((100, 75), bool)}, "does not match"),
        ({"polygon": [(1, 1), (2, 2)]}, "at least 3"),
    ],
)
def test_refine_rejects_bad_prompts_before_encoding(sam, kwargs, message) -> None:
    refiner = _refiner(sam)
    with _count_encoder(sam) as encoder, pytest.raises(ValueError, match=message):
        refiner.refine(_scene(), **kwargs)
    assert encoder.call_count == 0


@pytest.mark.parametrize("image", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32)])
def test_refine_rejects_bad_images(sam, image) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        _refiner(sam).refine(image, points=[[1, 1]])


def test_bad_refiner_and_embedder_arguments(sam) -> None:
    with pytest.raises(ValueError, match="model_id"):
        SamImageEmbedder(sam=sam, model_id="")
    with pytest.raises(ValueError, match="stability_offset"):
        SamRefiner(embedder=SamImageEmbedder(sam=sam, model_id="t"), stability_offset=0)
    with pytest.raises(ValueError, match="n_negative"):
        MaskPromptConfig(n_negative=-1)


# Building ---------------------------------------------------------------------------------------


def test_unknown_model_type_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown SAM model type 'vit_x'.*vit_h, vit_l, vit_b, tiny"):
        build_sam("vit_x", random_weights=True)
    assert known_model_types() == ["vit_h", "vit_l", "vit_b", "tiny"]


@pytest.mark.parametrize(
    ("model_type", "file_name"),
    [("vit_h", "sam_vit_h_4b8939.pth"), ("vit_l", "sam_vit_l_0b3195.pth"), ("vit_b", "sam_vit_b_01ec64.pth")],
)
def test_missing_checkpoint_names_the_file_and_the_download_command(tmp_path, model_type, file_name) -> None:
    missing = tmp_path / "nowhere" / file_name
    with pytest.raises(FileNotFoundError) as info:
        build_sam(model_type, checkpoint=missing)
    message = str(info.value)
    assert str(missing) in message and file_name in message and "osprey-label download" in message
    with pytest.raises(ValueError, match=f"{file_name}.*osprey-label download"):
        build_sam(model_type)


def test_checkpoint_arguments_are_exclusive(tmp_path) -> None:
    with pytest.raises(ValueError, match="not both"):
        build_sam("vit_b", checkpoint=tmp_path / "x.pth", random_weights=True)
    with pytest.raises(ValueError, match="random weights only"):
        build_sam("tiny", checkpoint=tmp_path / "x.pth")


def test_tiny_sam_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_tiny_sam(seed=0), build_tiny_sam(seed=0), build_tiny_sam(seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.mask_decoder.iou_token.weight, c.mask_decoder.iou_token.weight)
    assert a.image_encoder.img_size == 1024 and tuple(a.prompt_encoder.mask_input_size) == (256, 256)


def test_checkpoint_loading_is_strict(tmp_path) -> None:
    source, target = build_tiny_sam(seed=1), build_tiny_sam(seed=0)
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    _load_checkpoint(target, path, "tiny")
    assert torch.equal(target.mask_decoder.iou_token.weight, source.mask_decoder.iou_token.weight)

    state = source.state_dict()
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="1 missing keys.*iou_token"):
        _load_checkpoint(build_tiny_sam(), path, "tiny")
