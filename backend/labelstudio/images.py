"""Safe loading of task images (not the SDK's fetch-anything helper).

Sources of a task's image reference:

- ``/data/upload/<project>/<file>`` and any other path starting with ``/`` (e.g. Label Studio's
  ``/tasks/<id>/resolve/?fileuri=...`` proxy): fetched from ``LABEL_STUDIO_URL`` with its token;
- ``/data/local-files/?d=<path>``: read from disk under ``local_files_root`` when it is set
  (``LOCAL_FILES_DOCUMENT_ROOT``), else fetched from Label Studio with its token;
- absolute ``http(s)://`` URLs: Label Studio's own origin (exact scheme, host and port) gets the token;
  other hosts must be allowed (``allowed_hosts``) and never get it. Presigned cloud URLs
  (``...?X-Amz-Signature=...``) are plain allowed-host URLs;
- ``data:image/...;base64,`` URIs (Label Studio accepts inline images);
- ``s3://``, ``gs://``, ``azure-blob://`` URIs are refused: Label Studio resolves them (it presigns
  them when the storage has "Use pre-signed URLs" on, or proxies them).

``allowed_hosts`` entries: ``host`` or ``host:port`` (or ``scheme://host:port``) are trusted as
named, even on private addresses (an internal MinIO); ``*.example.com`` and ``*`` admit matching hosts
only while every address they resolve to is public. Private, loopback, link-local (cloud metadata
169.254.169.254), multicast, reserved and unspecified addresses are refused everywhere else except at
Label Studio's origin. An IPv6 address that stands for an IPv4 one (IPv4-mapped ``::ffff:0:0/96`` and
-compatible ``::/96``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/96``, 6to4 ``2002::/16``, Teredo
``2001::/32``) is judged by the IPv4 address it carries (Teredo: its server and its client); other
addresses in the local-use NAT64 prefix ``64:ff9b:1::/48`` carry an IPv4 address where only the
network's operator knows, and are refused. Redirects are followed by hand (at most 5), each hop
checked again. Bodies are streamed under a byte cap and a total time cap; the pixel count is checked
from the header before decoding; EXIF orientation is applied (as browsers do, so sizes match Label
Studio's ``original_width``/``original_height``).
Known limit: the name is resolved for the check and again by the HTTP client (DNS rebinding window).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import logging
import re
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps

from backend.errors import InputError, SettingsError

from .auth import LabelStudioAuth, LabelStudioAuthError
from .http import label_studio_session, retry_policy

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 50 * 2**20
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_TIMEOUT_S = 15.0
MAX_REDIRECTS = 5
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG covers camera MPO files
CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "azure", "minio")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


class ImageLoadError(InputError):
    """A task image that cannot be loaded (answered 422). ``kind``: refused, not_found, auth, too_large, bad_image,
    unreachable or upstream. Messages never contain tokens or query strings."""

    status = 422

    def __init__(self, message: str, *, kind: str = "refused") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class LoadedImage:
    """A decoded task image: ``rgb`` is ``(H, W, 3)`` uint8, read-only (it may be shared by the
    cache); ``content_hash`` is the sha256 of the file bytes; ``source`` is sanitised for logs."""

    rgb: np.ndarray
    content_hash: str
    source: str

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels, as Label Studio's original_width/original_height."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def sanitize_url(url: str) -> str:
    """``url`` without credentials, query string or fragment (safe to log and show)."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url.split("?", 1)[0].split("#", 1)[0]
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215 local use, any RFC 6052 layout
_NAT64_LOCAL_96 = ipaddress.IPv6Network("64:ff9b:1::/96")  # the one layout of it that can be read


