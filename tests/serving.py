"""Starting and stopping real servers for the tests: ``osprey-label serve`` with the tiny models, and
any process that must not outlive its test run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A server started in its own session, stopped with its whole process group."""

    def __init__(self, argv: list[str], env: dict, log: Path, cwd: Path | None = None) -> None:
        self.log = log
        with open(log, "w") as out:
            self.popen = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
            )

    def wait_until_up(self, url: str, timeout_s: float, what: str, auth=None) -> None:
        """Poll ``url`` (with ``requests``' ``auth``) until it answers 200; fail with the log's tail if
        the process dies or never does."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{what} exited early (code {self.popen.returncode}):\n{self.tail()}")
            try:
                if requests.get(url, timeout=2, auth=auth).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text()[-chars:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def tiny_backend_env(model_dir: Path, **settings: str) -> dict:
    """Environment for ``osprey-label serve`` on the tiny random-weight models, with segment-everything
    settings that always yield regions and short generations (seconds per task on a CPU)."""
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OSPREY_MODEL="tiny",
        SAM_MODEL="tiny",
        OSPREY_DEVICE="cpu",
        OSPREY_POINTS_PER_SIDE="4",
        OSPREY_MAX_MASKS="2",
        OSPREY_PRED_IOU_THRESH="0",
        OSPREY_STABILITY_SCORE_THRESH="0",
        OSPREY_MIN_MASK_AREA="0",
        MODEL_DIR=str(model_dir),
        THREADS="4",
        **settings,
    )


def start_backend(env: dict, log: Path, timeout_s: float = 180, auth=None) -> tuple[Process, str]:
    """``osprey-label serve`` on a free loopback port; returns the process and its URL once ``/health``
    answers (sent with ``auth`` when basic auth is on)."""
    port = free_port()
    argv = [sys.executable, "-m", "backend.service", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = Process(argv, env, log, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_until_up(f"{url}/health", timeout_s, "osprey-label serve", auth=auth)
    except Exception:
        process.stop()
        raise
    return process, url


class SlowClients:
    """``n`` raw connections to ``url``'s host that each send one byte every ``interval_s`` seconds and
    never finish: the even ones trickle the headers of a ``GET /health``, the odd ones send the whole
    headers of a ``POST /webhook`` and trickle its body. Use as a context manager; the sockets close at
    the end. ``open_count()`` says how many the server has not closed."""

    def __init__(self, url: str, n: int, *, interval_s: float = 1.0) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.n = n
        self.interval_s = interval_s
        self.sockets: list[socket.socket] = []
        self.sent = [0] * n
        self.closed_by_server = [False] * n
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, name="slow-clients", daemon=True)

    def _first_bytes(self, i: int) -> bytes:
        host = f"{self.address[0]}:{self.address[1]}"
        if i % 2 == 0:
            return f"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode()
        return (
            f"POST /webhook HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 1000000\r\n\r\n"
        ).encode()

    def __enter__(self) -> SlowClients:
        for i in range(self.n):
            sock = socket.create_connection(self.address, timeout=10)
            sock.settimeout(None)  # blocking: MSG_DONTWAIT peeks in open_count() return at once
            if i % 2 == 1:
                sock.sendall(self._first_bytes(i))  # headers at once, then the body byte by byte
            self.sockets.append(sock)
        self._thread.start()
        return self

    def _next_byte(self, i: int) -> bytes:
        if i % 2 == 0:  # the request line and headers, then a header value that never ends
            return self._first_bytes(i)[self.sent[i] : self.sent[i] + 1] or b"a"
        return b" " if self.sent[i] else b"{"  # a JSON body that never ends

    def _trickle(self) -> None:
        while not self._stop.is_set():
            for i, sock in enumerate(self.sockets):
                if self.closed_by_server[i]:
                    continue
                byte = self._next_byte(i)
                try:
                    sock.sendall(byte)
                    self.sent[i] += 1
                except OSError:
                    self.closed_by_server[i] = True
            self._stop.wait(self.interval_s)

    def open_count(self) -> int:
        """Connections the server still holds open (no EOF or reset seen on them)."""
        count = 0
        for i, sock in enumerate(self.sockets):
            if self.closed_by_server[i]:
                continue
            try:
                data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                count += 1  # nothing to read: open and waiting, as expected
                continue
            except OSError:
                data = b""
            if data == b"":
                self.closed_by_server[i] = True
            else:
                count += 1  # the server answered something (it should not have) but kept the socket
        return count

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for sock in self.sockets:
            sock.close()
