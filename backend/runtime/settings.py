"""Every setting of the backend: its environment variable, default, meaning and checks, read once.

:class:`Settings` is the one place that reads the environment (``Settings.from_env``); everything else
receives a ``Settings`` or the few values it needs. Each field carries its variable (``env``), a
description (``help``) and a group; the configuration reference of the docs is generated from them
(:func:`settings_reference`), so a setting without a description fails a test.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from backend.errors import SettingsError
from backend.labelstudio.limits import PayloadLimits

from .budgets import parse_bytes


def setting(default, env: str, group: str, help: str, *, shown: str | None = None):  # noqa: A002
    """A settings field read from ``env``; ``shown`` replaces the default in the docs (e.g. "auto")."""
    return field(default=default, metadata={"env": env, "group": group, "help": help, "shown": shown})


LS, SERVING, MODELS, PREDICT, CACHES, BULK, TRAINING, IMAGES = (
    "Label Studio", "Serving", "Models and device", "Predictions", "Caches and memory",
    "Batch predictions and bulk pre-labelling", "Retraining", "Images and payload limits",
)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """Every setting, its environment variable and default (see the docs' configuration reference)."""

    label_studio_url: str | None = setting(
        None, "LABEL_STUDIO_URL", LS,
        "Label Studio's base URL; relative image paths (`/data/upload/...`) are fetched from it, and "
        "predictions of deferred and bulk jobs are written to it.",
    )  # fmt: skip
    label_studio_api_key: str | None = setting(
        None, "LABEL_STUDIO_API_KEY", LS,
        "A personal access token (a JWT refresh token, exchanged at `/api/token/refresh/`) or a legacy "
        "key; sent only to `LABEL_STUDIO_URL`'s origin.",
    )  # fmt: skip
    basic_auth_user: str | None = setting(
        None, "BASIC_AUTH_USER", LS,
        "Require HTTP basic auth on every route with this user (set `BASIC_AUTH_PASS` too; enter both "
        "in Label Studio's model connection).",
    )  # fmt: skip
    basic_auth_pass: str | None = setting(
        None, "BASIC_AUTH_PASS", LS, "The basic-auth password (UTF-8 or Latin-1)."
    )
    webhook_secret: str | None = setting(
        None, "OSPREY_WEBHOOK_SECRET", LS,
        "With basic auth on, `/webhook` also accepts the header `X-Osprey-Webhook-Secret` with this "
        "value; the backend adds it to Label Studio's webhook itself.",
        shown="derived from BASIC_AUTH_PASS",
    )  # fmt: skip
    model_dir: Path = setting(
        Path("./models"), "MODEL_DIR", MODELS,
        "Where SAM checkpoints, the training store (`training.sqlite3`) and each project's trained "
        "versions live; must be writable (checked before any model loads).",
    )  # fmt: skip
    log_level: str | None = setting(
        None, "LOG_LEVEL", SERVING,
        "Logging level (`DEBUG`, `INFO`, `WARNING`, `ERROR`); credentials and query strings are removed "
        "from every record.",
        shown="INFO for serve, WARNING for the other commands",
    )  # fmt: skip
    host: str = setting("0.0.0.0", "HOST", SERVING, "The address `serve` binds.")
    port: int = setting(9090, "PORT", SERVING, "The port `serve` listens on.")
    threads: int = setting(
        8, "THREADS", SERVING,
        "Request threads; predictions use at most `THREADS` - 2, so `/health` and `/setup` always have "
        "one. Webhooks get `2 x OSPREY_WEBHOOK_CONCURRENCY` more.",
    )  # fmt: skip
    max_request_bytes: int = setting(
        64 * 2**20, "OSPREY_MAX_REQUEST_BYTES", SERVING,
        "Largest request body; larger ones get 413 before any of it is read.",
    )  # fmt: skip
    max_header_bytes: int = setting(
        64 * 2**10, "OSPREY_MAX_HEADER_BYTES", SERVING, "Largest request headers; larger ones get 431."
    )
    client_timeout_s: float = setting(
        30.0, "OSPREY_CLIENT_TIMEOUT_S", SERVING,
        "A connection that sends nothing for this many seconds is closed (slow senders never hold a thread).",
    )  # fmt: skip
    max_connections: int = setting(
        500, "OSPREY_MAX_CONNECTIONS", SERVING, "Open connections at most; more wait in the kernel's backlog."
    )
    webhook_concurrency: int = setting(
        2, "OSPREY_WEBHOOK_CONCURRENCY", SERVING,
        "Webhooks handled at once; as many more wait up to 0.5 s, others get 503 with `Retry-After`.",
    )  # fmt: skip
    region_model: str | None = setting(
        None, "REGION_MODEL", MODELS,
        "The region model that answers: `osprey-7b`, `osprey-chat-7b`, `pixelrefer-lite-2b`, "
        "`pixelrefer-lite-7b` (released weights from the Hugging Face cache), a checkpoint folder (its "
        "`config.json` says which), or `tiny` / `pixelrefer-lite-tiny` (random weights, plumbing tests). "
        "Unset: `OSPREY_MODEL`'s value.",
        shown="`OSPREY_MODEL`'s value",
    )  # fmt: skip
    osprey_model: str = setting(
        "osprey-7b", "OSPREY_MODEL", MODELS,
        "The older name of `REGION_MODEL`, still read when `REGION_MODEL` is unset: an Osprey preset "
        "(`osprey-7b`, `osprey-chat-7b`, `tiny`), any value `REGION_MODEL` takes, checkpoint folder or "
        "cached Hugging Face repo id.",
    )  # fmt: skip
    sam_model: str = setting(
        "vit_h", "SAM_MODEL", MODELS, "`vit_h`, `vit_l`, `vit_b`, or `tiny` (random weights, tests only)."
    )
    sam_checkpoint: str | None = setting(
        None, "SAM_CHECKPOINT", MODELS, "Path of the SAM `.pth` checkpoint.",
        shown="`MODEL_DIR/<released file name>`",
    )  # fmt: skip
    sam_base_url: str | None = setting(
        None, "SAM_BASE_URL", MODELS,
        "Where `osprey-label download` fetches the SAM checkpoints from (a mirror serving Meta's file "
        "names); each file is checked against its published sha256 whatever its source.",
        shown="Meta's download site",
    )  # fmt: skip
    sam_dtype: str = setting(
        "auto", "SAM_DTYPE", MODELS,
        "SAM's image encoder precision: `bf16`, `fp32`, or `auto` (`bf16` on CUDA, `fp32` on the CPU). The "
        "decoder, scores and masks stay float32; bf16 masks agree with fp32's to a mean IoU of 0.996 "
        "([Deployment](deployment.md#sam-precision-and-segment-everything)).",
    )  # fmt: skip
    device: str | None = setting(
        None, "OSPREY_DEVICE", MODELS,
        "`cpu`, `cuda` or `cuda:N`. Unset: CUDA when torch can use a GPU; a GPU that torch cannot use "
        "stops the server with the driver fix. `cpu` runs on the CPU on purpose.",
        shown="CUDA when usable, else CPU",
    )  # fmt: skip
    compile: str = setting(
        "auto", "OSPREY_COMPILE", MODELS,
        "`auto`, `on` or `off`: run the region model's decoding step compiled (`torch.compile`, whole "
        "graph; on CUDA captured as a CUDA graph per shape). `auto`: on for CUDA, off on the CPU. Answers "
        "are the same either way; the first request of each shape pays the compilation.",
    )  # fmt: skip
    sync_every: int = setting(
        8, "OSPREY_SYNC_EVERY", MODELS,
        "Decoding steps between two reads of which answers have finished (the only host reads while "
        "decoding). Fewer reads let the GPU run ahead; more move finished answers out of the way sooner.",
    )  # fmt: skip
    field_map: str = setting(
        "", "OSPREY_FIELD_MAP", PREDICT,
        "`tag=field` overrides of how label-config tags are filled, e.g. "
        "`my_choices=category,notes=description,junk=none`.",
    )  # fmt: skip
    refine_existing: bool = setting(
        False,
        "OSPREY_REFINE_EXISTING",
        PREDICT,
        "Refine a task's existing regions with SAM before labelling them.",
    )
    segment_everything: bool = setting(
        True, "OSPREY_SEGMENT_EVERYTHING", PREDICT, "Segment everything (SAM) in tasks that have no regions."
    )
    max_masks: int = setting(
        32, "OSPREY_MAX_MASKS", PREDICT, "Most regions segment everything keeps per task."
    )
    points_per_side: int = setting(
        32, "OSPREY_POINTS_PER_SIDE", PREDICT, "Segment everything's point grid: this many points per side."
    )
    pred_iou_thresh: float = setting(
        0.88, "OSPREY_PRED_IOU_THRESH", PREDICT, "Segment everything drops masks SAM rates below this IoU."
    )
    stability_score_thresh: float = setting(
        0.95,
        "OSPREY_STABILITY_SCORE_THRESH",
        PREDICT,
        "Segment everything drops masks less stable than this.",
    )
    min_mask_region_area: int = setting(
        100, "OSPREY_MIN_MASK_AREA", PREDICT,
        "Segment everything removes regions (and fills holes) smaller than this many pixels.",
    )  # fmt: skip
    attribute_threshold: float = setting(
        0.5,
        "OSPREY_ATTRIBUTE_THRESHOLD",
        PREDICT,
        "An attribute is pre-selected when its probability reaches this.",
    )
    max_caption_tokens: int = setting(
        32, "OSPREY_MAX_CAPTION_TOKENS", PREDICT, "Longest short caption, in tokens."
    )
    max_description_tokens: int = setting(
        256, "OSPREY_MAX_DESCRIPTION_TOKENS", PREDICT, "Longest detailed description, in tokens."
    )
    cache_images: int = setting(
        16, "OSPREY_CACHE_IMAGES", CACHES,
        "At most this many images per model in the device cache tier (and decoded images in the loader).",
    )  # fmt: skip
    cache_device_bytes: str = setting(
        "auto", "OSPREY_CACHE_DEVICE_BYTES", CACHES,
        "Device tier (whole encodings, prefix keys/values included). `auto`: the GPU's free memory after "
        "loading, less one request's peak and `OSPREY_DEVICE_SPARE_BYTES` (on a CPU, 1/4 of available "
        "RAM); 4/5 for Osprey, 1/5 for SAM. Sizes like `8GiB`, `512MB` or bytes.",
    )  # fmt: skip
    cache_host_bytes: str = setting(
        "auto", "OSPREY_CACHE_HOST_BYTES", CACHES,
        "Host-RAM tier (slim encodings the device tier evicted, SAM embeddings). `auto`: 1/10 of RAM, at "
        "most 4 GiB; `0` turns it off.",
    )  # fmt: skip
    cache_disk_bytes: str = setting(
        "4GiB", "OSPREY_CACHE_DISK_BYTES", CACHES,
        "Disk tier under `OSPREY_CACHE_DIR` (slim encodings and SAM embeddings; never prefix keys/values).",
    )  # fmt: skip
    device_spare_bytes: str = setting(
        "2GiB", "OSPREY_DEVICE_SPARE_BYTES", CACHES,
        "Device memory the `auto` budget leaves free on top of one request's peak.",
    )  # fmt: skip
    cache_dir: str | None = setting(
        None, "OSPREY_CACHE_DIR", CACHES,
        "Keep encodings on disk here (`osprey/`, `sam/` subfolders) so a restart does not re-encode; must be "
        "writable (checked at start).",
    )  # fmt: skip
    predict_budget_s: float = setting(
        60.0, "OSPREY_PREDICT_BUDGET_S", BULK,
        "A batch `/predict` (Retrieve Predictions) is answered within this many seconds; tasks that do "
        "not fit are finished by a background pre-label job through the API. Keep it well under Label "
        "Studio's `ML_TIMEOUT_PREDICT` (default 100 s).",
    )  # fmt: skip
    prelabel_batch_tasks: int = setting(
        4, "OSPREY_PRELABEL_BATCH_TASKS", BULK,
        "Tasks whose regions share the model's forward passes (batch `/predict`, pre-label jobs, "
        "`osprey-label prelabel`).",
    )  # fmt: skip
    prelabel_chunk_tasks: int = setting(
        8, "OSPREY_PRELABEL_CHUNK_TASKS", BULK,
        "Predictions written to Label Studio per API call (a crash loses at most one chunk).",
    )  # fmt: skip
    prelabel_retries: int = setting(
        2,
        "OSPREY_PRELABEL_RETRIES",
        BULK,
        "Retries (2 s, then 4 s ... apart) of a failed task before it is reported.",
    )
    prelabel_claim_lease_s: float = setting(
        900.0, "OSPREY_PRELABEL_CLAIM_LEASE_S", BULK,
        "A writer of pre-labels holds its claim on a task (one writer per task and model version) at most "
        "this long; a crashed writer's tasks are taken over after it. Keep it above a batch's time.",
    )  # fmt: skip
    auto_prelabel: bool = setting(
        False, "OSPREY_AUTO_PRELABEL", BULK,
        "Pre-label new tasks without anyone clicking: Label Studio's `TASKS_CREATED` webhook queues a "
        "pre-label job for exactly those tasks. Needs the project's webhook and `LABEL_STUDIO_URL` / "
        "`LABEL_STUDIO_API_KEY`. A project's ML backend extra params `{\"auto_prelabel\": true|false}` "
        "override it for that project (guide: bulk pre-labelling).",
    )  # fmt: skip
    auto_prelabel_sweep_s: float = setting(
        600.0, "OSPREY_AUTO_PRELABEL_SWEEP_S", BULK,
        "Where automatic pre-labelling is on, every this many seconds queue a pre-label job for each such "
        "project's tasks that have no prediction of the current version (a lost webhook); `0` turns it off.",
    )  # fmt: skip
    redis_url: str | None = setting(
        None, "REDIS_URL", TRAINING,
        "Keep the job queue in Redis (`redis://host:6379/0`) instead of the SQLite file under `MODEL_DIR`; "
        "several backend processes then share it.",
    )  # fmt: skip
    train_every: int = setting(
        20, "OSPREY_TRAIN_EVERY", TRAINING,
        "Queue a training job every N new or changed accepted region labels (0: only on Start Training).",
    )  # fmt: skip
    reconcile_s: float = setting(
        600.0, "OSPREY_RECONCILE_S", TRAINING,
        "Every this many seconds, read each known project's annotated tasks through the API and store the "
        "annotations whose webhook never arrived (Label Studio never resends one); `0` turns it off. Needs "
        "`LABEL_STUDIO_URL` and `LABEL_STUDIO_API_KEY`.",
    )  # fmt: skip
    training: bool = setting(
        True, "OSPREY_TRAINING", TRAINING, "Run queued jobs (training, deferred pre-labels) in this process."
    )
    min_train_examples: int = setting(
        5, "OSPREY_MIN_TRAIN_EXAMPLES", TRAINING, "Accepted regions a project needs before a head is trained."
    )
    lora: str = setting(
        "auto", "OSPREY_LORA", TRAINING,
        "Also queue a LoRA fine-tune with each training: `auto` (when a CUDA GPU is used), `true`, `false`.",
    )  # fmt: skip
    allowed_image_hosts: tuple[str, ...] = setting(
        (), "OSPREY_ALLOWED_IMAGE_HOSTS", IMAGES,
        "Other image hosts (`host`, `host:port`, `*.example.com`, comma-separated); they never get the token.",
    )  # fmt: skip
    local_files_root: str | None = setting(
        None, "LOCAL_FILES_DOCUMENT_ROOT", IMAGES,
        "Read `/data/local-files/?d=...` from this folder (no `..` or symlink escapes) instead of through "
        "Label Studio.",
    )  # fmt: skip
    max_image_bytes: int = setting(
        50 * 2**20, "OSPREY_MAX_IMAGE_BYTES", IMAGES, "Byte cap per image download."
    )
    max_image_pixels: int = setting(
        100_000_000, "OSPREY_MAX_IMAGE_PIXELS", IMAGES,
        "Pixel cap, checked from the header before decoding; also caps the image size a region claims "
        "(`original_width` x `original_height`), checked before its mask is made.",
    )  # fmt: skip
    image_timeout_s: float = setting(
        15.0, "OSPREY_IMAGE_TIMEOUT_S", IMAGES, "Total seconds per image download, redirects included."
    )
    image_url_ttl_s: float = setting(
        60.0, "OSPREY_IMAGE_URL_TTL_S", IMAGES,
        "An image read from the same URL within this many seconds is not fetched again (an annotator's "
        "clicks on one task); `0`: always fetch.",
    )  # fmt: skip
    max_polygon_points: int = setting(
        10_000, "OSPREY_MAX_POLYGON_POINTS", IMAGES, "Vertices per polygon region."
    )
    max_prompt_points: int = setting(
        100, "OSPREY_MAX_PROMPT_POINTS", IMAGES, "Keypoints (clicks) per interactive request."
    )
    max_regions: int = setting(
        1_000, "OSPREY_MAX_REGIONS", IMAGES,
        "Regions per annotation, per task's annotation or prediction, and items per interactive request.",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.payload_limits()  # refuses non-positive limits, naming the variable
        problems = [message for bad, message in self._checks() if bad]
        if problems:
            raise SettingsError("; ".join(problems))
        for name in ("cache_device_bytes", "cache_host_bytes", "cache_disk_bytes", "device_spare_bytes"):
            parse_bytes(
                getattr(self, name),
                setting=_env(name),
                auto=name in ("cache_device_bytes", "cache_host_bytes"),
            )

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (self.threads < 1, "THREADS must be >= 1"),
            (self.compile not in ("auto", "on", "off"), f"OSPREY_COMPILE must be auto, on or off, got {self.compile!r}"),
            (self.sync_every < 1, "OSPREY_SYNC_EVERY must be >= 1"),
            (min(self.max_request_bytes, self.max_header_bytes) < 1024,
             "OSPREY_MAX_REQUEST_BYTES and OSPREY_MAX_HEADER_BYTES must be >= 1024 bytes"),
            (self.client_timeout_s <= 0, "OSPREY_CLIENT_TIMEOUT_S must be > 0 seconds"),
            (self.max_connections < 1, "OSPREY_MAX_CONNECTIONS must be >= 1"),
            (self.webhook_concurrency < 1, "OSPREY_WEBHOOK_CONCURRENCY must be >= 1"),
            (self.image_url_ttl_s < 0, "OSPREY_IMAGE_URL_TTL_S must be >= 0 seconds (0: always fetch)"),
            (self.cache_images < 1, "OSPREY_CACHE_IMAGES must be >= 1"),
            (bool(self.basic_auth_user) != bool(self.basic_auth_pass),
             "set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither"),
            (self.lora not in ("auto", "true", "false"), f"OSPREY_LORA must be auto, true or false, got {self.lora!r}"),
            (self.sam_dtype not in ("auto", "bf16", "fp32"), f"SAM_DTYPE must be auto, bf16 or fp32, got {self.sam_dtype!r}"),
            (not 0.0 < self.attribute_threshold < 1.0, "OSPREY_ATTRIBUTE_THRESHOLD must be between 0 and 1"),
            (self.predict_budget_s <= 0,
             "OSPREY_PREDICT_BUDGET_S must be > 0 seconds (keep it under Label Studio's ML_TIMEOUT_PREDICT)"),
            (self.prelabel_batch_tasks < 1, "OSPREY_PRELABEL_BATCH_TASKS must be >= 1"),
            (self.prelabel_chunk_tasks < 1, "OSPREY_PRELABEL_CHUNK_TASKS must be >= 1"),
            (self.prelabel_retries < 0, "OSPREY_PRELABEL_RETRIES must be >= 0"),
            (self.prelabel_claim_lease_s <= 0, "OSPREY_PRELABEL_CLAIM_LEASE_S must be > 0 seconds"),
            (self.auto_prelabel_sweep_s < 0, "OSPREY_AUTO_PRELABEL_SWEEP_S must be >= 0 seconds (0: off)"),
            (self.reconcile_s < 0, "OSPREY_RECONCILE_S must be >= 0 seconds (0: off)"),
            (self.port < 0 or self.port > 65535, f"PORT must be 0..65535, got {self.port}"),
        ]  # fmt: skip

    def payload_limits(self) -> PayloadLimits:
        """The caps on what a payload may make the backend allocate (see :mod:`backend.labelstudio.limits`)."""
        return PayloadLimits(
            max_image_pixels=self.max_image_pixels,
            max_polygon_points=self.max_polygon_points,
            max_prompt_points=self.max_prompt_points,
            max_regions=self.max_regions,
        )

    @property
    def model_name(self) -> str:
        """The region model to serve: ``REGION_MODEL``, else ``OSPREY_MODEL``."""
        return self.region_model or self.osprey_model

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); ``overrides`` win. SettingsError
        names the variable of a value that cannot be used."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or f.name in overrides:
                continue
            try:
                values[f.name] = _convert(f.type, raw)
            except ValueError as error:
                raise SettingsError(f"{f.metadata['env']}={raw!r}: {error}") from None
        return cls(**{**values, **overrides})

    @staticmethod
    def documented() -> list[tuple[str, str]]:
        """``(ENV_VAR, default as shown)`` for every setting."""
        return [(f.metadata["env"], _shown_default(f)) for f in fields(Settings)]


