"""A Label Studio API on 127.0.0.1 that fails on purpose: the endpoints the backend calls, with tokens
that expire by their own clock, and faults (connection resets, 5xx, stalls, writes whose answer is lost)
injected per call. The real Label Studio is driven by tests/e2e; this one shows what happens when it
misbehaves."""

from __future__ import annotations

import base64
import copy
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"


def jwt(claims: dict) -> str:
    """A JWT-shaped token (unsigned: the backend never verifies, Label Studio does)."""

    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@dataclass
class Fault:
    """What the next ``times`` calls matching ``method`` and ``path`` (a regex) get: ``action`` is
    ``reset`` (the connection is cut before any answer), ``status`` (answered ``status``), ``stall``
    (``seconds`` of silence, then the real answer), ``commit_then_reset`` / ``commit_then_status`` (the
    call takes effect, then its answer is lost / replaced by ``status``)."""

    method: str
    path: str
    action: str
    times: int = 1
    status: int = 503
    seconds: float = 0.0
    hits: int = 0


@dataclass
class State:
    projects: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    webhooks: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)  # id -> (keep(task) -> bool, order key of a task)
    next_id: int = 1000


class FaultyLabelStudio:
    """The fake (see the module docstring). ``url``, ``close()``; ``add_project``, ``add_task``,
    ``add_file``; faults with ``fail``, ``fail_everything_for``; tokens: ``personal_access_token()``
    (a refresh JWT exchanged at ``/api/token/refresh/``), ``access_lifetime_s``, ``clock_offset_s``
    (this server's clock minus the real one), ``revoked``; ``calls`` lists ``(method, path)``."""

    def __init__(self) -> None:
        self.state = State()
        self.faults: list[Fault] = []
        self.failing_until = 0.0
        self.failing_status = 503
        self.access_lifetime_s = 300.0
        self.clock_offset_s = 0.0
        self.revoked = False
        self.calls: list[tuple[str, str]] = []
        self.refreshes = 0
        self.max_body_bytes: int | None = None  # prediction imports larger than this get 413
        self.rejected_tokens = 0
        self._lock = threading.RLock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                fake._handle(self, "GET")

            def do_POST(self):  # noqa: N802
                fake._handle(self, "POST")

            def do_PATCH(self):  # noqa: N802
                fake._handle(self, "PATCH")

            def do_DELETE(self):  # noqa: N802
                fake._handle(self, "DELETE")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- content ----
    def now(self) -> float:
        return time.time() + self.clock_offset_s

    def add_project(self, project: int, label_config: str) -> None:
        with self._lock:
            self.state.projects[project] = {"id": project, "label_config": label_config}

    def add_view(self, view: int, keep, order=lambda task: task["id"], project: int = 7) -> None:
        """A Data Manager view of ``project``: the tasks ``keep`` accepts when it is read, sorted by
        ``order``."""
        with self._lock:
            self.state.views[view] = (keep, order, project)

    def add_file(self, path: str, body: bytes) -> str:
        with self._lock:
            self.state.files[path] = body
        return path

    def add_task(self, project: int, task_id: int, data: dict, *, annotations: list | None = None) -> dict:
        task = {"id": task_id, "project": project, "data": data, "annotations": annotations or [],
                "predictions": [], "meta": {}, "updated_at": "2026-12-06T00:00:00Z"}  # fmt: skip
        with self._lock:
            self.state.tasks[task_id] = task
        return task

    def predictions_of(self, task_id: int, model_version: str | None = None) -> list[dict]:
        with self._lock:
            found = self.state.tasks[task_id]["predictions"]
            return [
                copy.deepcopy(p)
                for p in found
                if model_version is None or p["model_version"] == model_version
            ]

    def personal_access_token(self) -> str:
        return jwt(
            {"token_type": "refresh", "exp": int(self.now()) + 86400, "iat": int(self.now()), "jti": "pat"}
        )

    # ---- faults ----
    def fail(
        self, method: str, path: str, action: str, *, times: int = 1, status: int = 503, seconds: float = 0.0
    ) -> Fault:
        fault = Fault(method, path, action, times=times, status=status, seconds=seconds)
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail_everything_for(self, seconds: float, status: int = 503) -> None:
        with self._lock:
            self.failing_until, self.failing_status = time.monotonic() + seconds, status

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.hits < fault.times and fault.method == method and re.search(fault.path, path):
                    fault.hits += 1
                    return fault
        return None

    # ---- HTTP ----
    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        path, query = parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        with self._lock:
            self.calls.append((method, path))
        if time.monotonic() < self.failing_until:
            return _answer(handler, self.failing_status, {"detail": "unavailable"})
        fault = self._fault_for(method, path)
        if fault is not None and fault.action == "reset":
            return _reset(handler)
        if fault is not None and fault.action == "status":
            return _answer(handler, fault.status, {"detail": "injected"})
        if fault is not None and fault.action == "stall":
            time.sleep(fault.seconds)
        if path == "/api/token/refresh/" and method == "POST":
            return self._refresh(handler, raw)
        if not self._authorised(handler.headers.get("Authorization")):
            with self._lock:
                self.rejected_tokens += 1
            return _answer(handler, 401, {"detail": "Given token not valid for any token type"})
        status, body = self._route(method, path, query, raw)
        if fault is not None and fault.action == "commit_then_reset":
            return _reset(handler)
        if fault is not None and fault.action == "commit_then_status":
            return _answer(handler, fault.status, {"detail": "injected after commit"})
        if isinstance(body, bytes):
            return _answer_bytes(handler, status, body)
        return _answer(handler, status, body)

    def _refresh(self, handler, raw: bytes) -> None:
        token = json.loads(raw or b"{}").get("refresh", "")
        claims = _claims(token)
        if self.revoked or claims.get("token_type") != "refresh" or claims.get("exp", 0) <= self.now():
            return _answer(handler, 401, {"detail": "Token is invalid or expired"})
        with self._lock:
            self.refreshes += 1
        now = int(self.now())
        access = jwt(
            {
                "token_type": "access",
                "iat": now,
                "exp": now + int(self.access_lifetime_s),
                "n": self.refreshes,
            }
        )
        return _answer(handler, 200, {"access": access})

    def _authorised(self, header: str | None) -> bool:
        if header == f"Token {LEGACY_KEY}":
            return True
        if not header or not header.startswith("Bearer "):
            return False
        claims = _claims(header[len("Bearer ") :])
        return claims.get("token_type") == "access" and claims.get("exp", 0) > self.now()

    def _route(self, method: str, path: str, query: dict, raw: bytes):
        with self._lock:
            state = self.state
            if method == "GET" and path.startswith("/data/upload/"):
                body = state.files.get(path)
                return (200, body) if body is not None else (404, {"detail": "Not found."})
            if match := re.fullmatch(r"/api/projects/(\d+)/", path):
                project = state.projects.get(int(match[1]))
                return (200, copy.deepcopy(project)) if project else (404, {"detail": "Not found."})
            if path == "/api/tasks/" and method == "GET":
                return self._task_page(query)
            if (match := re.fullmatch(r"/api/dm/views/(\d+)/", path)) and method == "GET":
                if int(match[1]) not in state.views:
                    return 404, {"detail": "Not found."}
                return 200, {"id": int(match[1]), "project": state.views[int(match[1])][2], "data": {}}
            if (match := re.fullmatch(r"/api/projects/(\d+)/import/predictions", path)) and method == "POST":
                if self.max_body_bytes is not None and len(raw) > self.max_body_bytes:  # a proxy in front
                    return 413, {"detail": "Request Entity Too Large"}
                items = json.loads(raw)
                unknown = [
                    i["task"]
                    for i in items
                    if state.tasks.get(int(i["task"]), {}).get("project") != int(match[1])
                ]
                if unknown:  # as Label Studio 1.23: the whole request is refused, nothing stored
                    return 400, {"detail": "Validation error", "validation_errors": {"non_field_errors": [
                        f'task ID {unknown[0]} not found in project {match[1]}']}}  # fmt: skip
                for item in items:
                    state.next_id += 1
                    state.tasks[int(item["task"])]["predictions"].append({"id": state.next_id, **item})
                return 201, {"created": len(items)}
            if path == "/api/predictions/" and method == "GET":
                return 200, copy.deepcopy(state.tasks[int(query["task"])]["predictions"])
            if (match := re.fullmatch(r"/api/predictions/(\d+)/", path)) and method == "DELETE":
                for task in state.tasks.values():
                    kept = [p for p in task["predictions"] if p["id"] != int(match[1])]
                    if len(kept) != len(task["predictions"]):
                        task["predictions"] = kept
                        return 204, None
                return 404, {"detail": "Not found."}
            if path == "/api/webhooks/" and method == "GET":
                return 200, [h for h in state.webhooks.values() if str(h["project"]) == query.get("project")]
            if (match := re.fullmatch(r"/api/webhooks/(\d+)/", path)) and method == "PATCH":
                hook = state.webhooks[int(match[1])]
                hook.update(json.loads(raw))
                return 200, copy.deepcopy(hook)
        return 404, {"detail": f"no route {method} {path}"}

    def _task_page(self, query: dict):
        project = int(query["project"])
        if project not in self.state.projects:  # deleted, or never there
            return 404, {"detail": "Not found."}
        tasks = [t for t in self.state.tasks.values() if t["project"] == project]
        order = lambda t: t["id"]  # noqa: E731
        if query.get("view"):  # a view's own filters and order; the query is ignored, as by Label Studio
            if int(query["view"]) not in self.state.views:
                return 404, {"detail": "Not found."}
            keep, order, of = self.state.views[int(query["view"])]
            if of != project:  # Label Studio 1.23: an uncaught DataManagerException
                return 500, {"detail": "Project and View mismatch"}
            tasks = [t for t in tasks if keep(t)]
        elif query.get("query"):
            tasks = _selected(tasks, json.loads(query["query"]))
        tasks.sort(key=order)
        page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
        if page > 1 and (page - 1) * size >= len(tasks):
            return 404, {"detail": "Invalid page."}
        chosen = copy.deepcopy(tasks[(page - 1) * size : page * size])
        if query.get("fields") != "all":  # Label Studio's default: no annotations, no predictions
            chosen = [{k: v for k, v in t.items() if k not in ("annotations", "predictions")} for t in chosen]
        return 200, {"tasks": chosen, "total": len(tasks)}


