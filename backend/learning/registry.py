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

What a project *serves* is :meth:`ModelRegistry.served`: the promoted version when it is whole (its
folder, a readable ``meta.json`` and the parts its kind names: ``head/``, ``lora/`` or both), else the
last whole version below it in the promotion history, else the base model, with the damage found. A
damaged promoted version is logged once (per project and damage) and never rewritten: ``CURRENT``
stays as it is until someone promotes or rolls back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backend.errors import InputError

logger = logging.getLogger(__name__)

KIND_PARTS = {"head": ("head",), "lora": ("lora",), "head+lora": ("head", "lora")}  # folders of each kind

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


@dataclass(frozen=True)
class Served:
    """What a project serves (:meth:`ModelRegistry.served`): ``info`` and ``folder`` of the version served
    (None for the base model), the version ``CURRENT`` names (``promoted``, None for the base model) and,
    when the two differ because the promoted one is damaged, the damage found (``problem``)."""

    project: str
    info: VersionInfo | None = None
    folder: Path | None = None
    promoted: str | None = None
    problem: str | None = None

    @property
    def version(self) -> str | None:
        return self.info.version if self.info is not None else None

    def part(self, name: str) -> Path | None:
        """The served version's ``head`` or ``lora`` folder, or None when it has none."""
        if self.info is None or name not in KIND_PARTS.get(self.info.kind, ()):
            return None
        return self.folder / name

    def to_dict(self) -> dict:
        """``/metrics``: ``{"serving": "v0001", "promoted": "v0002", "problem": "..."}``."""
        return {
            "serving": self.version or "base model",
            "promoted": self.promoted or ("base model" if self.problem is None else "unreadable"),
            "problem": self.problem,
        }


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


