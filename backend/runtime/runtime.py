"""The composition root: ``build_runtime(settings) -> Runtime`` builds every part of a backend process
once, hands each the few collaborators it uses, and owns every thread it starts.

Parts: the models (on the device start-up chose), the model scheduler and the model sessions bound to
it, the image loader, the training store, the job queue with one worker per lane (pre-labels never
wait behind training), the version registry, per-project state, the prediction recorder, the Label
Studio client, and the services built from them: the predictor (``/predict``), the intake
(``/webhook``), the deferred pre-label jobs and the trainer. ``Runtime.start()`` starts the workers;
``Runtime.close()`` stops every thread and closes the store. ``osprey-label serve`` puts the HTTP layer
on top; ``osprey-label prelabel`` and ``precompute`` use a Runtime without it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from backend.acceptance.report import acceptance_summary
from backend.errors import internal_error
from backend.jobs import LANES, PRELABEL_LANE, TRAINING_LANE, make_queue
from backend.jobs.worker import Worker
from backend.labelstudio.api import LabelStudioClient
from backend.labelstudio.auth import LabelStudioAuth
from backend.labelstudio.images import ImageLoader
from backend.labelstudio.schema import parse_field_map
from backend.learning.examples import last_skipped
from backend.learning.inbox import WebhookInbox
from backend.learning.intake import Intake
from backend.learning.lora_training import LoraJob
from backend.learning.reconcile import Reconciler
from backend.learning.registry import ModelRegistry
from backend.learning.store import TrainingStore
from backend.learning.training import ProjectTrainer
from backend.predict.batch import BatchPredictor
from backend.predict.options import PredictOptions
from backend.predict.predictor import Predictor
from backend.predict.tasks import TaskPredictor
from backend.prelabel.auto import TASKS_CREATED, AutoPrelabel
from backend.prelabel.claims import BATCH_WRITER, Claimer, PrelabelClaims, writer_id
from backend.prelabel.deferral import Deferrals

from .budgets import lora_on
from .models import Models, base_version, check_weights, device_memory, load_models, weight_paths
from .projects import Projects
from .recorder import PredictionRecorder
from .scheduler import BACKGROUND, BATCH, INTERACTIVE, ModelScheduler
from .sessions import ModelSessions
from .settings import Settings
from .startup import check_writable, resolve_device_from_torch, startup_report

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # how long close() waits for a running job's current step
THREAD_PREFIX = "osprey-"  # every thread a runtime starts is named so (see owned_threads)


class Counters:
    """Thread-safe counts of outcomes (``/metrics``: ``predictions``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def __call__(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


@dataclass
class Runtime:
    """Everything a backend process runs on (see the module docstring). Build it with
    :func:`build_runtime`; use it as a context manager or call :meth:`close`."""

    settings: Settings
    models: Models | None  # None: the models load elsewhere (prelabel --ray's driver)
    scheduler: ModelScheduler
    sessions: ModelSessions
    loader: ImageLoader
    store: TrainingStore
    queue: object
    registry: ModelRegistry
    projects: Projects
    recorder: PredictionRecorder
    client: LabelStudioClient | None
    options: PredictOptions
    counts: Counters
    background: concurrent.futures.ThreadPoolExecutor
    claims: PrelabelClaims = None  # one writer per (task, model version), across this MODEL_DIR's processes
    predictor: Predictor = None
    intake: Intake = None
    deferrals: Deferrals = None
    trainer: ProjectTrainer = None
    workers: dict[str, Worker] = field(default_factory=dict)
    reconciler: Reconciler | None = None
    auto_prelabel: AutoPrelabel | None = None  # TASKS_CREATED and the sweep (with Label Studio API access)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # in the name of every thread it starts
    started: float = field(default_factory=time.time)
    closed: bool = False

    # ---- parts built from the others ----
    def tasks_for(self, project: str | None, priority: int = BATCH) -> TaskPredictor:
        """A task predictor for ``project`` working at ``priority`` (batch by default)."""
        if self.models is None:
            raise RuntimeError("this runtime was built without models (build_runtime(load_models=False))")
        return TaskPredictor(
            models=self.models, loader=self.loader, options=self.options,
            batch_tasks=self.settings.prelabel_batch_tasks,
            session=lambda: self.sessions(project, priority),
            courtesy=lambda: self.scheduler.courtesy(priority),
        )  # fmt: skip

    def claimer(self, project: str, version: str, what: str, *, owner: str | None = None) -> Claimer:
        """A writer's claims on ``project``'s tasks for ``version`` (``owner``: a stable name, so that a
        job resumed after a crash takes its own claims back; otherwise a new one naming ``what``)."""
        return Claimer(
            self.claims, str(project), version, owner or writer_id(what), self.settings.prelabel_claim_lease_s
        )

    def submit(self, function, *args) -> None:
        """Run ``function(*args)`` in the runtime's background thread (housekeeping: parsing stored
        annotations, registering a webhook header); an error is logged with an id."""
        if self.closed:
            return

        def guarded() -> None:
            try:
                function(*args)
            except Exception:
                internal_error(logger, getattr(function, "__name__", "background work"))

        self.background.submit(guarded)

    # ---- threads ----
    def start(self) -> Runtime:
        """Start the intake thread (webhooks stored and not yet parsed are parsed first), the
        reconciliation and one job worker per lane (``OSPREY_TRAINING``); returns the runtime."""
        if self.intake is None:
            raise RuntimeError("a runtime without models has no threads to start")
        self.intake.start()
        if self.reconciler is not None:
            self.reconciler.start()
        if self.auto_prelabel is not None and self.settings.training:  # its jobs need the workers
            self.auto_prelabel.start()
        if self.settings.training:
            for worker in self.workers.values():
                worker.start()
        return self

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Stop every thread this runtime started (workers after their current job step, the recorder
        after writing what is queued, the background thread) and close the store; True when every
        thread stopped within ``timeout_s``."""
        if self.closed:
            return True
        self.closed = True
        stopped = True
        if self.intake is not None:  # what is still in the inbox is parsed at the next start
            stopped &= self.intake.stop(timeout_s)
        if self.reconciler is not None:
            stopped &= self.reconciler.stop(timeout_s)
        if self.auto_prelabel is not None:
            stopped &= self.auto_prelabel.stop(timeout_s)
        stopped &= all([worker.stop(timeout_s) for worker in self.workers.values()])
        self.recorder.close()
        self.background.shutdown(wait=True, cancel_futures=True)
        for closable in (self.store, self.queue, self.intake and self.intake.inbox, self.claims):
            close = getattr(closable, "close", None)
            if close is not None:
                close()
        left = [thread.name for thread in self.threads()]
        if left:
            logger.warning("runtime closed; threads still running: %s", ", ".join(left))
        else:
            logger.info("runtime closed: every thread it started has stopped")
        return stopped and not left

    def threads(self) -> list[threading.Thread]:
        """The live threads this runtime started: job workers, the recorder, the background thread
        (their names carry the runtime's ``tag``)."""
        return [thread for thread in owned_threads() if self.tag in thread.name]

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- what the HTTP layer shows ----
    def health(self) -> dict:
        busy = self.scheduler.busy_since
        return {
            "model_version": self.models.version,
            "busy_s": round(time.time() - busy, 1) if busy else 0.0,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def metrics(self) -> dict:
        """Everything ``/metrics`` shows of the runtime: counts, caches, memory, jobs, acceptance."""
        self.recorder.flush(timeout_s=0.5)
        projects = self.projects.known()
        osprey_cache = getattr(self.models.region_model, "cache", None)
        sam_cache = getattr(self.models.refiner, "cache", None)
        return {
            "model_version": self.models.version,
            "predictions": self.counts.snapshot(),
            "osprey_image_cache": osprey_cache.stats() if osprey_cache is not None else None,
            "sam_image_cache": sam_cache.stats() if sam_cache is not None else None,
            "cache_budgets": self.models.budgets.to_dict() if self.models.budgets is not None else None,
            "device_memory": device_memory(self.models),
            "image_loader": self.loader.stats() if hasattr(self.loader, "stats") else None,
            "training": {
                "queue": _safe(self.queue.status),
                "acceptance": {p: _safe(acceptance_summary, self.store, p) for p in projects},
                "skipped_examples": {p: r for p in projects if (r := _safe(last_skipped, self.queue, p))},
                "workers": {lane: _worker_state(worker) for lane, worker in self.workers.items()},
            },
            "intake": {
                **_safe(self.intake.inbox.counts),
                "reconciliation": self.reconciler.last if self.reconciler is not None else "off",
            },
            "prelabel": {
                "jobs": self.deferrals.metrics(),
                "budget_s": self.settings.predict_budget_s,
                "claims": _safe(self.claims.held),
                "auto": self.auto_prelabel.metrics() if self.auto_prelabel is not None else "off",
            },  # fmt: skip
            "scheduler": self.scheduler.stats(),
            "versions": _safe(self.registry.damaged),  # projects whose promoted version cannot be served
        }


def build_runtime(settings: Settings, *, models: Models | None = None, loader: ImageLoader | None = None,
                  client: LabelStudioClient | None = None, device: str | None = None,
                  load_models: bool = True) -> Runtime:  # fmt: skip
    """Build every part (see the module docstring). ``models``, ``loader`` and ``client`` replace the
    loaded models, the image loader and the Label Studio client (tests, benchmarks); otherwise the
    models are loaded on ``device`` (default: ``OSPREY_DEVICE`` resolved by
    :func:`backend.runtime.startup.resolve_device_from_torch`). ``load_models=False`` builds a runtime
    without models, for a process that coordinates work whose models load elsewhere (``prelabel --ray``'s
    driver: the project state, claims, recorder and client, no device). Before anything loads,
    ``MODEL_DIR`` and ``OSPREY_CACHE_DIR`` must be writable (StartupError naming the path and the fix).
    Threads start with :meth:`Runtime.start`."""
    check_writable({"MODEL_DIR": settings.model_dir, "OSPREY_CACHE_DIR": settings.cache_dir})
    if models is None and load_models:
        models = _load(settings, device)
    elif models is None:  # the models load elsewhere from the same paths: missing weights are said here
        check_weights(settings)
    store = TrainingStore(settings.model_dir / "training.sqlite3")
    queue = make_queue(sqlite_path=store.path, redis_url=settings.redis_url)
    registry = ModelRegistry(root=settings.model_dir)
    scheduler = ModelScheduler()
    tag = uuid.uuid4().hex[:8]
    auth = label_studio_auth(settings)  # one token for the API client and the image loader
    runtime = Runtime(
        settings=settings,
        models=models,
        scheduler=scheduler,
        sessions=ModelSessions(
            scheduler=scheduler, registry=registry, osprey=models.region_model if models else None
        ),
        loader=loader or image_loader(settings, cache_size=settings.cache_images, auth=auth),
        store=store,
        queue=queue,
        registry=registry,
        projects=Projects(
            store=store,
            registry=registry,
            field_map=parse_field_map(settings.field_map),
            base_version=models.version if models else base_version(settings),
        ),
        recorder=PredictionRecorder(store=store, thread_name=f"{THREAD_PREFIX}record-{tag}"),
        client=client or label_studio_client(settings, auth=auth),
        options=predict_options(settings),
        counts=Counters(),
        background=concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{THREAD_PREFIX}background-{tag}"
        ),
        tag=tag,
        claims=PrelabelClaims(store.path),
    )
    if models is not None:  # without models: no predictor, intake, jobs or workers, nothing to start
        _wire(runtime)
    return runtime


def _load(settings: Settings, device: str | None) -> Models:
    """Resolve the device (a GPU torch cannot use stops here), say what the process runs on, check
    that every weight file is there, then load."""
    from osprey.loading.loader import default_dtype

    device = device or resolve_device_from_torch(settings.device)
    dtype = default_dtype(torch_device(device))
    for line in startup_report(device=device, dtype=str(dtype), weights=weight_paths(settings)):
        logger.info(line)
    check_weights(settings)
    return load_models(settings, device=device)


def _wire(rt: Runtime) -> None:
    """Build the services from the parts: each gets only the collaborators it uses."""
    settings = rt.settings
    rt.deferrals = Deferrals(
        queue=rt.queue, client=rt.client, projects=rt.projects, tasks_for=rt.tasks_for, record=rt.recorder.record,
        wake=lambda: _wake(rt, PRELABEL_LANE), chunk_tasks=settings.prelabel_chunk_tasks,
        retries=settings.prelabel_retries, claimer_for=rt.claimer,
    )  # fmt: skip
    batch = BatchPredictor(
        tasks_for=rt.tasks_for, deferral=rt.deferrals, record=rt.recorder.record, count=rt.counts,
        budget_s=settings.predict_budget_s, max_batch_tasks=settings.prelabel_batch_tasks,
        claimer_for=lambda project, version: rt.claimer(project, version, BATCH_WRITER),
    )  # fmt: skip
    rt.predictor = Predictor(
        projects=rt.projects, models=rt.models, loader=rt.loader, options=rt.options,
        session=rt.sessions.bound(INTERACTIVE), batch=batch, record=rt.recorder.record, count=rt.counts,
        slots=settings.threads - 2,
    )  # fmt: skip
    lora = None
    if lora_enabled(settings, rt.models):
        lora = LoraJob(
            served=rt.models.region_model, store=rt.store, registry=rt.registry,
            loader=rt.loader, projects=rt.projects, base_version=rt.models.version,
            min_examples=settings.min_train_examples, step_session=lambda: rt.scheduler.session(BACKGROUND),
        )  # fmt: skip
    rt.trainer = ProjectTrainer(
        osprey=rt.models.region_model, store=rt.store, registry=rt.registry, loader=rt.loader, projects=rt.projects,
        base_version=rt.models.version, session=rt.sessions.bound(BACKGROUND), lora=lora,
        min_examples=settings.min_train_examples,
    )  # fmt: skip
    if rt.client is not None:  # on for every project, or for those whose extra params say so
        rt.auto_prelabel = AutoPrelabel(
            deferrals=rt.deferrals, client=rt.client, projects=rt.projects, count=rt.counts,
            interval_s=settings.auto_prelabel_sweep_s, default=settings.auto_prelabel,
            thread_name=f"{THREAD_PREFIX}autoprelabel-{rt.tag}",
        )  # fmt: skip
    elif settings.auto_prelabel:
        logger.warning(
            "OSPREY_AUTO_PRELABEL is on but writes need LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: off"
        )
    rt.intake = Intake(
        store=rt.store, queue=rt.queue, inbox=WebhookInbox(rt.store.path), projects=rt.projects,
        flush=rt.recorder.flush, count=rt.counts, submit=rt.submit, wake=lambda: _wake(rt, TRAINING_LANE),
        train_every=settings.train_every, lora_enabled=lora is not None, limits=rt.options.limits,
        thread_name=f"{THREAD_PREFIX}intake-{rt.tag}",
        handlers={TASKS_CREATED: rt.auto_prelabel.tasks_created} if rt.auto_prelabel is not None else None,
    )  # fmt: skip
    if settings.reconcile_s > 0 and rt.client is not None:
        rt.reconciler = Reconciler(
            client=rt.client, store=rt.store, inbox=rt.intake.inbox, projects=rt.projects.known,
            arrived=rt.intake.arrived, interval_s=settings.reconcile_s,
            thread_name=f"{THREAD_PREFIX}reconcile-{rt.tag}",
        )  # fmt: skip
    handlers = {PRELABEL_LANE: rt.deferrals.run, TRAINING_LANE: rt.trainer}
    host = f"{socket.gethostname()}:{os.getpid()}"
    rt.workers = {
        lane: Worker(queue=rt.queue, handler=handlers[lane], lane=lane, worker_id=f"{host}:{lane}-{rt.tag}")
        for lane in LANES
    }


def _wake(rt: Runtime, lane: str) -> None:
    worker = rt.workers.get(lane)
    if worker is not None:
        worker.wake()


def lora_enabled(settings: Settings, models: Models) -> bool:
    """OSPREY_LORA: ``true``, ``false``, or ``auto`` (on when the models run on a CUDA GPU), whichever
    region model serves (each writes the samples in its own prompts)."""
    device = getattr(models.region_model, "device", None)
    return lora_on(settings, device.type if device is not None else "cpu")


def predict_options(settings: Settings) -> PredictOptions:
    return PredictOptions(
        refine_existing=settings.refine_existing,
        segment_everything=settings.segment_everything,
        attribute_threshold=settings.attribute_threshold,
        max_caption_tokens=settings.max_caption_tokens,
        max_description_tokens=settings.max_description_tokens,
        limits=settings.payload_limits(),
    )


def label_studio_auth(settings: Settings) -> LabelStudioAuth | None:
    """The token for Label Studio (``LABEL_STUDIO_API_KEY``), or None without URL and key."""
    if not (settings.label_studio_url and settings.label_studio_api_key):
        return None
    return LabelStudioAuth(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key)


def image_loader(settings: Settings, *, cache_size: int, auth: LabelStudioAuth | None = None) -> ImageLoader:
    """The task-image loader with the settings' sources and safety limits (and ``auth``'s token)."""
    return ImageLoader(
        token_provider=auth,
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


def label_studio_client(
    settings: Settings, *, auth: LabelStudioAuth | None = None
) -> LabelStudioClient | None:
    """The Label Studio API client, or None without ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``."""
    if not (settings.label_studio_url and settings.label_studio_api_key):
        return None
    return LabelStudioClient(url=settings.label_studio_url, auth=auth or label_studio_auth(settings))


def owned_threads() -> list[threading.Thread]:
    """The live threads a runtime starts (their names begin with ``osprey-``): workers, their
    heartbeats, the recorder and the background thread."""
    return [
        thread
        for thread in threading.enumerate()
        if thread.name.startswith(THREAD_PREFIX) and thread.is_alive()
    ]


def _worker_state(worker: Worker) -> dict:
    current = worker.current
    return {
        "running": current is not None,
        "current_job": current.job_id if current is not None else None,
        "alive": worker.is_alive(),
        "processed": worker.processed,
    }


def _safe(call, *args):
    try:
        return call(*args)
    except Exception as error:  # a Redis or database outage must not break /metrics
        return {"error": str(error)}


def torch_device(name: str):
    import torch

    return torch.device(name)
