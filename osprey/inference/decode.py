"""Greedy decoding of many answers at once, with the host out of the loop.

After the prefill (every answer's region segment run in one forward, which gives each answer its first
token), :class:`GreedyDecoder` runs fixed-shape steps. Each step feeds every column's last token, writes
its keys/values into the column's own slot of the :class:`~osprey.model.kv.KVBuffer` (slot ``t`` of the
step, ``gen_base + t * width + column``: written in place, nothing concatenated, no row grows), and
picks the next tokens on the device. Whether an answer is finished (``</s>`` or its token limit) is
decided on the device too; finished answers keep running until the host looks, which it does every
``sync_every`` steps (one read of the finished flags). At such a read, when at most half the columns of
every row are still running, the running ones move to fewer columns (their keys/values with them), so a
long description does not drag finished captions along. The answers are read back once, at the end.

A step is one function of tensors (:func:`decode_step`) with no host read and no data-dependent shape, so
``torch.compile(decode_step, fullgraph=True)`` takes it whole. With ``compile`` on (``auto``: on for
CUDA) it runs compiled, and on CUDA each shape's compiled step is captured once as a CUDA graph on the
buffer it writes to and replayed (:class:`_Graphs`). Attention reads the gen slots up to a window that
grows in powers of two with the steps, so early steps do not read the empty end of the buffer; each
window is its own shape.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from osprey.model.kv import KVBuffer
from osprey.model.llm import DecoderParts, logits_of, rope_angles, run_layers
from osprey.runtime import transfer
from osprey.runtime.steps import step_boundary
from osprey.runtime.transfer import to_device

logger = logging.getLogger(__name__)

__all__ = ["DecodeState", "GreedyDecoder", "Prefilled", "decode_step"]

MIN_WINDOW = 16  # gen slots per column attended by the first steps; doubles as the steps go


@dataclass
class Prefilled:
    """What the prefill hands to the decoder, all known on the host.

    ``columns[b]``: the answers of row ``b`` in column order, each ``(answer index, segment, position of
    its first generated token, token limit)``; ``first_logits`` ``(answers, V)`` float32 in answer
    order; ``gen_base``: the first buffer column after the kept tokens (where the gen slots begin);
    ``visible``: ``(B, S, S)`` segment visibility of the rows."""

    columns: list[list[tuple[int, int, int, int]]]
    first_logits: torch.Tensor
    gen_base: int
    visible: torch.Tensor


@dataclass
class DecodeState:
    """The device tensors one step reads and updates in place: per column (``B`` rows x ``W`` columns)
    and per answer (``S`` answers plus a trash row ``S``, where padding and finished columns write)."""

    tokens: torch.Tensor  # (B, W) long: the token each column feeds next
    positions: torch.Tensor  # (B, W) long: its position
    slots: torch.Tensor  # (W,) long: the buffer columns this step writes (gen_base + t * W + column)
    out_col: torch.Tensor  # (1,) long: the output column of the token this step picks (t + 1)
    column_answer: torch.Tensor  # (B, W) long: answer of each column (S: padding)
    done: torch.Tensor  # (B, W) bool: the column's answer is finished (padding: always)
    count: torch.Tensor  # (B, W) long: tokens the column's answer has
    limit: torch.Tensor  # (B, W) long: its token limit
    out_tokens: torch.Tensor  # (S + 1, T) long
    out_logprobs: torch.Tensor  # (S + 1, T) float32
    seen: torch.Tensor | None  # (S + 1, V) bool: tokens an answer generated (repetition penalty only)
    allowed: torch.Tensor  # (B, W, K) bool: keys each column sees, the step condition aside
    visible_from: torch.Tensor  # (K,) long: the first output column whose step sees each key (0: kept)
    keys: list[torch.Tensor]  # per layer (B, capacity, kv_heads, head_dim): the buffer, written in place
    values: list[torch.Tensor]
    read: tuple[list[torch.Tensor], list[torch.Tensor]] | None  # the window's views (eager; None compiled)


def decode_step(parts: DecoderParts, st: DecodeState, eos: int, penalty: float | None) -> None:
    """One decoding step for every column (see the module docstring); updates ``st`` and the buffer
    behind ``st.keys``/``st.values`` in place. No host read, no data-dependent shape: compilable whole."""
    batch, width = st.tokens.shape
    hidden = parts.decoder.embed_tokens(st.tokens)  # (B, W, D)
    allowed = st.allowed & (st.visible_from <= st.out_col)
    mask = torch.where(allowed, 0.0, torch.finfo(hidden.dtype).min)
    mask = (mask if hidden.dtype == torch.float32 else mask.to(hidden.dtype))[:, None]  # (B, 1, W, K)
    rope = rope_angles(parts, st.positions, hidden.dtype)
    hidden = run_layers(parts, st.keys, st.values, hidden, rope=rope, slots=st.slots, mask=mask, read=st.read)
    logits = logits_of(parts, hidden).view(batch * width, -1)  # (B * W, V) float32
    answers = st.column_answer.view(-1)
    best, logprob = _pick(logits, st.seen, answers, penalty)
    best, logprob = best.view(batch, width), logprob.view(batch, width)
    active = ~st.done
    target = torch.where(active, st.column_answer, st.out_tokens.shape[0] - 1)  # finished: the trash row
    st.out_tokens[target, st.out_col] = best
    st.out_logprobs[target, st.out_col] = logprob
    if st.seen is not None:
        st.seen[target, best] = True
    st.count.add_(active)
    st.done |= (best == eos) | (st.count >= st.limit)
    st.tokens.copy_(best)
    st.positions.add_(1)
    st.slots.add_(width)
    st.out_col.add_(1)


def _pick(
    logits: torch.Tensor, seen: torch.Tensor | None, answers: torch.Tensor, penalty: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy token of each row of ``logits`` ``(N, V)`` and its log-probability under the model.
    With ``penalty``, transformers' repetition penalty on the tokens each answer generated (a positive
    logit divided by it, a negative one multiplied) decides the token; the log-probability stays the
    model's own."""
    log_probs = logits.log_softmax(-1)
    if penalty is None:
        logprob, best = log_probs.max(-1)
        return best, logprob
    scores = torch.where(seen[answers], torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    best = scores.argmax(-1)
    return best, log_probs.gather(1, best[:, None])[:, 0]


def _clone_state(st: DecodeState) -> DecodeState:
    """A copy of the tensors (the buffer views stay shared)."""
    return DecodeState(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(st).items()})


