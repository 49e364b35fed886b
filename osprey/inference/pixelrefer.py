"""PixelRefer-Lite behind the region-model interface (:class:`~osprey.inference.region_model.RegionModel`).

model = PixelReferLite.from_pretrained("pixelrefer-lite-2b")     # or a checkpoint dir, or "pixelrefer-lite-tiny"
labels = model.label(image, masks, LabelRequest(categories=("cat", "dog"), caption=True))

The image is encoded once (the whole image at 336x336 through the tower: the global features of every
region's infusion); each region then becomes exactly ``mask_num`` (32) tokens from its own crop
(:meth:`~osprey.pixelrefer.modeling.PixelReferModel.region_tokens`). The LLM sees no image tokens, so
the prompt prefix is the chat header alone and the fast path's shared segments are the chat header and
each question's text up to its first region: every region and candidate of every question runs in the
same forwards, as for Osprey, through the same planner and runner. The k-means draw of a region is seeded
by its mask (:func:`~osprey.pixelrefer.modeling.region_seed`), so the same request always gets the same
answers; greedy decoding applies the checkpoint's repetition penalty to the generated tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from osprey.model.llm import KVState, forward_on_state
from osprey.pixelrefer.configuration import PixelReferConfig
from osprey.pixelrefer.loading import PIXELREFER
from osprey.pixelrefer.modeling import PixelReferModel, region_seed
from osprey.pixelrefer.processing import region_crop, whole_image
from osprey.pixelrefer.prompts import CHAT_PREFIX, IM_END, PixelReferPrompts

from .baseline import BaselineRunner
from .fast import EncodedImage, FastRunner, SegmentTree
from .model_base import RegionModelBase
from .plan import Question

ENCODING_FORMAT = "pixelrefer1"  # part of every cache key: bump when the EncodedImage layout changes
FAMILY = "pixelrefer-lite"


class _Baseline(BaselineRunner):
    """The authors' flow (``mm_infer`` with one mask): for every region and question the whole image, the
    crop and the local crop go through the tower again and the full prompt through the LLM."""

    def __init__(self, *, owner: PixelReferLite, **kwargs) -> None:
        super().__init__(**kwargs)
        self.owner = owner

    def _prompt_embeds(self, image: np.ndarray, mask: torch.Tensor, question: Question) -> torch.Tensor:
        tokens = self.owner._region_tokens(image, mask.cpu().numpy() > 0, None)
        return self.model.embed(
            torch.tensor(list(question.ids), device=self.model.device), region_tokens=tokens
        )


class PixelReferLite(RegionModelBase):
    """A loaded PixelRefer-Lite with its tokenizer; the same interface as :class:`~osprey.inference.api.Osprey`
    (the shared part is :class:`RegionModelBase`).

    ``from_pretrained`` knows the presets ``pixelrefer-lite-tiny``/``-small`` (random weights) and
    ``pixelrefer-lite-2b``/``-7b`` (the released checkpoint from the Hugging Face cache), a checkpoint
    directory and a cached Hugging Face repo id. ``seed`` seeds every region's k-means draw."""

    family = FAMILY
    encoding_format = ENCODING_FORMAT
    loader = PIXELREFER

    def __init__(
        self,
        *,
        model: PixelReferModel,
        tokenizer,
        config: PixelReferConfig,
        model_id: str,
        cache=None,
        max_batch_tokens: int = 2048,
        seed: int = 0,
    ) -> None:
        self.seed = seed
        prompts = PixelReferPrompts(config.mask_num)
        eos = int(tokenizer.convert_tokens_to_ids(IM_END))
        super().__init__(
            model=model, tokenizer=tokenizer, config=config, model_id=model_id, cache=cache, prompts=prompts,
            fast=FastRunner(
                model=model, eos_token_id=eos, max_batch_tokens=max_batch_tokens,
                repetition_penalty=config.repetition_penalty,
            ),
            baseline=_Baseline(
                owner=self, model=model, eos_token_id=eos, pad_token_id=int(tokenizer.pad_token_id),
                repetition_penalty=config.repetition_penalty,
            ),
            prefix_ids=tuple(prompts.tokenize_prompt(tokenizer, CHAT_PREFIX)),  # shared by every prompt
            vision_blocks=model.vision_encoder.encoder.layers,
        )  # fmt: skip

    # ---- images ----
    @torch.inference_mode()
    def _encode(self, rgb: np.ndarray) -> EncodedImage:
        """The whole image's tower features and the chat header's keys/values."""
        whole = self.model.encode_whole(whole_image(rgb, self.config))  # (G, C)
        side = self.config.global_size // self.config.vision.patch_size
        features = {"global": whole.T.reshape(-1, side, side)}  # (C, h, w)
        empty = torch.zeros(0, self.config.text.hidden_size, device=self.device, dtype=self.model.dtype)
        return self._with_prefix(features, empty, rgb.shape[:2])

    @torch.inference_mode()
    def _with_prefix(self, features: dict, image_tokens: torch.Tensor, image_hw) -> EncodedImage:
        """The chat header run through the decoder (the same for every image; a few tokens)."""
        model, n = self.model, len(self._prefix_ids)
        tree = SegmentTree()
        _, state = forward_on_state(
            model.llm, KVState.empty(model.device),
            embeds=model.embed(torch.tensor([list(self._prefix_ids)], device=model.device)),
            segment=torch.zeros(1, n, dtype=torch.long, device=model.device),
            position=torch.arange(n, device=model.device)[None],
            visible=tree.visible(model.device)[None], logits_at=None,
        )  # fmt: skip
        return EncodedImage(
            image_hw=tuple(image_hw), features=features, image_tokens=image_tokens,
            prefix_ids=self._prefix_ids, state=state, tree=tree,
        )  # fmt: skip

    # ---- regions ----
    @torch.inference_mode()
    def _region_tokens(self, rgb: np.ndarray, mask: np.ndarray, encoded: EncodedImage | None) -> torch.Tensor:
        """One region's ``(mask_num, D)`` tokens; the global features from ``encoded`` when given."""
        if encoded is None:
            whole = self.model.encode_whole(whole_image(rgb, self.config))
        else:
            feats = encoded.features["global"]
            whole = feats.reshape(feats.shape[0], -1).T
        crop = region_crop(rgb, mask, self.config)
        return self.model.region_tokens(crop, whole, region_seed(mask, self.seed))

    def region_tokens(self, rgb: np.ndarray, masks: torch.Tensor, encoded: EncodedImage) -> torch.Tensor:
        """``masks`` ``(R, H, W)`` -> ``(R, mask_num, D)``, each region on its own (its own crop)."""
        return torch.stack([self._region_tokens(rgb, m.numpy() > 0, encoded) for m in masks.cpu()])

    def region_tokens_of(self, rgb: np.ndarray, masks: torch.Tensor, encoded: EncodedImage) -> tuple:
        """What ``masks`` ``(R, H, W)`` put into a prompt: ``((R, mask_num, D),)``."""
        return (self.region_tokens(rgb, masks, encoded),)

    # ---- what the learning loop and the budgets ask ----
    def feature_levels(self) -> tuple[tuple[str, int], ...]:
        """The encoded feature maps the per-project head pools inside each mask, with their widths."""
        return (("global", self.config.vision.hidden_size),)

    def lora_sequences(self, *, train: Sequence[str] = ()):
        """LoRA training's samples in PixelRefer-Lite's prompts, region tokens as served
        (:class:`~osprey.pixelrefer.training.PixelReferSequences`; ``train`` must be empty)."""
        from osprey.pixelrefer.training import PixelReferSequences

        return PixelReferSequences(
            model=self.model, tokenizer=self.tokenizer, config=self.config, seed=self.seed, train=train
        )

    def encoding_bytes(self, image_hw: tuple[int, int] = (480, 640)):
        """One cached encoding from shapes (the same for any image size: the whole image is resized to
        ``global_size``): the global features ``(C, side, side)``, no image tokens, the chat header's keys
        and values; the tower's peak is that of its largest call, a region's crop at the pixel cap beside
        its local crop (:func:`~osprey.inference.memory.tower_peak_bytes`)."""
        from .memory import EncodingBytes, prefix_kv_bytes, tower_peak_bytes

        config, dtype = self.config, self.model.dtype
        element = torch.empty((), dtype=dtype).element_size()
        patch = config.vision.patch_size
        side = config.global_size // patch
        crop_call = config.max_pixels // patch**2 + (config.local_size // patch) ** 2
        tokens = len(self._prefix_ids)
        return EncodingBytes(
            features=config.vision.hidden_size * side * side * element, image_tokens=0,
            prefix_kv=prefix_kv_bytes(self.model.llm.config, tokens, dtype), prefix_tokens=tokens,
            vision_peak=tower_peak_bytes(config.vision, dtype, tokens=max(side * side, crop_call)),
        )  # fmt: skip

    @property
    def feature_backbone(self) -> str:
        vision = self.config.vision
        return f"siglip-navit-{vision.hidden_size}x{vision.num_hidden_layers}"
