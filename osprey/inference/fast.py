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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from osprey.model.llm import KVState, forward_on_state
from osprey.model.modeling import OspreyModel
from osprey.model.prompts import IMAGE_PLACEHOLDER_ID
from osprey.runtime.steps import acquire, step_boundary

from .plan import GenerateTask, Question, ScoreTask, candidate_log_likelihood

ROOT = 0


class SegmentTree:
    """Parent pointers of segments; ``visible()[a, b]`` is True when ``b`` is ``a`` or an ancestor."""

    def __init__(self, parents: list[int] | None = None) -> None:
        self.parents = list(parents) if parents is not None else [-1]

    def add(self, parent: int) -> int:
        self.parents.append(parent)
        return len(self.parents) - 1

    def copy(self) -> SegmentTree:
        return SegmentTree(self.parents)

    def visible(self, device: torch.device, size: int | None = None) -> torch.Tensor:
        """``(size, size)`` bool (default: this tree's size; larger sizes pad with False)."""
        n = len(self.parents)
        vis = torch.zeros(size or n, size or n, dtype=torch.bool)
        vis[:n, :n] = torch.eye(n, dtype=torch.bool)
        for node in range(n):
            parent = self.parents[node]
            while parent >= 0:
                vis[node, parent] = True
                parent = self.parents[parent]
        return vis.to(device)


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
    return ImageBatch(
        prefix_ids=images[0].prefix_ids,
        state=KVState.stack([image.state for image in images]),
        trees=[image.tree.copy() for image in images],
        shared=[dict(image.shared) for image in images],
        lock=threading.Lock(),
    )


