"""The pipelined pre-label engine: the stages of a run overlap, so the model never waits for Label
Studio and Label Studio never waits for the model.

    task pages -> claim, read back, fetch + decode images -> SAM + Osprey -> Label Studio results -> writes
      (feed)      (``prefetch`` batches at once; images in     (model      (build thread)            (write
                   a pool of ``image_threads``)                thread)                               thread)

Between stages are bounded queues (a stage that runs ahead waits), so the memory a run holds does not
grow with the project: at most ``2 * prefetch + 4`` batches of decoded images and results are alive at
once, and task pages are read as they are needed. The model stage is the only one that calls the model
(through the predictor's ``session``: the scheduler at batch priority, so an annotator's click goes
first); the others are I/O and CPU (RLE, polygons). Writes keep the order of the task stream, in
chunks (``chunk_tasks``) behind the model. A failure of the task listing ends the feed: the batches
already listed still go through and are written, as the serial engine writes them, then the listing's
error is raised. A failure of any other stage (Label Studio refusing writes for good) stops the others
and is raised in the caller's thread once every stage has stopped; claims still held are given back by
the engine.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

POLL_S = 0.1  # how often a waiting stage looks whether the run was stopped
_END = object()


class _Stopped(Exception):
    """Another stage failed; this one stops."""


def run_stages(batches: Iterator[list[dict]], *, attempt: int, run, prefetch: int = 2) -> None:
    """Push ``batches`` through ``run`` (the engine's per-run steps: ``admit``, ``accept``, ``flush``
    and its ``predictor``'s ``load``/``infer``/``build``) with the stages overlapping; returns when the
    last chunk is written, raises the first stage's error otherwise."""
    schema, head = run.schema, run.head
    load, infer, build_results = _stages(run.predictor)
    stop = threading.Event()
    errors: list[BaseException] = []
    listing: list[BaseException] = []  # the task stream's own failure: what was listed still finishes
    loading: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    inferred: queue.Queue = queue.Queue(maxsize=1)
    built: queue.Queue = queue.Queue(maxsize=2)
    image_threads = getattr(run.predictor, "image_threads", 4)
    images = ThreadPoolExecutor(max_workers=image_threads, thread_name_prefix="osprey-prelabel-image")
    fetchers = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="osprey-prelabel-fetch")

    def put(q: queue.Queue, item) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue
        raise _Stopped

    def get(q: queue.Queue):
        while not stop.is_set():
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                continue
        raise _Stopped

    def fetch(batch: list[dict]):
        admitted = run.admit(batch)
        return admitted, load(admitted, schema, pool=images) if admitted else None

    def feed() -> None:
        stream = iter(batches)
        while True:
            try:
                batch = next(stream)
            except StopIteration:
                break
            except Exception as error:  # Label Studio gone while listing: end the feed here
                listing.append(error)
                break
            put(loading, fetchers.submit(fetch, batch))
        put(loading, _END)

    def model() -> None:
        while (item := get(loading)) is not _END:
            admitted, staged = item.result()
            if staged is not None:
                put(inferred, (admitted, infer(staged, schema, head=head)))
        put(inferred, _END)

    def build() -> None:
        while (item := get(inferred)) is not _END:
            admitted, staged = item
            put(built, (admitted, build_results(staged, schema)))
        put(built, _END)

    def write() -> None:
        while (item := get(built)) is not _END:
            run.accept(item[1], item[0], attempt)
        run.flush()

    def guarded(stage: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                stage()
            except _Stopped:
                pass
            except BaseException as error:  # the first failure stops every stage
                errors.append(error)
                stop.set()

        return body

    threads = [
        threading.Thread(target=guarded(stage), name=f"osprey-prelabel-{stage.__name__}", daemon=True)
        for stage in (feed, model, build, write)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop.set()
        fetchers.shutdown(wait=True, cancel_futures=True)
        images.shutdown(wait=True, cancel_futures=True)
    if errors:
        raise errors[0]
    if listing:
        raise listing[0]


def _stages(predictor) -> tuple[Callable, Callable, Callable]:
    """The predictor's ``load``/``infer``/``build`` stages; a predictor with only ``predict`` runs it
    whole in the model stage."""
    if all(callable(getattr(predictor, name, None)) for name in ("load", "infer", "build")):
        return predictor.load, predictor.infer, predictor.build
    return (
        lambda tasks, schema, pool: tasks,
        lambda tasks, schema, head: predictor.predict(tasks, schema, head=head),
        lambda results, schema: results,
    )
