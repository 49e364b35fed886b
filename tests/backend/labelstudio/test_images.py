"""Image loading over real HTTP from local servers, local files, and Label Studio token handling."""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from backend.labelstudio.auth import LabelStudioAuth, LabelStudioAuthError, jwt_claims, token_kind
from backend.labelstudio.images import ImageLoader, ImageLoadError, sanitize_url

# --- fixtures: image files and HTTP servers ----------------------------------------------------------


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def picture(width=40, height=30) -> np.ndarray:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2] = (220, 30, 30)
    rgb[:, width // 2 :] = (30, 30, 220)
    rgb[0, 0] = (0, 255, 0)  # a marker in the top-left corner
    return rgb


def jpeg_rotated_by_exif() -> bytes:
    """A 40x20 JPEG whose EXIF orientation 6 says: rotate 90 degrees clockwise to display (20x40)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(picture(40, 20)).save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def png_bomb_header(width=60_000, height=60_000) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def make_jwt(claims: dict) -> str:
    def encode(part: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()

    return f"{encode({'alg': 'HS256', 'typ': 'JWT'})}.{encode(claims)}.c2lnbmF0dXJl"


class Server:
    """A real HTTP server on 127.0.0.1 that serves ``routes`` and records each request's headers."""

    def __init__(self) -> None:
        self.routes: dict[str, object] = {}
        self.requests: list[tuple[str, str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((method, self.path, dict(self.headers), body))
                route = outer.routes.get(f"{method} {self.path}", outer.routes.get(self.path))
                if callable(route):
                    route = route(self, body)
                status, headers, payload = route if route else (404, {}, b"not here")
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    if "Content-Length" not in headers and not isinstance(payload, list):
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    for part in payload if isinstance(payload, list) else [payload]:
                        self.wfile.write(part)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def headers_for(self, path: str) -> list[dict]:
        return [headers for method, p, headers, _ in self.requests if p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def ls():
    """A fake Label Studio: serves uploads and exchanges refresh tokens for access tokens."""
    server = Server()
    yield server
    server.close()


@pytest.fixture
def other():
    """Another host (a different port on 127.0.0.1): not Label Studio."""
    server = Server()
    yield server
    server.close()


def serve_png(server: Server, path: str, rgb: np.ndarray | None = None) -> np.ndarray:
    rgb = picture() if rgb is None else rgb
    server.routes[path] = (200, {"Content-Type": "image/png"}, png_bytes(rgb))
    return rgb


def refresh_route(access_tokens: list[str]):
    def answer(handler, body):
        if json.loads(body) != {"refresh": REFRESH}:
            return 401, {}, b'{"detail": "bad"}'
        access_tokens.append(
            make_jwt({"token_type": "access", "exp": time.time() + 300, "n": len(access_tokens)})
        )
        return 200, {"Content-Type": "application/json"}, json.dumps({"access": access_tokens[-1]}).encode()

    return answer


REFRESH = make_jwt({"token_type": "refresh", "exp": time.time() + 86_400, "user_id": 1})


# --- Label Studio uploads, tokens and origins -----------------------------------------------------


def test_upload_is_fetched_with_a_bearer_token_that_other_hosts_never_see(ls, other):
    access: list[str] = []
    ls.routes["POST /api/token/refresh/"] = refresh_route(access)
    rgb = serve_png(ls, "/data/upload/3/scene.png")
    serve_png(other, "/presigned/scene.png?X-Amz-Signature=s3cr3t&X-Amz-Expires=60")
    loader = ImageLoader(
        label_studio_url=ls.url + "/",
        api_key=REFRESH,
        allowed_hosts=[f"127.0.0.1:{other.url.rsplit(':', 1)[1]}"],
    )

    loaded = loader.load("/data/upload/3/scene.png")
    np.testing.assert_array_equal(loaded.rgb, rgb)
    assert loaded.size == (40, 30) and loaded.source == f"{ls.url}/data/upload/3/scene.png"
    assert ls.headers_for("/data/upload/3/scene.png")[0]["Authorization"] == f"Bearer {access[0]}"

    loader.load(f"{other.url}/presigned/scene.png?X-Amz-Signature=s3cr3t&X-Amz-Expires=60")
    (seen,) = other.headers_for("/presigned/scene.png?X-Amz-Signature=s3cr3t&X-Amz-Expires=60")
    assert "Authorization" not in seen and "Cookie" not in seen

    loader.load(f"{ls.url}/data/upload/3/scene.png")  # absolute URL on the LS origin: token again
    assert len(access) == 1  # the access token is cached
    assert ls.headers_for("/data/upload/3/scene.png")[1]["Authorization"] == f"Bearer {access[0]}"


def test_legacy_key_is_sent_as_token(ls):
    serve_png(ls, "/data/upload/1/a.png")
    ImageLoader(label_studio_url=ls.url, api_key="0123456789abcdef").load("/data/upload/1/a.png")
    assert ls.headers_for("/data/upload/1/a.png")[0]["Authorization"] == "Token 0123456789abcdef"


def test_401_refreshes_the_access_token_once(ls):
    access: list[str] = []
    ls.routes["POST /api/token/refresh/"] = refresh_route(access)
    calls = []

    def upload(handler, body):
        calls.append(handler.headers["Authorization"])
        if len(calls) == 1:
            return 401, {}, b"expired"
        return 200, {"Content-Type": "image/png"}, png_bytes(picture())

    ls.routes["/data/upload/1/a.png"] = upload
    ImageLoader(label_studio_url=ls.url, api_key=REFRESH).load("/data/upload/1/a.png")
    assert calls == [f"Bearer {access[0]}", f"Bearer {access[1]}"]


def test_refused_token_is_an_auth_error_without_the_token(ls, caplog):
    ls.routes["POST /api/token/refresh/"] = (401, {}, b'{"detail": "Token is invalid"}')
    serve_png(ls, "/data/upload/1/a.png")
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(ImageLoadError, match="refused LABEL_STUDIO_API_KEY") as info,
    ):
        ImageLoader(label_studio_url=ls.url, api_key=REFRESH).load("/data/upload/1/a.png")
    assert info.value.kind == "auth"
    assert REFRESH not in str(info.value) and REFRESH not in caplog.text
    assert ls.headers_for("/data/upload/1/a.png") == []


def test_another_port_on_the_same_host_is_not_label_studio(ls, other):
    serve_png(other, "/a.png")
    loader = ImageLoader(label_studio_url=ls.url, api_key="legacy-key")
    with pytest.raises(ImageLoadError, match="neither LABEL_STUDIO_URL nor in OSPREY_ALLOWED_IMAGE_HOSTS"):
        loader.load(f"{other.url}/a.png")
    wildcard = ImageLoader(label_studio_url=ls.url, api_key="legacy-key", allowed_hosts=["*"])
    with pytest.raises(ImageLoadError, match=r"non-public address \(127.0.0.1\)"):
        wildcard.load(f"{other.url}/a.png")
    assert other.requests == []


def test_redirects_are_checked_at_every_hop(ls, other):
    port = other.url.rsplit(":", 1)[1]
    serve_png(other, "/b.png")
    ls.routes["/data/upload/1/meta.png"] = (
        302,
        {"Location": "http://169.254.169.254/latest/meta-data/"},
        b"",
    )
    ls.routes["/data/upload/1/other.png"] = (303, {"Location": f"{other.url}/b.png"}, b"")
    ls.routes["/data/upload/1/loop.png"] = (302, {"Location": "/data/upload/1/loop.png"}, b"")
    loader = ImageLoader(label_studio_url=ls.url, api_key="legacy-key", allowed_hosts=["*"])
    with pytest.raises(ImageLoadError, match=r"169.254.169.254"):
        loader.load("/data/upload/1/meta.png")
    with pytest.raises(ImageLoadError, match="non-public address"):
        loader.load("/data/upload/1/other.png")
    with pytest.raises(ImageLoadError, match="more than 5 redirects") as info:
        loader.load("/data/upload/1/loop.png")
    assert info.value.kind == "upstream" and len(ls.headers_for("/data/upload/1/loop.png")) == 6
    assert other.requests == []

    trusting = ImageLoader(label_studio_url=ls.url, api_key="legacy-key", allowed_hosts=[f"127.0.0.1:{port}"])
    assert trusting.load("/data/upload/1/other.png").size == (40, 30)
    assert "Authorization" not in other.headers_for("/b.png")[0]  # the token stays at the LS origin


def test_resolved_addresses_are_checked_for_wildcard_hosts():
    addresses = {
        "cdn.example.test": ["93.184.216.34", "10.1.2.3"],
        "meta.example.test": ["::ffff:169.254.169.254"],
    }
    loader = ImageLoader(
        label_studio_url=None,
        api_key=None,
        allowed_hosts=["*.example.test"],
        resolver=lambda h, p: addresses[h],
    )
    for host, blocked in [("cdn.example.test", "10.1.2.3"), ("meta.example.test", "169.254.169.254")]:
        with pytest.raises(ImageLoadError, match=f"non-public address .*{blocked}"):
            loader.load(f"https://{host}/a.png")
    with pytest.raises(ImageLoadError, match="neither LABEL_STUDIO_URL"):
        loader.load("https://example.org/a.png")


# --- limits and decoding -----------------------------------------------------------------------------


def test_oversized_bodies_are_cut(ls):
    ls.routes["/data/upload/1/declared.png"] = (200, {"Content-Type": "image/png"}, b"x" * 5000)
    ls.routes["/data/upload/1/streamed.png"] = (200, {"Connection": "close"}, [b"x" * 1000] * 50)
    loader = ImageLoader(label_studio_url=ls.url, api_key=None, max_bytes=4096)
    for path, message in [
        ("declared", "body of 5000 bytes exceeds 4096"),
        ("streamed", "body exceeds 4096 bytes"),
    ]:
        with pytest.raises(ImageLoadError, match=message) as info:
            loader.load(f"/data/upload/1/{path}.png")
        assert info.value.kind == "too_large"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_before_decoding(ls, monkeypatch):
    ls.routes["/data/upload/1/bomb.png"] = (
        200,
        {"Content-Type": "image/png"},
        png_bomb_header(12_000, 10_000),
    )
    ls.routes["/data/upload/1/huge.png"] = (
        200,
        {"Content-Type": "image/png"},
        png_bomb_header(60_000, 60_000),
    )

    def must_not_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", must_not_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", must_not_decode)
    loader = ImageLoader(label_studio_url=ls.url, api_key=None, max_pixels=10_000_000)
    with pytest.raises(ImageLoadError, match="12000x10000 = 120000000 pixels, more than 10000000") as info:
        loader.load("/data/upload/1/bomb.png")
    assert info.value.kind == "too_large"
    with pytest.raises(ImageLoadError, match="claims 3600000000 pixels, more than Pillow's") as info:
        loader.load("/data/upload/1/huge.png")
    assert info.value.kind == "too_large"


def test_exif_orientation_is_applied(ls):
    ls.routes["/data/upload/1/photo.jpg"] = (200, {"Content-Type": "image/jpeg"}, jpeg_rotated_by_exif())
    loaded = ImageLoader(label_studio_url=ls.url, api_key=None).load("/data/upload/1/photo.jpg")
    assert loaded.rgb.shape == (40, 20, 3) and loaded.size == (20, 40)
    # rotated clockwise: the left (red) half of the stored picture is now the top half
    assert loaded.rgb[5, 10, 0] > 150 and loaded.rgb[35, 10, 2] > 150


def test_not_an_image_and_http_errors(ls):
    ls.routes["/data/upload/1/notes.png"] = (200, {}, b"just text, not a picture")
    loader = ImageLoader(label_studio_url=ls.url, api_key=None)
    with pytest.raises(ImageLoadError, match="not a readable image") as info:
        loader.load("/data/upload/1/notes.png")
    assert info.value.kind == "bad_image"
    with pytest.raises(ImageLoadError, match="answered HTTP 404") as info:
        loader.load("/data/upload/1/missing.png")
    assert info.value.kind == "not_found"


def test_decoded_images_are_cached_by_content_and_read_only(ls):
    serve_png(ls, "/data/upload/1/a.png")
    serve_png(ls, "/data/upload/2/copy-of-a.png")
    loader = ImageLoader(label_studio_url=ls.url, api_key=None, cache_size=2)
    first, second = loader.load("/data/upload/1/a.png"), loader.load("/data/upload/2/copy-of-a.png")
    assert first.content_hash == second.content_hash and first.rgb is second.rgb
    assert not first.rgb.flags.writeable and first.rgb.dtype == np.uint8
    with pytest.raises(ImageLoadError):
        loader.load("/data/upload/1/missing.png")
    assert loader.stats() == {"loaded": 2, "cache_hits": 1, "cached": 1, "refused_not_found": 1}


def test_clicks_on_one_image_within_the_ttl_do_not_fetch_it_again(ls):
    serve_png(ls, "/data/upload/1/a.png")
    loader = ImageLoader(label_studio_url=ls.url, api_key=None, url_ttl_s=3600)
    first = loader.load("/data/upload/1/a.png")
    again = loader.load("/data/upload/1/a.png")
    fetched = [r for r in ls.requests if r[1] == "/data/upload/1/a.png"]
    assert len(fetched) == 1 and again.rgb is first.rgb and again.content_hash == first.content_hash
    assert loader.stats()["recent_hits"] == 1
    always = ImageLoader(label_studio_url=ls.url, api_key=None, url_ttl_s=0)  # 0: every load fetches
    always.load("/data/upload/1/a.png")
    always.load("/data/upload/1/a.png")
    assert len([r for r in ls.requests if r[1] == "/data/upload/1/a.png"]) == 3
    expired = ImageLoader(label_studio_url=ls.url, api_key=None, url_ttl_s=1e-9)  # past its TTL: fetched
    expired.load("/data/upload/1/a.png")
    expired.load("/data/upload/1/a.png")
    assert len([r for r in ls.requests if r[1] == "/data/upload/1/a.png"]) == 5


def test_data_uri_and_refused_references(ls):
    rgb = picture(8, 6)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode()
    loader = ImageLoader(label_studio_url=None, api_key=None)
    np.testing.assert_array_equal(loader.load(uri).rgb, rgb)
    for reference, message in [
        ("s3://bucket/images/a.jpg", "Use pre-signed URLs"),
        ("gs://bucket/a.jpg", "Use pre-signed URLs"),
        ("/data/upload/1/a.png", "set LABEL_STUDIO_URL"),
        ("file:///etc/passwd", "unsupported image reference"),
        ("ftp://example.org/a.png", "unsupported image reference"),
        ("images/a.png", "unsupported image reference"),
        ("", "non-empty string"),
        ("data:text/html;base64,PGI+", "only base64 data:image"),
    ]:
        with pytest.raises(ImageLoadError, match=message):
            loader.load(reference)


def test_refusals_are_logged_without_query_strings_or_tokens(ls, caplog):
    loader = ImageLoader(label_studio_url=ls.url, api_key="legacy-key")
    with (
        caplog.at_level(logging.WARNING, logger="backend.labelstudio.images"),
        pytest.raises(ImageLoadError) as info,
    ):
        loader.load("https://user:pw@bucket.s3.amazonaws.com/a.jpg?X-Amz-Signature=s3cr3t")
    assert "s3cr3t" not in str(info.value) and "pw" not in str(info.value)
    assert "https://bucket.s3.amazonaws.com/a.jpg" in caplog.text and "s3cr3t" not in caplog.text
    assert sanitize_url("http://h:81/p?q=1#f") == "http://h:81/p" and sanitize_url("/x?d=1") == "/x"


# --- local files ---------------------------------------------------------------------------------------


@pytest.fixture
def local_root(tmp_path):
    root = tmp_path / "files"
    (root / "dataset").mkdir(parents=True)
    Image.fromarray(picture()).save(root / "dataset" / "a b.png")
    secret = tmp_path / "secret.png"
    Image.fromarray(picture(4, 4)).save(secret)
    (root / "dataset" / "link.png").symlink_to(secret)
    (root / "escape").symlink_to(tmp_path)
    return root


def test_local_files_are_read_from_disk_without_label_studio(local_root):
    loader = ImageLoader(label_studio_url="http://127.0.0.1:9", api_key="k", local_files_root=str(local_root))
    loaded = loader.load("/data/local-files/?d=dataset/a%20b.png")
    np.testing.assert_array_equal(loaded.rgb, picture())
    assert loaded.source == "local-files:dataset/a b.png"
    assert loader.load("http://127.0.0.1:9/data/local-files/?d=dataset/a%20b.png").size == (40, 30)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../secret.png", "'..' is not allowed"),
        ("dataset/../../secret.png", "'..' is not allowed"),
        ("dataset/link.png", "leaves LOCAL_FILES_DOCUMENT_ROOT"),
        ("escape/secret.png", "leaves LOCAL_FILES_DOCUMENT_ROOT"),
        ("dataset/missing.png", "no such file"),
        ("", "without \\?d="),
    ],
)
def test_local_files_escapes_are_refused(local_root, path, message):
    loader = ImageLoader(label_studio_url=None, api_key=None, local_files_root=str(local_root))
    with pytest.raises(ImageLoadError, match=message):
        loader.load(f"/data/local-files/?d={path}")


