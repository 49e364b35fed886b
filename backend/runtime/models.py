"""The models a process serves: the weight check before loading, loading on the chosen device, and the
loaded set (the region model, Osprey or PixelRefer-Lite, a SAM refiner and segment everything sharing one
SAM embedder, the cache budgets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from backend.errors import SettingsError

from .budgets import CacheBudgets, device_budgets
from .settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Models:
    """The loaded models: the region model (a :class:`~osprey.inference.region_model.RegionModel`), a SAM
    refiner and segment-everything sharing one SAM embedder, and the cache tiers' byte budgets they were
    given."""

    region_model: object
    refiner: object
    everything: object
    sam_model: str
    untrained: bool
    budgets: CacheBudgets | None = None

    @property
    def osprey(self):
        """The region model under its old name (scripts written before PixelRefer-Lite)."""
        return self.region_model

    @property
    def version(self) -> str:
        """The base ``model_version``: the region model's and SAM's names (``-untrained`` for random
        weights), e.g. ``pixelrefer-lite-2b+sam-vit_h``."""
        return model_version(self.region_model.model_id, self.sam_model, untrained=self.untrained)

    def warning(self) -> str | None:
        """What every answer says when the weights are random (tests and plumbing checks)."""
        if self.untrained:
            return "untrained model: random weights, its pre-labels are meaningless (tests and plumbing only)"
        return None


def sam_architecture(settings: Settings):
    """SAM_MODEL's architecture; SettingsError naming the known ones for anything else."""
    from osprey.sam.build import SAM_ARCHITECTURES

    arch = SAM_ARCHITECTURES.get(settings.sam_model)
    if arch is None:
        raise SettingsError(
            f"SAM_MODEL={settings.sam_model!r} is unknown; use one of {', '.join(SAM_ARCHITECTURES)}"
        )
    return arch


def sam_checkpoint_path(settings: Settings) -> Path | None:
    """Where SAM's checkpoint is read from (None for the random-weight ``tiny``)."""
    arch = sam_architecture(settings)
    if arch.checkpoint_file is None:
        return None
    return Path(settings.sam_checkpoint or settings.model_dir / arch.checkpoint_file)


def _region_model_source(name: str):
    """``(untrained preset?, resolve(name) -> checkpoint dir)`` for the region model ``name``."""
    from osprey.inference.region_model import model_family

    if model_family(name) == "pixelrefer-lite":
        from osprey.pixelrefer.configuration import load_preset, preset_names
        from osprey.pixelrefer.loading import resolve_checkpoint
    else:
        from osprey.model.checkpoint import resolve_checkpoint
        from osprey.model.config import load_preset, preset_names
    return name in preset_names() and load_preset(name).untrained, resolve_checkpoint


def weight_paths(settings: Settings) -> dict[str, str]:
    """Each model's weights as the start-up report names them."""
    model = settings.model_name
    untrained, resolve = _region_model_source(model)
    if untrained:
        region = f"{model} (random weights)"
    else:
        try:
            region = str(resolve(model))
        except FileNotFoundError:
            region = f"{model} (not found)"
    sam = sam_checkpoint_path(settings)
    return {
        "region model": region,
        "sam": str(sam) if sam is not None else f"{settings.sam_model} (random weights)",
    }


def model_version(region: str, sam_model: str, *, untrained: bool) -> str:
    """The one spelling of a base ``model_version``: region model, SAM, ``-untrained`` for random weights."""
    base = f"{region}+sam-{sam_model}"
    return f"{base}-untrained" if untrained else base


def base_version(settings: Settings) -> str:
    """:attr:`Models.version` of the models ``settings`` name, without loading them (a process that
    coordinates work whose models load elsewhere: ``prelabel --ray``'s driver). A released model is named
    by its checkpoint folder, as loading names it; FileNotFoundError when that folder is not here."""
    model = settings.model_name
    untrained, resolve = _region_model_source(model)
    region = model if untrained else resolve(model).name
    return model_version(
        region, settings.sam_model, untrained=untrained or sam_checkpoint_path(settings) is None
    )


