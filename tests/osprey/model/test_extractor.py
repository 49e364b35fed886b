import torch
from torch import nn

from osprey.model.config import load_preset
from osprey.model.extractor import build_mask_extractor, build_projector, mask_pool


def test_mask_pooling_full_empty_and_partial_masks():
    torch.manual_seed(0)
    features = torch.randn(8, 4, 4)
    full = torch.ones(1, 4, 4)
    empty = torch.zeros(1, 4, 4)
    corner = torch.zeros(1, 4, 4)
    corner[0, :2, :2] = 1
    pooled = mask_pool(features, torch.cat([full, empty, corner]))
    assert torch.allclose(pooled[0], features.mean(dim=(1, 2)), atol=1e-6)
    assert torch.equal(pooled[1], torch.zeros(8))  # empty mask: zeros, no NaN
    assert torch.allclose(pooled[2], features[:, :2, :2].mean(dim=(1, 2)), atol=1e-6)


def test_mask_pooling_resizes_high_resolution_masks_bilinearly_then_binarises():
    features = torch.arange(4.0).view(1, 2, 2)  # [[0, 1], [2, 3]]
    mask = torch.zeros(1, 64, 64)
    mask[0, 32:, 32:] = 1  # bottom-right quadrant at 32x the feature resolution
    assert torch.allclose(mask_pool(features, mask), torch.tensor([[3.0]]))


def test_extractor_shapes_and_released_parameter_names():
    cfg = load_preset("osprey-7b")
    with torch.device("meta"):
        extractor = build_mask_extractor(cfg)
        projector = build_projector(cfg)
    shapes = {k: tuple(v.shape) for k, v in extractor.state_dict().items()}
    assert shapes["res2.weight"] == (1024, 192) and shapes["res5.weight"] == (1024, 1536)
    assert shapes["feat_linear.weight"] == (4096, 1024)
    assert shapes["mask_linear.layers.0.weight"] == (1024, 112 * 112)
    assert shapes["mask_linear.layers.1.weight"] == (1024, 1024)
    assert shapes["mask_linear.layers.2.weight"] == (4096, 1024)
    assert [type(m) for m in projector] == [nn.Linear, nn.GELU, nn.Linear]
    assert tuple(projector[0].weight.shape) == (4096, 768) and tuple(projector[2].weight.shape) == (
        4096,
        4096,
    )


def test_extractor_gives_one_mask_and_one_spatial_token_per_region():
    cfg = load_preset("tiny")
    torch.manual_seed(0)
    extractor = build_mask_extractor(cfg)
    features = {
        level: torch.randn(c, cfg.vision.level_size(level), cfg.vision.level_size(level))
        for level, c in zip(("res2", "res3", "res4", "res5"), cfg.vision.channels, strict=True)
    }
    masks = torch.zeros(3, 100, 150)
    masks[0, :50] = 1
    masks[1, 50:] = 1
    masks[2, 20:80, 30:90] = 1
    mask_tokens, spatial = extractor(features, masks)
    assert mask_tokens.shape == (3, cfg.llm.hidden_size) and spatial.shape == (3, cfg.llm.hidden_size)
    assert not torch.allclose(mask_tokens[0], mask_tokens[1])
    single, _ = extractor(features, masks[2:3])
    assert torch.allclose(single[0], mask_tokens[2], atol=1e-5)  # batching regions changes nothing
