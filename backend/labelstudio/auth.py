"""Authentication against Label Studio with ``LABEL_STUDIO_API_KEY``.

Label Studio 1.23 personal access tokens are JWT *refresh* tokens: they are exchanged at
``POST {LABEL_STUDIO_URL}/api/token/refresh/`` (body ``{"refresh": token}``, answer ``{"access": ...}``)
for a short-lived access token sent as ``Authorization: Bearer <access>``. A JWT access token is sent
as is, and a legacy key (not a JWT) as ``Authorization: Token <key>``.

``LabelStudioAuth`` is a callable that returns the ``Authorization`` header value, exchanging and
caching the access token and refreshing it before it expires *as Label Studio sees it*: the token's
``exp`` and ``iat`` (read from the JWT payload without verifying it: Label Studio verifies it) are in
Label Studio's clock, so the offset between its clock and ours is taken from ``iat`` at the exchange,
and the token is refreshed ``refresh_margin_s`` (at most a quarter of its lifetime) before ``exp``
translated into our clock. After a 401 the caller calls ``invalidate()`` and the next call exchanges a
new one. Tokens never appear in messages, logs or ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Callable

import requests

from backend.errors import SettingsError

from .http import IDEMPOTENT_METHODS, label_studio_session, retry_policy

logger = logging.getLogger(__name__)

REFRESH_PATH = "/api/token/refresh/"
_DEFAULT_ACCESS_LIFETIME_S = 300.0  # used when an access token carries no exp claim
CLOCK_TOLERANCE_S = 300.0  # how far our clock may be from Label Studio's before we judge a key's expiry


class LabelStudioAuthError(SettingsError):
    """LABEL_STUDIO_API_KEY cannot be used; the message says why (it never contains the token)."""


def jwt_claims(token: str) -> dict | None:
    """The payload of a JWT, decoded without verification, or None if ``token`` is not a JWT."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        return None
    try:
        decoded = [json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) for part in parts[:2]]
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    header, claims = decoded
    if not isinstance(header, dict) or "alg" not in header or not isinstance(claims, dict):
        return None
    return claims


def token_kind(token: str) -> str:
    """``"refresh"`` or ``"access"`` for Label Studio JWTs, ``"legacy"`` for any other key."""
    claims = jwt_claims(token)
    if claims is None:
        return "legacy"
    return "access" if claims.get("token_type") == "access" else "refresh"


class LabelStudioAuth:
    """Callable giving the ``Authorization`` header value for requests to ``base_url``."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        session: requests.Session | None = None,
        timeout_s: float = 10.0,
        refresh_margin_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(api_key, str) or not api_key.strip():
            raise LabelStudioAuthError(
                "LABEL_STUDIO_API_KEY is empty; copy a token from Label Studio's Account page"
            )
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key.strip()
        self._kind = token_kind(self._api_key)
        self._session = session
        self._timeout_s = timeout_s
        self._margin_s = refresh_margin_s
        self._clock = clock
        self._lock = threading.Lock()
        self._access: str | None = None
        self._refresh_at = 0.0  # our clock: when the cached access token is to be replaced
        self.exchanges = 0
        self.skew_s = 0.0  # Label Studio's clock minus ours, estimated from the last access token's iat

    @property
    def kind(self) -> str:
        return self._kind

    def __repr__(self) -> str:
        return f"LabelStudioAuth(base_url={self._base_url!r}, kind={self._kind!r})"

    def __call__(self) -> str:
        if self._kind == "legacy":
            return f"Token {self._api_key}"
        if self._kind == "access":
            self._check_not_expired(self._api_key, "access token")
            return f"Bearer {self._api_key}"
        with self._lock:
            if self._access is None or self._clock() >= self._refresh_at:
                self._exchange()
            return f"Bearer {self._access}"

    def invalidate(self) -> None:
        """Forget the cached access token (after a 401) so the next call exchanges a new one."""
        with self._lock:
            self._access = None

    def _check_not_expired(self, token: str, what: str, *, tolerance_s: float = 0.0) -> None:
        exp = (jwt_claims(token) or {}).get("exp")
        if isinstance(exp, (int, float)) and exp <= self._clock() - tolerance_s:
            expired_on = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(exp))
            raise LabelStudioAuthError(
                f"LABEL_STUDIO_API_KEY ({what}) expired on {expired_on}; create a new personal access "
                f"token in Label Studio (Account & Settings) and restart the backend"
            )

    def _exchange(self) -> None:
        # a key that expired long ago by any plausible clock is refused without asking; one within the
        # tolerance is tried, since Label Studio's clock, not ours, decides
        self._check_not_expired(self._api_key, "personal access token", tolerance_s=CLOCK_TOLERANCE_S)
        url = self._base_url + REFRESH_PATH
        if self._session is None:
            self._session = label_studio_session(retry=retry_policy(methods=IDEMPOTENT_METHODS | {"POST"}))
        session = self._session
        sent = self._clock()
        try:
            response = session.post(url, json={"refresh": self._api_key}, timeout=self._timeout_s)
        except requests.RequestException as error:
            raise LabelStudioAuthError(
                f"could not reach {url} to exchange LABEL_STUDIO_API_KEY: {type(error).__name__}"
            ) from None
        if response.status_code in (401, 403):
            self._check_not_expired(self._api_key, "personal access token")  # then say when it expired
            raise LabelStudioAuthError(
                f"Label Studio refused LABEL_STUDIO_API_KEY at {url} (HTTP {response.status_code}); the token "
                f"was revoked or belongs to another Label Studio instance: create a personal access token in "
                f"Label Studio's Account & Settings and set LABEL_STUDIO_API_KEY"
            )
        if response.status_code != 200:
            raise LabelStudioAuthError(f"token exchange at {url} failed with HTTP {response.status_code}")
        try:
            access = response.json().get("access")
        except (ValueError, AttributeError):
            access = None
        if not isinstance(access, str) or not access:
            raise LabelStudioAuthError(f"token exchange at {url} answered without an 'access' token")
        claims = jwt_claims(access) or {}
        exp, iat = claims.get("exp"), claims.get("iat")
        now = self._clock()
        latest_skew = self.skew_s  # a token without iat: the last estimate
        if isinstance(iat, (int, float)):
            # Label Studio issued the token at some instant of [iat, iat + 1) by its clock (iat has whole
            # seconds) and of [sent, now] by ours: the skew lies between these bounds. The estimate is the
            # middle; the expiry uses the largest skew, so a token is replaced before either clock says so.
            latest_skew = float(iat) + 1.0 - sent
            self.skew_s = (float(iat) - now + latest_skew) / 2
        if isinstance(exp, (int, float)):
            lifetime = float(exp) - float(iat) if isinstance(iat, (int, float)) else float(exp) - now
            expires_at = float(exp) - latest_skew  # in our clock
        else:
            lifetime, expires_at = _DEFAULT_ACCESS_LIFETIME_S, now + _DEFAULT_ACCESS_LIFETIME_S
        self._access = access
        self._refresh_at = expires_at - min(self._margin_s, max(lifetime, 0.0) / 4)
        self.exchanges += 1
        logger.info(
            "exchanged LABEL_STUDIO_API_KEY for an access token valid %.0f s (Label Studio's clock %+.1f s from ours)",
            expires_at - now, self.skew_s,
        )  # fmt: skip
