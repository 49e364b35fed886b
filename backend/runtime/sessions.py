"""One step of model work for a project: the scheduler's session at a priority, with the project's
promoted LoRA adapter active whenever the work holds the model (and again each time it takes the model
back after handing it over).

Everything below the runtime receives a ``session`` callable from here, already bound to its
priority, so it never needs the scheduler or the registry itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from .scheduler import ModelScheduler


class ModelSessions:
    """``sessions(project, priority)`` is a context manager holding the model for one step of work.

    ``registry`` says which version (and so which adapter folder) a project serves; ``osprey`` is the
    served model the adapters attach to (loaded lazily, the first time a project has one)."""

    def __init__(self, *, scheduler: ModelScheduler, registry, osprey) -> None:
        self.scheduler = scheduler
        self.registry = registry
        self.osprey = osprey
        self._adapters = None  # osprey.learning.adapters.AdapterSet, when a project first has an adapter
        self._served: dict[str, str] = {}  # project -> the adapter its served version loaded
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, project: str | None, priority: int) -> Iterator[None]:
        with self.scheduler.session(priority, on_resume=lambda: self.activate(project)):
            self.activate(project)
            yield

    def bound(self, priority: int) -> Callable[[str | None], contextlib.AbstractContextManager]:
        """``session(project)`` at ``priority``: what a collaborator that works at one priority gets."""
        return lambda project: self(project, priority)

    def activate(self, project: str | None) -> None:
        """Make the adapter of the version ``project`` serves (or none) the active one; only while holding
        the model. A damaged promoted version falls back as the registry says (``served``). The adapter
        of a version the project no longer serves is removed from the model."""
        served = self.registry.served(project) if project else None
        lora_dir = served.part("lora") if served is not None else None
        if lora_dir is None or not lora_dir.is_dir():
            if self._adapters is not None:
                self._adapters.activate(None, None)
            return
        with self._lock:
            if self._adapters is None:
                from osprey.learning.adapters import AdapterSet

                # the set the model's LoRA trainer uses too: one record of which adapter is active
                self._adapters = AdapterSet.of(self.osprey)
        name = f"p{project}-{served.version}"
        superseded = self._served.get(project)
        if superseded is not None and superseded != name:
            self._adapters.remove(superseded)
        self._served[project] = name
        self._adapters.activate(name, lora_dir)
