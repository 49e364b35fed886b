"""Packing questions into the rows of one forward: segments, their tree, and where each token goes.

A row holds one image's tokens. Its tokens belong to *segments*: the conversation prefix (segment 0),
the text a question shares across regions, each region's ``<mask><pos> ... ASSISTANT:``, each
candidate answer. :class:`SegmentTree` records each segment's parent (a token sees its own segment and
its ancestors only) and where each segment ends (the next position of a child), all on the host, so
packing a forward never reads anything back from the device.
"""

from __future__ import annotations

import numpy as np
import torch

from osprey.runtime.transfer import to_device

ROOT = 0

__all__ = ["ROOT", "Packer", "SegmentTree", "interleaved", "split_question"]


class SegmentTree:
    """Parent pointers of segments and the position after each segment's last token (``ends``);
    ``visible()[a, b]`` is True when ``b`` is ``a`` or an ancestor of ``a``."""

    def __init__(self, parents: list[int] | None = None, ends: dict[int, int] | None = None) -> None:
        self.parents = list(parents) if parents is not None else [-1]
        self.ends = dict(ends) if ends is not None else {}

    def add(self, parent: int) -> int:
        self.parents.append(parent)
        return len(self.parents) - 1

    def copy(self) -> SegmentTree:
        return SegmentTree(self.parents, self.ends)

    def visible_host(self, size: int | None = None) -> np.ndarray:
        """``(size, size)`` bool on the host (default: this tree's size; larger sizes pad with False)."""
        n = len(self.parents)
        vis = np.zeros((size or n, size or n), dtype=bool)
        vis[np.arange(n), np.arange(n)] = True
        for node in range(n):
            parent = self.parents[node]
            while parent >= 0:
                vis[node, parent] = True
                parent = self.parents[parent]
        return vis

    def visible(self, device: torch.device, size: int | None = None) -> torch.Tensor:
        return to_device(self.visible_host(size), device)


def split_question(question, prefix_len: int, mask_token_id: int) -> tuple[tuple[int, ...], list[int]]:
    """``question.ids`` after the prefix -> (text shared by all regions, the region's own part)."""
    suffix = list(question.ids[prefix_len:])
    first_mask = suffix.index(mask_token_id) if mask_token_id in suffix else len(suffix)
    return tuple(suffix[:first_mask]), suffix[first_mask:]


class Packer:
    """The new tokens of one forward, row by row: ids, segments, positions, and the region of each
    ``<mask>`` in row-major order (which region tokens fill them). ``trees`` are this forward's own
    copies: adding a segment extends them."""

    def __init__(self, trees: list[SegmentTree], device: torch.device) -> None:
        self.trees = trees
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
        tree = self.trees[row]
        seg = tree.add(parent)
        start = tree.ends[parent]
        self.ids[row].extend(ids)
        self.segments[row].extend([seg] * len(ids))
        self.positions[row].extend(range(start, start + len(ids)))
        tree.ends[seg] = start + len(ids)
        if region is not None:
            self.regions[row].extend([region] * ids.count(mask_token_id))
        return seg, len(self.ids[row]) - 1

    def __len__(self) -> int:
        return max(len(ids) for ids in self.ids)

    def count(self, token: int) -> int:
        """How many times ``token`` was packed (a placeholder's count, known without the device)."""
        return sum(ids.count(token) for ids in self.ids)

    def width(self) -> int:
        """Tokens the padded forward holds (rows x longest row)."""
        return len(self.ids) * len(self)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, N)`` ids (padding 0), segments (padding -1) and positions (padding 0), on the device."""
        n = len(self)
        table = np.zeros((3, len(self.ids), n), dtype=np.int64)
        table[1] = -1
        for row, (ids, segs, pos) in enumerate(zip(self.ids, self.segments, self.positions, strict=True)):
            table[0, row, : len(ids)] = ids
            table[1, row, : len(segs)] = segs
            table[2, row, : len(pos)] = pos
        out = to_device(table, self.device)
        return out[0], out[1], out[2]

    def visible(self) -> torch.Tensor:
        size = max(len(tree.parents) for tree in self.trees)
        return to_device(np.stack([tree.visible_host(size) for tree in self.trees]), self.device)

    def mask_regions(self) -> list[int]:
        return [region for row in self.regions for region in row]


def interleaved(tasks: list) -> list:
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
