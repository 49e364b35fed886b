"""Host reads of device values and dispatched operations while labelling, counted on the CPU.

Every value the host reads back from the device (``.item()``, ``.tolist()``, ``int(tensor)``, a
boolean mask's ``nonzero``...) makes the host wait until the device has run everything queued before it:
a *sync*. On a GPU a decoding step that syncs cannot run ahead of the host, and a step made of many
small operations is bound by their launches. This bench counts both on the CPU, where the same code runs:

- a :class:`torch.utils._python_dispatch.TorchDispatchMode` sees every operation and the reads that go
  through the dispatcher (``_local_scalar_dense``, ``nonzero``, ``masked_select``, boolean indexing...);
- a :class:`torch.overrides.TorchFunctionMode` sees ``Tensor.tolist()`` / ``.numpy()`` / ``.item()``;
- a read counts only when its tensor came from the model (an output of an operation on the model's
  weights or on another such output), so host-side arithmetic on host numbers is not a sync.

For 1, 20 and 60 regions x 5 fields (tiny and small presets, fresh encodings), it prints per image: syncs
(whole ``label()``, and inside the fast path's ``score``/``generate``), decode steps, syncs per decode
step (generate's syncs over its steps, prefill included), dispatched operations per decode step (inside
the step: the old ``FastRunner._step`` + the greedy pick, or ``decode_step``), and with 32 category
labels instead of 8 (syncs must not grow with the candidates).

    python bench/syncs.py                       # this checkout
    python bench/syncs.py --json
    PYTHONPATH=/tmp/before python bench/syncs.py  # another checkout's osprey/ (e.g. a git worktree)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.append(str(Path(__file__).resolve().parents[1]))  # PYTHONPATH, when set, comes first

from regions import make_scene as scene  # noqa: E402  (bench/, beside this file)

from osprey.inference.api import Osprey  # noqa: E402
from osprey.inference.fields import LabelRequest  # noqa: E402

SYNC_OPS = {
    "aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
    "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor", "aten.is_nonzero.default", "aten.item.default",
}  # fmt: skip
READS = {"tolist", "numpy", "item"}
CATEGORIES = ("person", "dog", "cat", "car", "bicycle", "tree", "chair", "bottle")
MANY = tuple(f"thing {i}" for i in range(32))


class Counts(TorchDispatchMode):
    """Operations and syncs (see the module docstring); ``region`` names the counter currently added to."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.tainted: dict[int, bool] = {}  # storage -> whether it holds what the model computed
        for tensor in [*model.parameters(), *model.buffers()]:
            self.mark(tensor, True)
        self.totals: collections.Counter = collections.Counter()
        self.scopes: list[str] = []
        self.quiet = False  # inside one read_back: its reads are one synchronisation

    def add(self, key: str, n: int = 1) -> None:
        self.totals[key] += n
        for scope in self.scopes:
            self.totals[f"{scope}:{key}"] += n

    def mark(self, tensor: torch.Tensor, value: bool) -> None:
        self.tainted[tensor.untyped_storage()._cdata] = value

    def is_device(self, tensor) -> bool:
        """Whether ``tensor``'s storage holds what the model computed (a view, or a write into a view,
        counts for its whole storage)."""
        return isinstance(tensor, torch.Tensor) and self.tainted.get(tensor.untyped_storage()._cdata, False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        from_device = any(self.is_device(a) for a in inputs)
        self.add("ops")
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(  # args[1]: the indices
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in tree_flatten(args[1])[0]
        )
        if from_device and (name in SYNC_OPS or bool_index):
            self.add("syncs")
        out = func(*args, **kwargs)
        known = {a.untyped_storage()._cdata for a in inputs}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            fresh = tensor.untyped_storage()._cdata not in known or name.startswith("aten.lift_fresh")
            if fresh:  # a new storage (perhaps where a freed one was): the model's when its inputs were
                self.mark(tensor, from_device and not name.startswith("aten.lift_fresh"))
            elif from_device:  # written in place (or a view) with the model's values
                self.mark(tensor, True)
        return out


class Reads(TorchFunctionMode):
    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", None)
        if name in READS and args and not self.counts.quiet and self.counts.is_device(args[0]):
            self.counts.add("syncs")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def scoped(counts: Counts, obj, name: str, scope: str, calls: str | None = None):
    """Count what ``obj.name`` does under ``scope`` (and its calls as ``calls``) while inside."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        counts.scopes.append(scope)
        if calls:
            counts.add(calls)
        try:
            return original(*args, **kwargs)
        finally:
            counts.scopes.pop()

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, original)


@contextlib.contextmanager
def one_read_per_read_back(counts: Counts):
    """``osprey.runtime.transfer.read_back`` waits for the device once for all its tensors (where it exists)."""
    try:
        from osprey.runtime import transfer
    except ImportError:
        yield
        return
    original = transfer.read_back

    def read_back(*tensors):
        if any(counts.is_device(t) for t in tensors):
            counts.add("syncs")
        counts.quiet = True
        try:
            return original(*tensors)
        finally:
            counts.quiet = False

    transfer.read_back = read_back
    try:
        yield
    finally:
        transfer.read_back = original


def decode_step_hooks(counts: Counts, osprey: Osprey) -> list:
    """Where one decoding step lives in this checkout: the new ``decode_step`` or the old ``_step``."""
    from osprey.inference import fast

    try:
        from osprey.inference import decode
    except ImportError:  # before: FastRunner._step and the greedy pick, once per step
        runner = type(osprey.fast)
        hooks = [scoped(counts, runner, "_step", "step", calls="steps")]
        for name in ("_pick", "_greedy"):
            owner = runner if hasattr(runner, name) else fast
            if hasattr(owner, name):
                hooks.append(scoped(counts, owner, name, "step"))
                break
        return hooks
    return [scoped(counts, decode, "decode_step", "step", calls="steps")]


def request(categories=CATEGORIES, caption_tokens: int = 16, description_tokens: int = 32) -> LabelRequest:
    return LabelRequest(
        categories=categories, parts=("head", "body", "leg", "wheel"), attributes=("red", "wooden", "small"),
        caption=True, description=True, max_caption_tokens=caption_tokens,
        max_description_tokens=description_tokens,
    )  # fmt: skip


def measure(osprey: Osprey, regions: int, req: LabelRequest) -> dict:
    image, masks = scene(regions, seed=regions)
    counts = Counts(osprey.model)
    runner = type(osprey.fast)
    hooks = [
        scoped(counts, runner, "score", "fast"),
        scoped(counts, runner, "generate", "generate"),
        *decode_step_hooks(counts, osprey),
        one_read_per_read_back(counts),
    ]
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(hook)
        with torch.inference_mode(), Reads(counts), counts:
            osprey.label(image, masks, req)
    t = counts.totals
    steps = max(1, t["steps"])
    return {
        "preset": osprey.config.name,
        "regions": regions,
        "categories": len(req.categories),
        "syncs_per_image": t["syncs"],
        "syncs_fast_path": t["fast:syncs"] + t["generate:syncs"],
        "decode_steps": t["steps"],
        "syncs_per_decode_step": round(t["generate:syncs"] / steps, 3),
        "ops_per_decode_step": round(t["step:ops"] / steps, 1),
        "ops_per_image": t["ops"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--regions", default="1,20,60")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for preset in args.presets.split(","):
        osprey = Osprey.from_pretrained(preset, device="cpu")
        osprey.label(*scene(1, seed=99), request())  # warm-up
        for n in [int(x) for x in args.regions.split(",")]:
            rows.append(measure(osprey, n, request()))
            if n == max(int(x) for x in args.regions.split(",")):
                rows.append(measure(osprey, n, request(categories=MANY)))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    import osprey as package

    print(f"checkout: {Path(package.__file__).resolve().parents[1]}")
    columns = list(rows[0])
    print(" | ".join(columns))
    print(" | ".join("---" for _ in columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
