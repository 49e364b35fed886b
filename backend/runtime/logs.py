"""Logging for the commands: one handler on the root logger, and credentials removed from every record.

Presigned image URLs carry their signature in the query string, Label Studio URLs may carry
``user:pass@``, and libraries log both: urllib3 at DEBUG writes every request line with its full
path and query (``"GET /a.png?X-Amz-Signature=... HTTP/1.1" 200``). :func:`install_redaction`
replaces the log record factory, so every record of every logger (ours and third-party), at every
level, is cleaned when it is created, before any handler, filter or formatter sees it. Cleaning:

- a query string (``?`` followed by ``name=value`` pairs) becomes ``?[redacted]``;
- ``user:pass@`` in a URL becomes ``[redacted]@``;
- ``Authorization``/``Proxy-Authorization``/``Cookie`` header values, ``X-Amz-*`` credentials and
  ``token``/``password``/``secret``/``api_key``/``refresh`` keys (``key=value``, ``key: value``,
  JSON ``"key": "value"``) lose their values;
- anything shaped like a JWT (``eyJ...``) becomes ``[jwt]``.

The message is formatted (``msg % args``) before cleaning, so secrets passed as arguments are
caught too; a record's exception text and stack are cleaned the same way.
"""

from __future__ import annotations

import logging
import re
import traceback

from backend.errors import SettingsError

REDACTED = "[redacted]"

_QUERY = re.compile(r"\?(?=[^\s\"'<>]*=)[^\s\"'<>]+")
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@\"'<>]+@")
_HEADER = re.compile(
    r"(?P<name>(?:proxy-)?authorization|cookie|set-cookie|x-amz-security-token|x-api-key|x-osprey-webhook-secret)"
    r"(?P<sep>[\"']?\s*[:=]\s*[\"']?)(?P<scheme>(?:basic|bearer|token)\s+)?[^\s\"',;}]+",
    re.IGNORECASE,
)
_KEY_VALUE = re.compile(
    r"(?P<name>\b(?:[\w-]*token|password|passwd|pass|secret|api[_-]?key|apikey|refresh|access|"
    r"signature|x-amz-signature|x-amz-credential|sig)\b)"
    r"(?P<sep>[\"']?\s*[:=]\s*[\"']?)(?![\[\s\"'])[^\s\"'&,;}]+",
    re.IGNORECASE,
)
_JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]+")


def redact(text: str) -> str:
    """``text`` without query strings, URL credentials, auth header values, secret-looking keys or JWTs."""
    text = _JWT.sub("[jwt]", text)
    text = _USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)
    text = _QUERY.sub("?" + REDACTED, text)
    text = _HEADER.sub(
        lambda m: m.group("name") + m.group("sep") + (m.group("scheme") or "") + REDACTED, text
    )
    return _KEY_VALUE.sub(lambda m: m.group("name") + m.group("sep") + REDACTED, text)


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Clean ``record`` in place: its formatted message, exception text and stack; returns it."""
    try:
        message = record.getMessage()
    except Exception:  # a broken %-format: keep logging's own error path, on the raw message only
        message = str(record.msg)
    record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[0] is not None:
        # formatters print a record's exc_text when it is set, instead of formatting exc_info again
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


class _RedactingFactory:
    """A log record factory that cleans each record its wrapped factory makes."""

    def __init__(self, wrapped) -> None:
        self.wrapped = wrapped

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        return redact_record(self.wrapped(*args, **kwargs))


def install_redaction() -> None:
    """Clean every log record from now on (idempotent; wraps any factory already installed)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))


def configure_logging(level: str) -> None:
    """Root logger at ``level`` (a name such as ``DEBUG``) with one stderr handler, credentials removed
    from every record (see the module docstring). ValueError for an unknown level name."""
    name = level.strip().upper()
    if not isinstance(logging.getLevelName(name), int):
        raise SettingsError(
            f"LOG_LEVEL={level!r} is not a level; use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    install_redaction()
    logging.basicConfig(level=name, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
