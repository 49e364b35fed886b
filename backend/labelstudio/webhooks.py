"""Putting one extra header on the webhook Label Studio created for this backend.

When an ML backend is connected, Label Studio 1.23 creates a project webhook to
``<backend url>/webhook`` with no extra headers and sends it *without* the backend's basic-auth
credentials, so a backend that requires basic auth refuses every annotation event. Label Studio does
send a webhook's ``headers`` (``{"Name": "value"}``, at most 10) with each call, so
:class:`WebhookHeaderRegistrar` adds one there through the REST API:
``GET /api/webhooks/?project=<id>`` then ``PATCH /api/webhooks/<id>/`` with the merged ``headers``.

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

import requests

logger = logging.getLogger(__name__)


class WebhookRegistrationError(RuntimeError):
    """Label Studio's webhooks could not be read or updated; the message names the call, never a secret."""


class WebhookHeaderRegistrar:
    """Adds ``header: value`` to the webhooks of a project that point at this backend.

    ``auth`` returns the ``Authorization`` header value for Label Studio (e.g. a
    :class:`backend.labelstudio.auth.LabelStudioAuth`). :meth:`ensure_in_background` runs
    :meth:`ensure` once per project in a thread (again after a failure, at the next call).
    """

    def __init__(
        self,
        *,
        base_url: str,
        auth: Callable[[], str],
        header: str,
        value: str,
        timeout_s: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._auth = auth
        self._header = header
        self._value = value
        self._timeout_s = timeout_s
        self._session = session or requests.Session()
        self._session.trust_env = False
        self._lock = threading.Lock()
        self._done: set[str] = set()  # projects whose webhooks carry the header (or are being updated)
        self.updated: list[int] = []  # ids of webhooks this process has updated

    def __repr__(self) -> str:
        return f"WebhookHeaderRegistrar(base_url={self._base_url!r}, header={self._header!r})"

    def ensure(self, project_id: str, backend_host: str) -> list[int]:
        """Add the header to every webhook of ``project_id`` whose URL is ``http(s)://<backend_host>.../webhook``;
        returns the ids it updated (empty when all already carry it). WebhookRegistrationError on failure."""
        hooks = self._call(
            "GET", "/api/webhooks/", "list the project's webhooks", params={"project": project_id}
        )
        if not isinstance(hooks, list):
            raise WebhookRegistrationError("Label Studio's webhook list is not a JSON list")
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
            self._call(
                "PATCH",
                f"/api/webhooks/{int(hook['id'])}/",
                f"update webhook {hook['id']}",
                json={"headers": {**headers, self._header: self._value}},
            )
            updated.append(int(hook["id"]))
        with self._lock:
            self.updated.extend(updated)
        return updated

    def ensure_in_background(self, project_id: str, backend_host: str) -> bool:
        """Start :meth:`ensure` in a daemon thread unless this project is done or in progress; True if started."""
        with self._lock:
            if project_id in self._done:
                return False
            self._done.add(project_id)
        threading.Thread(
            target=self._ensure_logged,
            args=(project_id, backend_host),
            name="osprey-webhook-header",
            daemon=True,
        ).start()
        return True

    def _ensure_logged(self, project_id: str, backend_host: str) -> None:
        try:
            updated = self.ensure(project_id, backend_host)
        except (WebhookRegistrationError, requests.RequestException, ValueError) as error:
            with self._lock:
                self._done.discard(project_id)  # try again at the next /setup
            logger.warning(
                "project %s: could not add %s to Label Studio's webhook (%s); until it is there, basic auth "
                "refuses every annotation webhook: add the header by hand (README, Troubleshooting)",
                project_id, self._header, error,
            )  # fmt: skip
            return
        if updated:
            logger.info(
                "project %s: added %s to Label Studio webhook(s) %s", project_id, self._header, updated
            )

    def _call(self, method: str, path: str, what: str, **kwargs):
        try:
            response = self._session.request(
                method,
                self._base_url + path,
                headers={"Authorization": self._auth()},
                timeout=self._timeout_s,
                allow_redirects=False,
                **kwargs,
            )
        except requests.RequestException as error:
            raise WebhookRegistrationError(f"could not {what}: {type(error).__name__}") from None
        if response.status_code != 200:
            raise WebhookRegistrationError(f"could not {what}: HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise WebhookRegistrationError(f"could not {what}: the answer is not JSON") from None
