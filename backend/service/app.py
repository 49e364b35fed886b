"""Flask app factory speaking the Label Studio ML backend protocol.

Routes (as ``label-studio-ml`` 2.x serves them): ``GET /`` and ``/health``, ``POST /setup``,
``POST /predict``, ``POST /webhook``, ``GET /metrics``. A thin facade over a
:class:`~backend.runtime.runtime.Runtime`: it reads and checks the JSON, calls the runtime's parts
(``projects``, ``predictor``, ``intake``) and writes the answer; nothing is kept in module globals.
``/health`` and ``/setup`` never wait for model work: Label Studio gives them 1 s and 3 s and silently
drops a backend that is late.

Errors: an :class:`~backend.errors.InputError` (bad input) is answered with its 4xx status and message;
anything else is our bug, answered 500 with an error id that the log shows beside the traceback.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter

import orjson
from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider

from backend.errors import InputError, NotReadyError, RequestError, internal_error, require
from backend.labelstudio.ids import request_project
from backend.runtime.projects import project_options

from .admission import (
    WEBHOOK_SECRET_HEADER,
    ConcurrencyLimit,
    basic_auth_matches,
    secret_matches,
    webhook_registrar,
    webhook_secret,
)
from .overhead import RequestTimes
from .payloads import parse_json

logger = logging.getLogger(__name__)


class RouteStats:
    """Request counts per route and status, and time spent per route (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.counts[f"{route} {status}"] += 1
            self.seconds[route] += seconds

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "requests": dict(self.counts),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            }


class _FastJSON(DefaultJSONProvider):
    """Flask's JSON answers written by orjson: a brush mask is thousands of integers, which the
    standard encoder takes ~10 ms to write; what orjson cannot write goes to the standard one."""

    def dumps(self, obj, **kwargs) -> str:
        try:
            return orjson.dumps(obj).decode()
        except TypeError:
            return super().dumps(obj, **kwargs)


