"""How the backend talks HTTP to Label Studio: one retry policy and one way to make a session, shared by
the API client and the task-image loader.

The policy is urllib3's own ``Retry`` (no hand-written loops): connection errors and resets, 429 and
5xx answers are retried with exponential backoff and jitter, honouring ``Retry-After``, for about
``RETRY_WINDOW_S`` seconds at most. Status and read errors are retried only for idempotent methods
(GET, HEAD, PUT, DELETE, PATCH of a webhook's headers); a POST is retried only when the connection
failed before it was sent, because Label Studio may have stored what a lost answer was about (the
prediction writer reads back what exists instead, see :mod:`backend.prelabel.engine`). A 401 is not a
transport error: the client refreshes its token once and repeats the call (:mod:`backend.labelstudio.api`).
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

RETRY_STATUSES = (429, 500, 502, 503, 504)
RETRY_WINDOW_S = 45.0  # how long a run of failures may last before a call gives up (sum of the backoffs)
CONNECT_WINDOW_S = 10.0  # the same for connections refused (Label Studio restarting, or a wrong URL)
_BACKOFF_S = 0.5  # first backoff; doubles each time up to _BACKOFF_MAX_S
_BACKOFF_MAX_S = 8.0
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"})


def retry_policy(*, window_s: float = RETRY_WINDOW_S, methods: frozenset[str] = IDEMPOTENT_METHODS) -> Retry:
    """The one retry policy (see the module docstring): as many attempts as backoffs of 0.5, 1, 2, 4, 8,
    8, ... seconds (plus up to 0.5 s of jitter each) fit in ``window_s`` (a refused connection, the sign of
    a wrong URL or a restart, within ``CONNECT_WINDOW_S`` of it). ``methods`` are those whose status and
    read failures are retried (a token exchange adds POST: asking twice does no harm)."""
    attempts = _attempts(window_s)
    return Retry(
        total=attempts,
        connect=_attempts(min(window_s, CONNECT_WINDOW_S)),
        read=attempts,
        status=attempts,
        other=0,
        allowed_methods=methods,
        status_forcelist=RETRY_STATUSES,
        backoff_factor=_BACKOFF_S
        / 2,  # urllib3 sleeps factor * 2 ** (n - 1) from the second retry: 0.5 s, 1 s, ...
        backoff_max=_BACKOFF_MAX_S,
        backoff_jitter=0.5,
        respect_retry_after_header=True,
        raise_on_status=False,  # the last answer comes back; the caller turns it into an error naming the call
        raise_on_redirect=False,
    )


def _attempts(window_s: float) -> int:
    """How many retries' backoffs (0, 0.5, 1, 2, 4, 8, 8, ... s) fit in ``window_s``."""
    attempts, waited, backoff = 1, 0.0, _BACKOFF_S  # the first retry does not wait
    while waited + backoff <= window_s:
        waited += backoff
        attempts += 1
        backoff = min(backoff * 2, _BACKOFF_MAX_S)
    return attempts


def label_studio_session(*, retry: Retry | None = None) -> requests.Session:
    """A session for Label Studio: the retry policy on http and https, no proxy or .netrc credentials
    from the environment, and no cookies kept (the token is the only credential)."""
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    adapter = HTTPAdapter(max_retries=retry if retry is not None else retry_policy())
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
