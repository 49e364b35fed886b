"""``osprey-label prelabel --project ID``: pre-label a whole Label Studio project (or some of its tasks)
and write the predictions through its API, on a :class:`~backend.runtime.runtime.Runtime` without HTTP
(no workers, no webhooks) and the bulk engine of :mod:`backend.prelabel`. Registered by :mod:`backend.cli`.

The pipelined engine (:mod:`backend.prelabel.pipeline`) is the default; ``--serial`` runs the stages
one after another. Tasks are read page by page as the engine needs them (memory stays flat on a big
project). Each task is claimed in the store before it is predicted (:mod:`backend.prelabel.claims`), so
a running server's deferred jobs and this command never both write a task; ``--out FILE.jsonl`` writes
Label Studio-importable tasks to a file instead (:mod:`backend.prelabel.export`).

Runs under ``torchrun``/``accelerate launch`` as well: each rank (``RANK`` of ``WORLD_SIZE``) takes
every ``WORLD_SIZE``-th task of the id-sorted list, on ``cuda:LOCAL_RANK`` when there is a GPU, and
writes its own predictions; the writes are idempotent, so a rank that died is simply started again.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time

from backend.errors import SettingsError

logger = logging.getLogger(__name__)


def _ids(text: str) -> list[int]:
    """``1,2,10-12`` -> [1, 2, 10, 11, 12]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                if last < first or last - first > 1_000_000:
                    raise ValueError
                out.extend(range(first, last + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected task ids like 1,2,10-12, got {part!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("--tasks is empty")
    return out


def add_prelabel_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "prelabel",
        help="pre-label a Label Studio project's tasks and write the predictions through its API",
        description="Predict every task of a project (or --tasks / a Data Manager --view) that has no "
        "prediction of the current model version yet, several tasks per forward pass, and write the "
        "predictions back in small chunks. Reruns resume. LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY say "
        "where and as whom; the model settings are the server's (REGION_MODEL, SAM_MODEL, ...). Exit "
        "status 1 when a task failed, 2 on bad input.",
    )
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tasks", type=_ids, help="only these task ids, e.g. 1,2,10-12")
    which.add_argument("--view", type=int, help="only the tasks of this Data Manager view (tab) id")
    parser.add_argument("--limit", type=int, help="at most this many tasks (after sharding)")
    parser.add_argument(
        "--batch-tasks", type=int, help="tasks per forward pass (OSPREY_PRELABEL_BATCH_TASKS)"
    )
    parser.add_argument("--chunk-tasks", type=int, help="predictions per write (OSPREY_PRELABEL_CHUNK_TASKS)")
    parser.add_argument("--retries", type=int, help="retries of a failed task (OSPREY_PRELABEL_RETRIES)")
    parser.add_argument(
        "--dry-run", type=int, nargs="?", const=4, metavar="N",
        help="predict N tasks (default 4) without writing, and estimate the time for the rest",
    )  # fmt: skip
    parser.add_argument(
        "--out", metavar="FILE.jsonl",
        help="write Label Studio-importable tasks with their predictions to this file instead of through the "
        "API (appended; a rerun skips the tasks already in it)",
    )  # fmt: skip
    parser.add_argument(
        "--serial", action="store_true",
        help="run fetch, model, result building and writes one after another (default: overlapping stages)",
    )  # fmt: skip
    parser.add_argument("--model", help="region model (REGION_MODEL)")
    parser.add_argument("--sam-model", help="SAM model (SAM_MODEL)")
    parser.add_argument(
        "--device", help="cpu, cuda, cuda:1 ... (OSPREY_DEVICE; under torchrun: cuda:LOCAL_RANK)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_prelabel)


def run_prelabel(args: argparse.Namespace, *, client=None, models=None) -> int:
    """The ``prelabel`` command; ``client``/``models`` replace the Label Studio client and the loaded
    models (tests)."""
    from backend.prelabel.deferral import Progress
    from backend.prelabel.engine import format_summary, prelabel
    from backend.runtime.runtime import build_runtime, label_studio_client
    from backend.runtime.settings import Settings

    overrides = {}
    for key, value in (("region_model", args.model), ("sam_model", args.sam_model), ("device", args.device),
                       ("prelabel_batch_tasks", args.batch_tasks), ("prelabel_chunk_tasks", args.chunk_tasks),
                       ("prelabel_retries", args.retries)):  # fmt: skip
        if value is not None:
            overrides[key] = value
    settings = Settings.from_env(**overrides, training=False)
    rank, world = settings.rank, settings.world_size
    if world > 1 and settings.device is None and _cuda_available():
        settings = Settings.from_env(**overrides, training=False, device=f"cuda:{settings.gpu_rank}")
    client = client or label_studio_client(settings)
    if client is None:
        raise SettingsError(
            "prelabel writes through Label Studio's API: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a "
            "personal access token from Label Studio's Account & Settings page)"
        )
    label_config = client.label_config(args.project)
    with build_runtime(settings, models=models, client=client) as runtime:  # no workers: nothing is queued
        schema = runtime.projects.schema_for(label_config)
        project = str(args.project)
        runtime.projects.remember(project, label_config)
        version = runtime.projects.version(project)
        head = runtime.projects.head(project)
        tasks, total = _task_stream(client, args, rank, world)
        prefix = f"[rank {rank}/{world}] " if world > 1 else ""
        predictor = runtime.tasks_for(project)
        if args.dry_run is not None:
            return _dry_run(predictor, schema, head, version, list(tasks), args.dry_run, prefix)
        sink, claimer = client, runtime.claimer(project, version, "prelabel")
        if args.out:
            from backend.prelabel.export import JsonlSink

            sink, claimer = JsonlSink(args.out, project=args.project, model_version=version), None
            tasks = sink.pending(tasks)
        print(f"{prefix}project {args.project}: {total if total is not None else 'all'} tasks, model version "
              f"{version}" + (f", to {args.out}" if args.out else ""), file=sys.stderr)  # fmt: skip
        bar = None
        if not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="task", desc=f"{prefix}pre-label", file=sys.stderr)
        progress = Progress(project=project, job="command", total=total)

        def seen(result) -> None:
            progress(result)
            if bar is not None:
                bar.update(1)
            if result.status == "predicted":  # recorded, so the annotations can be compared with it
                runtime.recorder.record(project, result.task_id, version, result.result)
            elif args.out:
                sink.forget(result.task_id)

        try:
            summary = prelabel(
                tasks, predictor=predictor, schema=schema, project=args.project, model_version=version, sink=sink,
                head=head, chunk_tasks=settings.prelabel_chunk_tasks, retries=settings.prelabel_retries,
                on_result=seen, claimer=claimer, pipeline=not args.serial,
            )  # fmt: skip
        finally:
            progress.finish()
            if bar is not None:
                bar.close()
            if args.out:
                sink.close()
    summaries = _gather(summary.to_dict(), world)
    if rank == 0:
        print(format_summary(summaries, version=version))
    return 1 if summary.failed else 0


def _task_stream(client, args: argparse.Namespace, rank: int, world: int):
    """This rank's tasks and how many there are (None when unknown). Alone: read page by page as the
    engine asks (memory flat). Under torchrun: the whole id-sorted list, every ``world``-th task."""
    if world > 1:
        tasks = sorted(client.tasks(args.project, ids=args.tasks, view=args.view), key=lambda t: t["id"])
        mine = tasks[rank::world][: args.limit]
        return iter(mine), len(mine)
    stream = client.tasks(args.project, ids=args.tasks, view=args.view)
    total = len(args.tasks) if args.tasks is not None else None
    if total is None and args.view is None and hasattr(client, "count_tasks"):
        total = client.count_tasks(args.project)
    if args.limit is not None:
        stream = itertools.islice(stream, args.limit)
        total = min(total, args.limit) if total is not None else args.limit
    return stream, total


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _dry_run(predictor, schema, head, version: str, tasks: list[dict], sample: int, prefix: str) -> int:
    from backend.prelabel.engine import current_predictions

    todo = [t for t in tasks if not current_predictions(t, version)[0]]
    chosen = todo[: max(1, sample)]
    if not chosen:
        print(f"{prefix}nothing to do: every selected task has a prediction of {version}")
        return 0
    started = time.perf_counter()
    outcomes = predictor.predict(chosen, schema, head=head)
    per_task = (time.perf_counter() - started) / len(chosen)
    failed = [o for o in outcomes if o.status == "failed"]
    print(
        f"{prefix}dry run: {len(chosen)} tasks predicted in {per_task * len(chosen):.1f} s ({per_task:.2f} s a task, "
        f"nothing written); {len(todo)} tasks to do: about {per_task * len(todo) / 60:.1f} min"
        + (f"; {len(failed)} of the sample failed: {failed[0].reason}" if failed else "")
    )
    return 0


def _gather(summary: dict, world: int) -> list[dict]:
    """Every rank's summary on rank 0 (``torch.distributed`` over gloo); just ours when run alone."""
    if world == 1:
        return [summary]
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    gathered: list = [None] * world
    dist.all_gather_object(gathered, summary)
    dist.destroy_process_group()
    return gathered
