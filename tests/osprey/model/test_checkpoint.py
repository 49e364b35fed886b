"""Released-layout checkpoints load strictly: every tensor accounted for, by name."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from osprey.inference.api import Osprey
from osprey.inference.fields import LabelRequest
from osprey.model.config import OspreyConfig
from osprey.model.llm import build_tiny_tokenizer
from osprey.model.loading import load_strict

HIDDEN, LAYERS, VOCAB, INTER = 256, 2, 1024, 512


def released_llm_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """LLM, projector and extractor tensors under the names the released Osprey-7b uses."""

    def r(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).half()

    t = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN).half()}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{proj}.weight"] = r(HIDDEN, HIDDEN)
        t[p + "mlp.gate_proj.weight"] = r(INTER, HIDDEN)
        t[p + "mlp.up_proj.weight"] = r(INTER, HIDDEN)
        t[p + "mlp.down_proj.weight"] = r(HIDDEN, INTER)
        t[p + "input_layernorm.weight"] = torch.ones(HIDDEN).half()
        t[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN).half()
        t[p + "self_attn.rotary_emb.inv_freq"] = torch.rand(HIDDEN // 8)  # old transformers saved it
    t["lm_head.weight"] = r(VOCAB, HIDDEN)
    t["model.mm_projector.0.weight"], t["model.mm_projector.0.bias"] = r(HIDDEN, 768), r(HIDDEN)
    t["model.mm_projector.2.weight"], t["model.mm_projector.2.bias"] = r(HIDDEN, HIDDEN), r(HIDDEN)
    for level, ch in zip(("res2", "res3", "res4", "res5"), (192, 384, 768, 1536), strict=True):
        t[f"mask_extractor.{level}.weight"], t[f"mask_extractor.{level}.bias"] = r(1024, ch), r(1024)
    t["mask_extractor.feat_linear.weight"], t["mask_extractor.feat_linear.bias"] = r(HIDDEN, 1024), r(HIDDEN)
    dims = [112 * 112, 1024, 1024, HIDDEN]
    for j in range(3):
        t[f"mask_extractor.mask_linear.layers.{j}.weight"] = r(dims[j + 1], dims[j])
        t[f"mask_extractor.mask_linear.layers.{j}.bias"] = r(dims[j + 1])
    return t


@pytest.fixture(scope="module")
def clip_visual() -> dict[str, torch.Tensor]:
    """open_clip's own ConvNeXt-Large CLIP tower (``visual.*``, head included), random weights."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("convnext_large_d_320", pretrained=None)
    return {f"visual.{k}": v.half() for k, v in model.visual.state_dict().items()}


