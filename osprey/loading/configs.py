"""What every model's configuration does the same way: validation on creation, JSON (de)serialisation,
presets as JSON files in the model's ``model_configs`` folder, and reading a released ``config.json``.

A model's architecture stays its own frozen dataclasses (``osprey.model.config``,
``osprey.pixelrefer.configuration``); these are the rules they share.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


def require(condition: bool, message: str) -> None:
    """ValueError with ``message`` unless ``condition`` (a config's validation on creation)."""
    if not condition:
        raise ValueError(message)


def check_keys(data: dict[str, Any], known: set[str], *, what: str) -> None:
    """ValueError naming every key of ``data`` that is not in ``known``."""
    unknown = sorted(set(data) - known)
    require(not unknown, f"unknown {what} keys {unknown}; expected some of {sorted(known)}")


def set_fields(hf_config: dict[str, Any], config_type: type) -> dict[str, Any]:
    """The fields of the dataclass ``config_type`` that a released ``config.json`` sets (not null)."""
    return {f.name: hf_config[f.name] for f in fields(config_type) if hf_config.get(f.name) is not None}


def language_model_fields(
    hf_config: dict[str, Any], config_type: type, *, model_types: tuple[str, ...], architecture: str
) -> dict[str, Any]:
    """The language model's fields (:func:`set_fields` of ``config_type``) of a released ``config.json``
    whose ``model_type`` is one of ``model_types``; ValueError for another model type or a
    ``rope_scaling`` (neither model's decoder implements one)."""
    model_type = hf_config.get("model_type")
    require(
        model_type in model_types,
        f"config.json has model_type {model_type!r}; expected {model_types[0]!r} (a released {architecture} "
        "checkpoint)",
    )
    if isinstance(hf_config.get("rope_scaling"), dict):
        raise ValueError(f"rope_scaling in config.json is not supported for {architecture} checkpoints")
    return set_fields(hf_config, config_type)


class JsonConfig:
    """``to_dict`` and ``from_json`` for a config dataclass that defines ``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class PresetFolder:
    """A model's presets: ``<name>.json`` files in ``folder`` (those starting with ``skip_prefix`` are
    not presets), each read by ``config_type.from_json``."""

    folder: Path
    config_type: type
    architecture: str
    skip_prefix: str | None = None

    def names(self) -> list[str]:
        stems = (p.stem for p in self.folder.glob("*.json"))
        return sorted(s for s in stems if not (self.skip_prefix and s.startswith(self.skip_prefix)))

    def load(self, name: str):
        path = self.folder / f"{name}.json"
        if (self.skip_prefix and name.startswith(self.skip_prefix)) or not path.is_file():
            raise ValueError(
                f"unknown {self.architecture} preset {name!r}; known presets: {', '.join(self.names())}"
            )
        return self.config_type.from_json(path)
