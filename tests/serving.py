"""Starting and stopping real servers for the tests: ``osprey-label serve`` with the tiny models, and
any process that must not outlive its test run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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

    def wait_until_up(self, url: str, timeout_s: float, what: str) -> None:
        """Poll ``url`` until it answers 200; fail with the log's tail if the process dies or never does."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{what} exited early (code {self.popen.returncode}):\n{self.tail()}")
            try:
                if requests.get(url, timeout=2).status_code == 200:
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


def start_backend(env: dict, log: Path, timeout_s: float = 180) -> tuple[Process, str]:
    """``osprey-label serve`` on a free loopback port; returns the process and its URL once up."""
    port = free_port()
    argv = [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = Process(argv, env, log, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_until_up(f"{url}/health", timeout_s, "osprey-label serve")
    except Exception:
        process.stop()
        raise
    return process, url
