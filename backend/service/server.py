"""``osprey-label serve``: the service under waitress, which never gives a thread to a slow client.

Why waitress: Label Studio drops a backend whose ``/health`` takes over 1 s, and a thread-per-
connection server (gunicorn's sync and gthread workers) gives a thread to a connection as soon as its
first byte arrives, so ten clients trickling headers at 1 byte/s hold every thread; gunicorn's own
answer is a buffering proxy (nginx) in front, which a pip install cannot provide. Waitress (Pylons
project, pure Python, a decade in production) *is* that buffer: one asynchronous loop reads every
request, headers and body, and hands it to a worker thread only once it is complete, and buffers the
response, so slow senders and slow readers cost a socket and a buffer, never a thread. Before any
thread is given, a request is held to :class:`Settings`' caps:

- headers over ``OSPREY_MAX_HEADER_BYTES`` are answered 431, bodies over ``OSPREY_MAX_REQUEST_BYTES``
  413 (bodies over 512 KiB are spooled to a temporary file while they arrive);
- a connection that sends nothing for ``OSPREY_CLIENT_TIMEOUT_S`` is closed;
- at most ``OSPREY_MAX_CONNECTIONS`` connections are open (more wait in the kernel's backlog).

Threads: ``THREADS`` for ``/predict`` (at most ``THREADS`` - 2 at once), ``/health``, ``/setup`` and
``/metrics``, plus two per ``OSPREY_WEBHOOK_CONCURRENCY`` for webhooks (one running and one waiting,
see :class:`backend.service.admission.ConcurrencyLimit`), so neither can take the threads ``/health``
needs. One process serves; weights are checked before the models load, so a missing file stops the
command with a message naming it. SIGTERM stops accepting and lets running requests finish (5 s).
"""

from __future__ import annotations

import logging
from pathlib import Path

from backend.runtime.settings import Settings

logger = logging.getLogger(__name__)


def check_weights(settings: Settings) -> None:
    """Raise FileNotFoundError naming every missing weight file and the command that fetches it."""
    from osprey.model.checkpoint import resolve_checkpoint, weight_files
    from osprey.model.config import load_preset, preset_names
    from osprey.sam.build import SAM_ARCHITECTURES

    missing = []
    model = settings.osprey_model
    if not (model in preset_names() and load_preset(model).untrained):
        try:
            weight_files(resolve_checkpoint(model))
        except FileNotFoundError as error:
            missing.append(str(error))
    arch = SAM_ARCHITECTURES.get(settings.sam_model)
    if arch is None:
        raise ValueError(
            f"SAM_MODEL={settings.sam_model!r} is unknown; use one of {', '.join(SAM_ARCHITECTURES)}"
        )
    if arch.checkpoint_file is not None:
        path = Path(settings.sam_checkpoint or settings.model_dir / arch.checkpoint_file)
        if not path.is_file():
            missing.append(
                f"SAM checkpoint {path} is missing; run `osprey-label download --sam {settings.sam_model}` "
                f"(saves {arch.checkpoint_file} under MODEL_DIR) or set SAM_CHECKPOINT"
            )
    if missing:
        raise FileNotFoundError("cannot start, weights are missing:\n  " + "\n  ".join(missing))


def build_app(settings: Settings):
    """The WSGI app with its models loaded and its training worker started."""
    from backend.runtime.runtime import OspreyService, load_models

    from .app import create_app

    models = load_models(settings)
    logger.info("models loaded: %s", models.version)
    service = OspreyService(settings=settings, models=models)
    service.start_training_worker()
    return create_app(settings, service)


def server_options(settings: Settings) -> dict:
    """Keyword arguments for ``waitress.create_server`` (see the module docstring for each limit)."""
    return {
        "host": settings.host,
        "port": settings.port,
        # webhooks running plus as many waiting (see create_app) come on top of THREADS
        "threads": settings.threads + 2 * settings.webhook_concurrency,
        "connection_limit": settings.max_connections,
        "channel_timeout": max(1, round(settings.client_timeout_s)),
        "cleanup_interval": max(1, min(30, round(settings.client_timeout_s / 2))),
        "max_request_header_size": settings.max_header_bytes,
        "max_request_body_size": settings.max_request_bytes,
        "asyncore_use_poll": True,  # select() stops at 1024 file descriptors
        "ident": "osprey-label",
        "expose_tracebacks": False,
    }


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)  # waitress's loop catches it, then finishes running requests


def serve(settings: Settings) -> None:
    """Check the weights, load the models, then serve until SIGTERM or Ctrl-C."""
    import signal

    from waitress import create_server

    check_weights(settings)
    app = build_app(settings)
    server = create_server(app, **server_options(settings))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    logger.info(
        "serving on http://%s:%d (%d threads, %d more for webhooks; at most %d connections)",
        settings.host,
        settings.port,
        settings.threads,
        2 * settings.webhook_concurrency,
        settings.max_connections,
    )
    server.run()
