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
command with a message naming it. SIGTERM stops accepting, lets running requests finish (up to
``OSPREY_PREDICT_BUDGET_S`` + 10 s), then closes the runtime: job workers stop after their current step,
recorded predictions are written, webhooks not yet parsed stay in the inbox for the next start.
"""

from __future__ import annotations

import functools
import logging

from backend.runtime.settings import Settings

logger = logging.getLogger(__name__)


def build_app(settings: Settings):
    """The runtime (models loaded, workers started) and the WSGI app over it."""
    from backend.runtime.runtime import build_runtime

    from .app import create_app

    runtime = build_runtime(settings).start()
    return create_app(runtime), runtime


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
        # reading ahead on a connection is how waitress notices a client that left mid-request
        # (environ["waitress.client_disconnected"]): a batch /predict Label Studio gave up on is deferred
        "channel_request_lookahead": 1,
        "ident": "osprey-label",
        "expose_tracebacks": False,
    }


def drain_seconds(settings: Settings) -> float:
    """How long a stopping server lets running requests finish: a batch ``/predict``'s budget and then
    some (a click or a webhook takes far less)."""
    return settings.predict_budget_s + 10.0


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)  # waitress's loop catches it, then finishes running requests


def serve(settings: Settings) -> None:
    """Check the folders, the device and the weights, load the models, then serve until SIGTERM or
    Ctrl-C; then let running requests finish (5 s), stop the job workers after their current step and
    every other thread of the runtime, and return."""
    import signal

    from waitress import create_server

    app, runtime = build_app(settings)
    try:
        server = create_server(app, **server_options(settings))
        # Running requests get as long to finish as a batch /predict may take, not waitress's 5 s: a
        # request cut off mid-computation loses Label Studio's answer (and a thread left running at exit
        # takes the process down with it).
        server.task_dispatcher.shutdown = functools.partial(
            server.task_dispatcher.shutdown, cancel_pending=True, timeout=drain_seconds(settings)
        )
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        logger.info(
            "serving on http://%s:%d (%d threads, %d more for webhooks; at most %d connections)",
            settings.host, settings.port, settings.threads, 2 * settings.webhook_concurrency,
            settings.max_connections,
        )  # fmt: skip
        server.run()
        logger.info("stopped serving; stopping the runtime")
    finally:
        runtime.close()