def _read_meta(path: Path) -> VersionInfo:
    """A version's ``meta.json``; OSError, ValueError (not JSON) or TypeError (not its fields) when not."""
    return VersionInfo(**json.loads(path.read_text()))


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
        self._reported: dict[str, str] = {}  # project -> the damage last logged (logged once each)
        self._reported_lock = threading.Lock()
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
        """Complete versions, oldest first (temporary folders of unfinished writes, and versions whose
        ``meta.json`` cannot be read, are not listed)."""
        directory = self.project_dir(project)
        if not directory.is_dir():
            return []
        out = []
        for path in sorted(directory.iterdir()):
            if path.is_dir() and _VERSION_RE.match(path.name) and (path / "meta.json").is_file():
                with contextlib.suppress(OSError, ValueError, TypeError):
                    out.append(_read_meta(path / "meta.json"))
        return out

    def info(self, project: str, version: str) -> VersionInfo:
        path = self.project_dir(project) / version / "meta.json"
        if not _VERSION_RE.match(version) or not path.is_file():
            known = ", ".join(v.version for v in self.versions(project)) or "none"
            raise RegistryError(f"project {project} has no version {version!r} (versions: {known})")
        try:
            return _read_meta(path)
        except (OSError, ValueError, TypeError) as error:
            raise RegistryError(f"project {project}: {version}'s meta.json cannot be read: {error}") from None

    def check(self, project: str, version: str) -> tuple[VersionInfo | None, str | None]:
        """``(info, None)`` when ``version`` is whole (its folder, a readable ``meta.json`` describing it,
        and the folders its kind names), else ``(None, what is wrong)``."""
        if not _VERSION_RE.match(version):
            return None, f"{version!r} is not a version name"
        folder = self.project_dir(project) / version
        if not folder.is_dir():
            return None, f"{version}: its folder is missing"
        try:
            info = _read_meta(folder / "meta.json")
        except FileNotFoundError:
            return None, f"{version}: meta.json is missing"
        except (OSError, ValueError, TypeError) as error:
            return None, f"{version}: meta.json cannot be read ({error})"
        if info.version != version:
            return None, f"{version}: its meta.json describes {info.version!r}"
        if info.kind not in KIND_PARTS:
            return None, f"{version}: unknown kind {info.kind!r} (expected one of {', '.join(KIND_PARTS)})"
        missing = [f"{part}/" for part in KIND_PARTS[info.kind] if not (folder / part).is_dir()]
        if missing:
            return None, f"{version}: a {info.kind} version without its {' and '.join(missing)} folder"
        return info, None

    def served(self, project: str) -> Served:
        """What ``project`` serves: the promoted version when it is whole, else the last whole version
        promoted before it (walking the promotion history back), else the base model; ``problem`` says
        what was found damaged. ``CURRENT`` is never changed here. A new damage is logged once."""
        directory = self.project_dir(project)
        try:
            promoted = (directory / "CURRENT").read_text().strip() or None
        except FileNotFoundError:
            promoted = None
        except (OSError, UnicodeDecodeError) as error:
            return self._report(self._fall_back(project, None, f"CURRENT cannot be read ({error})"))
        if promoted is None:
            return self._report(Served(project=str(project)))
        info, problem = self.check(project, promoted)
        if problem is None:
            return self._report(Served(str(project), info, directory / promoted, promoted))
        return self._report(self._fall_back(project, promoted, problem))

    def _fall_back(self, project: str, promoted: str | None, problem: str) -> Served:
        """The last whole version promoted before ``promoted`` (history order), else the base model."""
        problems = [problem]
        try:
            stack = [version for version in self.promotion_stack(project) if isinstance(version, str)]
        except (OSError, ValueError, AttributeError) as error:  # AttributeError: a line that is no object
            stack = []
            problems.append(f"history.jsonl cannot be read ({error})")
        if promoted in stack:  # only what was promoted before it (a newer promotion was rolled back)
            stack = stack[: len(stack) - 1 - stack[::-1].index(promoted)]
        tried = {promoted}
        for version in reversed(stack):
            if version in tried:
                continue
            tried.add(version)
            info, damage = self.check(project, version)
            if damage is None:
                folder = self.project_dir(project) / version
                return Served(str(project), info, folder, promoted, "; ".join(problems))
            problems.append(damage)
        return Served(str(project), promoted=promoted, problem="; ".join(problems))

    def _report(self, served: Served) -> Served:
        """Log a project's damage once (and once more when it changes or is repaired)."""
        with self._reported_lock:
            before = self._reported.get(served.project)
            if before == served.problem:
                return served
            if served.problem is None:
                del self._reported[served.project]
            else:
                self._reported[served.project] = served.problem
        if served.problem is None:
            logger.info("project %s: the promoted version is served again (%s)", served.project, before)
        else:
            logger.warning(
                "project %s: the promoted version %s cannot be served (%s); serving %s instead. CURRENT is "
                "left as it is: `osprey-label models rollback %s` or `osprey-label models promote %s VERSION` "
                "chooses what to serve",
                served.project, served.promoted or "(unreadable)", served.problem,
                served.version or "the base model", served.project, served.project,
            )  # fmt: skip
        return served

    def damaged(self) -> dict[str, dict]:
        """For each project whose promoted version cannot be served: what it serves instead and why
        (``Served.to_dict``), for ``/metrics``."""
        out = {}
        for folder in sorted(self.root.iterdir(), key=lambda p: (len(p.name), p.name)):
            if _PROJECT_RE.match(folder.name) and (folder / "CURRENT").exists():
                served = self.served(folder.name)
                if served.problem is not None:
                    out[folder.name] = served.to_dict()
        return out

    def path(self, project: str, version: str) -> Path:
        self.info(project, version)
        return self.project_dir(project) / version

    def current(self, project: str) -> VersionInfo | None:
        """The version ``CURRENT`` names (None: the base model); RegistryError when it cannot be read.
        What is served is :meth:`served`, which falls back when this one is damaged."""
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
                version = f"v{max(self._used_numbers(directory), default=0) + 1:04d}"
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
    def _used_numbers(directory: Path) -> set[int]:
        """Version numbers ever used in ``directory``: folders, and the names in ``CURRENT`` and the
        history, so a version whose folder was lost never has its name given to a new one (``CURRENT``
        would silently name it)."""
        names = [path.name for path in directory.iterdir()]
        with contextlib.suppress(OSError, UnicodeDecodeError):
            names.append((directory / "CURRENT").read_text().strip())
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for line in (directory / "history.jsonl").read_text().splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    names.append(str(json.loads(line).get("version")))
        return {int(m.group(1)) for name in names if (m := _VERSION_RE.match(name))}

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
        """Make ``version`` the served one; RegistryError when it does not exist or is not whole."""
        info = self.info(project, version)
        if (problem := self.check(project, version)[1]) is not None:
            raise RegistryError(f"project {project}: cannot promote {problem}")
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
