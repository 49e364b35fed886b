"""Points where this thread's model work may step aside for more urgent work, and waits that let it.

A scheduler sharing one model between several threads (the backend's clicks, batches and training)
installs two hooks for the thread that holds the model, with :func:`between_steps`:

- ``boundary()``, called at :func:`step_boundary` points: between decoding steps and scoring chunks,
  between SAM's decoder batches, and before every block of the SAM image encoder, the vision tower and
  the language model (:func:`yield_before_each`). There the scheduler may hand the model over and take
  it back; what the thread computed so far (activations, a half-built KV cache) simply waits.
- ``pause()``, a context manager entered by :func:`waiting` around every block on something another
  thread may be doing (a computation of the same cached image, SAM's encoder lock). The model is
  released while waiting, so work that stepped aside inside that computation can finish it: no
  deadlock, whichever thread holds what.

Outside a scheduler (no hooks installed in this thread) both are no-ops. :func:`atomic` marks work that
must not be interrupted (a training step on the served weights: its adapter is active until it ends);
no boundary fires inside it.

Boundaries sit between forward passes, decoding steps and blocks, never inside a compiled or captured
step. On CUDA the host runs ahead of the device: a hand-over at a boundary would still leave everything
the previous holder launched queued in front of the click. :class:`DeviceThrottle` bounds that: at each
boundary it records an event and waits for the one of the boundary before, so batch work is at most one
step ahead of the device.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DeviceThrottle", "acquire", "atomic", "between_steps", "step_boundary", "waiting", "yield_after",
    "yield_before_each",
]  # fmt: skip


@dataclass(frozen=True)
class _Hooks:
    boundary: Callable[[], None]
    pause: Callable[[], AbstractContextManager]


_HOOKS: contextvars.ContextVar[_Hooks | None] = contextvars.ContextVar("osprey_step_hooks", default=None)


@contextmanager
def between_steps(
    boundary: Callable[[], None], pause: Callable[[], AbstractContextManager] = nullcontext
) -> Iterator[None]:
    """Install ``boundary`` and ``pause`` (see the module docstring) for this thread's work inside."""
    token = _HOOKS.set(_Hooks(boundary, pause))
    try:
        yield
    finally:
        _HOOKS.reset(token)


def step_boundary() -> None:
    """A point between two model steps of this thread's work: more urgent work may run here."""
    hooks = _HOOKS.get()
    if hooks is not None:
        hooks.boundary()


@contextmanager
def waiting() -> Iterator[None]:
    """Around a block on another thread's work: the model is released meanwhile, and taken back after
    (no step boundary fires inside)."""
    hooks = _HOOKS.get()
    if hooks is None:
        yield
        return
    token = _HOOKS.set(None)
    try:
        with hooks.pause():
            yield
    finally:
        _HOOKS.reset(token)


@contextmanager
def atomic() -> Iterator[None]:
    """Inside, no step boundary fires: this thread keeps the model until the block ends."""
    token = _HOOKS.set(None)
    try:
        yield
    finally:
        _HOOKS.reset(token)


class DeviceThrottle:
    """Keeps one thread's work at most one step ahead of the CUDA device (see the module docstring):
    :meth:`lap`, at every step boundary, records an event on the current stream and waits for the
    previous lap's. Does nothing unless CUDA is in use. ``event`` makes the events (default
    ``torch.cuda.Event``; anything with ``record()`` and ``synchronize()``)."""

    def __init__(self, *, event: Callable[[], object] | None = None) -> None:
        self._event = event
        self._previous = None
        self.waits = 0  # laps that waited for the step before

    def lap(self) -> None:
        make = self._event
        if make is None:
            if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
                return
            make = torch.cuda.Event
        event = make()
        event.record()
        if self._previous is not None:
            self._previous.synchronize()
            self.waits += 1
        self._previous = event


@contextmanager
def acquire(lock: threading.Lock) -> Iterator[None]:
    """Hold ``lock``; when another thread has it, wait for it with the model released (:func:`waiting`)."""
    if not lock.acquire(blocking=False):
        with waiting():
            lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _boundary_hook(module: nn.Module, args: tuple) -> None:
    step_boundary()


def _after_hook(module: nn.Module, args: tuple, output) -> None:
    step_boundary()


def yield_after(module: nn.Module) -> bool:
    """Make the end of ``module``'s forward a :func:`step_boundary` (once); True when the hook was added."""
    if getattr(module, "_osprey_step_after", False):
        return False
    module.register_forward_hook(_after_hook)
    module._osprey_step_after = True
    return True


def yield_before_each(blocks: Iterable[nn.Module]) -> int:
    """Make the start of each module's forward a :func:`step_boundary` (once per module, however often
    this is called). Returns how many modules got the hook."""
    added = 0
    for block in blocks:
        if getattr(block, "_osprey_step_boundary", False):
            continue
        block.register_forward_pre_hook(_boundary_hook)
        block._osprey_step_boundary = True
        added += 1
    return added
