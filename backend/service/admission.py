"""Who gets in, and how many at once: basic-auth credentials, the webhook secret, the webhook bound.

Basic auth (``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``) follows RFC 7617 with ``charset="UTF-8"``: the
decoded ``user:pass`` bytes are compared with the UTF-8 bytes of the settings (and with their
Latin-1 bytes, which Label Studio sends), each with ``hmac.compare_digest`` (constant time for equal
lengths), so non-ASCII passwords work.

Label Studio sends its automatically created webhook (``<backend url>/webhook``) without the ML
backend's basic-auth credentials; only the webhook's extra headers go with it. ``/webhook`` therefore
also accepts the header :data:`WEBHOOK_SECRET_HEADER` carrying :func:`webhook_secret` — a secret that
only lets a caller post webhooks, which the backend registers on Label Studio's webhook itself (see
:mod:`backend.labelstudio.webhooks`).

:class:`ConcurrencyLimit` bounds how many requests of one kind run at once (webhooks: each decodes
and stores every region of an annotation), so a flood of heavy webhooks cannot take the threads
that ``/health`` needs; a request that finds no slot (and no place to wait for one) is refused with
503 and ``Retry-After``, and the refusal is logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from backend.errors import NotReadyError

logger = logging.getLogger(__name__)

WEBHOOK_SECRET_HEADER = "X-Osprey-Webhook-Secret"
_DERIVATION = b"osprey-label webhook secret v1"
_BASIC_AUTH_ENCODINGS = ("utf-8", "latin-1")


def basic_auth_matches(header: str | None, *, user: str, password: str) -> bool:
    """True when ``header`` (an ``Authorization`` value, ``Basic <base64 of user:pass>``) carries exactly
    ``user`` and ``password``, both encoded in UTF-8 (RFC 7617) or both in Latin-1 (what ``requests``,
    and so Label Studio, sends for a ``str`` password). Bytes are compared in constant time, every
    candidate always; anything malformed is False."""
    if not header:
        return False
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):  # not base64, or not ASCII at all
        return False
    got_user, colon, got_password = decoded.partition(b":")
    if not colon:
        return False
    matched = False
    for encoding in _BASIC_AUTH_ENCODINGS:
        try:
            want_user, want_password = user.encode(encoding), password.encode(encoding)
        except UnicodeEncodeError:  # e.g. a password with CJK characters has no Latin-1 form
            continue
        user_ok = hmac.compare_digest(got_user, want_user)
        password_ok = hmac.compare_digest(got_password, want_password)
        matched |= user_ok and password_ok
    return matched


def webhook_secret(*, configured: str | None, basic_auth_pass: str | None) -> str | None:
    """The secret ``/webhook`` accepts in :data:`WEBHOOK_SECRET_HEADER`: ``OSPREY_WEBHOOK_SECRET`` when
    set, else one derived from ``BASIC_AUTH_PASS`` (HMAC-SHA256, hex; the same in every process and
    after restarts, and useless for any route but ``/webhook``), else None (basic auth is off)."""
    if configured:
        return configured
    if not basic_auth_pass:
        return None
    return hmac.new(basic_auth_pass.encode("utf-8"), _DERIVATION, hashlib.sha256).hexdigest()


def secret_matches(header: str | None, secret: str | None) -> bool:
    """True when ``header`` equals ``secret`` (UTF-8 bytes, constant time); False when either is missing."""
    if not header or not secret:
        return False
    return hmac.compare_digest(header.encode("utf-8", "surrogateescape"), secret.encode("utf-8"))


class ConcurrencyLimit:
    """At most ``limit`` holders of a slot at once and at most ``max_waiting`` more waiting up to
    ``wait_s`` seconds for one; any other caller is refused at once. A refusal raises
    :class:`backend.errors.NotReadyError` (503) with ``retry_after_s`` set, and is logged. Thread-safe.

    So a request of this kind occupies at most ``limit + max_waiting`` server threads, whatever arrives.
    """

    def __init__(
        self, *, name: str, limit: int, max_waiting: int, wait_s: float, retry_after_s: int = 1
    ) -> None:
        if limit < 1 or max_waiting < 0:
            raise ValueError(f"{name}: need limit >= 1 and max_waiting >= 0, got {limit} and {max_waiting}")
        self.name = name
        self.limit = limit
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.refused = 0

    def _acquire(self) -> bool:
        if self._slots.acquire(blocking=False):
            return True
        with self._lock:
            if self.waiting >= self.max_waiting:
                return False
            self.waiting += 1
        try:
            return self._slots.acquire(timeout=self.wait_s)
        finally:
            with self._lock:
                self.waiting -= 1

    @contextmanager
    def slot(self, what: str) -> Iterator[None]:
        """Hold one slot for the ``with`` body; ``what`` names the request in the refusal log line."""
        if not self._acquire():
            with self._lock:
                self.refused += 1
                refused = self.refused
            logger.warning(
                "refused %s with 503: %d %s running and %d waiting (OSPREY_WEBHOOK_CONCURRENCY); "
                "%d refused so far",
                what, self.limit, self.name, self.max_waiting, refused,
            )  # fmt: skip
            error = NotReadyError(
                f"too many {self.name} at once ({self.limit} running, {self.max_waiting} waiting); "
                f"retry in {self.retry_after_s} s"
            )
            error.retry_after_s = self.retry_after_s
            raise error
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
            self._slots.release()

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "limit": self.limit,
                "running": self.running,
                "waiting": self.waiting,
                "refused": self.refused,
            }


def webhook_registrar(settings, secret: str | None, *, client, submit):
    """The :class:`backend.labelstudio.webhooks.WebhookHeaderRegistrar` that puts the webhook secret on
    Label Studio's webhooks through ``client`` (work run by ``submit``), or None when basic auth is off
    or there is no Label Studio client (``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` unset)."""
    if not (settings.basic_auth_user and secret and client is not None):
        return None
    from backend.labelstudio.webhooks import WebhookHeaderRegistrar

    return WebhookHeaderRegistrar(client=client, header=WEBHOOK_SECRET_HEADER, value=secret, submit=submit)