def create_app(runtime) -> Flask:
    """The WSGI app over ``runtime`` (a :class:`backend.runtime.runtime.Runtime`)."""
    settings = runtime.settings
    app = Flask("osprey-label")
    app.json = _FastJSON(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    stats = RouteStats()
    # A webhook is one append to the inbox (milliseconds), so every server thread may wait for a slot,
    # up to 0.8 s: Label Studio gives up after 1 s and never resends, so refusing loses the annotation.
    webhooks = ConcurrencyLimit(
        name="webhooks",
        limit=settings.webhook_concurrency,
        max_waiting=settings.threads + settings.webhook_concurrency,
        wait_s=0.8,
    )
    secret = webhook_secret(configured=settings.webhook_secret, basic_auth_pass=settings.basic_auth_pass)
    registrar = webhook_registrar(settings, secret, client=runtime.client, submit=runtime.submit)
    request_times = RequestTimes(runtime.scheduler)  # /predict: model vs waiting vs the backend's own
    app.extensions["request_times"] = request_times
    warning = runtime.models.warning()

    def json_body() -> dict:
        if not request.is_json:
            raise RequestError("the request body must be JSON (Content-Type: application/json)")
        body = parse_json(request.get_data(cache=True))  # nesting limited before the parser recurses
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def with_warning(doc: dict) -> dict:
        return {**doc, "warning": warning} if warning else doc

    @app.before_request
    def start() -> Response | None:
        g.request_id = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex[:12]
        g.started = time.perf_counter()
        if settings.basic_auth_user:
            ok = basic_auth_matches(
                request.headers.get("Authorization"),
                user=settings.basic_auth_user,
                password=settings.basic_auth_pass or "",
            ) or (
                request.path == "/webhook"
                and secret_matches(request.headers.get(WEBHOOK_SECRET_HEADER), secret)
            )
            if not ok:
                hint = (
                    f" or {WEBHOOK_SECRET_HEADER} (docs: guide/predictions.md, basic auth and the webhook)"
                    if request.path == "/webhook"
                    else ""
                )
                logger.warning(
                    "refused %s %s: bad or missing basic auth%s [%s]",
                    request.method,
                    request.path,
                    hint,
                    g.request_id,
                )
                return Response(
                    "Unauthorized", 401, {"WWW-Authenticate": 'Basic realm="osprey-label", charset="UTF-8"'}
                )
        return None

    @app.after_request
    def finish(response: Response) -> Response:
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        route = request.url_rule.rule if request.url_rule else "unmatched"
        stats.record(route, response.status_code, seconds)
        response.headers["X-Request-Id"] = g.get("request_id", "")
        if warning:
            response.headers["X-Osprey-Warning"] = warning
        logger.info(
            "%s %s %d %.3fs [%s]",
            request.method,
            request.path,
            response.status_code,
            seconds,
            g.get("request_id"),
        )
        return response

    @app.errorhandler(Exception)
    def handle(error: Exception):
        from werkzeug.exceptions import HTTPException

        request_id = g.get("request_id")
        if isinstance(error, HTTPException):
            return jsonify({"error": error.description, "request_id": request_id}), error.code
        if isinstance(error, InputError | NotReadyError):
            logger.warning(
                "refused %s %s (%d): %s [%s]", request.method, request.path, error.status, error, request_id
            )
            headers = {"Retry-After": str(error.retry_after_s)} if hasattr(error, "retry_after_s") else {}
            return jsonify({"error": str(error), "request_id": request_id}), error.status, headers
        error_id = internal_error(logger, f"{request.method} {request.path} [{request_id}]")
        return jsonify(
            {"error": f"internal error {error_id}; the backend log has its details", "error_id": error_id,
             "request_id": request_id}
        ), 500  # fmt: skip

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(with_warning({"status": "UP", "model_class": "OspreyBackend", **runtime.health()}))

    @app.post("/setup")
    def setup():
        body = json_body()
        schema = require(body, "schema", str)
        project = request_project(body.get("project"))
        parsed = runtime.projects.schema_for(schema)  # 422 for a config that cannot be served
        options = project_options(body.get("extra_params"))  # 422 for a value it cannot use
        runtime.projects.remember(project, schema)
        runtime.projects.remember_options(project, options)
        if project is not None:
            runtime.intake.configured(project, schema)
            if registrar is not None:  # Label Studio's webhook needs the secret
                registrar.ensure_in_background(project, request.host)
        version = runtime.projects.version(project)
        return jsonify(with_warning({"model_version": version, "tags": parsed.tag_roles()}))

    @app.post("/predict")
    def predict():
        with request_times.measure() as timing:  # the JSON in and out included
            return predict_request(timing)

    def predict_request(timing: dict):
        body = json_body()
        tasks = require(body, "tasks", list)
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise RequestError(f"'params' must be an object, got {type(params).__name__}")
        context = params.get("context") or None
        if context is not None and not isinstance(context, dict):
            raise RequestError(f"'params.context' must be an object, got {type(context).__name__}")
        timing["kind"] = "interactive" if context is not None else "batch"
        label_config = body.get("label_config")
        if label_config is not None and not isinstance(label_config, str):
            raise RequestError("'label_config' must be the project's XML as a string")
        response = runtime.predictor.predict(
            tasks=tasks,
            project=request_project(body.get("project")),
            label_config=label_config,
            context=context,
            # waitress sees a client that closed the connection (server.py reads ahead on it)
            disconnected=request.environ.get("waitress.client_disconnected"),
        )
        return jsonify(with_warning(response))

    @app.post("/webhook")
    def webhook():
        body = json_body()
        action = require(body, "action", str)
        with webhooks.slot(f"webhook {action} [{g.request_id}]"):
            outcome = runtime.intake.receive(action, body)
        if outcome.get("status") == "ignored":  # as label-studio-ml answers events it does not train on
            return jsonify({**outcome, "status": "Unknown event"}), 200
        return jsonify(outcome), 201

    @app.get("/metrics")
    def metrics():
        return jsonify(
            {"routes": stats.snapshot(), "webhooks": webhooks.snapshot(), **runtime.metrics(),
             "request_times": request_times.stats()}
        )  # fmt: skip

    return app
