"""Fixtures for the job queue tests: both back ends behind one parametrised ``make``, and real Redis.

The Redis fixtures start a real ``redis-server`` on 127.0.0.1 (a free port, a temporary directory, AOF
on so that jobs survive a restart) and stop it afterwards; the Redis cases are skipped only where
redis-server is not installed (CI installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid

import pytest

from backend.jobs import RedisJobQueue, SqliteJobQueue

NO_REDIS = "redis-server is not installed (CI installs it with apt-get install -y redis-server)"
requires_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason=NO_REDIS)


class RedisServer:
    """A throw-away redis-server with append-only persistence in ``folder``."""

    def __init__(self, folder) -> None:
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def client(self):
        import redis

        return redis.Redis(port=self.port)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session; each queue on it gets its own key prefix."""
    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def restartable_redis(tmp_path):
    """A redis-server of this test alone, which the test may stop and start again."""
    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=requires_redis)])
def make(request, tmp_path):
    """Builds a queue of the parametrised back end: ``make(max_attempts=3)``."""
    made = []

    def build(max_attempts: int = 3):
        if request.param == "sqlite":
            queue = SqliteJobQueue(tmp_path / f"q{len(made)}.db", max_attempts=max_attempts)
        else:
            server = request.getfixturevalue("redis_server")
            queue = RedisJobQueue(
                connection=server.client(), prefix=f"t-{uuid.uuid4().hex[:8]}", max_attempts=max_attempts
            )
        made.append(queue)
        return queue

    yield build
    for queue in made:
        if isinstance(queue, SqliteJobQueue):
            queue.close()


@pytest.fixture
def queue(make):
    """A queue of the parametrised back end with the default settings."""
    return make()


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def wait_for():
    """``wait_for(condition, timeout=10.0)``: poll until ``condition()`` is true, else AssertionError."""
    return _wait_for
