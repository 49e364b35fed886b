"""Keys and values of tokens already run through the decoder: kept states and preallocated buffers.

- :class:`KVState`: the keys/values of a finished run (an image's conversation prefix and the question
  text its requests share), ``B`` independent rows, never modified in place, so one state is the base of
  many later runs. It is what an encoded image caches.
- :class:`KVBuffer`: the same layout with room to grow, written in place: every forward writes its new
  tokens' keys/values into columns it was given (``index_copy_``), and attention reads the buffer as it
  is, so no forward ever concatenates a cache or builds a cache object. A buffer is filled once from a
  state (one copy per request) and then only appended to, or overwritten where a forward's tokens were
  scratch (a scoring chunk).
- :class:`BufferPool`: buffers handed back after a request and taken again by the next one of the same
  shape, so their addresses stay put (what a captured CUDA graph replays on) and nothing is allocated
  per request.

Layout: per layer, a keys and a values tensor ``(B, capacity, kv_heads, head_dim)``, zeroed when
allocated (a column attention masks out must still hold finite numbers: 0 x NaN is NaN); separate
tensors, so a compiled step that writes one never sees it alias another. ``segment``/``position``
``(B, capacity)`` say which segment each column belongs to (-1: empty or padding) and its absolute
position. Pure torch, no transformers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

__all__ = ["BufferPool", "KVBuffer", "KVLayout", "KVState"]


@dataclass(frozen=True)
class KVLayout:
    """The shape of one token's keys/values: ``layers`` x (keys, values) x ``kv_heads`` x ``head_dim``."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, llm_config, dtype: torch.dtype) -> KVLayout:
        heads = llm_config.num_attention_heads
        kv_heads = getattr(llm_config, "num_key_value_heads", None) or heads
        head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // heads
        return cls(llm_config.num_hidden_layers, kv_heads, head_dim, dtype)

    def token_bytes(self) -> int:
        """Bytes of one token's keys and values in every layer, plus its segment and position (int64)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * element + 2 * 8


@dataclass
class KVState:
    """Keys/values of tokens already run, in ``B`` independent rows (one image each), with every token's
    segment and position.

    ``layers[i] = (keys, values)``, each ``(B, n_kv_heads, T, head_dim)``; ``segment`` and ``position``
    are ``(B, T)`` long tensors. A segment of ``-1`` marks padding (a row shorter than the longest),
    which no query ever sees. Never modified in place.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    segment: torch.Tensor
    position: torch.Tensor

    @classmethod
    def empty(cls, device: torch.device, batch: int = 1) -> KVState:
        none = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(layers=[], segment=none, position=none.clone())

    @property
    def batch(self) -> int:
        return self.segment.shape[0]

    @property
    def length(self) -> int:
        return self.segment.shape[1]

    @classmethod
    def stack(cls, states: list[KVState]) -> KVState:
        """One state whose row ``b`` is ``states[b]`` (each a single row), shorter rows padded."""
        length = max(s.length for s in states)
        buffer = KVBuffer.allocate(
            _layout_of(states), batch=len(states), capacity=length, device=states[0].segment.device
        )
        for row, state in enumerate(states):
            buffer.write_state(state, row=row)
        buffer.length = length
        return buffer.state()


def _layout_of(states: list[KVState]) -> KVLayout:
    keys = states[0].layers[0][0]
    return KVLayout(len(states[0].layers), keys.shape[1], keys.shape[3], keys.dtype)


