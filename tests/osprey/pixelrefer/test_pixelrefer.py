"""PixelRefer-Lite on its tiny preset: the fast path answers as the authors' one-region-per-call flow,
deterministically; the released layout loads strictly; the facts of the authors' code hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osprey.inference.fields import LabelRequest
from osprey.inference.pixelrefer import PixelReferLite
from osprey.inference.region_model import RegionModel, load_region_model, model_family
from osprey.pixelrefer.loading import released_state_dict, save_released_layout
from osprey.pixelrefer.modeling import box_positions, kmeans, region_seed
from osprey.pixelrefer.processing import pixel_patches, region_crop, smart_resize
from osprey.pixelrefer.prompts import PixelReferPrompts

REQUEST = LabelRequest(
    categories=("cat", "dog", "bird"), parts=("head", "tail"), attributes=("red", "round"),
    caption=True, description=True, max_caption_tokens=6, max_description_tokens=9,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny() -> PixelReferLite:
    return PixelReferLite.from_pretrained("pixelrefer-lite-tiny", device="cpu")


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    masks = []
    for y0, y1, x0, x1 in [(10, 60, 20, 90), (50, 110, 100, 150), (30, 36, 30, 38)]:
        mask = np.zeros((120, 160), bool)
        mask[y0:y1, x0:x1] = True
        masks.append(mask)
    return image, masks


def test_is_a_region_model_and_is_chosen_by_name(tiny):
    assert isinstance(tiny, RegionModel) and tiny.untrained and tiny.model_id == "pixelrefer-lite-tiny"
    assert model_family("pixelrefer-lite-2b") == "pixelrefer-lite" and model_family("osprey-7b") == "osprey"


def assert_same_answers(a, b, tol: float = 1e-5) -> None:
    """Same labels and text; probabilities within float rounding of differently packed forwards."""
    assert (a.caption, a.description) == (b.caption, b.description)
    for field in ("category", "part"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.label == y.label and x.scores == pytest.approx(y.scores, abs=tol)
    assert a.attributes == pytest.approx(b.attributes, abs=tol)


def test_fast_path_answers_as_the_one_region_per_call_flow(tiny, scene):
    image, masks = scene
    fast = tiny.label(image, masks, REQUEST)
    slow = tiny.label_baseline(image, masks, REQUEST)
    for a, b in zip(fast, slow, strict=True):
        assert_same_answers(a, b)
        assert a.to_dict()["warning"].startswith("untrained")


def test_same_request_same_answers_whatever_else_it_holds(tiny, scene):
    image, masks = scene
    alone = tiny.label(image, [masks[2]], REQUEST)[0]
    together = tiny.label(image, masks, REQUEST)[2]
    assert_same_answers(alone, together)
    assert tiny.label(image, [masks[2]], REQUEST)[0].to_dict() == alone.to_dict()  # run to run: identical
    many = tiny.label_many(
        [(image, masks[:1]), (image[:, ::-1].copy(), [m[:, ::-1].copy() for m in masks])], REQUEST
    )
    assert_same_answers(many[0][0], tiny.label(image, masks[:1], REQUEST)[0])
    assert len(many[1]) == 3


def test_each_region_is_32_tokens_between_brackets(tiny):
    prompts = PixelReferPrompts(32)
    turn = prompts.caption_turn()
    assert turn == "Please describe [" + "<REGION>" * 32 + "] briefly."
    text = prompts.conversation(turn)
    assert text.startswith("<|im_start|>user\nPlease describe [") and text.endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = prompts.tokenize_prompt(tiny.tokenizer, text)
    assert ids.count(tiny.model.region_token_id) == 32 and tuple(ids[:3]) == tiny._prefix_ids


def test_placeholder_and_token_counts_must_match(tiny):
    ids = torch.tensor([[5, tiny.model.region_token_id, 6]])
    with pytest.raises(ValueError, match="1 placeholder tokens, 0 token rows"):
        tiny.model.embed(ids)


def test_kmeans_facts():
    tokens = torch.tensor([[0.0], [0.1], [10.0], [10.2], [5.0]])
    # draw [4, 0]: centroid 0 starts at 5.0 (takes 5, 10, 10.2), centroid 1 at 0.0 (takes 0, 0.1)
    out = kmeans(tokens, 2, torch.tensor([4, 0, 1, 2, 3]))
    assert out.shape == (2, 1) and out[1, 0] == pytest.approx(0.05)  # output order follows the draw
    # converged: the centroids before the (identical) last update come back
    same = kmeans(torch.tensor([[1.0], [3.0]]), 2, torch.tensor([1, 0]))
    assert same[:, 0].tolist() == [3.0, 1.0]
    # an empty cluster keeps its centroid; ties go to the lowest index
    dup = kmeans(torch.tensor([[2.0], [2.0], [2.0]]), 2, torch.tensor([0, 1, 2]))
    assert dup[:, 0].tolist() == [2.0, 2.0]


def test_box_is_read_as_x0_y0_x1_y1_although_it_is_top_left_bottom_right():
    pos = box_positions(2, 4, (10, 20, 50, 80), (100, 200))  # (top, left, bottom, right), H=100, W=200
    assert pos[0, 1, 0].item() == pytest.approx((0.25 * (50 - 10) + 10) / 199)
    assert pos[1, 0, 1].item() == pytest.approx((0.5 * (80 - 20) + 20) / 99)


def test_crop_scale_and_patches():
    image = np.zeros((200, 300, 3), np.uint8)
    mask = np.zeros((200, 300), bool)
    mask[50:60, 100:110] = True  # 100 pixels: scale ceil(sqrt(196 * 32 / 100)) = 8
    crop = region_crop(image, mask, _config())
    assert (
        crop.box == (22, 72, 87, 137)
        and crop.crop.shape == (532, 532, 3)
        and crop.grid_mask.shape == (38, 38)
    )
    assert crop.local.shape == (224, 224, 3)
    assert smart_resize(20, 20, factor=14, min_pixels=56 * 56, max_pixels=10**6) == (56, 56)
    patches, grid = pixel_patches(np.full((28, 42, 3), 255, np.uint8), _config())
    assert (
        grid == (4, 5) and patches.shape == (20, 588) and patches.max().item() == pytest.approx(1.0)
    )  # up to 56x70


def _config():
    from osprey.pixelrefer.configuration import load_preset

    return load_preset("pixelrefer-lite-tiny")


def test_region_seed_depends_on_the_mask_only(scene):
    _, masks = scene
    assert region_seed(masks[0]) == region_seed(masks[0].copy()) != region_seed(masks[1])


def test_released_layout_loads_strictly_and_answers_the_same(tiny, scene, tmp_path):
    image, masks = scene
    unused = {
        "model.mm_projector.readout.0.weight": torch.zeros(64, 32),
        "model.region_encoder.mask_embedding.weight": torch.zeros(32, 1, 1, 1),
    }
    folder = save_released_layout(tiny.model, tiny.tokenizer, tmp_path / "PixelRefer-Lite-tiny", extra=unused)
    names = set(torch.load(folder / "pytorch_model.bin", weights_only=True))
    assert "model.vision_encoder.vision_encoder.encoder.layers.0.self_attn.q_proj.weight" in names
    assert "model.region_encoder.fusion_attention_local.in_proj_weight" in names
    loaded = load_region_model(str(folder), device="cpu")
    assert isinstance(loaded, PixelReferLite) and not loaded.untrained
    request = LabelRequest(categories=("cat", "dog"), caption=True, max_caption_tokens=5)
    for a, b in zip(loaded.label(image, masks, request), tiny.label(image, masks, request), strict=True):
        assert a.to_dict() == {k: v for k, v in b.to_dict().items() if k != "warning"}


def test_a_missing_or_unknown_tensor_is_refused_by_name(tiny, tmp_path):
    folder = save_released_layout(tiny.model, tiny.tokenizer, tmp_path / "ckpt")
    state = released_state_dict(tiny.model)
    del state["model.region_encoder.pos_linear.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing tensors: region_encoder\.pos_linear\.weight"):
        load_region_model(str(folder), device="cpu")
    state = released_state_dict(tiny.model)
    state["model.region_encoder.surprise"] = torch.zeros(1)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.region_encoder\.surprise"):
        load_region_model(str(folder), device="cpu")
