"""The fast path: one image encode, one shared-prefix KV cache, packed region questions.

Every request runs on an :class:`EncodedImage`: the vision features, the projected image tokens
and the decoder's keys/values for the conversation prefix (system prompt, ``USER:`` and the image
tokens). Questions then run as *segments* of one packed sequence on top of that cache: the text a
question shares across regions (e.g. a label-set instruction) is a segment run once per image and
kept; each region's ``<mask><pos>...ASSISTANT:`` is a child segment; candidate answers are
grandchildren. A 4D mask lets each segment see only its ancestors, and positions continue from
the parent, so every token sees exactly what it would in the full single-question prompt.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from osprey.model.llm import KVState, forward_on_state
from osprey.model.modeling import OspreyModel
from osprey.model.prompts import IMAGE_PLACEHOLDER_ID

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

    def visible(self, device: torch.device) -> torch.Tensor:
        n = len(self.parents)
        vis = torch.eye(n, dtype=torch.bool)
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
    n_image = image_tokens.shape[0]
    if prefix_ids.count(IMAGE_PLACEHOLDER_ID) != 1 or prefix_ids[-1] != IMAGE_PLACEHOLDER_ID:
        raise ValueError("the conversation prefix must end with exactly one image placeholder")
    ids = prefix_ids[:-1] + [IMAGE_PLACEHOLDER_ID] * n_image
    ids_t = torch.tensor(ids, device=model.device)
    embeds = model.embed(ids_t, image_tokens=image_tokens)
    tree = SegmentTree()
    n = len(ids)
    _, state = forward_on_state(
        model.llm,
        KVState.empty(model.device),
        embeds=embeds,
        segment=torch.zeros(n, dtype=torch.long, device=model.device),
        position=torch.arange(n, device=model.device),
        visible=tree.visible(model.device),
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
    """Collects segments of one forward: ids, segment ids, positions and placeholder features."""

    def __init__(self, tree: SegmentTree, seg_end: dict[int, int], device: torch.device) -> None:
        self.tree = tree
        self.seg_end = seg_end  # segment -> position after its last token
        self.device = device
        self.ids: list[int] = []
        self.segments: list[int] = []
        self.positions: list[int] = []
        self.mask_rows: list[int] = []  # region index per <mask>/<pos> pair, in order

    def add(
        self, parent: int, ids: list[int], region: int | None = None, mask_token_id: int | None = None
    ) -> tuple[int, int]:
        """Append a segment; returns (segment id, index of its last token in the packed sequence)."""
        seg = self.tree.add(parent)
        start = self.seg_end[parent]
        self.ids.extend(ids)
        self.segments.extend([seg] * len(ids))
        self.positions.extend(range(start, start + len(ids)))
        self.seg_end[seg] = start + len(ids)
        if region is not None:
            self.mask_rows.extend([region] * ids.count(mask_token_id))
        return seg, len(self.ids) - 1

    def __len__(self) -> int:
        return len(self.ids)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def t(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        return t(self.ids), t(self.segments), t(self.positions)


@dataclass
class _Snapshot:
    state: KVState
    tree: SegmentTree
    ends: dict[int, int]
    parents: dict[str, int]  # question key -> its shared segment


class FastRunner:
    """Runs score and generate tasks for many regions of one encoded image."""

    def __init__(self, *, model: OspreyModel, eos_token_id: int, max_batch_tokens: int = 2048) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.max_batch_tokens = max_batch_tokens

    # ---- shared question text, run once per image and kept ----
    def _prepare(self, image: EncodedImage, questions: list[Question]) -> _Snapshot:
        """Run (once per image) the shared text of ``questions``; return a consistent snapshot of the
        image's cache for this request, so other requests extending it meanwhile do no harm."""
        model = self.model
        with image.lock:
            packer = _Packer(image.tree, self._segment_ends(image.state), model.device)
            for q in questions:
                shared, _ = split_question(q, len(image.prefix_ids), model.mask_token_id)
                if shared not in image.shared:
                    seg, _ = packer.add(ROOT, list(shared))
                    image.shared[shared] = seg
            if len(packer):
                ids, seg, pos = packer.tensors()
                _, image.state = forward_on_state(
                    model.llm,
                    image.state,
                    embeds=model.embed(ids),
                    segment=seg,
                    position=pos,
                    visible=image.tree.visible(model.device),
                    logits_at=None,
                )
            parents = {
                q.key: image.shared[split_question(q, len(image.prefix_ids), model.mask_token_id)[0]]
                for q in questions
            }
            return _Snapshot(
                state=image.state,
                tree=image.tree.copy(),
                ends=self._segment_ends(image.state),
                parents=parents,
            )

    @staticmethod
    def _segment_ends(state: KVState) -> dict[int, int]:
        ends: dict[int, int] = {}
        for seg, pos in zip(state.segment.tolist(), state.position.tolist(), strict=True):
            ends[seg] = max(ends.get(seg, 0), pos + 1)
        return ends

    def _region_ids(self, image: EncodedImage, q: Question) -> list[int]:
        return split_question(q, len(image.prefix_ids), self.model.mask_token_id)[1]

    def _embed_packed(
        self, packer: _Packer, ids: torch.Tensor, mask_tokens: torch.Tensor, spatial_tokens: torch.Tensor
    ) -> torch.Tensor:
        rows = torch.tensor(packer.mask_rows, dtype=torch.long, device=ids.device)
        return self.model.embed(ids, mask_tokens=mask_tokens[rows], spatial_tokens=spatial_tokens[rows])

    # ---- closed-set scoring ----
    @torch.inference_mode()
    def score(
        self, image: EncodedImage, tasks: list[ScoreTask], region_tokens: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Fill ``task.log_likelihoods`` for every candidate of every task."""
        if not tasks:
            return
        snap = self._prepare(image, [t.question for t in tasks])
        chunk: list[ScoreTask] = []
        size = 0
        for task in tasks:
            need = len(self._region_ids(image, task.question)) + sum(len(c[1]) for c in task.candidates)
            if chunk and size + need > self.max_batch_tokens:
                self._score_chunk(image, snap, chunk, region_tokens)
                chunk, size = [], 0
            chunk.append(task)
            size += need
        self._score_chunk(image, snap, chunk, region_tokens)

    def _score_chunk(
        self, image: EncodedImage, snap: _Snapshot, tasks: list[ScoreTask], region_tokens
    ) -> None:
        model = self.model
        packer = _Packer(snap.tree.copy(), dict(snap.ends), model.device)
        wanted: list[tuple[ScoreTask, list[int], list[int]]] = []  # task, logit rows per candidate, targets
        logits_at: list[int] = []
        for task in tasks:
            region_seg, region_last = packer.add(
                snap.parents[task.question.key],
                self._region_ids(image, task.question),
                task.region,
                model.mask_token_id,
            )
            for _, cand in task.candidates:
                _, cand_last = packer.add(region_seg, cand)
                first = cand_last - len(cand) + 1
                rows = [region_last] + list(range(first, cand_last))
                wanted.append((task, list(range(len(logits_at), len(logits_at) + len(rows))), cand))
                logits_at.extend(rows)
        ids, seg, pos = packer.tensors()
        embeds = self._embed_packed(packer, ids, *region_tokens)
        logits, _ = forward_on_state(
            model.llm,
            snap.state,
            embeds=embeds,
            segment=seg,
            position=pos,
            visible=packer.tree.visible(model.device),
            logits_at=torch.tensor(logits_at, device=model.device),
        )
        log_probs = logits.log_softmax(-1)
        for task, rows, targets in wanted:
            task.log_likelihoods.append(candidate_log_likelihood(log_probs[rows], targets))

    # ---- greedy generation ----
    @torch.inference_mode()
    def generate(
        self, image: EncodedImage, tasks: list[GenerateTask], region_tokens: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Greedy decoding for every task at once; fills ``task.token_ids`` (ending with ``</s>``
        unless the token limit came first)."""
        if not tasks:
            return
        model = self.model
        snap = self._prepare(image, [t.question for t in tasks])
        packer = _Packer(snap.tree.copy(), dict(snap.ends), model.device)
        seqs: list[tuple[GenerateTask, int]] = []
        last_rows = []
        for task in tasks:
            seg, last = packer.add(
                snap.parents[task.question.key],
                self._region_ids(image, task.question),
                task.region,
                model.mask_token_id,
            )
            seqs.append((task, seg))
            last_rows.append(last)
        ids, seg_t, pos_t = packer.tensors()
        visible = packer.tree.visible(model.device)
        logits, state = forward_on_state(
            model.llm,
            snap.state,
            embeds=self._embed_packed(packer, ids, *region_tokens),
            segment=seg_t,
            position=pos_t,
            visible=visible,
            logits_at=torch.tensor(last_rows, device=model.device),
        )
        next_pos = {seg: packer.seg_end[seg] for _, seg in seqs}
        active = list(range(len(seqs)))
        next_tokens, next_logprobs = _greedy(logits)
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
            tokens = torch.tensor([seqs[i][0].token_ids[-1] for i in active], device=model.device)
            segs = torch.tensor([seqs[i][1] for i in active], device=model.device)
            pos = torch.tensor([next_pos[seqs[i][1]] for i in active], device=model.device)
            for i in active:
                next_pos[seqs[i][1]] += 1
            logits, state = forward_on_state(
                model.llm,
                state,
                embeds=model.embed(tokens),
                segment=segs,
                position=pos,
                visible=visible,
                logits_at=torch.arange(len(active), device=model.device),
            )
            next_tokens, next_logprobs = _greedy(logits)


def _greedy(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Argmax token of each row of ``logits (N, V)`` and its log-probability."""
    log_probs = logits.log_softmax(-1)
    best = log_probs.max(-1)
    return best.indices.tolist(), best.values.tolist()
