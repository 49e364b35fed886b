"""The backend's state: models loaded once per process, the project schemas, the image loader.

``/health`` and ``/setup`` touch only in-memory state and never wait for model work; ``/predict``
serialises model work on one lock (one GPU, one model per process), and a task that fails gets an
empty result and a reason, never a failed batch.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

from backend.acceptance.report import acceptance_summary
from backend.errors import NotReadyError, RequestError, UnprocessableError
from backend.jobs import make_queue
from backend.jobs.worker import Worker
from backend.labelstudio.ids import bad_task_ids
from backend.labelstudio.images import ImageLoader, ImageLoadError
from backend.labelstudio.schema import ProjectSchema, SchemaError, parse_field_map, parse_label_config
from backend.learning.examples import last_skipped
from backend.learning.intake import handle_webhook, reparse_unparsed
from backend.learning.registry import ModelRegistry
from backend.learning.store import TrainingStore
from backend.predict.batch import BatchPredictor
from backend.predict.regions import PredictOptions, predict_task
from backend.prelabel.deferral import is_prelabel_job
from backend.service.overhead import RequestTimes

from .scheduler import BACKGROUND, INTERACTIVE, ModelScheduler
from .settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Models:
    """The loaded models: Osprey, a SAM refiner and segment-everything sharing one SAM embedder."""

    osprey: object
    refiner: object
    everything: object
    sam_model: str
    untrained: bool
    budgets: object = None  # the cache tiers' byte budgets (backend.runtime.budgets.CacheBudgets)

    @property
    def version(self) -> str:
        base = f"{self.osprey.model_id}+sam-{self.sam_model}"
        return f"{base}-untrained" if self.untrained else base


def load_models(settings: Settings, *, random_weights: bool = False) -> Models:
    """Load Osprey and SAM as the settings say; raises FileNotFoundError naming missing weights.
    ``random_weights`` builds the full-size architectures with random weights instead (benchmarks)."""
    from osprey.inference.api import Osprey, image_feature_cache
    from osprey.sam import EverythingOptions, SamEverything, SamImageEmbedder, SamRefiner, build_sam
    from osprey.sam.build import SAM_ARCHITECTURES

    from .budgets import device_budgets

    disk = (lambda name: f"{settings.cache_dir}/{name}") if settings.cache_dir else (lambda name: None)
    osprey = Osprey.from_pretrained(
        settings.osprey_model, device=settings.device, random_weights=random_weights
    )
    arch = SAM_ARCHITECTURES.get(settings.sam_model)
    if arch is None:
        raise ValueError(
            f"SAM_MODEL={settings.sam_model!r} is unknown; use one of {', '.join(SAM_ARCHITECTURES)}"
        )
    checkpoint = None
    if arch.checkpoint_file is not None and not random_weights:
        checkpoint = settings.sam_checkpoint or str(settings.model_dir / arch.checkpoint_file)
    sam = build_sam(settings.sam_model, checkpoint=checkpoint, random_weights=checkpoint is None
                    and arch.checkpoint_file is not None, device=osprey.device)  # fmt: skip
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
    )
    return Models(
        osprey=osprey,
        refiner=SamRefiner(embedder=embedder),
        everything=SamEverything(embedder=embedder, options=options),
        sam_model=settings.sam_model,
        untrained=osprey.untrained or checkpoint is None,
        budgets=budgets,
    )


def device_memory(osprey) -> dict | None:
    """The model device's memory as PyTorch's allocator sees it (CUDA only; None on a CPU)."""
    device = getattr(osprey, "device", None)
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


def image_loader(settings: Settings, *, cache_size: int) -> ImageLoader:
    """The task-image loader with the settings' sources and safety limits."""
    return ImageLoader(
        label_studio_url=settings.label_studio_url,
        api_key=settings.label_studio_api_key,
        allowed_hosts=settings.allowed_image_hosts,
        local_files_root=settings.local_files_root,
        max_bytes=settings.max_image_bytes,
        timeout_s=settings.image_timeout_s,
        max_pixels=settings.max_image_pixels,
        cache_size=cache_size,
        url_ttl_s=settings.image_url_ttl_s,
    )


