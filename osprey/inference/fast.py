"""The fast path: one image encode, one shared-prefix KV cache, packed region questions.

Every request runs on an :class:`EncodedImage`: the vision features, the projected image tokens
and the decoder's keys/values for the conversation prefix (system prompt, ``USER:`` and the image
tokens). Questions then run as *segments* of one packed sequence on top of that cache: the text a
question shares across regions (e.g. a label-set instruction) is a segment run once per image and
kept; each region's ``<mask><pos>...ASSISTANT:`` is a child segment; candidate answers are
grandchildren. A 4D mask lets each segment see only its ancestors, and positions continue from
the parent, so every token sees exactly what it would in the full single-question prompt.

Several images run together as the rows of an :class:`ImageBatch` (one batch row per image, padded
to the longest): their regions share the same forward passes and decoding steps, and each row attends
to its own image only, so every answer is the one that image alone would get.

The host stays out of the device's way: a request copies the cached keys/values once into a
preallocated :class:`~osprey.model.kv.KVBuffer` (from a pool, so the same memory serves request after
request) and every forward writes its new tokens into it in place; what to pack where is decided from
the host's own record of the segments (:mod:`osprey.inference.packing`), never read back. Closed-set
candidates are scored with one gather and one ``logsumexp`` per chunk, their log-likelihoods summed on
the device and read back once per :meth:`FastRunner.score` call; free text is decoded by
:class:`~osprey.inference.decode.GreedyDecoder`, which reads the device once every few steps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from osprey.model.kv import BufferPool, KVBuffer, KVState
from osprey.model.llm import decoder_parts, embed_tokens, forward_on_buffer, forward_on_state, logits_of
from osprey.model.modeling import OspreyModel
from osprey.model.prompts import IMAGE_PLACEHOLDER_ID
from osprey.runtime import transfer
from osprey.runtime.steps import acquire, step_boundary
from osprey.runtime.transfer import to_device

from .decode import GreedyDecoder, Prefilled
from .packing import ROOT, Packer, SegmentTree, interleaved, split_question
from .plan import GenerateTask, Question, ScoreTask

__all__ = [
    "EncodedImage", "FastRunner", "ImageBatch", "ImageFeatures", "SegmentTree", "batch_images",
    "encode_image", "encode_prefix", "split_question",
]  # fmt: skip


@dataclass
class EncodedImage:
    """Everything about one image that does not depend on the regions (see module docstring)."""

    image_hw: tuple[int, int]
    features: dict[str, torch.Tensor]
    image_tokens: torch.Tensor
    prefix_ids: tuple[int, ...]
    state: KVState
    tree: SegmentTree
    shared: dict[tuple[int, ...], int] = field(default_factory=dict)  # shared text ids -> segment
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __getstate__(self) -> dict:  # for the on-disk feature cache: a lock cannot be pickled
        state = dict(self.__dict__)
        del state["lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()


@dataclass
class ImageFeatures:
    """What the host and disk caches keep of an :class:`EncodedImage`: the vision features and image
    tokens (~20 MB for the 7B model in bf16), not the prefix keys/values (~0.56 GB), which one decoder
    forward rebuilds (:func:`encode_prefix`)."""

    image_hw: tuple[int, int]
    features: dict[str, torch.Tensor]
    image_tokens: torch.Tensor
    prefix_ids: tuple[int, ...]

    @classmethod
    def of(cls, image: EncodedImage) -> ImageFeatures:
        return cls(image.image_hw, dict(image.features), image.image_tokens, image.prefix_ids)


@dataclass
class ImageBatch:
    """Images side by side as the rows of one cache (:func:`batch_images`); tasks name their row with
    ``task.image``. A batch of one made from an :class:`EncodedImage` (``source``) writes the shared
    question text it runs back into that image, so later requests reuse it."""

    prefix_ids: tuple[int, ...]
    state: KVState
    trees: list[SegmentTree]
    shared: list[dict[tuple[int, ...], int]]
    lock: threading.Lock
    source: EncodedImage | None = None

    @classmethod
    def of(cls, image: EncodedImage) -> ImageBatch:
        return cls(image.prefix_ids, image.state, [image.tree], [image.shared], image.lock, source=image)

    def set_state(self, state: KVState) -> None:
        self.state = state
        if self.source is not None:
            self.source.state = state


def batch_images(images: list[EncodedImage]) -> ImageBatch:
    """Several images as one batch: row ``b`` is ``images[b]`` (its prefix and the shared question text
    it already ran), shorter rows padded. The keys/values are copied (~0.56 GB per 7B image in bf16)."""
    if not images:
        raise ValueError("batch_images needs at least one encoded image")
    if len({image.prefix_ids for image in images}) != 1:
        raise ValueError("images encoded with different conversation prefixes cannot share a batch")
    if len(images) == 1:
        return ImageBatch.of(images[0])
    for image in images:
        _ensure_ends(image.tree, image.state, row=0)
    return ImageBatch(
        prefix_ids=images[0].prefix_ids,
        state=KVState.stack([image.state for image in images]),
        trees=[image.tree.copy() for image in images],
        shared=[dict(image.shared) for image in images],
        lock=threading.Lock(),
    )


def _ensure_ends(tree: SegmentTree, state: KVState, *, row: int) -> None:
    """Fill ``tree.ends`` from the state when the tree was made without them (once per tree: a read)."""
    if ROOT in tree.ends:
        return
    (segments, positions) = transfer.read_back(state.segment[row], state.position[row])
    for seg, pos in zip(segments, positions, strict=True):
        if seg >= 0:
            tree.ends[seg] = max(tree.ends.get(seg, 0), pos + 1)


@torch.inference_mode()
def encode_image(
    model: OspreyModel, pixels: torch.Tensor, image_hw: tuple[int, int], prefix_ids: list[int]
) -> EncodedImage:
    """Vision features, image tokens and the prefix KV cache of one image."""
    features, image_tokens = model.encode_pixels(pixels)
    return encode_prefix(model, features, image_tokens, image_hw, prefix_ids)


@torch.inference_mode()
def encode_prefix(
    model: OspreyModel,
    features: dict[str, torch.Tensor],
    image_tokens: torch.Tensor,
    image_hw: tuple[int, int],
    prefix_ids: list[int],
) -> EncodedImage:
    """The conversation prefix (system prompt, ``USER:``, the image tokens) run through the decoder."""
    n_image = image_tokens.shape[0]
    if prefix_ids.count(IMAGE_PLACEHOLDER_ID) != 1 or prefix_ids[-1] != IMAGE_PLACEHOLDER_ID:
        raise ValueError("the conversation prefix must end with exactly one image placeholder")
    ids = prefix_ids[:-1] + [IMAGE_PLACEHOLDER_ID] * n_image
    device = model.device
    embeds = model.embed(to_device([ids], device), image_tokens=image_tokens, counts={"image": n_image})
    tree = SegmentTree(ends={ROOT: len(ids)})
    n = len(ids)
    _, state = forward_on_state(
        model.llm,
        KVState.empty(device),
        embeds=embeds,
        segment=torch.zeros(1, n, dtype=torch.long, device=device),
        position=torch.arange(n, device=device)[None],
        visible=tree.visible(device)[None],
        logits_at=None,
    )
    return EncodedImage(
        image_hw=image_hw,
        features=features,
        image_tokens=image_tokens,
        prefix_ids=tuple(prefix_ids),
        state=state,
        tree=tree,
    )


@dataclass
class _Snapshot:
    state: KVState
    trees: list[SegmentTree]
    parents: dict[tuple[int, str], int]  # (row, question key) -> its shared segment


class FastRunner:
    """Runs score and generate tasks for many regions of one encoded image, or of an
    :class:`ImageBatch` of several.

    ``max_batch_tokens`` bounds one scoring forward (padded rows x tokens); ``max_decode_rows`` the
    answers decoded together (None: all of a call), each group with its own keys/values; both follow
    from a memory budget with :meth:`fit_to` (:mod:`osprey.inference.memory`). ``decoder`` runs the
    greedy steps (its ``sync_every`` and ``compile``)."""

    def __init__(
        self,
        *,
        model: OspreyModel,
        eos_token_id: int,
        max_batch_tokens: int = 2048,
        repetition_penalty: float = 1.0,
    ) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.max_batch_tokens = max_batch_tokens
        self.max_decode_rows: int | None = None
        # on the tokens each answer generated so far (a prompt given as embeddings has no ids to penalise)
        self.repetition_penalty = repetition_penalty
        self.decoder = GreedyDecoder(eos_token_id=eos_token_id, repetition_penalty=repetition_penalty)
        self.pool = BufferPool()

    def set_decoding(self, *, compile: str = "auto", sync_every: int = 8) -> None:
        """Decode compiled or not (``"auto"``: compiled on CUDA) and read the finished flags every
        ``sync_every`` steps (see :class:`~osprey.inference.decode.GreedyDecoder`)."""
        self.decoder = GreedyDecoder(
            eos_token_id=self.eos_token_id, sync_every=sync_every, compile=compile,
            repetition_penalty=self.repetition_penalty,
        )  # fmt: skip

    def fit_to(self, work_bytes: int, *, max_new_tokens: int) -> None:
        """Size the scoring chunks and the decoding groups so one call's working memory (its keys/values
        buffer, activations and logits) stays within ``work_bytes`` (see
        :func:`osprey.inference.memory.fit_work`)."""
        from .memory import fit_work

        self.max_batch_tokens, self.max_decode_rows = fit_work(
            self.model, work_bytes, max_new_tokens=max_new_tokens
        )

    # ---- shared question text, run once per image and kept ----
    def _prepare(self, batch: ImageBatch, tasks: list) -> _Snapshot:
        """Run (once per image) the shared text of the tasks' questions; return a consistent snapshot of
        the cache for this request, so other requests extending it meanwhile do no harm."""
        model = self.model
        wanted = {(t.image, t.question.key): t.question for t in tasks}
        with acquire(batch.lock):  # another request of this image may hold it, stepped aside
            for row, tree in enumerate(batch.trees):
                _ensure_ends(tree, batch.state, row=row)
            packer = Packer(batch.trees, model.device)  # the batch's own trees: new segments are kept
            for (row, _), q in wanted.items():
                shared, _ = split_question(q, len(batch.prefix_ids), model.mask_token_id)
                if shared not in batch.shared[row]:
                    seg, _ = packer.add(row, ROOT, list(shared))
                    batch.shared[row][shared] = seg
            if len(packer):
                ids, seg, pos = packer.tensors()
                _, state = forward_on_state(
                    model.llm,
                    batch.state,
                    embeds=embed_tokens(model.llm)(ids),  # shared text: no placeholders
                    segment=seg,
                    position=pos,
                    visible=packer.visible(),
                    logits_at=None,
                )
                batch.set_state(state)
            parents = {
                (row, key): batch.shared[row][
                    split_question(q, len(batch.prefix_ids), model.mask_token_id)[0]
                ]
                for (row, key), q in wanted.items()
            }
            return _Snapshot(state=batch.state, trees=[tree.copy() for tree in batch.trees], parents=parents)

    def _region_ids(self, batch: ImageBatch, q: Question) -> list[int]:
        return split_question(q, len(batch.prefix_ids), self.model.mask_token_id)[1]

    def _embed_packed(
        self,
        packer: Packer,
        ids: torch.Tensor,
        mask_tokens: torch.Tensor,
        spatial_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows = to_device(packer.mask_regions(), ids.device, torch.long)
        embed_regions = getattr(self.model, "embed_regions", None)
        if embed_regions is not None:  # a model whose region spans several placeholders (PixelRefer-Lite)
            return embed_regions(ids, rows, mask_tokens)
        model = self.model
        counts = {"<mask>": packer.count(model.mask_token_id), "<pos>": packer.count(model.pos_token_id)}
        return model.embed(
            ids, mask_tokens=mask_tokens[rows], spatial_tokens=spatial_tokens[rows], counts=counts
        )

    @staticmethod
    def _batch(image: EncodedImage | ImageBatch) -> ImageBatch:
        return image if isinstance(image, ImageBatch) else ImageBatch.of(image)

    def _buffer(self, state: KVState, new_tokens: int) -> KVBuffer:
        parts = decoder_parts(self.model.llm)
        return KVBuffer.from_state(
            state, capacity=state.length + new_tokens, layout=parts.layout(), pool=self.pool
        )

    # ---- closed-set scoring ----
    @torch.inference_mode()
    def score(
        self,
        image: EncodedImage | ImageBatch,
        tasks: list[ScoreTask],
        region_tokens: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Fill ``task.log_likelihoods`` for every candidate of every task. ``region_tokens`` are
        ``(mask tokens (R, D), spatial tokens (R, D))``, indexed by ``task.region``. Every chunk's
        log-likelihoods stay on the device; they are read back once, at the end."""
        if not tasks:
            return
        step_boundary()
        batch = self._batch(image)
        snap = self._prepare(batch, tasks)
        chunks, widths = self._chunks(batch, tasks)
        candidates = sum(len(task.candidates) for task in tasks)
        totals = torch.zeros(candidates, dtype=torch.float32, device=self.model.device)
        buffer = self._buffer(snap.state, max(widths))
        try:
            first = 0
            for i, chunk in enumerate(chunks):
                if i:
                    step_boundary()
                first = self._score_chunk(batch, snap, buffer, chunk, region_tokens, totals, first)
        finally:
            self.pool.give(buffer)
        (values,) = transfer.read_back(totals)
        start = 0
        for chunk in chunks:
            for task in chunk:
                task.log_likelihoods.extend(values[start : start + len(task.candidates)])
                start += len(task.candidates)

    def _chunks(self, batch: ImageBatch, tasks: list[ScoreTask]) -> tuple[list[list[ScoreTask]], list[int]]:
        """Tasks grouped so that each chunk's padded width (rows x longest row) fits ``max_batch_tokens``;
        and each chunk's longest row."""
        chunks: list[list[ScoreTask]] = [[]]
        widths = [0]
        sizes = [0] * len(batch.trees)
        for task in interleaved(tasks):
            need = len(self._region_ids(batch, task.question)) + sum(len(c[1]) for c in task.candidates)
            grown = list(sizes)
            grown[task.image] += need
            if chunks[-1] and max(grown) * sum(1 for s in grown if s) > self.max_batch_tokens:
                chunks.append([])
                widths.append(0)
                grown = [0] * len(sizes)
                grown[task.image] = need
            chunks[-1].append(task)
            sizes = grown
            widths[-1] = max(sizes)
        return chunks, widths

    def _score_chunk(
        self, batch: ImageBatch, snap: _Snapshot, buffer: KVBuffer, tasks: list[ScoreTask], region_tokens,
        totals: torch.Tensor, first: int,
    ) -> int:  # fmt: skip
        """One forward for ``tasks``; adds each candidate's log-likelihood (candidates numbered from
        ``first`` in task order) into ``totals``; returns the next candidate number."""
        model = self.model
        device = model.device
        packer = Packer([tree.copy() for tree in snap.trees], device)
        at_rows: list[int] = []
        at_index: list[int] = []
        targets: list[int] = []
        owner: list[int] = []  # candidate number of every scored token
        number = first
        for task in tasks:
            region_seg, region_last = packer.add(
                task.image,
                snap.parents[(task.image, task.question.key)],
                self._region_ids(batch, task.question),
                task.region,
                model.mask_token_id,
            )
            for _, cand in task.candidates:
                _, cand_last = packer.add(task.image, region_seg, cand)
                start = cand_last - len(cand) + 1
                positions = [region_last, *range(start, cand_last)]  # each predicts the next candidate token
                at_rows.extend([task.image] * len(positions))
                at_index.extend(positions)
                targets.extend(cand)
                owner.extend([number - first] * len(cand))
                number += 1
        ids, seg, pos = packer.tensors()
        hidden = forward_on_buffer(
            decoder_parts(model.llm), buffer, embeds=self._embed_packed(packer, ids, *region_tokens),
            segment=seg, position=pos, visible=packer.visible(), between_layers=step_boundary,
        )  # fmt: skip
        rows, index, target, owners = to_device([at_rows, at_index, targets, owner], device, torch.long)
        logits = logits_of(decoder_parts(model.llm), hidden[rows, index])  # (M, V) float32
        token_ll = logits.gather(1, target[:, None])[:, 0] - logits.logsumexp(-1)
        totals[first:number].index_add_(0, owners, token_ll)
        return number

    # ---- greedy generation ----
    @torch.inference_mode()
    def generate(
        self,
        image: EncodedImage | ImageBatch,
        tasks: list[GenerateTask],
        region_tokens: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Greedy decoding for every task at once (in groups of ``max_decode_rows``); fills
        ``task.token_ids`` (ending with ``</s>`` unless the token limit came first)."""
        if not tasks:
            return
        step_boundary()
        batch = self._batch(image)
        snap = self._prepare(batch, tasks)
        group = self.max_decode_rows or len(tasks)
        for start in range(0, len(tasks), group):
            if start:
                step_boundary()
            self._generate_group(batch, snap, tasks[start : start + group], region_tokens)

    def _generate_group(self, batch: ImageBatch, snap: _Snapshot, tasks: list[GenerateTask], region_tokens):
        model = self.model
        parts = decoder_parts(model.llm)
        packer = Packer([tree.copy() for tree in snap.trees], model.device)
        columns: list[list[tuple[int, int, int, int]]] = [[] for _ in snap.trees]
        last_rows, last_index = [], []
        for answer, task in enumerate(tasks):
            seg, index = packer.add(
                task.image,
                snap.parents[(task.image, task.question.key)],
                self._region_ids(batch, task.question),
                task.region,
                model.mask_token_id,
            )
            columns[task.image].append((answer, seg, packer.trees[task.image].ends[seg], task.max_new_tokens))
            last_rows.append(task.image)
            last_index.append(index)
        width = max(len(row) for row in columns)
        longest = max(task.max_new_tokens for task in tasks)
        buffer = self._buffer(snap.state, len(packer) + width * max(longest - 1, 0))
        try:
            ids, seg_t, pos_t = packer.tensors()
            visible = packer.visible()
            hidden = forward_on_buffer(
                parts, buffer, embeds=self._embed_packed(packer, ids, *region_tokens), segment=seg_t,
                position=pos_t, visible=visible, between_layers=step_boundary,
            )  # fmt: skip
            rows, index = to_device([last_rows, last_index], model.device, torch.long)
            first_logits = logits_of(parts, hidden[rows, index])  # (answers, V)
            buffer.length += len(packer)  # the region segments stay: every answer attends to its own
            pre = Prefilled(
                columns=columns, first_logits=first_logits, gen_base=buffer.length, visible=visible
            )
            out = self.decoder.decode(parts, buffer, pre)
        finally:
            self.pool.give(buffer)
        for task, (tokens, logprobs) in zip(tasks, out, strict=True):
            task.token_ids.extend(tokens)
            task.token_logprobs.extend(logprobs)