def write_common(directory, *, mm_vision_tower: str) -> None:
    directory.mkdir()
    tokenizer = build_tiny_tokenizer(VOCAB)
    tokenizer.save_pretrained(directory)
    config = {
        "model_type": "osprey",
        "architectures": ["OspreyLlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": 4,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": mm_vision_tower,
        "mm_use_im_start_end": False,
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory, clip_visual):
    """Vision tower inside, two safetensors shards and an index, as save_pretrained writes them."""
    directory = tmp_path_factory.mktemp("ckpt") / "Osprey-7b"
    write_common(directory, mm_vision_tower="/nonexistent/open_clip_pytorch_model.bin")
    llm = released_llm_tensors(torch.Generator().manual_seed(1))
    vision = {f"model.vision_tower.vision_tower.{k}": v for k, v in clip_visual.items()}
    shards = {"model-00001-of-00002.safetensors": llm, "model-00002-of-00002.safetensors": vision}
    weight_map = {}
    for name, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return directory, llm, vision


def test_released_layout_loads_with_every_tensor_accounted_for(sharded_checkpoint, caplog):
    directory, llm, vision = sharded_checkpoint
    osprey = Osprey.from_pretrained(str(directory), device="cpu")
    state = osprey.model.state_dict()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    assert torch.equal(state["llm.model.embed_tokens.weight"], llm["model.embed_tokens.weight"].float())
    assert torch.equal(state["llm.lm_head.weight"], llm["lm_head.weight"].float())
    assert torch.equal(
        state["mask_extractor.mask_linear.layers.0.weight"],
        llm["mask_extractor.mask_linear.layers.0.weight"].float(),
    )
    stage = "visual.trunk.stages.2.blocks.26.conv_dw.weight"  # ConvNeXt-L: 27 blocks in stage 3
    assert torch.equal(
        state[f"vision_tower.{stage}"], vision[f"model.vision_tower.vision_tower.{stage}"].float()
    )
    assert osprey.config.mm_hidden_size == 768 and not osprey.untrained
    assert osprey.tokenizer.convert_tokens_to_ids(["<mask>", "<pos>"]) == [VOCAB, VOCAB + 1]
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    mask = np.zeros((64, 96), bool)
    mask[10:40, 20:70] = True
    out = osprey.label(
        image, [mask], LabelRequest(categories=("cat", "dog"), caption=True, max_caption_tokens=3)
    )
    assert out[0].category.label in {"cat", "dog"} and "warning" not in out[0].to_dict()


def test_vision_tower_comes_from_the_open_clip_file_when_absent(tmp_path, clip_visual):
    directory = tmp_path / "Osprey-7b"
    write_common(directory, mm_vision_tower="./clip/open_clip_pytorch_model.bin")
    llm = released_llm_tensors(torch.Generator().manual_seed(2))
    torch.save(llm, directory / "pytorch_model.bin")
    text_tower = {
        "token_embedding.weight": torch.zeros(4, 2),
        "logit_scale": torch.ones(()),
        "ln_final.weight": torch.ones(2),
    }
    torch.save({**clip_visual, **text_tower}, directory / "open_clip_pytorch_model.bin")
    osprey = Osprey.from_pretrained(str(directory), device="cpu")
    key = "visual.trunk.stem.0.weight"
    assert torch.equal(osprey.model.state_dict()[f"vision_tower.{key}"], clip_visual[key].float())


def test_layer_scales_come_from_the_open_clip_file_as_in_the_authors_code(tmp_path, clip_visual, caplog):
    """transformers 4.31 never loads a checkpoint's ``gamma`` (it renames keys containing "gamma"), so the
    authors' tower keeps the open_clip file's fp32 layer scales; without that file ours stay."""
    directory = tmp_path / "Osprey-7b"
    write_common(directory, mm_vision_tower="./clip/open_clip_pytorch_model.bin")
    shipped = {f"model.vision_tower.vision_tower.{k}": v for k, v in clip_visual.items()}
    gammas = {k: v for k, v in clip_visual.items() if k.endswith(".gamma")}
    assert len(gammas) == 36  # ConvNeXt-L: 3 + 3 + 27 + 3 blocks
    for key in gammas:
        shipped[f"model.vision_tower.vision_tower.{key}"] = (gammas[key].float() * 1.1).bfloat16()
    save_file(
        {**released_llm_tensors(torch.Generator().manual_seed(5)), **shipped},
        str(directory / "model.safetensors"),
    )
    clip_gammas = {
        k: torch.rand(v.shape, generator=torch.Generator().manual_seed(6)) for k, v in gammas.items()
    }
    (directory / "clip").mkdir()
    torch.save(
        {**clip_gammas, "visual.trunk.stem.0.weight": torch.zeros(192, 3, 4, 4)},
        directory / "clip" / "open_clip_pytorch_model.bin",
    )
    with caplog.at_level(logging.INFO, logger="osprey.model.loading"):
        osprey = Osprey.from_pretrained(str(directory), device="cpu")
    state = osprey.model.state_dict()
    for key, value in clip_gammas.items():
        assert torch.equal(state[f"vision_tower.{key}"], value), key  # fp32, bit for bit
    stem = "visual.trunk.stem.0.weight"  # everything else comes from the checkpoint
    assert torch.equal(state[f"vision_tower.{stem}"], clip_visual[stem].float())
    assert any(
        "layer scales (36 gamma) from" in m and "open_clip_pytorch_model.bin" in m for m in caplog.messages
    )

    (directory / "clip" / "open_clip_pytorch_model.bin").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="osprey.model.loading"):
        osprey = Osprey.from_pretrained(str(directory), device="cpu")
    key = next(iter(gammas))
    assert torch.equal(
        osprey.model.state_dict()[f"vision_tower.{key}"],
        shipped[f"model.vision_tower.vision_tower.{key}"].float(),
    )
    assert any("layer scales (36 gamma) from the checkpoint" in m for m in caplog.messages)


