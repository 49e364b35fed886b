"""The errors that blame the user, and the id that marks our own.

:class:`InputError` and its subclasses mean "what you sent or set is wrong": the HTTP layer answers
them with their ``status`` (4xx), a failed task gives their message as its reason, and the command
line prints it as one line (exit status 2). Their messages are shown to Label Studio users, so they
say what was wrong and how to fix it, and never carry tokens, URLs with credentials or tracebacks.

Anything else that escapes is our bug: the HTTP layer answers 500 with an error id, a failed task's
reason is ``internal error <id>``, and the log holds that id with the traceback
(:func:`internal_error`).
"""

from __future__ import annotations

import logging
import uuid


class InputError(ValueError):
    """Something a user sent or configured is wrong; the message names it and the fix."""

    status = 400


class RequestError(InputError):
    """The request itself is malformed (missing keys, wrong types)."""


class WebhookError(RequestError):
    """A Label Studio payload (webhook event, annotation, task) that is not what Label Studio sends; the
    message names the bad key."""


class UnprocessableError(InputError):
    """The request is well formed but cannot be served (e.g. an unusable label config)."""

    status = 422


class SettingsError(InputError):
    """A setting (environment variable or command option) has a value that cannot be used; the message
    names the variable."""


class NotReadyError(RuntimeError):
    """The service is not ready for this call (e.g. a model is still loading, every slot is busy)."""

    status = 503


def internal_error(logger: logging.Logger, what: str) -> str:
    """Log the exception being handled, with its traceback, under a new error id, and return the id.
    Call inside an ``except`` block; ``what`` says what was being done (``"task 12"``)."""
    error_id = uuid.uuid4().hex[:12]
    logger.exception("internal error %s in %s", error_id, what)
    return error_id


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
