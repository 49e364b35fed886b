"""The installed ``osprey-label`` command: every command of :mod:`backend.cli`, plus ``serve``, which
runs this package's server (the command line does not import the HTTP layer; it is handed ``serve``
here)."""

from __future__ import annotations

import argparse

from backend import cli


def add_serve_command(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the Label Studio ML backend (settings from the environment)"
    )
    serve.add_argument("--host", help="bind address (HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (PORT, default 9090)")
    serve.add_argument(
        "--model",
        help="region model: osprey-7b (default), pixelrefer-lite-2b, ... or a checkpoint dir (REGION_MODEL)",
    )
    serve.add_argument("--sam-model", help="vit_h, vit_l, vit_b or tiny (SAM_MODEL, default vit_h)")
    serve.add_argument("--threads", type=int, help="request threads (THREADS, default 8)")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from backend.runtime.settings import Settings

    from .server import serve

    overrides = {
        key: value
        for key, value in (
            ("host", args.host),
            ("port", args.port),
            ("region_model", args.model),
            ("sam_model", args.sam_model),
            ("threads", args.threads),
        )
        if value is not None
    }
    serve(Settings.from_env(**overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole ``osprey-label`` parser."""
    return cli.build_parser(add_serve_command)


def main(argv: list[str] | None = None) -> int:
    """``osprey-label`` (see :func:`backend.cli.main` for the exit status)."""
    return cli.main(argv, commands=(add_serve_command,))
