"""Putting one extra header on the webhook Label Studio created for this backend.

When an ML backend is connected, Label Studio 1.23 creates a project webhook to
``<backend url>/webhook`` with no extra headers and sends it *without* the backend's basic-auth
credentials, so a backend that requires basic auth refuses every annotation event. Label Studio does
send a webhook's ``headers`` (``{"Name": "value"}``, at most 10) with each call, so
:class:`WebhookHeaderRegistrar` adds one there through the REST API:
``GET /api/webhooks/?project=<id>`` then ``PATCH /api/webhooks/<id>/`` with the merged ``headers``,
through the one Label Studio client (:mod:`backend.labelstudio.api`).

A webhook is this backend's when its URL's ``host[:port]`` is the ``Host`` that Label Studio used to
call the backend (``/setup``'s ``Host`` header) and its path ends in ``/webhook``; other webhooks of
the project are never touched, so the header never goes to a third party. Needs a
``LABEL_STUDIO_API_KEY`` allowed to change the project's webhooks (its owner or an administrator).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from .api import LabelStudioAPIError

logger = logging.getLogger(__name__)


class WebhookRegistrationError(RuntimeError):
    """Label Studio's webhooks could not be read or updated; the message names the call, never a secret."""


class WebhookHeaderRegistrar:
    """Adds ``header: value`` to the webhooks of a project that point at this backend.

    ``client`` is the :class:`~backend.labelstudio.api.LabelStudioClient`; ``submit(fn, *args)`` runs
    work in the background thread of whoever owns this registrar (the runtime).
    :meth:`ensure_in_background` runs :meth:`ensure` once per project (again after a failure, at the
    next call).
    """

    def __init__(self, *, client, header: str, value: str, submit: Callable) -> None:
        self._client = client
        self._header = header
        self._value = value
        self._submit = submit
        self._lock = threading.Lock()
        self._done: set[str] = set()  # projects whose webhooks carry the header (or are being updated)
        self.updated: list[int] = []  # ids of webhooks this process has updated

    def __repr__(self) -> str:
        return f"WebhookHeaderRegistrar(url={self._client.url!r}, header={self._header!r})"

    def ensure(self, project_id: str, backend_host: str) -> list[int]:
        """Add the header to every webhook of ``project_id`` whose URL is ``http(s)://<backend_host>.../webhook``;
        returns the ids it updated (empty when all already carry it). WebhookRegistrationError on failure."""
        try:
            hooks = self._client.webhooks(project_id)
        except LabelStudioAPIError as error:
            raise WebhookRegistrationError(
                f"could not list the project's webhooks: {_status(error)}"
            ) from None
        host = backend_host.strip().lower()
        updated = []
        for hook in hooks:
            if not isinstance(hook, dict) or str(hook.get("project")) != str(project_id):
                continue
            url = urlsplit(str(hook.get("url", "")))
            netloc = url.netloc.rsplit("@", 1)[-1].lower()
            if netloc != host or not url.path.rstrip("/").endswith("/webhook"):
                continue
            headers = hook.get("headers") if isinstance(hook.get("headers"), dict) else {}
            if headers.get(self._header) == self._value:
                continue
            try:
                self._client.set_webhook_headers(int(hook["id"]), {**headers, self._header: self._value})
            except LabelStudioAPIError as error:
                raise WebhookRegistrationError(
                    f"could not update webhook {hook['id']}: {_status(error)}"
                ) from None
            updated.append(int(hook["id"]))
        with self._lock:
            self.updated.extend(updated)
        return updated

    def ensure_in_background(self, project_id: str, backend_host: str) -> bool:
        """Submit :meth:`ensure` unless this project is done or in progress; True if submitted."""
        with self._lock:
            if project_id in self._done:
                return False
            self._done.add(project_id)
        self._submit(self._ensure_logged, project_id, backend_host)
        return True

    def _ensure_logged(self, project_id: str, backend_host: str) -> None:
        try:
            updated = self.ensure(project_id, backend_host)
        except WebhookRegistrationError as error:
            with self._lock:
                self._done.discard(project_id)  # try again at the next /setup
            logger.warning(
                "project %s: could not add %s to Label Studio's webhook (%s); until it is there, basic auth "
                "refuses every annotation webhook: add the header by hand (docs: troubleshooting)",
                project_id, self._header, error,
            )  # fmt: skip
            return
        if updated:
            logger.info(
                "project %s: added %s to Label Studio webhook(s) %s", project_id, self._header, updated
            )


def _status(error: LabelStudioAPIError) -> str:
    return f"HTTP {error.status}" if error.status else str(error)
