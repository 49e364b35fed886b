"""The loading both region models share (osprey.loading), on real files: weight files and shards, `.bin`
read with weights_only, finding a checkpoint, strict loading naming every problem, presets or checkpoint."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from osprey.loading.configs import JsonConfig, PresetFolder, language_model_fields
from osprey.loading.files import MissingWeightsError, find_checkpoint, iter_tensors, read_config, weight_files
from osprey.loading.loader import ModelLoader, build_and_load, choose_device
from osprey.loading.strict import load_strict, map_by_prefix

KEY_MAP = (("model.body.", "body."), ("head.", "head."))


def map_name(name: str) -> str | None:
    return None if name.endswith("inv_freq") else map_by_prefix(name, KEY_MAP)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 2, bias=False)


def released(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "model.body.weight": torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "model.body.bias": torch.randn(4, generator=gen, dtype=torch.float64),
        "head.weight": torch.randn(2, 4, generator=gen, dtype=torch.float64),
        "model.rotary.inv_freq": torch.ones(2),
    }


@dataclass
class Payload:
    """Anything but tensors and plain containers: a weights-only read refuses it, never unpickling it."""

    value: int = 1


def meta_tiny() -> Tiny:
    with torch.device("meta"):
        return Tiny()


def load(model, tensors, **options):
    return load_strict(
        model, tensors.items(), device=torch.device("cpu"), dtype=torch.float32, source="ckpt",
        map_name=map_name, architecture="Tiny", **options,
    )  # fmt: skip


def test_strict_loading_assigns_every_tensor_in_the_dtype_and_skips_the_known_unused():
    tensors = released(torch.Generator().manual_seed(0))
    model = meta_tiny()
    assert load(model, tensors) == {"body.weight", "body.bias", "head.weight"}
    assert model.body.weight.dtype == torch.float32 and model.body.weight.device.type == "cpu"
    assert torch.equal(model.head.weight, tensors["head.weight"].float())


def test_strict_loading_names_every_unexpected_mis_shaped_and_missing_tensor():
    tensors = released(torch.Generator().manual_seed(0))
    del tensors["model.body.bias"]
    tensors["model.body.weight"] = torch.zeros(5, 3)
    tensors["model.surprise"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        load(meta_tiny(), tensors)
    message = str(error.value)
    assert message.startswith("ckpt does not match the Tiny architecture: ")
    assert "1 unexpected tensors: model.surprise" in message
    assert "model.body.weight: checkpoint (5, 3), model (4, 3)" in message
    assert "missing tensors: body.bias, body.weight" in message


def test_strict_loading_leaves_an_optional_prefix_and_a_scope_to_other_sources():
    tensors = released(torch.Generator().manual_seed(0))
    body_only = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    model = meta_tiny()
    assert load(model, body_only, optional_prefix="head.") == {"body.weight", "body.bias"}
    assert load(model, {"head.weight": tensors["head.weight"]}, scope="head.") == {"head.weight"}


def test_bin_files_are_read_with_weights_only(tmp_path):
    tensors = released(torch.Generator().manual_seed(1))
    torch.save({"state_dict": tensors}, tmp_path / "pytorch_model.bin")
    assert {k: v.shape for k, v in iter_tensors(tmp_path / "pytorch_model.bin")} == {
        k: v.shape for k, v in tensors.items()
    }
    torch.save({"x": Payload()}, tmp_path / "evil.bin")
    with pytest.raises(pickle.UnpicklingError):
        list(iter_tensors(tmp_path / "evil.bin"))


def test_sharded_safetensors_are_found_through_their_index_and_loaded(tmp_path):
    tensors = released(torch.Generator().manual_seed(2))
    names = sorted(tensors)
    shards = {"model-1.safetensors": names[:2], "model-2.safetensors": names[2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(tmp_path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    files = weight_files(tmp_path)
    assert [p.name for p in files] == ["model-1.safetensors", "model-2.safetensors"]
    model, loaded = build_and_load(
        Tiny, files, device=torch.device("cpu"), dtype=torch.float32, source=str(tmp_path),
        map_name=map_name, architecture="Tiny",
    )  # fmt: skip
    assert loaded == {"body.weight", "body.bias", "head.weight"}
    assert torch.equal(model.body.bias, tensors["model.body.bias"].float())
    (tmp_path / "model-2.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="lists shards that are not there: model-2.safetensors"):
        weight_files(tmp_path)


def test_a_folder_without_weights_or_config_says_what_it_expected(tmp_path):
    with pytest.raises(MissingWeightsError, match="no weights in .*model.safetensors, pytorch_model.bin"):
        weight_files(tmp_path)
    with pytest.raises(ValueError, match="has no config.json; it is not a released Tiny checkpoint"):
        read_config(tmp_path, architecture="Tiny")


def test_finding_a_checkpoint(tmp_path, monkeypatch):
    assert find_checkpoint(str(tmp_path), repo=None, known=()) == tmp_path
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; pass the checkpoint directory that holds config.json"):
        find_checkpoint(str(tmp_path / "weights.bin"), repo="org/repo", known=())
    with pytest.raises(ValueError, match=r"neither a checkpoint directory nor a known model.*\(tiny, big\)"):
        find_checkpoint("nothing-like-it", repo=None, known=("tiny", "big"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(
        MissingWeightsError, match=r"org/absent\) are not in the Hugging Face cache.*download"
    ):
        find_checkpoint("big", repo="org/absent", known=())


@dataclass(frozen=True)
class TinyConfig(JsonConfig):
    name: str
    width: int = 4
    untrained: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> TinyConfig:
        return cls(**data)


def test_presets_or_checkpoint(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps({"name": "tiny", "untrained": True}))
    (tmp_path / "big.json").write_text(json.dumps({"name": "big", "width": 8}))
    (tmp_path / "skip_me.json").write_text("{}")
    presets = PresetFolder(folder=tmp_path, config_type=TinyConfig, architecture="Tiny", skip_prefix="skip_")
    assert presets.names() == ["big", "tiny"]
    with pytest.raises(ValueError, match="unknown Tiny preset 'skip_me'; known presets: big, tiny"):
        presets.load("skip_me")
    checkpoints = []

    def build_random(config, *, device, dtype, seed):
        torch.manual_seed(seed)
        return Tiny().to(device=device, dtype=dtype), "tokenizer"

    def load_checkpoint(name_or_path, *, device, dtype):
        checkpoints.append(name_or_path)
        return Tiny(), "tokenizer", presets.load("big")

    loader = ModelLoader(
        architecture="Tiny", preset_names=presets.names, load_preset=presets.load,
        build_random=build_random, load_checkpoint=load_checkpoint,
    )  # fmt: skip
    device, dtype = choose_device("cpu", None)
    assert (device, dtype) == (torch.device("cpu"), torch.float32)
    _, _, config = loader.load("tiny", device=device, dtype=dtype)
    assert config == TinyConfig(name="tiny", untrained=True) and not checkpoints
    _, _, config = loader.load("big", device=device, dtype=dtype, random_weights=True)
    assert config == TinyConfig(name="big", width=8, untrained=True) and not checkpoints
    _, _, config = loader.load("big", device=device, dtype=dtype)
    assert not config.untrained and checkpoints == ["big"]
    with pytest.raises(ValueError, match=r"random_weights needs a preset \(big, tiny\), got '/some/dir'"):
        loader.load("/some/dir", device=device, dtype=dtype, random_weights=True)


def test_a_released_config_json_gives_its_language_model_fields_or_says_why_not():
    hf = {"model_type": "tiny_llm", "name": "t", "width": 16, "untrained": None, "other": 1}
    fields = language_model_fields(hf, TinyConfig, model_types=("tiny_llm", "llama"), architecture="Tiny")
    assert fields == {"name": "t", "width": 16}
    with pytest.raises(
        ValueError, match=r"model_type 'bert'; expected 'tiny_llm' \(a released Tiny checkpoint"
    ):
        language_model_fields(
            {**hf, "model_type": "bert"}, TinyConfig, model_types=("tiny_llm",), architecture="Tiny"
        )
    with pytest.raises(ValueError, match="rope_scaling in config.json is not supported for Tiny checkpoints"):
        language_model_fields(
            {**hf, "rope_scaling": {"type": "linear"}},
            TinyConfig,
            model_types=("tiny_llm",),
            architecture="Tiny",
        )