class KVBuffer:
    """Preallocated keys/values of ``batch`` rows x ``capacity`` columns (see the module docstring).

    ``keys[i]``/``values[i]``: layer ``i``'s ``(B, capacity, kv_heads, head_dim)`` tensors, one allocation
    each (token-major: a forward writes its tokens with one ``index_copy_`` per tensor, and attention
    reads a ``(B, kv_heads, K, head_dim)`` view of the first ``K`` columns, :meth:`window`). ``length`` is
    the number of columns that hold kept tokens (the same for every row: shorter rows are padded with
    segment -1); a forward's new tokens go to columns ``length .. length + N`` and become kept when the
    caller advances ``length``.
    """

    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        segment: torch.Tensor,
        position: torch.Tensor,
    ) -> None:
        self.keys = keys
        self.values = values
        self.segment = segment
        self.position = position
        self.length = 0
        self.graphs: dict = {}  # captured decode steps that replay on this buffer (osprey.inference.decode)
        self._windows: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @classmethod
    def allocate(cls, layout: KVLayout, *, batch: int, capacity: int, device: torch.device) -> KVBuffer:
        shape = (batch, capacity, layout.kv_heads, layout.head_dim)

        def zeros() -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.layers)]

        segment = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        return cls(zeros(), zeros(), segment, torch.zeros(batch, capacity, dtype=torch.long, device=device))

    @property
    def layout(self) -> KVLayout:
        keys = self.keys[0]
        return KVLayout(len(self.keys), keys.shape[2], keys.shape[3], keys.dtype)

    @property
    def batch(self) -> int:
        return self.segment.shape[0]

    @property
    def capacity(self) -> int:
        return self.segment.shape[1]

    @property
    def device(self) -> torch.device:
        return self.segment.device

    def tensors(self) -> list[torch.Tensor]:
        """Every keys and values tensor, each ``(B, capacity, kv_heads, head_dim)``."""
        return [*self.keys, *self.values]

    def window(self, columns: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer ``(B, kv_heads, columns, head_dim)`` views of the keys and of the values of the first
        ``columns`` columns: what attention over them reads (made once per width)."""
        views = self._windows.get(columns)
        if views is None:
            views = self._windows[columns] = (
                [k[:, :columns].transpose(1, 2) for k in self.keys],
                [v[:, :columns].transpose(1, 2) for v in self.values],
            )
        return views

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors()) + 2 * self.segment.numel() * 8

    def reset(self) -> None:
        """Forget every column (the memory is kept, its finite contents masked out by segment -1)."""
        self.segment.fill_(-1)
        self.length = 0

    def write_state(self, state: KVState, *, row: int | None = None) -> None:
        """Copy ``state`` (all its rows, or one row into ``row``) into columns ``0 .. state.length``."""
        rows = slice(None) if row is None else slice(row, row + 1)
        n = state.length
        if n > self.capacity:
            raise ValueError(f"a state of {n} tokens does not fit a buffer of {self.capacity} columns")
        for i, (keys, values) in enumerate(state.layers):
            self.keys[i][rows, :n].copy_(keys.transpose(1, 2))
            self.values[i][rows, :n].copy_(values.transpose(1, 2))
        self.segment[rows, :n].copy_(state.segment)
        self.position[rows, :n].copy_(state.position)

    @classmethod
    def from_state(cls, state: KVState, *, capacity: int, layout: KVLayout, pool: BufferPool | None = None):
        """A buffer of at least ``capacity`` columns holding ``state`` (from ``pool`` when given)."""
        device = state.segment.device
        if pool is not None:
            buffer = pool.take(layout, batch=state.batch, capacity=capacity, device=device)
        else:
            buffer = cls.allocate(layout, batch=state.batch, capacity=capacity, device=device)
        if state.layers:
            buffer.write_state(state)
        buffer.length = state.length
        return buffer

    def state(self, length: int | None = None) -> KVState:
        """The first ``length`` columns (default: ``self.length``) as a :class:`KVState`: views when the
        buffer is exactly that long, else a compact copy."""
        n = self.length if length is None else length
        exact = n == self.capacity

        def kept(t: torch.Tensor) -> torch.Tensor:
            return (t if exact else t[:, :n].clone()).transpose(1, 2)

        layers = [(kept(k), kept(v)) for k, v in zip(self.keys, self.values, strict=True)]
        segment, position = self.segment[:, :n], self.position[:, :n]
        if not exact:
            segment, position = segment.clone(), position.clone()
        return KVState(layers=layers, segment=segment, position=position)


def _bucket(capacity: int, step: int = 256) -> int:
    return -(-capacity // step) * step


class BufferPool:
    """:class:`KVBuffer` objects kept between requests (see the module docstring). ``take`` gives the
    smallest free buffer of the same layout, rows and device with room for ``capacity`` columns (or a new
    one, its capacity rounded up to a multiple of 256); ``give`` returns it. At most ``keep`` free
    buffers stay (the largest). A buffer carries the CUDA graphs captured on it (``graphs``), so they
    live and die with the memory they replay on."""

    def __init__(self, *, keep: int = 2) -> None:
        self.keep = keep
        self._free: list[KVBuffer] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers made, for tests and metrics

    def take(self, layout: KVLayout, *, batch: int, capacity: int, device: torch.device) -> KVBuffer:
        device = torch.device(device)
        with self._lock:
            fits = [
                b for b in self._free
                if b.layout == layout and b.batch == batch and b.device == device and b.capacity >= capacity
            ]  # fmt: skip
            if fits:
                buffer = min(fits, key=lambda b: b.capacity)
                self._free.remove(buffer)
                buffer.reset()
                return buffer
            self.allocated += 1
        return KVBuffer.allocate(layout, batch=batch, capacity=_bucket(capacity), device=device)

    def give(self, buffer: KVBuffer) -> None:
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda b: -b.capacity)
            del self._free[self.keep :]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes() for b in self._free)
