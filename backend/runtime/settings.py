"""Runtime settings, read from the environment once and passed to the app factory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from backend.labelstudio.limits import PayloadLimits


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    """Every setting, its environment variable and default. See the README's configuration table."""

    # Label Studio connection (ecosystem conventions)
    label_studio_url: str | None = field(default=None, metadata={"env": "LABEL_STUDIO_URL"})
    label_studio_api_key: str | None = field(default=None, metadata={"env": "LABEL_STUDIO_API_KEY"})
    basic_auth_user: str | None = field(default=None, metadata={"env": "BASIC_AUTH_USER"})
    basic_auth_pass: str | None = field(default=None, metadata={"env": "BASIC_AUTH_PASS"})
    model_dir: Path = field(default=Path("./models"), metadata={"env": "MODEL_DIR"})
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL"})
    host: str = field(default="0.0.0.0", metadata={"env": "HOST"})
    port: int = field(default=9090, metadata={"env": "PORT"})
    threads: int = field(default=8, metadata={"env": "THREADS"})
    # Serving (waitress, see backend/service/server.py): what a client may send and for how long
    max_request_bytes: int = field(default=64 * 2**20, metadata={"env": "OSPREY_MAX_REQUEST_BYTES"})
    max_header_bytes: int = field(default=64 * 2**10, metadata={"env": "OSPREY_MAX_HEADER_BYTES"})
    client_timeout_s: float = field(default=30.0, metadata={"env": "OSPREY_CLIENT_TIMEOUT_S"})
    max_connections: int = field(default=500, metadata={"env": "OSPREY_MAX_CONNECTIONS"})
    webhook_concurrency: int = field(default=2, metadata={"env": "OSPREY_WEBHOOK_CONCURRENCY"})
    webhook_secret: str | None = field(default=None, metadata={"env": "OSPREY_WEBHOOK_SECRET"})
    # Models
    osprey_model: str = field(default="osprey-7b", metadata={"env": "OSPREY_MODEL"})
    sam_model: str = field(default="vit_h", metadata={"env": "SAM_MODEL"})
    sam_checkpoint: str | None = field(default=None, metadata={"env": "SAM_CHECKPOINT"})
    device: str | None = field(default=None, metadata={"env": "OSPREY_DEVICE"})
    # Behaviour
    field_map: str = field(default="", metadata={"env": "OSPREY_FIELD_MAP"})
    refine_existing: bool = field(default=False, metadata={"env": "OSPREY_REFINE_EXISTING"})
    segment_everything: bool = field(default=True, metadata={"env": "OSPREY_SEGMENT_EVERYTHING"})
    max_masks: int = field(default=32, metadata={"env": "OSPREY_MAX_MASKS"})
    points_per_side: int = field(default=32, metadata={"env": "OSPREY_POINTS_PER_SIDE"})
    pred_iou_thresh: float = field(default=0.88, metadata={"env": "OSPREY_PRED_IOU_THRESH"})
    stability_score_thresh: float = field(default=0.95, metadata={"env": "OSPREY_STABILITY_SCORE_THRESH"})
    min_mask_region_area: int = field(default=100, metadata={"env": "OSPREY_MIN_MASK_AREA"})
    attribute_threshold: float = field(default=0.5, metadata={"env": "OSPREY_ATTRIBUTE_THRESHOLD"})
    max_caption_tokens: int = field(default=32, metadata={"env": "OSPREY_MAX_CAPTION_TOKENS"})
    max_description_tokens: int = field(default=256, metadata={"env": "OSPREY_MAX_DESCRIPTION_TOKENS"})
    cache_images: int = field(default=16, metadata={"env": "OSPREY_CACHE_IMAGES"})
    cache_device_bytes: str = field(default="auto", metadata={"env": "OSPREY_CACHE_DEVICE_BYTES"})
    cache_host_bytes: str = field(default="auto", metadata={"env": "OSPREY_CACHE_HOST_BYTES"})
    cache_disk_bytes: str = field(default="4GiB", metadata={"env": "OSPREY_CACHE_DISK_BYTES"})
    device_spare_bytes: str = field(default="2GiB", metadata={"env": "OSPREY_DEVICE_SPARE_BYTES"})
    cache_dir: str | None = field(default=None, metadata={"env": "OSPREY_CACHE_DIR"})
    # Batch predictions and bulk pre-labelling
    predict_budget_s: float = field(default=60.0, metadata={"env": "OSPREY_PREDICT_BUDGET_S"})
    prelabel_batch_tasks: int = field(default=4, metadata={"env": "OSPREY_PRELABEL_BATCH_TASKS"})
    prelabel_chunk_tasks: int = field(default=8, metadata={"env": "OSPREY_PRELABEL_CHUNK_TASKS"})
    prelabel_retries: int = field(default=2, metadata={"env": "OSPREY_PRELABEL_RETRIES"})
    # Retraining
    redis_url: str | None = field(default=None, metadata={"env": "REDIS_URL"})
    train_every: int = field(default=20, metadata={"env": "OSPREY_TRAIN_EVERY"})
    training: bool = field(default=True, metadata={"env": "OSPREY_TRAINING"})
    min_train_examples: int = field(default=5, metadata={"env": "OSPREY_MIN_TRAIN_EXAMPLES"})
    lora: str = field(default="auto", metadata={"env": "OSPREY_LORA"})
    # Image loading safety
    allowed_image_hosts: tuple[str, ...] = field(default=(), metadata={"env": "OSPREY_ALLOWED_IMAGE_HOSTS"})
    local_files_root: str | None = field(default=None, metadata={"env": "LOCAL_FILES_DOCUMENT_ROOT"})
    max_image_bytes: int = field(default=50 * 2**20, metadata={"env": "OSPREY_MAX_IMAGE_BYTES"})
    max_image_pixels: int = field(default=100_000_000, metadata={"env": "OSPREY_MAX_IMAGE_PIXELS"})
    image_timeout_s: float = field(default=15.0, metadata={"env": "OSPREY_IMAGE_TIMEOUT_S"})
    image_url_ttl_s: float = field(default=60.0, metadata={"env": "OSPREY_IMAGE_URL_TTL_S"})
    # Payload limits (regions claim image sizes too: OSPREY_MAX_IMAGE_PIXELS caps them)
    max_polygon_points: int = field(default=10_000, metadata={"env": "OSPREY_MAX_POLYGON_POINTS"})
    max_prompt_points: int = field(default=100, metadata={"env": "OSPREY_MAX_PROMPT_POINTS"})
    max_regions: int = field(default=1_000, metadata={"env": "OSPREY_MAX_REGIONS"})

    def __post_init__(self) -> None:
        self.payload_limits()  # refuses non-positive limits, naming the variable
        if self.threads < 1:
            raise ValueError("THREADS must be >= 1")
        if self.max_request_bytes < 1024 or self.max_header_bytes < 1024:
            raise ValueError("OSPREY_MAX_REQUEST_BYTES and OSPREY_MAX_HEADER_BYTES must be >= 1024 bytes")
        if self.client_timeout_s <= 0 or self.max_connections < 1 or self.webhook_concurrency < 1:
            raise ValueError(
                "OSPREY_CLIENT_TIMEOUT_S must be > 0 seconds, OSPREY_MAX_CONNECTIONS and "
                "OSPREY_WEBHOOK_CONCURRENCY >= 1"
            )
        from .budgets import parse_bytes

        for name in ("cache_device_bytes", "cache_host_bytes", "cache_disk_bytes", "device_spare_bytes"):
            parse_bytes(
                getattr(self, name),
                setting=f"OSPREY_{name.upper()}",
                auto=name in ("cache_device_bytes", "cache_host_bytes"),
            )
        if self.image_url_ttl_s < 0:
            raise ValueError("OSPREY_IMAGE_URL_TTL_S must be >= 0 seconds (0: always fetch)")
        if self.cache_images < 1:
            raise ValueError("OSPREY_CACHE_IMAGES must be >= 1")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.lora not in ("auto", "true", "false"):
            raise ValueError(f"OSPREY_LORA must be auto, true or false, got {self.lora!r}")
        if not 0.0 < self.attribute_threshold < 1.0:
            raise ValueError("OSPREY_ATTRIBUTE_THRESHOLD must be between 0 and 1")
        if self.predict_budget_s <= 0:
            raise ValueError(
                "OSPREY_PREDICT_BUDGET_S must be > 0 seconds (keep it under Label Studio's ML_TIMEOUT_PREDICT)"
            )
        if self.prelabel_batch_tasks < 1 or self.prelabel_chunk_tasks < 1 or self.prelabel_retries < 0:
            raise ValueError(
                "OSPREY_PRELABEL_BATCH_TASKS and OSPREY_PRELABEL_CHUNK_TASKS must be >= 1, OSPREY_PRELABEL_RETRIES >= 0"
            )

    def payload_limits(self) -> PayloadLimits:
        """The caps on what a payload may make the backend allocate (see :mod:`backend.labelstudio.limits`)."""
        return PayloadLimits(
            max_image_pixels=self.max_image_pixels,
            max_polygon_points=self.max_polygon_points,
            max_prompt_points=self.max_prompt_points,
            max_regions=self.max_regions,
        )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); ``overrides`` win."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or f.name in overrides:
                continue
            try:
                values[f.name] = _convert(f.type, raw)
            except ValueError as error:
                raise ValueError(f"{f.metadata['env']}={raw!r}: {error}") from None
        return cls(**{**values, **overrides})

    @staticmethod
    def documented() -> list[tuple[str, str]]:
        """``(ENV_VAR, default)`` for every setting (the README's table is checked against this)."""
        return [(f.metadata["env"], repr(f.default)) for f in fields(Settings)]


def _convert(kind: str, raw: str):
    if "bool" in kind:
        return _bool(raw)
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    if "Path" in kind:
        return Path(raw)
    if "tuple" in kind:
        return _list(raw)
    return raw or None if "None" in kind else raw
