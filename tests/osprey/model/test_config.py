import json

import pytest

from osprey.model.config import OspreyConfig, load_preset, preset_names


def test_presets_have_the_papers_dimensions():
    cfg = load_preset("osprey-7b")
    assert cfg.vision.open_clip_model == "convnext_large_d_320"
    assert cfg.vision.image_size == 512
    assert cfg.vision.channels == (192, 384, 768, 1536)
    assert cfg.vision.num_image_tokens == 32 * 32
    assert (cfg.extractor.embed_dim, cfg.extractor.mask_shape) == (1024, 112)
    assert (cfg.llm.hidden_size, cfg.llm.num_hidden_layers, cfg.llm.vocab_size) == (4096, 32, 32000)
    assert cfg.projector_type == "mlp2x_gelu" and cfg.projector_depth == 2
    assert not cfg.untrained
    assert load_preset("tiny").untrained
    assert {"osprey-7b", "tiny", "small"} <= set(preset_names())


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown Osprey preset 'osprey-13b'.*osprey-7b"):
        load_preset("osprey-13b")


def test_released_config_json_defaults_mm_hidden_size_to_768():
    released = {
        "model_type": "osprey",
        "architectures": ["OspreyLlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "/path/to/open_clip_pytorch_model.bin",
        "rms_norm_eps": 1e-05,
    }
    cfg = OspreyConfig.from_checkpoint_config(released, name="Osprey-7b")
    assert cfg.mm_hidden_size == 768
    assert cfg.llm.num_key_value_heads == 32


def test_bad_configs_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="projector_type"):
        OspreyConfig.from_dict({"name": "x", "projector_type": "mlp2x_relu"})
    with pytest.raises(
        ValueError, match="mm_hidden_size 1024 must equal the channels of the image-token level res4"
    ):
        OspreyConfig.from_dict({"name": "x", "mm_hidden_size": 1024})
    with pytest.raises(ValueError, match="unknown Osprey config keys"):
        OspreyConfig.from_dict({"name": "x", "visoin": {}})
    with pytest.raises(ValueError, match="model_type 'bert'"):
        OspreyConfig.from_checkpoint_config({"model_type": "bert"}, name="x")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(load_preset("tiny").to_dict()))
    assert OspreyConfig.from_json(path) == load_preset("tiny")
