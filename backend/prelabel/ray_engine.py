"""Bulk pre-labelling on Ray Data (``osprey-label prelabel --ray [ADDRESS]``): the same stages as the
in-process engine, spread over a Ray cluster (or a local Ray on a laptop).

    this process           Ray CPU tasks               model actors (one per GPU)   Ray CPU tasks     this process
    task ids, skip done -> claim, read back, fetch  -> SAM + region model       -> Label Studio   -> chunked writes,
    (page by page, into    and decode images            (TaskPredictor.infer)      results (build)   claims given back
     a TaskFeed)

The driver (this process) lists the tasks page by page, keeps the ids of those without a prediction of
the version, and hands them to Ray in batches of ``batch_tasks`` while it lists: when it knows how many
tasks there are (a project's count, ``--tasks``), the first round streams them through a
:class:`TaskFeed` (an actor on the driver's node that holds a few batches ahead of the CPU tasks, which
take one each), so the pipeline starts with the first page and the listing never holds more than a few
batches; otherwise the ids are listed first. A CPU task claims a batch (through
:class:`ClaimDesk`, an actor on the driver's node that holds the claims file of ``MODEL_DIR``, so the
in-process engine, the server's deferred jobs and Ray runs all see each other's claims), reads the
claimed tasks back from Label Studio (tasks finished meanwhile are skipped, other writers' duplicates
and empty predictions deleted: :func:`backend.prelabel.claims.converge`) and fetches and decodes their
images. A pool of actors (``map_batches`` with a callable class; ``num_gpus=1`` each when the cluster
has GPUs) holds one model each and runs :meth:`TaskPredictor.infer`; CPU tasks build Label Studio's
results; the driver writes them in chunks with the engine's own steps (:class:`backend.prelabel.engine._Run`:
write, read back, converge, give the claims back), so the answers and the writes are those of the
in-process engine. Writes are unordered (in the order batches finish).

Errors: a task that fails says why in the closing summary and never stops the others (a stage that
fails for a whole batch, Label Studio gone for a moment, fails that batch's tasks with the reason); a
model actor that dies (killed, out of memory) is restarted by Ray and its batch is done again
(``max_restarts``/``max_task_retries``); its first attempt's output never reached the driver, so nothing
is written twice. A batch Ray gives up on is reported with its tasks as lost. Retryable failures get
``retries`` more rounds, as in the in-process engine. A listing that fails (Label Studio gone for
longer than the client's retries) ends the feed: the batches already taken finish and are written,
then its error is raised, as without Ray.

``OSPREY_RAY_CRASH_TEST="N:MARKER"`` (tests only) makes a model actor's process exit on its N-th batch,
once: the first actor to get there creates the file ``MARKER`` and exits; later ones see the file.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from backend.labelstudio.schema import ProjectSchema
from backend.predict.options import PredictOptions
from backend.predict.tasks import StagedBatch, TaskPredictor, TaskResult, task_id

from .claims import Claimer, PrelabelClaims, converge
from .engine import Summary, _batches, _Run, _unfinished, current_predictions

logger = logging.getLogger(__name__)

CRASH_TEST_ENV = "OSPREY_RAY_CRASH_TEST"
LOCAL = "local"  # ``--ray`` without an address: a Ray started in this process
MAX_BLOCKS = 2048  # blocks of the id batches (one batch a block on smaller runs: the most parallel reads)
FEED_SLACK = 2  # slots beyond the batches a known task count gives (a CPU task Ray runs again takes more)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` (``local``, ``auto``, ``ray://host:10001``, ``host:6379``),
    ``actors`` (model actors; default one per GPU of the cluster, else 1), ``cpus`` (of a local Ray;
    default all), ``actor_restarts``/``task_retries`` (Ray's fault tolerance for a dying actor),
    ``progress`` (Ray Data's progress bars), ``gpus`` (False: CPU actors even on a cluster with GPUs)."""

    address: str = LOCAL
    actors: int | None = None
    cpus: int | None = None
    actor_restarts: int = 4
    task_retries: int = 4
    progress: bool = True
    gpus: bool = True


@dataclass(frozen=True)
class RayWorkers:
    """What every Ray worker builds for itself, as picklable zero-argument factories: ``client`` (the
    Label Studio client: reads, deletions), ``loader`` (an image loader), ``predictor`` (``(TaskPredictor,
    head)`` for a model actor: the models load there, on its GPU); ``options`` build the results."""

    client: Callable[[], object]
    loader: Callable[[], object]
    predictor: Callable[[], tuple[TaskPredictor, object]]
    options: PredictOptions


