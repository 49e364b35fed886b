"""Versioned per-project models under ``MODEL_DIR/<project>/<version>/``.

A version is written into a temporary folder next to its final place, every file and the folder
are fsynced, and the folder is renamed into place, so a crash never leaves a half-written version
that looks complete. ``CURRENT`` names the promoted version; it is replaced atomically and read by
every worker process (a change of its modification time makes a worker reload). ``history.jsonl``
records each promotion, which is what ``rollback`` walks back.

A writer holds an exclusive ``flock`` on its temporary folder until the folder is renamed, so what a
writer killed outright (kill -9, power loss) leaves is recognisable: a ``.tmp-*`` folder nobody holds.
The registry removes those, and the temporary files of an interrupted ``CURRENT`` replacement, when it
starts (``remove_unfinished``), logging each; versions, ``CURRENT`` and the history are never touched.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backend.errors import InputError

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^v(\d{4,})$")
_PROJECT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TMP_VERSION_RE = re.compile(r"^\.tmp-[0-9a-f]{1,64}$")  # what ``create`` writes into (uuid4 hex)
_TMP_CURRENT_RE = re.compile(r"^\.CURRENT\.[0-9a-f]{32}\.tmp$")  # what ``_write_atomic`` writes CURRENT into


@dataclass
class VersionInfo:
    """``meta.json`` of a version: what it is, what it was trained on, how it scored."""

    project: str
    version: str
    kind: str  # "head", "lora" or "head+lora"
    base_model_version: str
    created_at: float
    train_examples: int = 0
    heldout_examples: int = 0
    metrics: dict = field(default_factory=dict)  # e.g. {"category_accuracy": 0.93}
    parent: str | None = None
    promoted: bool = False
    notes: str = ""

    def model_version(self) -> str:
        """What Label Studio sees: the base models plus this project's version."""
        return f"{self.base_model_version}+p{self.project}-{self.version}"


