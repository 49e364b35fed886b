"""``osprey-label prelabel --project ID``: pre-label a whole Label Studio project (or some of its tasks)
and write the predictions through its API, on a :class:`~backend.runtime.runtime.Runtime` without HTTP
(no workers, no webhooks) and the bulk engine of :mod:`backend.prelabel`. Registered by :mod:`backend.cli`.

The pipelined engine (:mod:`backend.prelabel.pipeline`) is the default; ``--serial`` runs the stages
one after another. Tasks are read page by page as the engine needs them (memory stays flat on a big
project). Each task is claimed in the store before it is predicted (:mod:`backend.prelabel.claims`), so
a running server's deferred jobs and this command never both write a task; ``--out FILE.jsonl`` writes
Label Studio-importable tasks to a file instead (:mod:`backend.prelabel.export`).

``--ray [ADDRESS]`` runs the same stages on Ray Data (:mod:`backend.prelabel.ray_engine`): a local Ray
started here, or the cluster at ADDRESS (``auto`` under ``ray job submit``), with one model actor per GPU.
That is the way to use several GPUs or machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import sys
import time

from backend.errors import InputError, SettingsError

LOCAL = "local"  # --ray without an address (backend.prelabel.ray_engine.LOCAL)

logger = logging.getLogger(__name__)


def _ids(text: str) -> list[int]:
    """``1,2,10-12`` -> [1, 2, 10, 11, 12]; an id named twice is kept once, where it first came."""
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
    return list(dict.fromkeys(out))


def _positive(text: str) -> int:
    """A project or tab id, a count: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


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
    parser.add_argument("--project", type=_positive, required=True, help="Label Studio project id")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tasks", type=_ids, help="only these task ids, e.g. 1,2,10-12")
    which.add_argument("--view", type=_positive, help="only the tasks of this Data Manager view (tab) id")
    parser.add_argument(
        "--unannotated", action="store_true",
        help="only the tasks still to label: none with an annotation, submitted or skipped",
    )  # fmt: skip
    parser.add_argument("--limit", type=_positive, help="at most this many tasks")
    parser.add_argument(
        "--batch-tasks", type=int, help="tasks per forward pass (OSPREY_PRELABEL_BATCH_TASKS)"
    )
    parser.add_argument("--chunk-tasks", type=int, help="predictions per write (OSPREY_PRELABEL_CHUNK_TASKS)")
    parser.add_argument("--retries", type=int, help="retries of a failed task (OSPREY_PRELABEL_RETRIES)")
    parser.add_argument(
        "--dry-run", type=_positive, nargs="?", const=4, metavar="N",
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
    parser.add_argument(
        "--ray", nargs="?", const=LOCAL, metavar="ADDRESS",
        help="run on Ray Data: without ADDRESS a local Ray started here; 'auto' (under ray job submit), "
        "ray://host:10001 or host:6379 for a cluster. Needs pip install osprey-label[ray]",
    )  # fmt: skip
    parser.add_argument(
        "--ray-actors", type=int, metavar="N", help="with --ray: model actors (default: one per GPU, else 1)"
    )
    parser.add_argument(
        "--ray-cpus", type=int, metavar="N", help="with --ray and no ADDRESS: CPUs of the local Ray"
    )
    parser.add_argument("--model", help="region model (REGION_MODEL)")
    parser.add_argument("--sam-model", help="SAM model (SAM_MODEL)")
    parser.add_argument(
        "--device", help="cpu, cuda, cuda:1 ... (OSPREY_DEVICE; with --ray: cpu, or each actor's own GPU)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_prelabel)


def run_prelabel(args: argparse.Namespace, *, client=None, models=None) -> int:
    """The ``prelabel`` command; ``client``/``models`` replace the Label Studio client and the loaded
    models (tests; with ``--ray`` the actors load their own models from the settings)."""
    from backend.predict.tasks import TaskResult
    from backend.prelabel.deferral import Progress
    from backend.prelabel.engine import format_summary
    from backend.runtime.runtime import build_runtime, label_studio_client
    from backend.runtime.settings import Settings

    _check_ray_arguments(args)
    overrides = {}
    for key, value in (("region_model", args.model), ("sam_model", args.sam_model), ("device", args.device),
                       ("prelabel_batch_tasks", args.batch_tasks), ("prelabel_chunk_tasks", args.chunk_tasks),
                       ("prelabel_retries", args.retries)):  # fmt: skip
        if value is not None:
            overrides[key] = value
    settings = Settings.from_env(**overrides, training=False)
    client = client or label_studio_client(settings)
    if client is None:
        raise SettingsError(
            "prelabel writes through Label Studio's API: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a "
            "personal access token from Label Studio's Account & Settings page)"
        )
    label_config = client.label_config(args.project)
    # No workers: nothing is queued. On Ray the models load in the actors, never here: a driver on a
    # GPU node would otherwise hold a second copy beside the actor that gets that GPU.
    with build_runtime(settings, models=None if args.ray else models, client=client,
                       load_models=not args.ray) as runtime:  # fmt: skip
        schema = runtime.projects.schema_for(label_config)
        project = str(args.project)
        runtime.projects.remember(project, label_config)
        version = runtime.projects.version(project)
        unread: list[TaskResult] = []  # tasks asked for and not found (see _task_stream)
        tasks, total = _task_stream(client, args, unread=unread)
        if args.dry_run is not None:
            head = runtime.projects.head(project)
            return _dry_run(runtime.tasks_for(project), schema, head, version, list(tasks), args.dry_run)
        sink, claimer = client, runtime.claimer(project, version, "prelabel")
        if args.out:
            from backend.prelabel.export import JsonlSink

            sink, claimer = JsonlSink(args.out, project=args.project, model_version=version), None
            tasks = sink.pending(tasks)
        print(f"project {args.project}: {total if total is not None else 'all'} tasks, model version {version}"
              + (f", to {args.out}" if args.out else "") + (" on Ray" if args.ray else ""), file=sys.stderr)  # fmt: skip
        bar = None
        if not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="task", desc="pre-label", file=sys.stderr)
        progress = Progress(project=project, job="command", total=total)

        def seen(result) -> None:
            progress(result)
            if bar is not None:
                bar.update(1)
            if result.status == "predicted":  # recorded, so the annotations can be compared with it
                runtime.recorder.record(project, result.task_id, version, result.result)
            elif args.out:
                sink.forget(result.task_id)

        common = dict(
            schema=schema, project=args.project, model_version=version, sink=sink,
            chunk_tasks=settings.prelabel_chunk_tasks, retries=settings.prelabel_retries, on_result=seen,
            claimer=claimer,
        )  # fmt: skip
        try:
            if args.ray:
                summary = _on_ray(
                    tasks,
                    args,
                    settings,
                    label_config,
                    version,
                    read_only=bool(args.out),
                    total=total,
                    **common,
                )
            else:
                from backend.prelabel.engine import prelabel

                summary = prelabel(tasks, predictor=runtime.tasks_for(project), head=runtime.projects.head(project),
                                   pipeline=not args.serial, **common)  # fmt: skip
            for result in unread:
                summary.add(result)
                seen(result)
        finally:
            progress.finish()
            if bar is not None:
                bar.close()
            if args.out:
                sink.close()
    print(format_summary(summary.to_dict(), version=version))
    return 1 if summary.failed else 0


def _check_ray_arguments(args: argparse.Namespace) -> None:
    if not args.ray:
        if args.ray_actors is not None or args.ray_cpus is not None:
            raise InputError("--ray-actors and --ray-cpus need --ray")
        return
    if args.dry_run is not None or args.serial:
        raise InputError("--dry-run and --serial run in this process: leave out --ray")
    if args.ray_cpus is not None and args.ray != LOCAL:
        raise InputError("--ray-cpus sizes a local Ray; a cluster (--ray ADDRESS) has its own")
    if (args.ray_actors is not None and args.ray_actors < 1) or (
        args.ray_cpus is not None and args.ray_cpus < 1
    ):
        raise InputError("--ray-actors and --ray-cpus must be >= 1")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise InputError("--ray needs Ray Data: pip install 'osprey-label[ray]' (or 'ray[data]')") from None


def _on_ray(tasks, args: argparse.Namespace, settings, label_config: str, version: str, *, read_only: bool,
            total: int | None, **common):  # fmt: skip
    """The run on Ray Data: workers build their client, image loader and models from ``settings``."""
    import functools

    from backend.prelabel.ray_engine import RayOptions, RayWorkers, connect, disconnect, prelabel_on_ray
    from backend.runtime.runtime import predict_options

    options = RayOptions(
        address=args.ray,
        actors=args.ray_actors,
        cpus=args.ray_cpus,
        progress=not args.quiet,
        gpus=settings.device != "cpu",
    )
    if settings.device is not None and settings.device.startswith("cuda"):  # each actor has its own GPU
        settings = dataclasses.replace(settings, device=None)
    workers = RayWorkers(
        client=functools.partial(_worker_client, settings), loader=functools.partial(_worker_loader, settings),
        predictor=functools.partial(_worker_predictor, settings, str(args.project), label_config, version),
        options=predict_options(settings),
    )  # fmt: skip
    started = connect(options)
    try:
        return prelabel_on_ray(tasks, workers=workers, batch_tasks=settings.prelabel_batch_tasks, options=options,
                               read_only=read_only, total=total, **common)  # fmt: skip
    finally:
        if started:
            disconnect()


def _worker_client(settings):
    from backend.runtime.runtime import label_studio_client

    return label_studio_client(settings)


def _worker_loader(settings):
    from backend.runtime.runtime import image_loader, label_studio_auth

    return image_loader(settings, cache_size=1, auth=label_studio_auth(settings))


def _worker_predictor(settings, project: str, label_config: str, version: str):
    """A model actor's predictor and head: a runtime of its own (the models on its device, the project's
    served version from ``MODEL_DIR``), which must serve the driver's ``version``."""
    from backend.runtime.runtime import build_runtime

    runtime = build_runtime(settings)
    runtime.projects.remember(project, label_config)
    found = runtime.projects.version(project)
    if found != version:
        raise RuntimeError(
            f"a Ray worker serves model version {found}, the command {version}: every node needs the same "
            f"MODEL_DIR ({settings.model_dir}) and weights (a shared filesystem)"
        )
    return runtime.tasks_for(project), runtime.projects.head(project)


def _task_stream(client, args: argparse.Namespace, *, unread: list):
    """The tasks (read page by page as the engine asks: memory flat) and how many (None when unknown).
    Tasks asked for and not found go to ``unread`` as they are met, each with its outcome: a view's task
    deleted between its listing and its read is gone (deleted meanwhile); an id of ``--tasks`` not in
    the project fails (a range over deleted tasks still pre-labels the others, a typo is reported)."""
    from backend.predict.tasks import TaskResult

    def missing(status: str, reason: str):
        return lambda ids: unread.extend(TaskResult(i, status, reason, retryable=False) for i in ids)

    whole = args.tasks is None and args.view is None
    if args.unannotated and whole:  # Label Studio selects them: the annotated ones are never read
        stream = client.tasks(args.project, unannotated=True)
    elif args.view is not None:
        client.view(args.project, args.view)  # a tab of this project, or one line saying it is not
        gone = missing("gone", "deleted from Label Studio before it was read")
        stream = client.tasks(args.project, view=args.view, on_missing=gone)
    elif args.tasks is not None:
        absent = missing("failed", f"not in Label Studio project {args.project} (deleted, or never there)")
        ids = args.tasks if args.limit is None or args.unannotated else args.tasks[: args.limit]
        stream = client.tasks(args.project, ids=ids, skip_missing=True, on_missing=absent)
    else:
        stream = client.tasks(args.project)
    if args.unannotated:  # ids or a view: left out here (and a task annotated since it was listed)
        stream = (task for task in stream if not task.get("annotations"))
    total = len(args.tasks) if args.tasks is not None else None
    counts = getattr(client, "count_tasks", None)  # a client given to main() may not count: no total
    if counts is not None and whole:
        total = counts(args.project, unannotated=args.unannotated)
    elif counts is not None and args.view is not None and not args.unannotated:
        total = counts(args.project, view=args.view)
    if args.limit is not None:
        stream = itertools.islice(stream, args.limit)
        total = min(total, args.limit) if total is not None else args.limit
    return stream, total


def _dry_run(predictor, schema, head, version: str, tasks: list[dict], sample: int) -> int:
    from backend.prelabel.engine import current_predictions

    todo = [t for t in tasks if not current_predictions(t, version)[0]]
    chosen = todo[: max(1, sample)]
    if not chosen:
        print(f"nothing to do: every selected task has a prediction of {version}")
        return 0
    started = time.perf_counter()
    outcomes = predictor.predict(chosen, schema, head=head)
    per_task = (time.perf_counter() - started) / len(chosen)
    failed = [o for o in outcomes if o.status == "failed"]
    print(
        f"dry run: {len(chosen)} tasks predicted in {per_task * len(chosen):.1f} s ({per_task:.2f} s a task, "
        f"nothing written); {len(todo)} tasks to do: about {per_task * len(todo) / 60:.1f} min"
        + (f"; {len(failed)} of the sample failed: {failed[0].reason}" if failed else "")
    )
    return 0