def check_weights(settings: Settings) -> None:
    """Raise FileNotFoundError naming every missing weight file and the command that fetches it."""
    from osprey.model.checkpoint import weight_files

    missing = []
    model = settings.model_name
    untrained, resolve = _region_model_source(model)
    if not untrained:
        try:
            weight_files(resolve(model))
        except FileNotFoundError as error:
            missing.append(str(error))
    path = sam_checkpoint_path(settings)
    if path is not None and not path.is_file():
        missing.append(
            f"SAM checkpoint {path} is missing; run `osprey-label download --sam {settings.sam_model}` "
            f"(saves {path.name} under MODEL_DIR) or set SAM_CHECKPOINT"
        )
    if missing:
        raise FileNotFoundError("cannot start, weights are missing:\n  " + "\n  ".join(missing))


def load_models(settings: Settings, *, device: str, random_weights: bool = False) -> Models:
    """Load the region model and SAM on ``device`` as the settings say (FileNotFoundError naming missing weights),
    then give their caches the byte budgets left on the device. ``random_weights`` builds the full-size
    architectures with random weights instead (benchmarks)."""
    from osprey.inference.api import image_feature_cache
    from osprey.inference.region_model import load_region_model
    from osprey.sam import EverythingOptions, SamEverything, SamImageEmbedder, SamRefiner, build_sam
    from osprey.sam.build import resolve_sam_dtype

    def disk(name: str) -> str | None:
        return f"{settings.cache_dir}/{name}" if settings.cache_dir else None

    osprey = load_region_model(settings.model_name, device=device, random_weights=random_weights)
    osprey.fast.set_decoding(compile=settings.compile, sync_every=settings.sync_every)
    arch = sam_architecture(settings)
    checkpoint = None if random_weights else sam_checkpoint_path(settings)
    sam = build_sam(
        settings.sam_model, checkpoint=str(checkpoint) if checkpoint else None,
        random_weights=checkpoint is None and arch.checkpoint_file is not None, device=osprey.device,
        dtype=resolve_sam_dtype(settings.sam_dtype, osprey.device),
    )  # fmt: skip
    budgets = device_budgets(settings, osprey)  # with both models loaded: what is left for the caches
    osprey.cache = image_feature_cache(
        max_images=settings.cache_images, max_bytes=budgets.osprey_device, host_max_bytes=budgets.osprey_host,
        device=osprey.device, disk_dir=disk("osprey"), max_disk_bytes=budgets.osprey_disk,
    )  # fmt: skip
    embedder = SamImageEmbedder(
        sam=sam, model_id=f"sam_{settings.sam_model}", max_images=settings.cache_images,
        max_bytes=budgets.sam_device, host_max_bytes=budgets.sam_host, disk_dir=disk("sam"),
        max_disk_bytes=budgets.sam_disk,
    )  # fmt: skip
    options = EverythingOptions(
        points_per_side=settings.points_per_side,
        pred_iou_thresh=settings.pred_iou_thresh,
        stability_score_thresh=settings.stability_score_thresh,
        min_mask_region_area=settings.min_mask_region_area,
        max_masks=settings.max_masks,
        **({"points_per_batch": budgets.points_per_batch} if budgets.points_per_batch else {}),
    )
    models = Models(
        region_model=osprey,
        refiner=SamRefiner(embedder=embedder),
        everything=SamEverything(embedder=embedder, options=options),
        sam_model=settings.sam_model,
        untrained=osprey.untrained or checkpoint is None,
        budgets=budgets,
    )
    decoding = "compiled" if osprey.fast.decoder.compiled_for(osprey.device) else "eager"
    logger.info(
        "models loaded: %s on %s; decoding %s, finished answers read every %d steps",
        models.version, osprey.device, decoding, settings.sync_every,
    )  # fmt: skip
    return models


def device_memory(models: Models) -> dict | None:
    """The model device's memory as PyTorch's allocator sees it (CUDA only; None on a CPU)."""
    device = getattr(models.region_model, "device", None)
    if device is None or device.type != "cuda":
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "allocated_bytes": torch.cuda.memory_allocated(device),
        "reserved_bytes": torch.cuda.memory_reserved(device),
        "max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "free_bytes": free,
        "total_bytes": total,
    }