def settings_reference() -> str:
    """The configuration reference as Markdown: one table per group, a row per variable."""
    groups: dict[str, list] = {}
    for f in fields(Settings):
        groups.setdefault(f.metadata["group"], []).append(f)
    out = []
    for group, members in groups.items():
        out += [f"## {group}", "", "| variable | default | meaning |", "|---|---|---|"]
        out += [f"| `{f.metadata['env']}` | {_shown_default(f)} | {f.metadata['help']} |" for f in members]
        out.append("")
    return "\n".join(out)


def _shown_default(f) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    default = f.default if f.default is not MISSING else None
    if default is None or default in ((), ""):
        return "unset"
    if isinstance(default, Path) and not default.is_absolute():
        return f"`./{default}`"  # Path drops the leading ./ that says "relative to where it runs"
    return f"`{default}`"


def _env(name: str) -> str:
    return next(f.metadata["env"] for f in fields(Settings) if f.name == name)


def parse_bool(text: str) -> bool:
    """A setting's boolean text (``1/true/yes/on``, ``0/false/no/off``, empty: false), any case."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _convert(kind: str, raw: str):
    if "bool" in kind:
        return parse_bool(raw)
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    if "Path" in kind:
        return Path(raw)
    if "tuple" in kind:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw or None if "None" in kind else raw
