"""The ``osprey-label`` command line: builds the parser and runs a subcommand.

``precompute``, ``models`` and ``check-config`` are here; the others live beside what they drive and
are registered below: ``label`` (:mod:`osprey.inference.cli`), ``download``
(:mod:`osprey.download.cli`), ``eval classify|captions`` (:mod:`osprey.evaluation.cli`) and
``eval acceptance`` (:mod:`backend.cli.acceptance`) and ``prelabel`` (:mod:`backend.cli.prelabel`).
``serve`` belongs to the HTTP layer, which this package does not import: the installed
``osprey-label`` is :func:`backend.service.command.main`, which hands its registration to
:func:`main` (``commands``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from backend.errors import InputError, SettingsError, internal_error
from backend.runtime.logs import configure_logging


def _check_config(args: argparse.Namespace) -> int:
    from backend.labelstudio.schema import describe_schema, parse_field_map, parse_label_config
    from backend.runtime.settings import Settings

    xml = Path(args.file).read_text()
    field_map = parse_field_map(
        args.field_map if args.field_map is not None else Settings.from_env().field_map
    )
    print(describe_schema(parse_label_config(xml, field_map=field_map)))
    return 0


def _precompute(args: argparse.Namespace) -> int:
    from backend.prelabel.precompute import precompute, task_image_references
    from backend.runtime.runtime import build_runtime
    from backend.runtime.settings import Settings

    overrides = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    if args.model:
        overrides["region_model"] = args.model
    if args.sam_model:
        overrides["sam_model"] = args.sam_model
    settings = Settings.from_env(**overrides, training=False)
    if not settings.cache_dir:
        raise SettingsError(
            "set OSPREY_CACHE_DIR (or --cache-dir): precomputed encodings are kept on disk there"
        )
    references = task_image_references(Path(args.tasks), args.image_key)
    which = ("sam", "osprey") if args.only is None else (args.only,)
    with build_runtime(settings) as runtime:
        report = precompute(runtime.models, runtime.loader, references, which=which)
    print(
        f"{report.images} images in {report.seconds:.1f} s: encoded {report.encoded or '{}'}, "
        f"already cached {report.already_cached or '{}'}, failed {len(report.failed)}"
    )
    for ref, error in report.failed:
        print(f"  failed: {ref}: {error}")
    return 1 if report.failed else 0


def _download(args: argparse.Namespace) -> int:
    """``download`` with MODEL_DIR and SAM_BASE_URL from the settings (the command line wins)."""
    from backend.runtime.settings import Settings
    from osprey.download.cli import run_download

    settings = Settings.from_env()
    args.model_dir = args.model_dir or str(settings.model_dir)
    args.sam_base_url = args.sam_base_url or settings.sam_base_url
    return run_download(args)


def _models(args: argparse.Namespace) -> int:
    from backend.learning.registry import ModelRegistry
    from backend.runtime.settings import Settings

    registry = ModelRegistry(root=args.model_dir or Settings.from_env().model_dir)
    if args.action == "list":
        served = registry.served(args.project)  # "*": served; "!": promoted, but damaged
        versions = registry.versions(args.project)
        if not versions:
            print(f"project {args.project}: no trained versions; predictions use the base model")
        for info in versions:
            mark = "*" if served.version == info.version else "!" if served.promoted == info.version else " "
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(info.metrics.items())) or "no metrics"
            print(
                f"{mark} {info.version}  {info.kind:<9} {info.train_examples:>6} examples  {metrics}  {info.notes}"
            )
        if served.problem:
            print(f"damaged: the promoted version {served.promoted or '(unreadable)'}: {served.problem}")
        print(f"current: {_serving(served, 'base model')}")
    elif args.action == "promote":
        if not args.version:
            raise InputError("models promote needs a version, e.g. `osprey-label models promote 7 v0003`")
        registry.promote(args.project, args.version, reason="osprey-label models promote")
        print(f"project {args.project}: now serving {_serving(registry.served(args.project))}")
    else:
        registry.rollback(args.project)
        print(f"project {args.project}: now serving {_serving(registry.served(args.project))}")
    return 0


def _serving(served, base: str = "the base model") -> str:
    """The ``model_version`` a project serves, saying so when it falls back from a damaged version."""
    text = served.info.model_version() if served.info is not None else base
    if served.problem:
        text += (
            f" (falling back: CURRENT still names {served.promoted or 'an unreadable version'}; "
            f"`osprey-label models rollback {served.project}` or `osprey-label models promote "
            f"{served.project} VERSION` chooses what to serve)"
        )
    return text


def build_parser(*commands: Callable) -> argparse.ArgumentParser:
    """Every command of this package and the model library's, then each of ``commands`` (a function
    that adds its subparser to the subparsers it is given)."""
    from osprey.download.cli import add_download_command
    from osprey.evaluation.cli import add_eval_commands
    from osprey.inference.cli import add_label_command

    from .acceptance import add_acceptance_command
    from .prelabel import add_prelabel_command

    parser = argparse.ArgumentParser(
        prog="osprey-label", description="Osprey + SAM region pre-labelling for Label Studio"
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error")
    parser.add_argument(
        "--log-level",
        help="DEBUG, INFO, WARNING, ERROR (LOG_LEVEL; default INFO for serve, WARNING otherwise)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_label_command(subparsers)
    add_download_command(subparsers)
    subparsers.choices["download"].set_defaults(func=_download)
    eval_parser = subparsers.add_parser(
        "eval", help="Osprey's region benchmarks (classify, captions) and pre-label acceptance"
    )
    eval_sub = eval_parser.add_subparsers(dest="eval_command", required=True)
    add_eval_commands(eval_sub)
    # The model library's commands pass the user's arguments straight to it, and the library says
    # "bad argument" with ValueError (it cannot know backend.errors): for them, that is bad input.
    for command in (subparsers.choices["label"], subparsers.choices["download"], *eval_sub.choices.values()):
        command.set_defaults(input_errors=(ValueError,))
    add_acceptance_command(eval_sub)
    add_prelabel_command(subparsers)

    pre = subparsers.add_parser(
        "precompute", help="encode every image of a task list into the on-disk caches (OSPREY_CACHE_DIR)"
    )
    pre.add_argument(
        "tasks", help="Label Studio task list JSON (export or import file), or a folder of images"
    )
    pre.add_argument("--image-key", default="image", help="task data key of the image (default: image)")
    pre.add_argument("--cache-dir", help="cache folder (OSPREY_CACHE_DIR)")
    pre.add_argument("--model", help="region model (REGION_MODEL)")
    pre.add_argument("--sam-model", help="SAM model (SAM_MODEL)")
    pre.add_argument("--only", choices=("sam", "osprey"), help="encode with one model only")
    pre.set_defaults(func=_precompute)

    models = subparsers.add_parser("models", help="list, promote or roll back a project's trained versions")
    models.add_argument("action", choices=("list", "promote", "rollback"))
    models.add_argument("project", help="Label Studio project id")
    models.add_argument("version", nargs="?", help="version to promote, e.g. v0003")
    models.add_argument("--model-dir", help="registry root (MODEL_DIR)")
    models.set_defaults(func=_models)

    check = subparsers.add_parser("check-config", help="show how a label config maps to Osprey's fields")
    check.add_argument("file", help="Label Studio label config XML")
    check.add_argument("--field-map", help="tag=field overrides, e.g. 'notes=description' (OSPREY_FIELD_MAP)")
    check.set_defaults(func=_check_config)
    for add in commands:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None, *, commands: tuple[Callable, ...] = ()) -> int:
    """Run one command. Exit status 0: done; 1: it ran, but something failed (failed tasks, Label Studio
    failing, or an error of our own, logged with its traceback under an error id); 2: bad input or
    settings, Label Studio unreachable or refusing the token, or a start-up check refused. Every
    failure that is not our bug is one line naming the problem and the fix; ``--debug`` adds the
    traceback."""
    from backend.labelstudio.api import LabelStudioAPIError
    from backend.runtime.startup import StartupError

    parser = build_parser(*commands)
    args = parser.parse_args(argv)
    user_errors = (InputError, StartupError, FileNotFoundError, *getattr(args, "input_errors", ()))
    try:
        configure_logging(_log_level(args))  # query strings and credentials are removed from every record
        return args.func(args)
    except (*user_errors, LabelStudioAPIError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"osprey-label {args.command}: error: {error}", file=sys.stderr)
        failing = isinstance(error, LabelStudioAPIError) and error.kind == "upstream"  # theirs, not the input
        return 1 if failing else 2
    except Exception:
        error_id = internal_error(logging.getLogger("backend.cli"), f"osprey-label {args.command}")
        print(f"osprey-label {args.command}: internal error {error_id} (traceback above)", file=sys.stderr)
        return 1


def _log_level(args: argparse.Namespace) -> str:
    """``--log-level``, else ``LOG_LEVEL``, else INFO for ``serve`` and WARNING for the other commands."""
    if args.log_level:
        return args.log_level
    from backend.runtime.settings import Settings

    try:
        configured = Settings.from_env().log_level
    except InputError:
        configured = None  # the command reports the bad setting itself
    return configured or ("INFO" if args.command == "serve" else "WARNING")