def split_question(
    question: Question, prefix_len: int, mask_token_id: int
) -> tuple[tuple[int, ...], list[int]]:
    """``question.ids`` after the prefix -> (text shared by all regions, the region's own part)."""
    suffix = list(question.ids[prefix_len:])
    first_mask = suffix.index(mask_token_id) if mask_token_id in suffix else len(suffix)
    return tuple(suffix[:first_mask]), suffix[first_mask:]


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
    ids_t = torch.tensor([ids], device=model.device)
    embeds = model.embed(ids_t, image_tokens=image_tokens)
    tree = SegmentTree()
    n = len(ids)
    _, state = forward_on_state(
        model.llm,
        KVState.empty(model.device),
        embeds=embeds,
        segment=torch.zeros(1, n, dtype=torch.long, device=model.device),
        position=torch.arange(n, device=model.device)[None],
        visible=tree.visible(model.device)[None],
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


class _Packer:
    """The new tokens of one forward, row by row: ids, segments, positions, and the region of each
    ``<mask>`` in row-major order (which region tokens fill them)."""

    def __init__(self, trees: list[SegmentTree], ends: list[dict[int, int]], device: torch.device) -> None:
        self.trees = trees
        self.ends = ends  # per row: segment -> position after its last token
        self.device = device
        self.ids: list[list[int]] = [[] for _ in trees]
        self.segments: list[list[int]] = [[] for _ in trees]
        self.positions: list[list[int]] = [[] for _ in trees]
        self.regions: list[list[int]] = [[] for _ in trees]  # per row, region of each <mask>

    def add(
        self,
        row: int,
        parent: int,
        ids: list[int],
        region: int | None = None,
        mask_token_id: int | None = None,
    ) -> tuple[int, int]:
        """Append a segment to ``row``; returns (segment id, index of its last token in the row)."""
        seg = self.trees[row].add(parent)
        start = self.ends[row][parent]
        self.ids[row].extend(ids)
        self.segments[row].extend([seg] * len(ids))
        self.positions[row].extend(range(start, start + len(ids)))
        self.ends[row][seg] = start + len(ids)
        if region is not None:
            self.regions[row].extend([region] * ids.count(mask_token_id))
        return seg, len(self.ids[row]) - 1

    def __len__(self) -> int:
        return max(len(ids) for ids in self.ids)

    def width(self) -> int:
        """Tokens the padded forward holds (rows x longest row)."""
        return len(self.ids) * len(self)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, N)`` ids (padding 0), segments (padding -1) and positions (padding 0)."""
        n = len(self)

        def t(rows: list[list[int]], pad: int) -> torch.Tensor:
            return torch.tensor(
                [r + [pad] * (n - len(r)) for r in rows], dtype=torch.long, device=self.device
            )

        return t(self.ids, 0), t(self.segments, -1), t(self.positions, 0)

    def visible(self) -> torch.Tensor:
        size = max(len(tree.parents) for tree in self.trees)
        return torch.stack([tree.visible(self.device, size) for tree in self.trees])

    def mask_regions(self) -> list[int]:
        return [region for row in self.regions for region in row]


@dataclass
class _Snapshot:
    state: KVState
    trees: list[SegmentTree]
    ends: list[dict[int, int]]
    parents: dict[tuple[int, str], int]  # (row, question key) -> its shared segment


class FastRunner:
    """Runs score and generate tasks for many regions of one encoded image, or of an
    :class:`ImageBatch` of several."""

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
        # on the tokens each answer generated so far (a prompt given as embeddings has no ids to penalise)
        self.repetition_penalty = repetition_penalty

    # ---- shared question text, run once per image and kept ----
    def _prepare(self, batch: ImageBatch, tasks: list) -> _Snapshot:
        """Run (once per image) the shared text of the tasks' questions; return a consistent snapshot of
        the cache for this request, so other requests extending it meanwhile do no harm."""
        model = self.model
        wanted = {(t.image, t.question.key): t.question for t in tasks}
        with acquire(batch.lock):  # another request of this image may hold it, stepped aside
            packer = _Packer(batch.trees, self._segment_ends(batch.state), model.device)
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
                    embeds=model.embed(ids),
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
            return _Snapshot(
                state=batch.state,
                trees=[tree.copy() for tree in batch.trees],
                ends=self._segment_ends(batch.state),
                parents=parents,
            )

    @staticmethod
    def _segment_ends(state: KVState) -> list[dict[int, int]]:
        out = []
        for segments, positions in zip(state.segment.tolist(), state.position.tolist(), strict=True):
            ends: dict[int, int] = {}
            for seg, pos in zip(segments, positions, strict=True):
                if seg >= 0:
                    ends[seg] = max(ends.get(seg, 0), pos + 1)
            out.append(ends)
        return out

    def _region_ids(self, batch: ImageBatch, q: Question) -> list[int]:
        return split_question(q, len(batch.prefix_ids), self.model.mask_token_id)[1]

    def _embed_packed(
        self,
        packer: _Packer,
        ids: torch.Tensor,
        mask_tokens: torch.Tensor,
        spatial_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows = torch.tensor(packer.mask_regions(), dtype=torch.long, device=ids.device)
        embed_regions = getattr(self.model, "embed_regions", None)
        if embed_regions is not None:  # a model whose region spans several placeholders (PixelRefer-Lite)
            return embed_regions(ids, rows, mask_tokens)
        return self.model.embed(ids, mask_tokens=mask_tokens[rows], spatial_tokens=spatial_tokens[rows])

    @staticmethod
    def _batch(image: EncodedImage | ImageBatch) -> ImageBatch:
        return image if isinstance(image, ImageBatch) else ImageBatch.of(image)

    # ---- closed-set scoring ----
    @torch.inference_mode()
    def score(
        self,
        image: EncodedImage | ImageBatch,
        tasks: list[ScoreTask],
        region_tokens: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Fill ``task.log_likelihoods`` for every candidate of every task. ``region_tokens`` are
        ``(mask tokens (R, D), spatial tokens (R, D))``, indexed by ``task.region``."""
        if not tasks:
            return
        step_boundary()
        batch = self._batch(image)
        snap = self._prepare(batch, tasks)
        chunk: list[ScoreTask] = []
        sizes = [0] * len(batch.trees)
        for task in _interleaved(tasks):
            need = len(self._region_ids(batch, task.question)) + sum(len(c[1]) for c in task.candidates)
            grown = list(sizes)
            grown[task.image] += need
            if chunk and max(grown) * sum(1 for s in grown if s) > self.max_batch_tokens:  # padded width
                self._score_chunk(batch, snap, chunk, region_tokens)
                step_boundary()
                chunk, grown = [], [0] * len(sizes)
                grown[task.image] = need
            chunk.append(task)
            sizes = grown
        self._score_chunk(batch, snap, chunk, region_tokens)

    def _score_chunk(self, batch: ImageBatch, snap: _Snapshot, tasks: list[ScoreTask], region_tokens) -> None:
        model = self.model
        packer = _Packer([tree.copy() for tree in snap.trees], [dict(e) for e in snap.ends], model.device)
        wanted: list[tuple[ScoreTask, list[int], list[int]]] = []  # task, logit rows per candidate, targets
        at_rows: list[int] = []
        at_index: list[int] = []
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
                first = cand_last - len(cand) + 1
                positions = [region_last] + list(range(first, cand_last))
                wanted.append((task, list(range(len(at_index), len(at_index) + len(positions))), cand))
                at_rows.extend([task.image] * len(positions))
                at_index.extend(positions)
        ids, seg, pos = packer.tensors()
        logits, _ = forward_on_state(
            model.llm,
            snap.state,
            embeds=self._embed_packed(packer, ids, *region_tokens),
            segment=seg,
            position=pos,
            visible=packer.visible(),
            logits_at=(
                torch.tensor(at_rows, device=model.device),
                torch.tensor(at_index, device=model.device),
            ),
        )
        log_probs = logits.log_softmax(-1)
        for task, rows, targets in wanted:
            task.log_likelihoods.append(candidate_log_likelihood(log_probs[rows], targets))

    # ---- greedy generation ----
    @torch.inference_mode()
    def generate(
        self,
        image: EncodedImage | ImageBatch,
        tasks: list[GenerateTask],
        region_tokens: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Greedy decoding for every task at once; fills ``task.token_ids`` (ending with ``</s>``
        unless the token limit came first)."""
        if not tasks:
            return
        step_boundary()
        model = self.model
        batch = self._batch(image)
        snap = self._prepare(batch, tasks)
        packer = _Packer([tree.copy() for tree in snap.trees], [dict(e) for e in snap.ends], model.device)
        seqs: list[tuple[GenerateTask, int]] = []
        last = []
        for task in tasks:
            seg, index = packer.add(
                task.image,
                snap.parents[(task.image, task.question.key)],
                self._region_ids(batch, task.question),
                task.region,
                model.mask_token_id,
            )
            seqs.append((task, seg))
            last.append(index)
        ids, seg_t, pos_t = packer.tensors()
        visible = packer.visible()
        logits, state = forward_on_state(
            model.llm,
            snap.state,
            embeds=self._embed_packed(packer, ids, *region_tokens),
            segment=seg_t,
            position=pos_t,
            visible=visible,
            logits_at=(
                torch.tensor([t.image for t, _ in seqs], device=model.device),
                torch.tensor(last, device=model.device),
            ),
        )
        next_pos = [packer.ends[task.image][seg] for task, seg in seqs]
        active = list(range(len(seqs)))
        next_tokens, next_logprobs = self._pick(logits, [seqs[i][0] for i in active])
        while active:
            still = []
            for i, token, logprob in zip(active, next_tokens, next_logprobs, strict=True):
                task = seqs[i][0]
                task.token_ids.append(token)
                task.token_logprobs.append(logprob)
                if token != self.eos_token_id and len(task.token_ids) < task.max_new_tokens:
                    still.append(i)
            active = still
            if not active:
                break
            step_boundary()
            state, logits = self._step(state, visible, [(seqs[i], next_pos[i]) for i in active])
            for i in active:
                next_pos[i] += 1
            next_tokens, next_logprobs = self._pick(logits, [seqs[i][0] for i in active])

    def _pick(self, logits: torch.Tensor, tasks: list[GenerateTask]) -> tuple[list[int], list[float]]:
        """The next token of each task (a row of ``logits``) and its log-probability."""
        if self.repetition_penalty == 1.0:
            return _greedy(logits)
        return _greedy_penalised(logits, [task.token_ids for task in tasks], self.repetition_penalty)

    def _step(self, state: KVState, visible: torch.Tensor, active: list) -> tuple[KVState, torch.Tensor]:
        """One decoding step: each active task's last token in its row (rows padded to the row with the
        most active tasks); returns the new state and the logits in ``active``'s order."""
        model = self.model
        rows: list[list[tuple[int, int, int]]] = [
            [] for _ in range(state.batch)
        ]  # (token, segment, position)
        where = []
        for (task, seg), position in active:
            where.append((task.image, len(rows[task.image])))
            rows[task.image].append((task.token_ids[-1], seg, position))
        n = max(len(r) for r in rows)

        def column(k: int, pad: int) -> torch.Tensor:
            return torch.tensor(
                [[item[k] for item in r] + [pad] * (n - len(r)) for r in rows],
                dtype=torch.long,
                device=model.device,
            )

        logits, state = forward_on_state(
            model.llm,
            state,
            embeds=model.embed(column(0, 0)),
            segment=column(1, -1),
            position=column(2, 0),
            visible=visible,
            logits_at=(
                torch.tensor([r for r, _ in where], device=model.device),
                torch.tensor([i for _, i in where], device=model.device),
            ),
        )
        return state, logits


