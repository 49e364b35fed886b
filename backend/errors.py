"""Errors the service maps to 4xx responses. Their messages are shown to Label Studio users, so
they say what was wrong and how to fix it, and never carry tokens, URLs with credentials or
tracebacks."""

from __future__ import annotations


class RequestError(ValueError):
    """The request itself is malformed (missing keys, wrong types)."""

    status = 400


class WebhookError(RequestError):
    """A Label Studio payload (webhook event, annotation, task) that is not what Label Studio sends; the
    message names the bad key."""


class UnprocessableError(ValueError):
    """The request is well formed but cannot be served (e.g. an unusable label config)."""

    status = 422


class NotReadyError(RuntimeError):
    """The service is not ready for this call (e.g. a model is still loading)."""

    status = 503


def require(payload: object, key: str, kind: type | tuple[type, ...], *, where: str = "request body"):
    """``payload[key]`` checked to be of ``kind``; RequestError naming the key otherwise."""
    if not isinstance(payload, dict):
        raise RequestError(f"{where} must be a JSON object, got {type(payload).__name__}")
    if key not in payload:
        raise RequestError(f"{where} is missing '{key}'")
    value = payload[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RequestError(f"'{key}' in {where} must be {names}, got {type(value).__name__}")
    return value
