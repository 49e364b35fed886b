"""``osprey-label serve`` (waitress) against hostile and unlucky clients, over real sockets: slow and
stalled senders, oversized headers and bodies, UTF-8 basic auth, the webhook secret, and
credentials kept out of a DEBUG log. One served process (tiny models) for the module."""

from __future__ import annotations

import base64
import re
import socket
import threading
from pathlib import Path

import pytest
import requests
from lsfakes import ImageHost, scene_png
from serving import SlowClients, start_backend, tiny_backend_env

from backend.service.admission import WEBHOOK_SECRET_HEADER, webhook_secret

ROOT = Path(__file__).resolve().parents[3]
USER = "annotator-ü"
PASSWORD = "pässwörd-秘密-🔑"  # not even Latin-1: only UTF-8 carries it
AUTH = (USER.encode("utf-8"), PASSWORD.encode("utf-8"))  # bytes: requests sends them as they are
SIGNATURE = "f00dfeedc0ffee0123456789abcdef"


@pytest.fixture(scope="module")
def images():
    """A plain image host (a presigned-URL bucket): any path answers the PNG; paths are recorded."""
    host = ImageHost(scene_png(seed=3))
    yield f"127.0.0.1:{host.port}", host.seen
    host.close()


@pytest.fixture(scope="module")
def served(images, tmp_path_factory):
    host, _ = images
    env = tiny_backend_env(
        tmp_path_factory.mktemp("models"),
        BASIC_AUTH_USER=USER,
        BASIC_AUTH_PASS=PASSWORD,
        LOG_LEVEL="DEBUG",
        OSPREY_ALLOWED_IMAGE_HOSTS=host,
        OSPREY_CLIENT_TIMEOUT_S="5",
        OSPREY_MAX_REQUEST_BYTES=str(2**20),
        OSPREY_MAX_HEADER_BYTES=str(16 * 2**10),
    )
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    try:
        process, url = start_backend(env, log, timeout_s=120, auth=AUTH)
    except RuntimeError as error:
        pytest.fail(str(error))
    try:
        yield url, log
    finally:
        process.stop()


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` on a fresh socket and read the answer: its headers and the body they announce
    (or until the server closes, or 64 KiB arrived)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while len(answer) < 65536:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
            head, sep, body = answer.partition(b"\r\n\r\n")
            if sep:
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if length is None or len(body) >= int(length.group(1)):
                    break
        return answer


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (``HTTP/1.x NNN ...``)."""
    return int(answer.split(b"\r\n", 1)[0].split()[1])


def test_health_answers_while_50_slow_clients_are_connected(served):
    url, log = served
    with SlowClients(url, 50, interval_s=1.0) as clients:
        threading.Event().wait(
            3
        )  # every client has sent bytes: a threaded server would have given each a thread
        answered = [requests.get(f"{url}/health", auth=AUTH, timeout=10).status_code for _ in range(10)]
        assert answered == [200] * 10
        assert clients.open_count() == 50  # still connected and trickling, holding no thread
    assert "Traceback" not in log.read_text()


def test_a_stalled_client_is_disconnected_after_the_client_timeout(served):
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b'POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"action": ')
        assert sock.recv(1024) == b""  # closed by the server (OSPREY_CLIENT_TIMEOUT_S=5), not left open
    assert requests.get(f"{url}/health", auth=AUTH, timeout=10).status_code == 200


def test_oversized_headers_and_bodies_are_refused_with_4xx(served):
    url, _ = served
    big_header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (32 * 2**10) + b"\r\n\r\n"
    answer = raw_exchange(url, big_header)
    assert status_of(answer) == 431 and b"exceeds max_header of 16384" in answer
    # the declared length alone is refused: the body is never read, and no thread is given
    big_body = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n"
    answer = raw_exchange(url, big_body)
    assert status_of(answer) == 413, answer[:200]


def test_utf8_basic_auth_credentials_are_accepted_and_others_refused(served):
    url, log = served
    assert requests.get(f"{url}/health", auth=AUTH, timeout=10).status_code == 200
    refused = {
        "none": requests.get(f"{url}/health", timeout=10),
        "wrong password": requests.get(f"{url}/health", auth=(AUTH[0], b"p\xc3\xa4sswort"), timeout=10),
        "latin-1 user": requests.get(f"{url}/health", auth=(USER.encode("latin-1"), AUTH[1]), timeout=10),
        "not base64": requests.get(f"{url}/health", headers={"Authorization": "Basic ***"}, timeout=10),
        "no colon": requests.get(
            f"{url}/health",
            headers={"Authorization": "Basic " + base64.b64encode(AUTH[0]).decode()},
            timeout=10,
        ),
        "bearer": requests.get(f"{url}/health", headers={"Authorization": "Bearer x"}, timeout=10),
    }
    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 401)
    assert 'charset="UTF-8"' in refused["none"].headers["WWW-Authenticate"]
    assert PASSWORD not in log.read_text() and "Traceback" not in log.read_text()


def test_the_webhook_secret_admits_webhooks_and_nothing_else(served):
    url, log = served
    secret = webhook_secret(configured=None, basic_auth_pass=PASSWORD)
    event = {"action": "PROJECT_UPDATED", "project": {"id": 5}}
    accepted = requests.post(
        f"{url}/webhook", json=event, headers={WEBHOOK_SECRET_HEADER: secret}, timeout=10
    )
    assert accepted.status_code == 200 and accepted.json()["status"] == "Unknown event"
    wrong = requests.post(
        f"{url}/webhook", json=event, headers={WEBHOOK_SECRET_HEADER: secret[:-1]}, timeout=10
    )
    assert wrong.status_code == 401
    not_for_health = requests.get(f"{url}/health", headers={WEBHOOK_SECRET_HEADER: secret}, timeout=10)
    assert not_for_health.status_code == 401
    assert WEBHOOK_SECRET_HEADER in log.read_text()  # the refusal says what Label Studio's webhook lacks
    assert secret not in log.read_text()


def test_a_presigned_image_url_leaves_no_signature_in_the_debug_log(served, images):
    url, log = served
    host, seen = images
    image = (
        f"http://{host}/bucket/scene.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE"
        f"&X-Amz-Signature={SIGNATURE}"
    )
    xml = (ROOT / "label_configs" / "brush_full.xml").read_text()
    body = {"tasks": [{"id": 1, "data": {"image": image}}], "project": "3.1700000000", "label_config": xml}
    response = requests.post(f"{url}/predict", json=body, auth=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    assert any(SIGNATURE in path for path in seen)  # the loader really fetched the signed URL
    logged = log.read_text()
    assert "DEBUG urllib3" in logged and "/bucket/scene.png?[redacted]" in logged  # DEBUG on, and cleaned
    assert SIGNATURE not in logged and "AKIDEXAMPLE" not in logged