class RegistryError(InputError):
    """A registry operation was asked for something that does not exist or is not allowed."""


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [*sorted(p for p in root.rglob("*") if p.is_dir()), root]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_lock_dir(path: Path) -> int | None:
    """An fd holding an exclusive flock on the folder ``path``, or None when another process (or
    another fd of this one) holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class ModelRegistry:
    """The versions of every project under ``root`` (``MODEL_DIR``); see the module docstring.

    Starting one removes what writes killed mid-way left behind (``remove_unfinished``).
    """

    def __init__(self, *, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_unfinished()

    def project_dir(self, project: str, *, create: bool = False) -> Path:
        """The project's folder; created only for writes (reading an unknown project changes nothing)."""
        if not _PROJECT_RE.match(str(project)):
            raise RegistryError(f"project id {project!r} must be letters, digits, '_', '.' or '-'")
        path = self.root / str(project)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def _locked(self, project: str) -> Iterator[Path]:
        """An exclusive lock on the project's folder, across threads and processes."""
        directory = self.project_dir(project, create=True)
        with open(directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield directory
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---- reading ----
    def versions(self, project: str) -> list[VersionInfo]:
        """Complete versions, oldest first (temporary folders of unfinished writes are not listed)."""
        directory = self.project_dir(project)
        if not directory.is_dir():
            return []
        out = []
        for path in sorted(directory.iterdir()):
            if path.is_dir() and _VERSION_RE.match(path.name) and (path / "meta.json").is_file():
                out.append(VersionInfo(**json.loads((path / "meta.json").read_text())))
        return out

    def info(self, project: str, version: str) -> VersionInfo:
        path = self.project_dir(project) / version / "meta.json"
        if not _VERSION_RE.match(version) or not path.is_file():
            known = ", ".join(v.version for v in self.versions(project)) or "none"
            raise RegistryError(f"project {project} has no version {version!r} (versions: {known})")
        return VersionInfo(**json.loads(path.read_text()))

    def path(self, project: str, version: str) -> Path:
        self.info(project, version)
        return self.project_dir(project) / version

    def current(self, project: str) -> VersionInfo | None:
        pointer = self.project_dir(project) / "CURRENT"
        if not pointer.is_file():
            return None
        version = pointer.read_text().strip()
        return self.info(project, version) if version else None

    def current_stamp(self, project: str) -> float:
        """Changes whenever ``CURRENT`` is replaced: workers compare it to know when to reload."""
        pointer = self.root / str(project) / "CURRENT"
        try:
            return pointer.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def history(self, project: str) -> list[dict]:
        path = self.project_dir(project) / "history.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # ---- writing ----
    def create(
        self,
        project: str,
        *,
        kind: str,
        base_model_version: str,
        write: Callable[[Path], dict],
        parent: str | None = None,
    ) -> VersionInfo:
        """Write a new version: ``write(folder)`` fills a temporary folder and returns the meta fields
        it knows (``train_examples``, ``metrics`` ...); the folder becomes ``vNNNN`` only when complete."""
        directory = self.project_dir(project, create=True)
        tmp, hold = self._new_tmp(directory)
        try:
            extra = write(tmp) or {}
            with self._locked(project):
                numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _VERSION_RE.match(p.name))]
                version = f"v{max(numbers, default=0) + 1:04d}"
                info = VersionInfo(
                    project=str(project),
                    version=version,
                    kind=kind,
                    base_model_version=base_model_version,
                    created_at=time.time(),
                    parent=parent,
                    **extra,
                )
                (tmp / "meta.json").write_text(json.dumps(asdict(info), indent=2))
                _fsync_tree(tmp)
                os.replace(tmp, directory / version)
                _fsync_tree(directory / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.close(hold)  # releases the folder's flock (it followed the folder through the rename)
        logger.info("project %s: wrote version %s (%s)", project, version, kind)
        return info

    @staticmethod
    def _new_tmp(directory: Path) -> tuple[Path, int]:
        """A new temporary version folder and an fd holding its flock while it is written."""
        while True:
            tmp = directory / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue  # a starting registry took it for a leftover between mkdir and open
            fcntl.flock(fd, fcntl.LOCK_EX)
            if tmp.is_dir():
                return tmp, fd
            os.close(fd)  # removed before this process got the lock: take another name

    def promote(self, project: str, version: str, *, reason: str = "") -> VersionInfo:
        info = self.info(project, version)
        self._set_current(project, version, action="promote", reason=reason or "by hand")
        return info

    def rollback(self, project: str) -> VersionInfo | None:
        """Undo the last promotion: back to the version promoted before it (None: the base model)."""
        stack = self.promotion_stack(project)
        if not stack:
            raise RegistryError(f"project {project} runs the base model; there is nothing to roll back")
        previous = stack[-2] if len(stack) > 1 else None
        self._set_current(project, previous, action="rollback", reason=f"rollback from {stack[-1]}")
        return self.info(project, previous) if previous else None

    def promotion_stack(self, project: str) -> list[str]:
        """Promoted versions still in force, oldest first: promotions push, rollbacks pop."""
        stack: list[str] = []
        for record in self.history(project):
            if record.get("action") == "rollback":
                if stack:
                    stack.pop()
            elif record.get("version"):
                stack.append(record["version"])
        return stack

    def _set_current(self, project: str, version: str | None, *, action: str, reason: str) -> None:
        with self._locked(project) as directory:
            _write_atomic(directory / "CURRENT", (version or "") + "\n")
            record = {"time": time.time(), "action": action, "version": version, "reason": reason}
            with open(directory / "history.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        logger.info("project %s: %s -> %s (%s)", project, action, version or "base model", reason)

    def remove_unfinished(self) -> list[Path]:
        """Remove, in every project folder, the temporary version folders no live writer holds and the
        temporary files of interrupted ``CURRENT`` replacements; returns the removed paths, each logged.
        Complete versions (``vNNNN``), ``CURRENT``, the history and files of other names are kept."""
        removed: list[Path] = []
        try:
            folders = sorted(p for p in self.root.iterdir() if _PROJECT_RE.match(p.name) and p.is_dir())
        except OSError as error:
            logger.warning(
                "model registry %s: cannot list it to remove unfinished writes: %s", self.root, error
            )
            return removed
        for folder in folders:
            removed += self._remove_unfinished_in(folder)
        return removed

    def clean_unfinished(self, project: str) -> int:
        """``remove_unfinished`` for one project; returns how many leftovers were removed."""
        directory = self.project_dir(project)
        return len(self._remove_unfinished_in(directory)) if directory.is_dir() else 0

    def _remove_unfinished_in(self, directory: Path) -> list[Path]:
        removed = []
        try:
            entries = sorted(directory.iterdir())
        except OSError as error:
            logger.warning("model registry: cannot list %s: %s", directory, error)
            return removed
        for path in entries:
            try:
                if _TMP_VERSION_RE.match(path.name) and path.is_dir() and not path.is_symlink():
                    fd = _try_lock_dir(path)
                    if fd is None:
                        continue  # a live writer is filling it
                    try:
                        shutil.rmtree(path)
                    finally:
                        os.close(fd)
                elif _TMP_CURRENT_RE.match(path.name) and path.is_file():
                    with self._locked(directory.name):  # CURRENT is only replaced under this lock
                        path.unlink(missing_ok=True)
                else:
                    continue
            except FileNotFoundError:
                continue  # its writer finished (or another registry removed it) meanwhile
            except OSError as error:
                logger.warning("model registry: cannot remove the unfinished write %s: %s", path, error)
                continue
            logger.warning("model registry: removed %s, left by a write that did not finish", path)
            removed.append(path)
        return removed


def not_worse(candidate: dict, current: dict, *, tolerance: float = 0.0) -> tuple[bool, str]:
    """The promotion gate: every metric the current version has must be matched by the candidate
    (within ``tolerance``); returns the decision and a reason naming the deciding metric."""
    for name, value in sorted(current.items()):
        if name not in candidate:
            return False, f"candidate has no {name}"
        if candidate[name] < value - tolerance:
            return False, f"{name} {candidate[name]:.4f} < current {value:.4f}"
    return True, "no metric worse than the current version"