def _selected(tasks: list[dict], query: dict) -> list[dict]:
    """What Label Studio's Data Manager selects with ``query``: selected items, then the filters this
    backend sends (``greater`` on the id, ``updated_at`` and the annotation counters; ``equal`` on the
    counters)."""
    chosen = query.get("selectedItems") or {"all": True}
    if not chosen.get("all"):
        tasks = [t for t in tasks if t["id"] in set(chosen["included"])]
    filters = query.get("filters")
    if not filters:
        return tasks

    def value(task: dict, column: str):
        skipped = [bool(a.get("was_cancelled")) for a in task["annotations"]]
        return {
            "filter:tasks:id": lambda: task["id"],
            "filter:tasks:updated_at": lambda: datetime.fromisoformat(task["updated_at"]),
            "filter:tasks:total_annotations": lambda: skipped.count(False),
            "filter:tasks:cancelled_annotations": lambda: skipped.count(True),
        }[column]()

    def passes(task: dict, item: dict) -> bool:
        bound = item["value"]
        if item["type"] == "Datetime":
            bound = datetime.strptime(bound, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        found = value(task, item["filter"])
        return {"greater": found > bound, "equal": found == bound}[item["operator"]]

    join = all if filters["conjunction"] == "and" else any
    return [t for t in tasks if join(passes(t, item) for item in filters["items"])]


def _claims(token: str) -> dict:
    try:
        return json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    except (IndexError, ValueError):
        return {}


def _answer(handler: BaseHTTPRequestHandler, status: int, body) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    _answer_bytes(handler, status, data, content_type="application/json")


def _answer_bytes(
    handler: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str = "image/png"
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Cut the connection with a TCP reset, no answer at all."""
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.close_connection = True
    handler.connection.close()