@dataclass
class _Batch:
    """One batch of tasks on its way through the stages (pickled between them)."""

    ids: list[int]
    early: list[TaskResult] = field(default_factory=list)  # finished before the model
    tasks: list[dict] = field(default_factory=list)  # claimed and still to do
    staged: StagedBatch | None = None
    results: list[TaskResult] | None = None  # one per ``tasks`` after the build stage
    deleted_empty: int = 0
    duplicates: int = 0


class ClaimDesk:
    """The claims of one writer, held on the driver's node (a Ray actor there): the claims file of
    ``MODEL_DIR`` is a local SQLite file, so CPU tasks elsewhere in the cluster claim through it."""

    def __init__(self, path: str | None, project: str, version: str, owner: str, lease_s: float) -> None:
        claims = PrelabelClaims(path) if path else None
        self.claimer = Claimer(claims, project, version, owner, lease_s)

    def claim(self, task_ids: list[int]) -> list[int]:
        return sorted(self.claimer.claim(task_ids))


class TaskFeed:
    """Batches of task ids on their way from the driver's listing to the CPU tasks (a Ray actor on the
    driver's node, async: callers wait without holding a thread). ``put`` waits while ``size`` batches
    are waiting; ``take`` waits for a batch and gives None once the feed has ended and is empty;
    ``stop`` ends the feed at once and gives back the batches nobody took (a ``put`` waiting then, or
    after, gives False)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: collections.deque[list[int]] = collections.deque()
        self.ended = self.stopped = False
        self.changed = asyncio.Condition()

    async def put(self, ids: list[int]) -> bool:
        async with self.changed:
            await self.changed.wait_for(lambda: self.stopped or len(self.items) < self.size)
            if self.stopped:
                return False
            self.items.append(ids)
            self.changed.notify_all()
            return True

    async def take(self) -> list[int] | None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.items or self.ended or self.stopped)
            if self.items and not self.stopped:
                ids = self.items.popleft()
                self.changed.notify_all()
                return ids
            return None

    async def end(self) -> None:
        async with self.changed:
            self.ended = True
            self.changed.notify_all()

    async def stop(self) -> list[list[int]]:
        async with self.changed:
            self.stopped, left = True, list(self.items)
            self.items.clear()
            self.changed.notify_all()
            return left


_PER_PROCESS: dict[str, object] = {}  # a worker process's Label Studio client and image loader, per run
_PER_PROCESS_LOCK = threading.Lock()


def _per_process(key: str, factory: Callable[[], object]) -> object:
    with _PER_PROCESS_LOCK:
        if key not in _PER_PROCESS:
            _PER_PROCESS[key] = factory()
        return _PER_PROCESS[key]


class _Tasks:
    """A sink that remembers the tasks it read (so :func:`converge`'s read-back also gives the data)."""

    def __init__(self, client) -> None:
        self.client, self.seen = client, {}

    def tasks(self, project, *, ids, skip_missing=True):
        found = list(self.client.tasks(project, ids=ids, skip_missing=skip_missing))
        self.seen.update({task["id"]: task for task in found})
        return found

    def delete_prediction(self, prediction_id: int) -> None:
        self.client.delete_prediction(prediction_id)


def _admit_and_load(row: dict, *, run_id: str, workers: RayWorkers, desk, feed, schema: ProjectSchema,
                    project: int, version: str, converging: bool) -> dict:  # fmt: skip
    """CPU stage: take the batch (a slot row takes the next one from ``feed``; None when the feed has
    ended: an empty batch), claim it, read it back, fetch and decode its images."""
    import ray

    ids = row.get("ids")
    if ids is None:
        ids = ray.get(feed.take.remote()) or []
    batch = _Batch(ids=[int(i) for i in ids])
    if not batch.ids:  # a slot the listing did not fill: filtered out
        return {"batch": pickle.dumps(batch), "tasks": 0}
    try:
        claimed = ray.get(desk.claim.remote(batch.ids)) if desk is not None else list(batch.ids)
        reader = _Tasks(_per_process(f"{run_id}:client", workers.client))
        done: set[int] = set()
        if converging:  # against Label Studio: others' duplicates and empty predictions go too
            found = converge(reader, project, claimed, version)
            done, batch.deleted_empty, batch.duplicates = found.done, found.empty, found.duplicates
        missing = [i for i in claimed if i not in reader.seen]
        if missing:
            reader.tasks(project, ids=missing, skip_missing=True)
        if not converging:  # --out: Label Studio is only read
            done = {i for i, task in reader.seen.items() if current_predictions(task, version)[0]}
        for identity in batch.ids:
            if identity not in claimed:
                batch.early.append(TaskResult(identity, "elsewhere", "being pre-labelled by another writer"))
            elif identity in done:
                batch.early.append(TaskResult(identity, "skipped", f"already has a prediction of {version}"))
            elif identity not in reader.seen:
                batch.early.append(
                    TaskResult(identity, "failed", "the task is gone from Label Studio", retryable=False)
                )
            else:
                batch.tasks.append(reader.seen[identity])
        if batch.tasks:
            loader = _per_process(f"{run_id}:loader", workers.loader)
            batch.staged = TaskPredictor(models=None, loader=loader, options=workers.options).load(
                batch.tasks, schema
            )
    except Exception as error:  # Label Studio unreachable for a moment: this batch fails, retried later
        logger.warning("a batch of %d tasks could not be read: %s", len(batch.ids), error)
        batch.early = [TaskResult(i, "failed", f"reading the task: {error}") for i in batch.ids]
        batch.tasks, batch.staged = [], None
    return {"batch": pickle.dumps(batch), "tasks": len(batch.ids)}


class ModelActor:
    """GPU stage (or CPU without GPUs): one model per actor, built once; SAM + the region model on each
    batch through the same :class:`TaskPredictor` as the in-process engine."""

    def __init__(self, *, workers: RayWorkers, schema: ProjectSchema, crash: str | None = None) -> None:
        self.predictor, self.head = workers.predictor()
        self.schema, self.batches, self.crash = schema, 0, crash

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for blob in rows["batch"]:
            self.batches += 1
            self._crash_test()
            batch: _Batch = pickle.loads(blob)
            if batch.staged is not None:
                batch.staged = _portable(self.predictor.infer(batch.staged, self.schema, head=self.head))
            out.append(pickle.dumps(batch))
        return {"batch": np.array(out, dtype=object)}

    def _crash_test(self) -> None:
        if not self.crash:
            return
        nth, _, marker = self.crash.partition(":")
        if self.batches == int(nth):
            try:
                with open(marker, "x") as handle:  # exactly once per marker file
                    handle.write(str(os.getpid()))
            except FileExistsError:
                return
            logger.warning("%s: this model actor exits on its batch %s", CRASH_TEST_ENV, nth)
            os._exit(1)


def _portable(staged: StagedBatch) -> StagedBatch:
    """The staged batch without device tensors (SAM's device copies of the masks), so that a CPU worker
    can unpickle it."""
    for group, _ in staged.answered:
        for _, _, regions in group:
            for region in regions:
                region.device_mask = None
    return staged


def _build(row: dict, *, workers: RayWorkers, schema: ProjectSchema) -> dict:
    """CPU stage: Label Studio's results (RLE, polygons) of a batch."""
    batch: _Batch = pickle.loads(row["batch"])
    if batch.staged is not None:
        builder = TaskPredictor(models=None, loader=None, options=workers.options)
        batch.results, batch.staged = builder.build(batch.staged, schema), None
    return {"batch": pickle.dumps(batch)}


def connect(options: RayOptions) -> bool:
    """Join the Ray cluster at ``options.address``, or start a local Ray on 127.0.0.1 (no dashboard);
    True when this call started or joined it (and :func:`disconnect` should end it). A Ray already
    initialised in this process (tests, a notebook) is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    if options.address == LOCAL:
        ray.init(address="local", num_cpus=options.cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=False, log_to_driver=False)  # fmt: skip
    else:
        ray.init(address=options.address, configure_logging=False)
    return True


def disconnect() -> None:
    import ray

    ray.shutdown()


def _actor_resources(options: RayOptions) -> tuple[int, dict]:
    """How many model actors, and each one's resources: a GPU each when the cluster has GPUs."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0)) if options.gpus else 0
    actors = options.actors or max(1, gpus)
    if gpus:
        return actors, {"num_gpus": 1}
    return actors, {"num_cpus": 1}


def prelabel_on_ray(
    tasks: Iterable[dict],
    *,
    workers: RayWorkers,
    schema: ProjectSchema,
    project: int,
    model_version: str,
    sink,
    total: int | None = None,
    batch_tasks: int = 4,
    chunk_tasks: int = 8,
    retries: int = 2,
    backoff_s: float = 2.0,
    on_result: Callable[[TaskResult], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    claimer: Claimer | None = None,
    options: RayOptions = RayOptions(),
    read_only: bool = False,
) -> Summary:
    """:func:`backend.prelabel.engine.prelabel` on Ray Data (see the module docstring): same arguments
    (``workers`` replaces the predictor), same :class:`Summary`. Ray must be connected
    (:func:`connect`). ``total`` (how many tasks ``tasks`` gives at most, or None) lets the first round
    stream the listing instead of finishing it first. ``sink`` is the driver's (Label Studio's client,
    or a ``JsonlSink`` with ``read_only``: Label Studio is then only read, never changed)."""
    claimer = claimer or Claimer(None, str(project), model_version, owner="-")
    run = _Run(
        predictor=None, schema=schema, project=project, model_version=model_version, sink=sink, head=None,
        chunk_tasks=chunk_tasks, retries=retries, on_result=on_result, sleep=sleep, claimer=claimer,
    )  # fmt: skip
    desk = _claim_desk(claimer)
    started = time.perf_counter()
    sent: set[int] = set()
    stream = _ids(_unfinished(tasks, run), run)
    pending: list[int] = []
    if total is None:  # nothing to size the slots by: list first
        pending, stream = list(stream), None
    try:
        for attempt in range(1, retries + 2):
            if attempt > 1:
                if not pending:
                    break
                sleep(backoff_s * 2 ** (attempt - 2))
            feeder = None
            if stream is not None:  # the first round takes the listing as it comes
                slots, actors = -(-total // batch_tasks), _actor_resources(options)[0]
                # a few batches ready for each model actor; slots for the count and a little more
                feeder = _Feeder(stream, batch_tasks=batch_tasks, slots=slots + FEED_SLACK + slots // 20,
                                 size=max(4, 2 * actors + 2))  # fmt: skip
                stream = None
            returned, stopped = _run_dataset(pending, run, attempt, workers=workers, desk=desk, options=options,
                                             batch_tasks=batch_tasks, converging=not read_only, feeder=feeder)  # fmt: skip
            taken, left = (feeder.taken, feeder.left) if feeder is not None else (pending, [])
            sent.update(taken)
            lost = [i for i in taken if i not in returned]
            pending = [task_id(t) for t in run.retry]
            run.retry = []
            for identity in lost:
                if attempt <= retries:
                    pending.append(identity)
                else:
                    run.finish(
                        TaskResult(identity, "failed", f"lost: {stopped or 'Ray gave up on its batch'}")
                    )
            if attempt <= retries:
                pending.extend(left)
            else:
                for identity in left:
                    run.finish(
                        TaskResult(identity, "failed", "not reached in this run: run the command again")
                    )
            if feeder is not None and feeder.error is not None:
                raise feeder.error
    finally:
        run.claimer.release(sorted(sent))  # what is still held (lost batches, a run cut off)
    run.summary.seconds = time.perf_counter() - started
    return run.summary


def _ids(tasks: Iterator[dict], run: _Run) -> Iterator[int]:
    for task in tasks:
        identity = task_id(task)
        if identity is None:
            run.finish(TaskResult(None, "failed", "a task without an integer id", retryable=False))
        else:
            yield identity


class _Feeder:
    """The driver's side of a streamed round: a thread lists ``stream`` (task ids) in batches into a
    :class:`TaskFeed` while the round runs; the round has ``slots`` rows, each taking one batch. After
    :meth:`finish`, ``taken`` are the ids the CPU tasks took, ``left`` those they did not (batches
    still waiting, and the rest of the listing when the round ended first: tasks added while it
    listed, or Ray stopped), and ``error`` what stopped the listing, if anything (the batches already
    taken still finish)."""

    def __init__(self, stream: Iterator[int], *, batch_tasks: int, slots: int, size: int) -> None:
        import ray

        self.slots, self.batch_tasks, self._stream = slots, batch_tasks, stream
        self.feed = ray.remote(TaskFeed).options(num_cpus=0, scheduling_strategy=_here()).remote(size)
        self.put: list[int] = []
        self.taken: list[int] = []
        self.left: list[int] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._list, name="osprey-ray-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _list(self) -> None:
        import ray

        batches = _batches(self._stream, self.batch_tasks)
        try:
            for batch in batches:
                if not ray.get(self.feed.put.remote(batch)):  # the round ended: the rest is left
                    self.left.extend(batch)
                    for rest in batches:
                        self.left.extend(rest)
                    return
                self.put.extend(batch)
        except BaseException as error:  # Label Studio gone while listing: raised after the round
            self.error = error
        finally:
            ray.get(self.feed.end.remote())

    def finish(self) -> None:
        import ray

        untaken = {i for batch in ray.get(self.feed.stop.remote()) for i in batch}
        self._thread.join()
        self.taken = [i for i in self.put if i not in untaken]
        self.left = [i for i in self.put if i in untaken] + self.left
        ray.kill(self.feed)


def _here():
    """A scheduling strategy that keeps an actor on this (the driver's) node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _claim_desk(claimer: Claimer):
    """The :class:`ClaimDesk` actor on this (the driver's) node, or None when there is no claims file."""
    if claimer.claims is None:
        return None
    import ray

    return (
        ray.remote(ClaimDesk)
        .options(num_cpus=0, scheduling_strategy=_here())
        .remote(claimer.claims.path, claimer.project, claimer.version, claimer.owner, claimer.lease_s)
    )


def _run_dataset(ids: list[int], run: _Run, attempt: int, *, workers: RayWorkers, desk, options: RayOptions,
                 batch_tasks: int, converging: bool, feeder: _Feeder | None = None) -> tuple[set[int], str | None]:  # fmt: skip
    """One round of ``ids`` (or, with ``feeder``, of what it lists) through the Ray Data pipeline; every
    returned batch goes through the engine's ``accept``/``flush``. The ids that came back, and why Ray
    stopped early (None when it did not: a whole stage that cannot go on, such as model actors that die
    at every start, ends the round and its other tasks are lost to it, not the run)."""
    import ray
    from ray.data.expressions import col

    if feeder is not None:
        rows = [{"slot": i} for i in range(feeder.slots)]
    else:
        rows = [{"ids": batch} for batch in _batches(iter(ids), batch_tasks)]
    if not rows:
        return set(), None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = options.progress
    context.max_errored_blocks = -1  # continue on error: a lost batch is reported, the rest goes on
    actors, resources = _actor_resources(options)
    crash = os.environ.get(CRASH_TEST_ENV)
    stage = {"schema": run.schema, "workers": workers}
    with warnings.catch_warnings():  # Ray 2.60 takes the actors' fault tolerance only as ray_remote_args
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = (
            ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
            .map(_admit_and_load, fn_kwargs={"run_id": uuid.uuid4().hex, "desk": desk, "project": run.project,
                                             "version": run.model_version, "converging": converging,
                                             "feed": feeder.feed if feeder is not None else None, **stage})
            .filter(expr=col("tasks") > 0)  # slots the listing did not fill
            .map_batches(ModelActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                         fn_constructor_kwargs={**stage, "crash": crash},
                         max_restarts=options.actor_restarts, max_task_retries=options.task_retries, **resources)
            .map(_build, fn_kwargs=stage)
        )  # fmt: skip
    returned: set[int] = set()
    if feeder is not None:
        feeder.start()
    try:
        for row in dataset.iter_rows():
            batch: _Batch = pickle.loads(row["batch"])
            returned.update(batch.ids)
            run.count(deleted_empty=batch.deleted_empty, duplicates=batch.duplicates)
            run.claimer.release([result.task_id for result in batch.early])  # not ours, or not to predict
            for result in batch.early:
                if result.status == "failed" and result.retryable and attempt <= run.retries:
                    run.retry.append({"id": result.task_id})
                else:
                    run.finish(result)
            if batch.results is not None:
                run.accept(batch.results, batch.tasks, attempt)
    except ray.exceptions.RayError as error:
        stopped = f"Ray stopped the run: {type(error).__name__}: {str(error).strip().splitlines()[0]}"
        logger.warning("%s (%d of %d tasks came back; the log of Ray's workers says more)", stopped,
                       len(returned), len(ids))  # fmt: skip
        return returned, stopped
    finally:
        if feeder is not None:
            feeder.finish()
        run.flush()
    return returned, None