def _copy_state(dst: DecodeState, src: DecodeState) -> None:
    for name, value in vars(src).items():
        if isinstance(value, torch.Tensor):
            getattr(dst, name).copy_(value)


class _Graphs:
    """The compiled step captured as CUDA graphs, one per shape, kept on the buffer it writes to
    (:attr:`~osprey.model.kv.KVBuffer.graphs`). A graph replays on the tensors it was captured on: the
    first step of a shape copies the live state into them, and from then on they are the live state."""

    def __init__(self, step) -> None:
        self.step = step

    def __call__(self, parts, buffer: KVBuffer, st: DecodeState, eos: int, penalty: float | None):
        key = (*st.tokens.shape, *st.allowed.shape, *st.out_tokens.shape, st.seen is not None, penalty)
        entry = buffer.graphs.get(key)
        if entry is None:
            entry = buffer.graphs[key] = self._capture(parts, st, eos, penalty)
        graph, static = entry
        if static is not st:
            _copy_state(static, st)
        graph.replay()
        return static

    def _capture(self, parts, st: DecodeState, eos: int, penalty: float | None):
        device = st.tokens.device
        static, before = _clone_state(st), _clone_state(st)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up outside capture, as CUDA graphs need (compiles too)
            for _ in range(2):
                self.step(parts, static, eos, penalty)
        torch.cuda.current_stream(device).wait_stream(stream)
        # The warm-up wrote the gen slots of this step and the next; the real steps write them again
        # before any query sees them (a step's mask shows the slots up to its own).
        _copy_state(static, before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(parts, static, eos, penalty)
        return graph, static


class GreedyDecoder:
    """Runs :func:`decode_step` until every answer is finished (see the module docstring).

    Args:
        eos_token_id: ends an answer.
        sync_every: steps between two reads of the finished flags (the only host reads while decoding).
        compile: ``"on"``, ``"off"`` or ``"auto"`` (on for CUDA): run the step compiled (and on CUDA
            as captured graphs).
        repetition_penalty: transformers' penalty on each answer's own generated tokens (1.0: none).
    """

    def __init__(
        self,
        *,
        eos_token_id: int,
        sync_every: int = 8,
        compile: str = "auto",
        repetition_penalty: float = 1.0,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        if compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be 'auto', 'on' or 'off', got {compile!r}")
        self.eos_token_id = eos_token_id
        self.sync_every = sync_every
        self.compile = compile
        self.repetition_penalty = repetition_penalty
        self._compiled = None
        self._graphs: _Graphs | None = None
        self._failed = False  # compiling or capturing failed once: eager from then on (logged)
        self.steps = 0  # decoding steps run, for benchmarks
        self.syncs = 0  # host reads while decoding, for benchmarks

    def compiled_for(self, device: torch.device) -> bool:
        if self._failed:
            return False
        return self.compile == "on" or (self.compile == "auto" and device.type == "cuda")

    def _run(self, parts, buffer: KVBuffer, st: DecodeState, penalty: float | None) -> DecodeState:
        device = st.tokens.device
        if self.compiled_for(device):
            if self._compiled is None:
                self._compiled = torch.compile(decode_step, fullgraph=True, dynamic=True)
            try:
                if device.type != "cuda":
                    self._compiled(parts, st, self.eos_token_id, penalty)
                    return st
                self._graphs = self._graphs or _Graphs(self._compiled)
                return self._graphs(parts, buffer, st, self.eos_token_id, penalty)
            except Exception:  # a compiler or capture problem must not fail the request
                logger.warning("compiled decoding failed; decoding eagerly from now on", exc_info=True)
                self._failed = True
        decode_step(parts, st, self.eos_token_id, penalty)
        return st

    # ---- the loop ----
    def decode(
        self, parts: DecoderParts, buffer: KVBuffer, pre: Prefilled
    ) -> list[tuple[list[int], list[float]]]:
        """Tokens and log-probabilities of every answer, in answer order."""
        answers = sum(len(row) for row in pre.columns)
        owners = [[answer for answer, *_ in row] for row in pre.columns]  # host copy of column_answer
        longest = max(limit for row in pre.columns for *_, limit in row)
        st, count = self._start(buffer, pre, answers, longest)
        penalty = None if self.repetition_penalty == 1.0 else float(self.repetition_penalty)
        steps = 0
        while steps < longest - 1:
            if steps and steps % self.sync_every == 0:
                (done,) = transfer.read_back(st.done)
                self.syncs += 1
                if all(all(row) for row in done):
                    break
                st, owners = self._compact(buffer, st, count, pre.gen_base, owners, done, steps)
            st = self._window(buffer, st, pre.gen_base, steps, longest)
            step_boundary()
            st = self._run(parts, buffer, st, penalty)
            steps += 1
            self.steps += 1
        count[st.column_answer] = st.count  # the columns still held: their counts
        tokens, logprobs, counts = transfer.read_back(
            st.out_tokens[:answers], st.out_logprobs[:answers], count[:answers]
        )
        self.syncs += 1
        return [(tokens[a][: counts[a]], logprobs[a][: counts[a]]) for a in range(answers)]

    def _start(
        self, buffer: KVBuffer, pre: Prefilled, answers: int, longest: int
    ) -> tuple[DecodeState, torch.Tensor]:
        device = buffer.device
        batch, width = len(pre.columns), max(len(row) for row in pre.columns)
        column_answer = [[answers] * width for _ in range(batch)]
        positions = [[0] * width for _ in range(batch)]
        segments = [[-1] * width for _ in range(batch)]
        limits = [[0] * width for _ in range(batch)]
        for b, row in enumerate(pre.columns):
            for j, (answer, segment, position, limit) in enumerate(row):
                column_answer[b][j], positions[b][j], segments[b][j] = answer, position, segment
                limits[b][j] = limit
        table = to_device([column_answer, positions, segments, limits], device, torch.long)
        column_answer_t, positions_t, segments_t, limit_t = table
        penalty = None if self.repetition_penalty == 1.0 else float(self.repetition_penalty)
        seen = None
        if penalty is not None:
            seen = torch.zeros(answers + 1, pre.first_logits.shape[-1], dtype=torch.bool, device=device)
        first = torch.cat([pre.first_logits, pre.first_logits[:1]])[column_answer_t.view(-1)]
        best, logprob = _pick(first, seen, column_answer_t.view(-1), penalty)
        best, logprob = best.view(batch, width), logprob.view(batch, width)
        out_tokens = torch.zeros(answers + 1, longest, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(answers + 1, longest, dtype=torch.float32, device=device)
        out_tokens[column_answer_t, 0] = best  # padding columns write the trash row
        out_logprobs[column_answer_t, 0] = logprob
        if seen is not None:
            seen[column_answer_t, best] = True
        padding = column_answer_t == answers
        count = torch.ones(batch, width, dtype=torch.long, device=device)
        done = padding | (best == self.eos_token_id) | (limit_t <= 1)
        # the kept tokens each column sees: its own segment and its ancestors, never padding
        key_segment = buffer.segment[:, : pre.gen_base]
        rows = torch.arange(batch, device=device)[:, None, None]
        allowed = pre.visible[rows, segments_t.clamp(min=0)[:, :, None], key_segment.clamp(min=0)[:, None, :]]
        allowed &= (key_segment >= 0)[:, None, :] & ~padding[:, :, None]
        st = DecodeState(
            tokens=best.masked_fill(padding, 0), positions=positions_t,
            slots=pre.gen_base + torch.arange(width, device=device),
            out_col=torch.ones(1, dtype=torch.long, device=device), column_answer=column_answer_t,
            done=done, count=count, limit=limit_t, out_tokens=out_tokens, out_logprobs=out_logprobs, seen=seen,
            allowed=allowed, visible_from=torch.zeros(pre.gen_base, dtype=torch.long, device=device),
            keys=buffer.keys, values=buffer.values, read=None,
        )  # fmt: skip
        return st, torch.zeros(answers + 1, dtype=torch.long, device=device)

    def _window(self, buffer: KVBuffer, st: DecodeState, base: int, steps: int, longest: int) -> DecodeState:
        """Widen the attended gen slots (after the ``base`` kept columns) to the next power of two of
        steps when step ``steps`` needs it."""
        width = st.tokens.shape[1]
        if steps < (st.allowed.shape[-1] - base) // width:
            return st
        need = min(max(MIN_WINDOW, 2 ** math.ceil(math.log2(steps + 1))), longest - 1)
        device = st.tokens.device
        slot = torch.arange(need * width, device=device)
        same = (slot % width)[None, :] == torch.arange(width, device=device)[:, None]  # (W, gen)
        st.allowed = torch.cat([st.allowed[:, :, :base], same[None].expand(st.tokens.shape[0], -1, -1)], -1)
        st.visible_from = torch.cat([st.visible_from[:base], slot // width + 1])
        st.read = None if self.compiled_for(device) else buffer.window(base + need * width)
        return st

    def _compact(
        self, buffer: KVBuffer, st: DecodeState, count: torch.Tensor, base: int, owners: list[list[int]],
        done: list[list[bool]], steps: int,
    ) -> tuple[DecodeState, list[list[int]]]:  # fmt: skip
        """Move the running answers to fewer columns when at most half of every row's columns still run;
        their keys/values of the ``steps`` steps so far move with them, the others' counts are kept."""
        width = st.tokens.shape[1]
        live = [[j for j, finished in enumerate(row) if not finished] for row in done]
        new_width = max(1, max(len(row) for row in live))
        if new_width > width // 2:
            return st, owners
        device = st.tokens.device
        count[st.column_answer] = st.count
        source = [row + [0] * (new_width - len(row)) for row in live]  # old column of each new column
        padding_host = [[j >= len(row) for j in range(new_width)] for row in live]
        index, padding = to_device([source, padding_host], device, torch.long)
        padding = padding.bool()
        old = (torch.arange(steps, device=device)[None, :, None] * width + index[:, None, :]).flatten(
            1
        ) + base
        span = steps * new_width
        for tensor in buffer.tensors():  # (B, capacity, kv_heads, head_dim)
            moved = tensor.gather(1, old[:, :, None, None].expand(-1, -1, tensor.shape[2], tensor.shape[3]))
            tensor[:, base : base + span] = moved
        answers = st.out_tokens.shape[0] - 1
        compacted = DecodeState(
            tokens=st.tokens.gather(1, index), positions=st.positions.gather(1, index),
            slots=base + steps * new_width + torch.arange(new_width, device=device), out_col=st.out_col,
            column_answer=st.column_answer.gather(1, index).masked_fill(padding, answers),
            done=st.done.gather(1, index) | padding, count=st.count.gather(1, index),
            limit=st.limit.gather(1, index), out_tokens=st.out_tokens, out_logprobs=st.out_logprobs,
            seen=st.seen, allowed=st.allowed[:, :, :base].gather(1, index[:, :, None].expand(-1, -1, base))
            & ~padding[:, :, None], visible_from=st.visible_from[:base], keys=st.keys, values=st.values, read=None,
        )  # fmt: skip
        owners = [
            [answers if pad else row[j] for j, pad in zip(src, pads, strict=True)]
            for row, src, pads in zip(owners, source, padding_host, strict=True)
        ]
        return compacted, owners