def test_an_open_clip_file_without_the_layer_scales_is_refused(tmp_path, clip_visual):
    directory = tmp_path / "Osprey-7b"
    write_common(directory, mm_vision_tower="open_clip_pytorch_model.bin")
    shipped = {f"model.vision_tower.vision_tower.{k}": v for k, v in clip_visual.items()}
    save_file(
        {**released_llm_tensors(torch.Generator().manual_seed(7)), **shipped},
        str(directory / "model.safetensors"),
    )
    torch.save(
        {"visual.trunk.stem.0.weight": torch.zeros(192, 3, 4, 4)}, directory / "open_clip_pytorch_model.bin"
    )
    with pytest.raises(
        ValueError, match=r"layer scales.*36 missing tensors: vision_tower\.visual\.trunk\.stages"
    ):
        Osprey.from_pretrained(str(directory), device="cpu")


def test_missing_vision_weights_name_the_file_and_the_command(tmp_path):
    directory = tmp_path / "Osprey-7b"
    write_common(directory, mm_vision_tower="/models/open_clip_pytorch_model.bin")
    torch.save(released_llm_tensors(torch.Generator().manual_seed(3)), directory / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin.*osprey-label download"):
        Osprey.from_pretrained(str(directory), device="cpu")


@pytest.fixture(scope="module")
def meta_model():
    from accelerate import init_empty_weights

    from osprey.model.modeling import build_osprey_model

    config = OspreyConfig.from_checkpoint_config(
        {
            "model_type": "osprey",
            "hidden_size": HIDDEN,
            "intermediate_size": INTER,
            "num_attention_heads": 4,
            "num_hidden_layers": LAYERS,
            "vocab_size": VOCAB,
        },
        name="t",
    )

    def build():
        with init_empty_weights(include_buffers=False):
            return build_osprey_model(config, mask_token_id=VOCAB, pos_token_id=VOCAB + 1, device="meta")

    return build


def test_unexpected_missing_and_misshaped_tensors_are_named(meta_model, clip_visual):
    tensors = released_llm_tensors(torch.Generator().manual_seed(4))
    tensors.update({f"model.vision_tower.vision_tower.{k}": v for k, v in clip_visual.items()})
    extra = dict(tensors, **{"model.mm_projector.4.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"1 unexpected tensors: model\.mm_projector\.4\.weight"):
        load_strict(
            meta_model(), extra.items(), device=torch.device("cpu"), dtype=torch.float32, source="ckpt"
        )
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"1 missing tensors: llm\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_strict(
            meta_model(), missing.items(), device=torch.device("cpu"), dtype=torch.float32, source="ckpt"
        )
    wrong = dict(tensors, **{"lm_head.weight": torch.zeros(VOCAB + 2, HIDDEN)})
    with pytest.raises(ValueError, match=r"lm_head\.weight: checkpoint \(1026, 256\), model \(1024, 256\)"):
        load_strict(
            meta_model(), wrong.items(), device=torch.device("cpu"), dtype=torch.float32, source="ckpt"
        )