def _interleaved(tasks: list) -> list:
    """Tasks taken from each image in turn, so every chunk fills the batch rows evenly (a row the
    chunk does not use would be padding all the way)."""
    seen: dict[int, int] = {}
    rank = []
    for task in tasks:
        rank.append(seen.get(task.image, 0))
        seen[task.image] = rank[-1] + 1
    return [
        task
        for _, _, task in sorted(
            zip(rank, range(len(tasks)), tasks, strict=True), key=lambda t: (t[0], t[2].image)
        )
    ]


def _greedy_penalised(
    logits: torch.Tensor, previous: list[list[int]], penalty: float
) -> tuple[list[int], list[float]]:
    """Greedy choice after transformers' repetition penalty on each row's ``previous`` tokens (a positive
    logit divided by ``penalty``, a negative one multiplied); the log-probability is the model's own."""
    scores = logits.clone()
    for row, ids in enumerate(previous):
        if ids:
            index = torch.tensor(ids, device=logits.device)
            picked = scores[row, index]
            scores[row, index] = torch.where(picked < 0, picked * penalty, picked / penalty)
    best = scores.argmax(-1)
    log_probs = logits.log_softmax(-1).gather(1, best[:, None])[:, 0]
    return best.tolist(), log_probs.tolist()


def _greedy(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Argmax token of each row of ``logits (N, V)`` and its log-probability."""
    log_probs = logits.log_softmax(-1)
    best = log_probs.max(-1)
    return best.indices.tolist(), best.values.tolist()
