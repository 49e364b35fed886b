"""The one adapter module for the ``segment-anything`` library.

Everything else in :mod:`osprey.sam` imports SAM's classes and helpers from here, so a change of
the upstream package touches this file only.

Architectures are data (:data:`SAM_ARCHITECTURES`), and thin ``build_*`` functions wire SAM's own
modules (``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder`` with a ``TwoWayTransformer``)
together, as ``segment_anything/build_sam.py`` does. Checkpoints are read from a local path only;
nothing is downloaded here (``osprey-label download`` fetches them where a network exists).

``dtype`` applies to the image encoder only, the part that costs time and memory. The prompt
encoder and mask decoder stay float32 because SAM's prompt encoder casts point coordinates to
float32 before multiplying them with its own weights, and every mask, score and threshold is
computed from float32 decoder outputs. ``SAM_DTYPE`` (:func:`resolve_sam_dtype`) picks the encoder's
dtype: bfloat16 on CUDA, float32 on the CPU, unless set (docs/models.md states the measured agreement).
On CUDA, :func:`build_sam` also turns TF32 on for float32 matrix products and convolutions
(:func:`enable_tf32`), once per process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.automatic_mask_generator import SamAutomaticMaskGenerator
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import get_rel_pos
from segment_anything.predictor import SamPredictor
from segment_anything.utils.amg import (
    MaskData,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_points,
)
from segment_anything.utils.transforms import ResizeLongestSide

from .checkpoints import DEFAULT_SAM_BASE_URL, SAM_CHECKPOINTS

__all__ = [
    "SAM_ARCHITECTURES",
    "SAM_DTYPES",
    "TINY_MODEL_TYPE",
    "MaskData",
    "ResizeLongestSide",
    "Sam",
    "SamArchitecture",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "batched_mask_to_box",
    "build_all_layer_point_grids",
    "build_sam",
    "build_tiny_sam",
    "calculate_stability_score",
    "checkpoint_url",
    "enable_tf32",
    "generate_crop_boxes",
    "get_rel_pos",
    "is_box_near_crop_edge",
    "known_model_types",
    "remove_small_regions",
    "resolve_sam_dtype",
    "uncrop_boxes_xyxy",
    "uncrop_points",
]

logger = logging.getLogger(__name__)

TINY_MODEL_TYPE = "tiny"

# SAM_DTYPE values -> the image encoder's dtype ("auto": bf16 on CUDA, fp32 elsewhere).
SAM_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SamArchitecture:
    """One SAM architecture: the image encoder's shape plus the fixed prompt/decoder sizes.

    ``image_size`` is the square input frame of the encoder (1024 for the released models);
    the image embedding is ``(prompt_embed_dim, image_size / patch_size, image_size / patch_size)``
    and SAM's low-resolution mask input is 4x that spatial size (256x256 for the released models).
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    checkpoint_file: str | None = None
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size must be a multiple of patch_size, got {self.image_size} and {self.patch_size}"
            )
        if any(i < 0 or i >= self.encoder_depth for i in self.encoder_global_attn_indexes):
            raise ValueError(
                f"encoder_global_attn_indexes must lie in [0, {self.encoder_depth}), "
                f"got {self.encoder_global_attn_indexes}"
            )