def test_local_files_without_a_root_come_from_label_studio(ls):
    serve_png(ls, "/data/local-files/?d=dataset/a.png")
    loaded = ImageLoader(label_studio_url=ls.url, api_key="legacy-key").load(
        "/data/local-files/?d=dataset/a.png"
    )
    assert loaded.size == (40, 30) and loaded.source == f"{ls.url}/data/local-files/"
    assert ls.headers_for("/data/local-files/?d=dataset/a.png")[0]["Authorization"] == "Token legacy-key"


# --- LabelStudioAuth ---------------------------------------------------------------------------------


def test_token_kinds_and_claims():
    assert token_kind(REFRESH) == "refresh" and jwt_claims(REFRESH)["user_id"] == 1
    assert token_kind(make_jwt({"token_type": "access", "exp": 1})) == "access"
    assert token_kind("4f1b2c3d4e5f") == "legacy" and jwt_claims("a.b.c") is None


def test_access_token_is_refreshed_before_it_expires(ls):
    access: list[str] = []
    ls.routes["POST /api/token/refresh/"] = refresh_route(access)
    now = [time.time()]
    auth = LabelStudioAuth(base_url=ls.url, api_key=REFRESH, clock=lambda: now[0])
    assert auth() == f"Bearer {access[0]}" and auth() == f"Bearer {access[0]}"
    now[0] += 280  # within the 30 s margin of the 300 s lifetime
    assert auth() == f"Bearer {access[1]}"
    auth.invalidate()
    assert auth() == f"Bearer {access[2]}" and len(access) == 3
    assert REFRESH not in repr(auth)


def test_expired_keys_are_refused_without_a_request(ls):
    expired = make_jwt({"token_type": "refresh", "exp": time.time() - 3600})  # by any plausible clock
    with pytest.raises(LabelStudioAuthError, match="expired on"):
        LabelStudioAuth(base_url=ls.url, api_key=expired)()
    with pytest.raises(LabelStudioAuthError, match="empty"):
        LabelStudioAuth(base_url=ls.url, api_key="  ")
    assert ls.requests == []