def carried_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses a connection to ``ip`` reaches through an IPv4 embedding (IPv4-mapped or
    -compatible, NAT64, 6to4, Teredo: server and client); None for a plain IPv6 address, [] for a
    local-use NAT64 address outside ``64:ff9b:1::/96`` (the operator's layout is unknown)."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _IPV4_COMPATIBLE or ip in _NAT64 or ip in _NAT64_LOCAL_96:  # :: and ::1 give 0.0.0.0/8
        return [low32]
    if ip in _NAT64_LOCAL:
        return []
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return None


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        carried = carried_ipv4(ip)
        if carried is not None:
            return bool(carried) and all(_public_ip(v4) for v4 in carried)
    return _public_ip(ip)


def _described(address: str) -> str:
    """``address``, with the IPv4 addresses it carries when it is an IPv4 embedding (for messages)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    carried = carried_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if carried is None:
        return address
    return f"{address} = {' and '.join(map(str, carried))}" if carried else f"{address} = unknown IPv4"


def _public_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    flags = (
        ip.is_private,
        ip.is_loopback,
        ip.is_link_local,
        ip.is_multicast,
        ip.is_reserved,
        ip.is_unspecified,
    )
    return ip.is_global and not any(flags)


def _resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


class ImageLoader:
    """Loads task images from Label Studio, local files, allowed hosts or data URIs (module docstring).

    ``token_provider`` returns the ``Authorization`` header value for Label Studio (default: a
    ``LabelStudioAuth`` built from ``api_key``); if it has ``invalidate()``, that is called on a 401.
    ``resolver(host, port) -> [addresses]`` is injectable for tests. ``cache_size`` decoded images are
    kept, keyed by content hash.
    """

    def __init__(
        self,
        *,
        label_studio_url: str | None,
        api_key: str | None,
        allowed_hosts: list[str] | tuple[str, ...] = (),
        local_files_root: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        token_provider: Callable[[], str | None] | None = None,
        cache_size: int = 8,
        resolver: Callable[[str, int], list[str]] = _resolve,
        url_ttl_s: float = 60.0,
    ) -> None:
        self._ls_url = self._check_ls_url(label_studio_url)
        self._ls_origin = _origin(self._ls_url) if self._ls_url else None
        if token_provider is None and api_key and self._ls_url:
            token_provider = LabelStudioAuth(base_url=self._ls_url, api_key=api_key, timeout_s=timeout_s)
        self._token_provider = token_provider
        self._allowed = [self._parse_allowed(entry) for entry in allowed_hosts if entry.strip()]
        self._local_root = Path(local_files_root).resolve() if local_files_root else None
        if max_bytes <= 0 or max_pixels <= 0 or timeout_s <= 0:
            raise ValueError(
                f"max_bytes, max_pixels and timeout_s must be positive, got {max_bytes}, {max_pixels}, {timeout_s}"
            )
        self.max_bytes, self.max_pixels, self.timeout_s = int(max_bytes), int(max_pixels), float(timeout_s)
        self._resolver = resolver
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        # reference -> (content hash, when it was read): an annotator's clicks on one image within
        # url_ttl_s reuse its decoded pixels without fetching it again (0: always fetch)
        self._recent: OrderedDict[str, tuple[str, float, str]] = OrderedDict()
        self.url_ttl_s = float(url_ttl_s)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._counts: Counter[str] = Counter()

    @staticmethod
    def _check_ls_url(url: str | None) -> str | None:
        if not url:
            return None
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(
                f"LABEL_STUDIO_URL must look like http://host:port, got {sanitize_url(url)!r}"
            )
        return url.strip().rstrip("/")

    @staticmethod
    def _parse_allowed(entry: str) -> tuple[str, int | None]:
        entry = entry.strip().lower()
        if "://" in entry:
            _, host, port = _origin(entry)
            return host, port
        host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if port and not port.isdigit():
            raise SettingsError(f"OSPREY_ALLOWED_IMAGE_HOSTS entry {entry!r}: port {port!r} is not a number")
        return host, int(port) if port else None

    # --- public API -------------------------------------------------------------------------------

    def load(self, url_or_path: str) -> LoadedImage:
        """Load and decode the image a task refers to. Raises ImageLoadError (see ``kind``)."""
        if not isinstance(url_or_path, str) or not url_or_path.strip():
            raise ImageLoadError(
                f"the task's image reference must be a non-empty string, got {type(url_or_path).__name__}"
            )
        reference = url_or_path.strip()
        recent = self._recent_image(reference)
        if recent is not None:
            return recent
        data, source = self._read(reference)
        content_hash = hashlib.sha256(data).hexdigest()
        with self._lock:
            rgb = self._cache.get(content_hash)
            self._counts["loaded"] += 1
            if rgb is not None:
                self._cache.move_to_end(content_hash)
                self._counts["cache_hits"] += 1
        if rgb is None:
            rgb = self._decode(data, source)
            with self._lock:
                self._cache[content_hash] = rgb
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if self.url_ttl_s > 0 and source != "data-uri":
            with self._lock:
                self._recent[reference] = (content_hash, time.monotonic(), source)
                self._recent.move_to_end(reference)
                while len(self._recent) > 4 * self._cache_size:
                    self._recent.popitem(last=False)
        return LoadedImage(rgb=rgb, content_hash=content_hash, source=source)

    def _recent_image(self, reference: str) -> LoadedImage | None:
        """The image read from ``reference`` less than ``url_ttl_s`` ago, if its pixels are still cached."""
        with self._lock:
            entry = self._recent.get(reference)
            if entry is None:
                return None
            content_hash, read_at, source = entry
            rgb = self._cache.get(content_hash)
            if rgb is None or time.monotonic() - read_at > self.url_ttl_s:
                del self._recent[reference]
                return None
            self._cache.move_to_end(content_hash)
            self._counts["loaded"] += 1
            self._counts["recent_hits"] += 1
        return LoadedImage(rgb=rgb, content_hash=content_hash, source=source)

    def stats(self) -> dict[str, int]:
        """Counters for /metrics: ``loaded``, ``cache_hits``, ``cached`` and ``refused_<kind>``."""
        with self._lock:
            return {**self._counts, "cached": len(self._cache)}

    def _read(self, reference: str) -> tuple[bytes, str]:
        if reference.startswith("data:"):
            return self._data_uri(reference), "data-uri"
        if reference.startswith(("upload/", "data/upload/")):  # older Label Studio stores these without "/"
            reference = "/" + reference if reference.startswith("data/") else "/data/" + reference
        parts = urlsplit(reference)
        scheme = parts.scheme.lower()
        if scheme in CLOUD_SCHEMES:
            raise self._refuse(
                f"{scheme}:// URIs must be resolved by Label Studio: enable 'Use pre-signed URLs' on the cloud "
                f"storage (or let Label Studio proxy it) so the task holds an http(s) URL",
                sanitize_url(reference),
            )
        if scheme not in ("", "http", "https") or (not scheme and not reference.startswith("/")):
            raise self._refuse(
                "unsupported image reference; expected /data/upload/..., http(s)://... or data:", ""
            )
        is_ls = not scheme or (self._ls_origin is not None and _origin(reference) == self._ls_origin)
        if is_ls and parts.path.rstrip("/") == "/data/local-files":
            relative = (parse_qs(parts.query).get("d") or [""])[0]
            if not relative:
                raise self._refuse("/data/local-files/ reference without ?d=<path>", "/data/local-files/")
            if self._local_root is not None:
                return self._read_local(relative), f"local-files:{relative}"
        if not scheme:
            if self._ls_url is None:
                raise self._refuse("the image is stored in Label Studio; set LABEL_STUDIO_URL", parts.path)
            reference = self._ls_url + reference
        return self._fetch(reference), sanitize_url(reference)

    def _refuse(self, message: str, source: str, kind: str = "refused") -> ImageLoadError:
        logger.warning("image refused (%s): %s: %s", kind, source or "-", message)
        with self._lock:
            self._counts[f"refused_{kind}"] += 1
        return ImageLoadError(f"{source}: {message}" if source else message, kind=kind)

    # --- sources ----------------------------------------------------------------------------------

    def _data_uri(self, reference: str) -> bytes:
        header, _, payload = reference.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise self._refuse("only base64 data:image/... URIs are supported", "data-uri")
        if len(payload) > self.max_bytes * 4 // 3 + 4:
            raise self._refuse(f"inline image is larger than {self.max_bytes} bytes", "data-uri", "too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise self._refuse("inline image is not valid base64", "data-uri", "bad_image") from None

    def _read_local(self, relative: str) -> bytes:
        source = f"local-files:{relative}"
        if "\x00" in relative or ".." in PurePosixPath(relative.replace("\\", "/")).parts:
            raise self._refuse("'..' is not allowed in local file paths", source)
        assert self._local_root is not None
        try:
            candidate = (self._local_root / relative.replace("\\", "/").lstrip("/")).resolve()
            if not candidate.is_relative_to(self._local_root):
                raise self._refuse("the path leaves LOCAL_FILES_DOCUMENT_ROOT (through a symlink?)", source)
            if not candidate.is_file():
                raise self._refuse("no such file under LOCAL_FILES_DOCUMENT_ROOT", source, "not_found")
            if candidate.stat().st_size > self.max_bytes:
                raise self._refuse(f"the file is larger than {self.max_bytes} bytes", source, "too_large")
            with candidate.open("rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except (OSError, RuntimeError) as error:  # permissions, symlink loops
            raise self._refuse(
                f"cannot read the file ({type(error).__name__})", source, "not_found"
            ) from None
        if len(data) > self.max_bytes:
            raise self._refuse(f"the file is larger than {self.max_bytes} bytes", source, "too_large")
        return data

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            # Label Studio's retry policy, within half the image's time; no .netrc credentials, proxy
            # settings or cookies leaking to image hosts
            session = label_studio_session(retry=retry_policy(window_s=self.timeout_s / 2))
            self._local.session = session
        return session

    def check_url(self, url: str) -> None:
        """Raise ImageLoadError (``refused`` or ``unreachable``) unless ``url`` may be fetched: Label
        Studio's origin, an exactly named host, or a wildcard-matched host whose every address is public
        (module docstring). Every hop of a fetch, redirects included, goes through this check."""
        source = sanitize_url(url)
        scheme, host, port = _origin(url)
        if scheme not in ("http", "https") or not host:
            raise self._refuse("only http(s) URLs can be fetched", source)
        if (scheme, host, port) == self._ls_origin:
            return
        trusted = any(h == host and (p is None or p == port) for h, p in self._allowed)
        if trusted:
            return
        matched = any(h == "*" or (h.startswith("*.") and host.endswith(h[1:])) for h, _ in self._allowed)
        if not matched:
            raise self._refuse(
                f"host {host}:{port} is neither LABEL_STUDIO_URL nor in OSPREY_ALLOWED_IMAGE_HOSTS", source
            )
        try:
            addresses = self._resolver(host, port)
        except (OSError, UnicodeError):
            raise self._refuse(f"cannot resolve host {host}", source, "unreachable") from None
        blocked = [_described(address) for address in addresses if not _public(address)]
        if blocked or not addresses:
            raise self._refuse(
                f"host {host} resolves to a non-public address ({', '.join(blocked) or 'none'}); name it "
                f"exactly in OSPREY_ALLOWED_IMAGE_HOSTS to trust it",
                source,
            )

    def _fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            self.check_url(url)
            response = self._get(url, deadline)
            if response.status_code in _REDIRECTS:
                location = response.headers.get("Location")
                response.close()
                if not location:
                    raise self._refuse("redirect without a Location header", sanitize_url(url), "upstream")
                url = urljoin(url, location)
                continue
            try:
                return self._body(response, url, deadline)
            finally:
                response.close()
        raise self._refuse(f"more than {MAX_REDIRECTS} redirects", sanitize_url(url), "upstream")

    def _get(self, url: str, deadline: float) -> requests.Response:
        to_ls = _origin(url) == self._ls_origin
        for attempt in range(2):
            # Label Studio 1.23 answers 406 to a bare "image/*" for its uploads: allow anything, decode decides
            headers = {
                "Accept": "image/*, */*;q=0.8",
                "Accept-Encoding": "identity",
                "User-Agent": "osprey-label",
            }
            if to_ls and self._token_provider is not None:
                try:
                    token = self._token_provider()
                except LabelStudioAuthError as error:
                    raise self._refuse(str(error), sanitize_url(url), "auth") from None
                if token:
                    headers["Authorization"] = token
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._refuse(f"no answer within {self.timeout_s:g} s", sanitize_url(url), "unreachable")
            try:
                response = self._session().get(
                    url, headers=headers, stream=True, allow_redirects=False, timeout=(remaining, remaining)
                )
            except requests.RequestException as error:
                raise self._refuse(
                    f"request failed ({type(error).__name__})", sanitize_url(url), "unreachable"
                ) from None
            if (
                response.status_code == 401
                and to_ls
                and attempt == 0
                and hasattr(self._token_provider, "invalidate")
            ):
                response.close()
                self._token_provider.invalidate()
                continue
            return response
        return response

    def _body(self, response: requests.Response, url: str, deadline: float) -> bytes:
        source = sanitize_url(url)
        status = response.status_code
        if status != 200:
            kind = {401: "auth", 403: "auth", 404: "not_found", 410: "not_found"}.get(status, "upstream")
            raise self._refuse(f"answered HTTP {status}", source, kind)
        encoding = response.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("", "identity"):
            raise self._refuse(
                f"compressed body (Content-Encoding {encoding}) is not accepted", source, "upstream"
            )
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise self._refuse(f"body of {declared} bytes exceeds {self.max_bytes}", source, "too_large")
        raw = response.raw
        read = getattr(raw, "read1", None) or raw.read
        chunks, total = [], 0
        while True:
            if time.monotonic() > deadline:
                raise self._refuse(f"download took longer than {self.timeout_s:g} s", source, "unreachable")
            try:
                chunk = read(_CHUNK)
            except Exception as error:  # urllib3 read errors and timeouts vary by version
                raise self._refuse(
                    f"download failed ({type(error).__name__})", source, "unreachable"
                ) from None
            if not chunk:
                break
            total += len(chunk)
            if total > self.max_bytes:
                raise self._refuse(f"body exceeds {self.max_bytes} bytes", source, "too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # --- decoding ---------------------------------------------------------------------------------

    def _decode(self, data: bytes, source: str) -> np.ndarray:
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > self.max_pixels:
                raise self._refuse(
                    f"image is {width}x{height} = {width * height} pixels, more than {self.max_pixels} "
                    f"(OSPREY_MAX_IMAGE_PIXELS)",
                    source,
                    "too_large",
                )
            image.load()
            image = ImageOps.exif_transpose(image) or image
            rgb = np.asarray(image.convert("RGB"))
        except ImageLoadError:
            raise
        except Image.DecompressionBombError as error:  # Pillow's own limit, checked inside Image.open
            claimed = re.search(r"\((\d+) pixels\)", str(error))
            size = f"{claimed.group(1)} pixels" if claimed else "too many pixels"
            raise self._refuse(
                f"image header claims {size}, more than Pillow's decompression-bomb limit "
                f"({2 * (Image.MAX_IMAGE_PIXELS or 0)}) and OSPREY_MAX_IMAGE_PIXELS ({self.max_pixels})",
                source,
                "too_large",
            ) from None
        except (OSError, SyntaxError, ValueError) as error:
            raise self._refuse(
                f"not a readable image ({type(error).__name__})", source, "bad_image"
            ) from None
        rgb = np.ascontiguousarray(rgb)
        rgb.setflags(write=False)
        return rgb