SAM_ARCHITECTURES: dict[str, SamArchitecture] = {
    "vit_h": SamArchitecture(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
        checkpoint_file=SAM_CHECKPOINTS["vit_h"].name,
    ),
    "vit_l": SamArchitecture(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
        checkpoint_file=SAM_CHECKPOINTS["vit_l"].name,
    ),
    "vit_b": SamArchitecture(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
        checkpoint_file=SAM_CHECKPOINTS["vit_b"].name,
    ),
    # Random weights only, for tests and plumbing checks: the real input frame (1024) and mask
    # input size (256), with every width and depth cut down so a CPU encodes an image in ~0.1 s.
    TINY_MODEL_TYPE: SamArchitecture(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        prompt_embed_dim=32,
        mask_in_chans=8,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}


def known_model_types() -> list[str]:
    """Model types :func:`build_sam` accepts, real checkpoints first."""
    return list(SAM_ARCHITECTURES)


def checkpoint_url(model_type: str) -> str:
    """Published download address of the checkpoint of ``model_type`` (for the download command)."""
    arch = _architecture(model_type)
    if arch.checkpoint_file is None:
        raise ValueError(f"model type {model_type!r} has no published checkpoint; it is random-weights only")
    return DEFAULT_SAM_BASE_URL + arch.checkpoint_file


def resolve_sam_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The image encoder's dtype for ``SAM_DTYPE`` = ``name`` (``auto``, ``bf16`` or ``fp32``) on ``device``.

    ``auto`` is bfloat16 on CUDA (half the encoder's time and activation memory; masks agree with
    float32's to the figures in docs/models.md) and float32 elsewhere (a CPU without bfloat16 matrix
    units runs bfloat16 slower, not faster)."""
    key = str(name).strip().lower()
    if key == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return SAM_DTYPES[key]
    except KeyError:
        raise ValueError(f"SAM dtype must be auto, {' or '.join(SAM_DTYPES)}; got {name!r}") from None


_TF32_ON = False


def enable_tf32(device: str | torch.device) -> bool:
    """On a CUDA ``device``, let float32 matrix products and cuDNN convolutions use TF32 (process-wide,
    what Osprey and SAM both want: 10 mantissa bits in the products, float32 accumulation). Logged the
    first time; returns whether TF32 is on."""
    global _TF32_ON
    if torch.device(device).type != "cuda":
        return _TF32_ON
    if not _TF32_ON:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        _TF32_ON = True
        logger.info("TF32 on for float32 matmuls and cuDNN convolutions on CUDA")
    return True


def build_sam(
    model_type: str,
    *,
    checkpoint: str | Path | None = None,
    random_weights: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Sam:
    """Build a SAM model in eval mode.

    Args:
        model_type: one of :func:`known_model_types` (``vit_h``, ``vit_l``, ``vit_b``, ``tiny``).
        checkpoint: path to the released ``.pth`` file (e.g. ``sam_vit_b_01ec64.pth``). Required
            unless ``random_weights`` is true; loaded strictly (every key, every shape).
        random_weights: build the full-size architecture with random initialisation from ``seed``
            (benchmarks and tests; masks are meaningless). ``tiny`` is always random.
        seed: seed for the random initialisation; the global RNG state is left untouched.
        device: where the model lives (``"cpu"``, ``"cuda"``, ``"cuda:1"``...); on CUDA TF32 is turned on
            (:func:`enable_tf32`).
        dtype: dtype of the image encoder (see :func:`resolve_sam_dtype`); the prompt encoder and mask
            decoder stay float32.

    Raises:
        ValueError: unknown ``model_type``, or neither/both of ``checkpoint`` and ``random_weights``.
        FileNotFoundError: ``checkpoint`` does not exist (the message names the file to fetch).
    """
    arch = _architecture(model_type)
    if arch.checkpoint_file is None:  # tiny: random weights only
        if checkpoint is not None:
            raise ValueError(
                f"model type {model_type!r} has random weights only; got checkpoint={checkpoint!s}"
            )
        random_weights = True
    if random_weights and checkpoint is not None:
        raise ValueError("pass either checkpoint=<path> or random_weights=True, not both")
    path = None if random_weights else _checkpoint_path(model_type, arch, checkpoint)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = _assemble(arch)
    if path is not None:
        _load_checkpoint(sam, path, model_type)
    else:
        logger.info("built SAM %s with RANDOM weights (seed %d): masks are not meaningful", model_type, seed)
    sam.image_encoder.to(dtype=dtype)
    sam.to(device=device)
    enable_tf32(device)
    logger.info("SAM %s on %s, image encoder in %s", model_type, device, str(dtype).removeprefix("torch."))
    return sam.eval()


def build_tiny_sam(
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Sam:
    """Tiny SAM with random weights from ``seed``: SAM's own modules at small widths, for tests.

    Same input frame (1024) and mask input size (256x256) as the released models, so every
    coordinate transform is exercised exactly as with a real checkpoint.
    """
    return build_sam(TINY_MODEL_TYPE, random_weights=True, seed=seed, device=device, dtype=dtype)


def _architecture(model_type: str) -> SamArchitecture:
    try:
        return SAM_ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"unknown SAM model type {model_type!r}; expected one of {', '.join(known_model_types())}"
        ) from None


def _checkpoint_path(model_type: str, arch: SamArchitecture, checkpoint: str | Path | None) -> Path:
    if checkpoint is None:
        raise ValueError(
            f"SAM {model_type} needs checkpoint=<path to {arch.checkpoint_file}>; "
            "run `osprey-label download` to fetch it, or pass random_weights=True for benchmarks"
        )
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM {model_type} checkpoint not found at {path} (expected the published file "
            f"{arch.checkpoint_file}, from {DEFAULT_SAM_BASE_URL}{arch.checkpoint_file}); "
            "run `osprey-label download` to fetch it"
        )
    return path


def _assemble(arch: SamArchitecture) -> Sam:
    embedding_size = arch.image_size // arch.patch_size
    image_encoder = ImageEncoderViT(
        depth=arch.encoder_depth,
        embed_dim=arch.encoder_embed_dim,
        img_size=arch.image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=arch.encoder_num_heads,
        patch_size=arch.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=arch.encoder_global_attn_indexes,
        window_size=arch.window_size,
        out_chans=arch.prompt_embed_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=arch.prompt_embed_dim,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(arch.image_size, arch.image_size),
        mask_in_chans=arch.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=arch.decoder_depth,
            embedding_dim=arch.prompt_embed_dim,
            mlp_dim=arch.decoder_mlp_dim,
            num_heads=arch.decoder_num_heads,
        ),
        transformer_dim=arch.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=arch.iou_head_hidden_dim,
    )
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _load_checkpoint(sam: Sam, path: Path, model_type: str) -> None:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} is not a SAM state dict (got {type(state_dict).__name__})")
    expected = sam.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} does not match SAM {model_type}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, wrong shapes {wrong_shape[:5]}; "
            "is it the checkpoint of another model type?"
        )
    sam.load_state_dict(state_dict, strict=True)
    logger.info("loaded SAM %s weights from %s", model_type, path)