class OspreyService:
    def __init__(self, *, settings: Settings, models: Models, loader: ImageLoader | None = None) -> None:
        self.settings = settings
        self.models = models
        self.loader = loader or image_loader(settings, cache_size=settings.cache_images)
        self.field_map = parse_field_map(settings.field_map)
        self.options = PredictOptions(
            refine_existing=settings.refine_existing,
            segment_everything=settings.segment_everything,
            attribute_threshold=settings.attribute_threshold,
            max_caption_tokens=settings.max_caption_tokens,
            max_description_tokens=settings.max_description_tokens,
            limits=settings.payload_limits(),
        )
        self.scheduler = ModelScheduler()  # who runs on the model next: clicks before batches before training
        self.request_times = RequestTimes(self.scheduler)  # /predict: model vs waiting vs the backend's own
        # Predictions queue on the model scheduler; keep two server threads free so /health and /setup
        # always answer within Label Studio's 1 s / 3 s even when every annotator is clicking.
        self._predict_slots = threading.BoundedSemaphore(max(1, settings.threads - 2))
        # recorded predictions are written behind the answers, in order (see record_prediction)
        self._recorder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="record")
        self._schemas: OrderedDict[str, ProjectSchema] = OrderedDict()
        self._project_configs: dict[str, str] = {}
        self._state_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.started = time.time()
        # Retraining: accepted labels in SQLite under MODEL_DIR, jobs there or in Redis, versions
        # under MODEL_DIR/<project>/, and a worker thread that runs the jobs.
        from backend.learning.training import ProjectTrainer

        self.store = TrainingStore(settings.model_dir / "training.sqlite3")
        self.queue = make_queue(sqlite_path=self.store.path, redis_url=settings.redis_url)
        self.registry = ModelRegistry(root=settings.model_dir)
        self.trainer = ProjectTrainer(
            service=self,
            min_examples=settings.min_train_examples,
            session=lambda project: self.model_session(project, BACKGROUND),
            step_session=lambda: self.scheduler.session(BACKGROUND),
        )
        self.batch = BatchPredictor(service=self)
        self.worker = Worker(queue=self.queue, train=self._run_job)
        self._heads: dict[str, tuple[int, object]] = {}
        self._adapters = None  # osprey.learning.lora.AdapterSet, made when a project first has an adapter

    @property
    def lora_enabled(self) -> bool:
        """OSPREY_LORA: ``true``, ``false``, or ``auto`` (on when a CUDA GPU is present)."""
        if self.settings.lora == "auto":
            import torch

            return torch.cuda.is_available()
        return self.settings.lora == "true"

    def activate_project(self, project: str | None) -> None:
        """Make the project's promoted LoRA adapter (or none) the active one. Inside a
        :meth:`model_session` only."""
        info = self.registry.current(project) if project else None
        lora_dir = self.registry.path(project, info.version) / "lora" if info is not None else None
        if lora_dir is None or not lora_dir.is_dir():
            if self._adapters is not None:
                self._adapters.activate(None, None)
            return
        if self._adapters is None:
            from osprey.learning.lora import AdapterSet

            self._adapters = AdapterSet(osprey=self.models.osprey)
        self._adapters.activate(f"p{project}-{info.version}", lora_dir)

    def start_training_worker(self) -> None:
        """Run queued training jobs in a background thread of this process (``OSPREY_TRAINING``)."""
        if self.settings.training:
            self.worker.start()

    def stop_training_worker(self) -> bool:
        return self.worker.stop()

    # ---- per-project versions ----
    def current_head(self, project: str | None):
        """The project's promoted fast head (reloaded when another process promotes), or None."""
        if not project:
            return None
        stamp = self.registry.current_stamp(project)
        with self._state_lock:
            cached = self._heads.get(project)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        from osprey.learning.head import FastHead

        info = self.registry.current(project)
        head = None
        if info is not None and (self.registry.path(project, info.version) / "head").is_dir():
            try:
                head = FastHead.load(self.registry.path(project, info.version) / "head")
            except (ValueError, OSError) as error:  # a damaged version must not stop predictions
                logger.error(
                    "project %s: cannot load head %s, serving Osprey alone: %s", project, info.version, error
                )
        with self._state_lock:
            self._heads[project] = (stamp, head)
        return head

    def project_version(self, project: str | None) -> str:
        """The ``model_version`` Label Studio sees for ``project``: base models plus its promoted version."""
        info = self.registry.current(project) if project else None
        return info.model_version() if info is not None else self.models.version

    def project_schema(self, project: str) -> ProjectSchema:
        """The schema of the label config Label Studio last sent for ``project`` (training jobs use it)."""
        label_config = self.label_config_for(project)
        if label_config is None:
            raise RuntimeError(
                f"project {project}: no label config known yet (Label Studio sends it at /setup)"
            )
        return self.schema_for(label_config)

    def label_config_for(self, project: str) -> str | None:
        """The label config Label Studio last sent for ``project`` (kept in the store across restarts)."""
        key = str(project).split(".", 1)[0]
        with self._state_lock:
            known = self._project_configs.get(key)
        if known is not None:
            return known
        try:
            stored = self.store.label_config(key)
        except sqlite3.Error as error:
            logger.warning("project %s: cannot read its stored label config: %s", key, error)
            return None
        if stored is not None:
            with self._state_lock:
                self._project_configs[key] = stored
        return stored

    def _remember_config(self, project: str | None, label_config: str | None) -> None:
        if not (project and label_config):
            return
        key = project.split(".", 1)[0]
        with self._state_lock:
            changed = self._project_configs.get(key) != label_config
            self._project_configs[key] = label_config
        if changed:  # a write only when it changed: /setup has 3 s and comes on every connect
            try:
                self.store.remember_label_config(key, label_config)
            except sqlite3.Error as error:
                logger.warning("project %s: label config kept in memory only: %s", key, error)

    # ---- cheap calls: never wait for the models ----
    def warning(self) -> str | None:
        if self.models.untrained:
            return "untrained model: random weights, its pre-labels are meaningless (tests and plumbing only)"
        return None

    def health(self) -> dict:
        busy = self.scheduler.busy_since
        return {
            "model_version": self.models.version,
            "busy_s": round(time.time() - busy, 1) if busy else 0.0,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def schema_for(self, label_config: str) -> ProjectSchema:
        key = hashlib.sha256(label_config.encode()).hexdigest()
        with self._state_lock:
            if key in self._schemas:
                self._schemas.move_to_end(key)
                return self._schemas[key]
        try:
            schema = parse_label_config(label_config, field_map=self.field_map)
        except SchemaError as error:
            raise UnprocessableError(f"this label config cannot be served: {error}") from None
        with self._state_lock:
            self._schemas[key] = schema
            while len(self._schemas) > 64:
                self._schemas.popitem(last=False)
        for warning in schema.warnings:
            logger.warning("label config: %s", warning)
        return schema

    def setup(self, *, project: str | None, label_config: str, extra_params: dict | None) -> str:
        self.schema_for(label_config)
        self._remember_config(project, label_config)
        project_id = project.split(".", 1)[0] if project else None
        if project_id and self.store.count_unparsed(project_id):
            # Annotations that arrived before the label config was known; /setup has 3 s, so parse later.
            threading.Thread(target=self._reparse, args=(project_id, label_config), daemon=True).start()
        return self.project_version(project_id)

    def _reparse(self, project_id: str, label_config: str) -> None:
        try:
            outcome = reparse_unparsed(
                self.store,
                project_id,
                label_config,
                train_every=self.settings.train_every or None,
                queue=self.queue,
                field_map=self.field_map,
                limits=self.options.limits,
            )
            logger.info(
                "project %s: parsed annotations stored before its label config: %s", project_id, outcome
            )
        except Exception:
            logger.exception("project %s: parsing stored annotations failed", project_id)

    def record_prediction(
        self, project_id: str | None, task: dict, version: str, items: list, *, interactive: bool = False
    ) -> None:
        """Remember what was predicted (acceptance tracking), written behind the answer on one
        background thread, in order; whatever reads predictions (webhooks, ``/metrics``) calls
        :meth:`flush_predictions` first. A busy store never fails a prediction."""
        if not project_id or task.get("id") is None:
            return
        self._recorder.submit(self._record, project_id, task["id"], version, items, interactive)

    def flush_predictions(self, timeout_s: float = 5.0) -> None:
        """Wait (at most ``timeout_s``) until every prediction recorded so far is in the store."""
        try:
            self._recorder.submit(lambda: None).result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            logger.warning(
                "predictions are still being written after %.1f s; reading the store anyway", timeout_s
            )

    def _record(self, project_id: str, task_id, version: str, items: list, interactive: bool) -> None:
        try:
            self.store.record_prediction(
                project_id=project_id, task_id=task_id, model_version=version, result=items,
                interactive=interactive,
            )  # fmt: skip
        except (sqlite3.Error, ValueError) as error:
            logger.warning(
                "project %s: could not record the prediction of task %s: %s", project_id, task_id, error
            )

    def metrics(self) -> dict:
        self.flush_predictions(timeout_s=0.5)
        with self._state_lock:
            counts = dict(self._counts)
        osprey_cache = getattr(self.models.osprey, "cache", None)
        sam_cache = getattr(self.models.refiner, "cache", None)
        return {
            "model_version": self.models.version,
            "predictions": counts,
            "osprey_image_cache": osprey_cache.stats() if osprey_cache is not None else None,
            "sam_image_cache": sam_cache.stats() if sam_cache is not None else None,
            "cache_budgets": self.models.budgets.to_dict() if self.models.budgets is not None else None,
            "device_memory": device_memory(self.models.osprey),
            "image_loader": self.loader.stats() if hasattr(self.loader, "stats") else None,
            "training": {
                "queue": self._safe(self.queue.status),
                "acceptance": {
                    p: self._safe(acceptance_summary, self.store, p) for p in self._known_projects()
                },
                # per project and job kind: the regions its latest job skipped, by reason
                "skipped_examples": {
                    p: report
                    for p in self._known_projects()
                    if (report := self._safe(last_skipped, self.queue, p))
                },
                "worker": {
                    "running": self.worker.current is not None,
                    "current_job": self.worker.current.job_id if self.worker.current else None,
                    "processed": self.worker.processed,
                },
            },
            "prelabel": {"jobs": self.batch.metrics(), "budget_s": self.settings.predict_budget_s},
            "scheduler": self.scheduler.stats(),
            "request_times": self.request_times.stats(),
        }

    def _known_projects(self) -> list[str]:
        with self._state_lock:
            known = set(self._project_configs)
        try:
            known.update(self.store.known_projects())
        except sqlite3.Error:
            pass
        return sorted(known, key=lambda p: (len(p), p))

    @staticmethod
    def _safe(call, *args):
        try:
            return call(*args)
        except Exception as error:  # a Redis or database outage must not break /metrics
            return {"error": str(error)}

    def count(self, key: str, n: int = 1) -> None:
        with self._state_lock:
            self._counts[key] += n

    @contextmanager
    def model_session(self, project: str | None, priority: int):
        """The model for one step of work at ``priority`` (see :mod:`backend.runtime.scheduler`), with the
        project's adapter active, and active again whenever the step takes the model back."""
        with self.scheduler.session(priority, on_resume=lambda: self.activate_project(project)):
            self.activate_project(project)
            yield

    # ---- background jobs: training, and the pre-label work /predict deferred ----
    def _run_job(self, project_id: str, kind: str, payload: dict) -> dict:
        if is_prelabel_job(kind):
            return self.batch.run_job(project_id, kind, payload)
        return self.trainer(project_id, kind, payload)

    # ---- webhooks: persisted before answering, training queued ----
    def webhook(self, action: str, payload: dict) -> dict:
        self.flush_predictions()  # an annotation is compared with the prediction it started from
        project = payload.get("project")
        if isinstance(project, dict) and isinstance(project.get("label_config"), str):
            self._remember_config(str(project.get("id")), project["label_config"])
        outcome = handle_webhook(
            self.store,
            payload,
            label_config_for=self.label_config_for,
            train_every=self.settings.train_every or None,
            queue=self.queue,
            field_map=self.field_map,
            limits=self.options.limits,
        )
        self.count(f"webhook {action} {outcome.get('status')}")
        if outcome.get("train"):
            if self.lora_enabled:
                project_id = str(project.get("id") if isinstance(project, dict) else project).split(".", 1)[0]
                outcome["lora_job_id"] = self.queue.enqueue(project_id, "lora", {"reason": action})
            self.worker.wake()
        return outcome

    # ---- predictions ----
    def predict(
        self, *, tasks: list, project: str | None, label_config: str | None, context: dict | None
    ) -> dict:
        if not self._predict_slots.acquire(timeout=0.05):
            self.count("refused busy")
            raise NotReadyError("the backend is busy with other predictions; retry in a moment")
        try:
            return self._predict(tasks=tasks, project=project, label_config=label_config, context=context)
        finally:
            self._predict_slots.release()

    def _predict(
        self, *, tasks: list, project: str | None, label_config: str | None, context: dict | None
    ) -> dict:
        project_id = (project or "").split(".", 1)[0] or None
        if label_config is None:
            label_config = self.label_config_for(project_id) if project_id else None
            if label_config is None:
                raise RequestError("'label_config' is missing and /setup was not called for this project")
        schema = self.schema_for(label_config)
        self._remember_config(project_id, label_config)
        version = self.project_version(project_id)
        head = self.current_head(project_id)
        if context is not None and len(tasks) != 1:
            raise RequestError(
                f"an interactive request (params.context) must carry one task, got {len(tasks)}"
            )
        if context is None:
            return self._predict_batch(tasks, schema, label_config, project_id, version, head)
        bad = bad_task_ids(tasks)
        if bad:
            raise RequestError(bad[0])
        self.options.limits.check_context(context)  # 413 before the image is loaded or the model waited for
        try:
            items, score = self._predict_one(tasks[0], schema, context, head, project_id)
        except (ValueError, FileNotFoundError) as error:
            self.count("tasks failed")
            raise RequestError(str(error)) from None  # the annotator is waiting on this one task: say why
        self.record_prediction(project_id, tasks[0], version, items, interactive=True)
        self.count("tasks ok")
        return {"results": [{"result": items, "score": score, "model_version": version}]}

    def _predict_batch(self, tasks: list, schema, label_config: str, project_id, version: str, head) -> dict:
        """The batch answer: exactly one result per task, in order. A task whose id is not a Label Studio
        id gets the answer without ``result`` (Label Studio stores nothing for it) and an error naming
        the field; the others are predicted by :class:`~backend.predict.batch.BatchPredictor`."""
        bad = bad_task_ids(tasks)
        good = [index for index in range(len(tasks)) if index not in bad]
        out = self.batch.predict(
            [tasks[index] for index in good], schema=schema, label_config=label_config, project=project_id,
            version=version, head=head,
        )  # fmt: skip
        if not bad:
            return out
        self.count("tasks failed", len(bad))
        results: list[dict] = [{"score": 0.0, "model_version": version} for _ in tasks]
        for index, result in zip(good, out["results"], strict=True):
            results[index] = result
        errors = [{**error, "index": good[error["index"]]} for error in out.get("errors", [])]
        errors += [{"index": index, "task": None, "error": reason} for index, reason in bad.items()]
        return {**out, "results": results, "errors": sorted(errors, key=lambda error: error["index"])}

    def _predict_one(
        self, task, schema: ProjectSchema, context: dict | None, head, project_id: str | None
    ) -> tuple[list[dict], float]:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise RequestError("each task must be an object with a 'data' object")
        reference = task["data"].get(schema.image_data_key)
        if not isinstance(reference, str) or not reference:
            raise RequestError(
                f"task data has no image under '{schema.image_data_key}' (the Image tag's value)"
            )
        try:
            image = self.loader.load(reference)
        except ImageLoadError as error:
            raise RequestError(f"cannot load the task image: {error}") from None
        return predict_task(
            task=task, rgb=image.rgb, schema=schema, context=context, models=self.models, options=self.options,
            head=head, model_session=lambda: self.model_session(project_id, INTERACTIVE),
        )  # fmt: skip
