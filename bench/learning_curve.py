"""Learning curve: held-out accuracy against the number of accepted labels, per model version.

The synthetic task (also used by ``tests/osprey/learning/test_head.py``): 128x128 noisy backgrounds with
1-3 non-overlapping shapes each (circle, square, triangle; random size, position and rotation),
filled in red, green, blue or yellow with jitter. Category = shape, attribute = colour. Regions
arrive as a stream of "accepted" annotations; for each ``k`` the versions are trained on the first
``k`` and scored on a fixed held-out set of separate images:

- ``osprey``: Osprey's own closed-set scores (does not learn; with random weights it is chance);
- ``fast-head``: :class:`osprey.learning.head.FastHead` on :func:`osprey.learning.region_features.region_features`;
- ``osprey+head``: what is served, both pooled by :mod:`osprey.learning.blend` with the head weight
  fitted per field by 5-fold cross-validation on the ``k`` training regions (grouped by image), as a
  training job fits it.

A version is a function ``(k, train, test) -> {metric: value}`` returned by :func:`build_versions`;
the table and the plot have one row / line per version, so registry versions (LoRA fine-tunes,
promoted heads) slot in as more entries there.

    python bench/learning_curve.py                          # tiny random-weight Osprey, CPU
    python bench/learning_curve.py --json                   # one JSON object per point
    python bench/learning_curve.py --png bench/out/learning_curve.png

Active learning (``--order uncertainty,random``): instead of the table above, tasks (images) are taken
from one pool of ``--pool-images`` in the pool's own order (``random``) or lowest prediction score first
(``uncertainty``: after every ``--batch`` tasks the served model is refitted on what was accepted so
far and every unlabelled task is scored by :func:`backend.predict.confidence.task_confidence`, the
score ``/predict`` gives it). Each order's served category accuracy is measured every ``--every``
accepted labels, and the summary says how many labels each order needed to reach ``--target``:

    python bench/learning_curve.py --order uncertainty,random --seeds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 40), "green": (45, 170, 60), "blue": (40, 70, 215), "yellow": (225, 205, 45)}
KS = (0, 5, 10, 20, 40, 80)


@dataclass
class Scene:
    """One synthetic image with its regions: ``masks[i]`` is ``(H, W)`` bool, labelled
    ``shapes[i]`` (category) and ``colours[i]`` (its only attribute)."""

    image: np.ndarray
    masks: list[np.ndarray]
    shapes: list[str]
    colours: list[str]


def _shape_polygon(shape: str, center: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Vertices ``(V, 2)`` int32 (x, y) of a square or an equilateral triangle with circumradius ``radius``."""
    sides = 4 if shape == "square" else 3
    theta = angle + 2 * np.pi * np.arange(sides) / sides
    return np.round(center + radius * np.stack([np.cos(theta), np.sin(theta)], axis=1)).astype(np.int32)


def make_scene(rng: np.random.Generator, size: int = 128) -> Scene:
    """A ``size`` x ``size`` image with 1-3 shapes that do not touch (retries placements)."""
    base = rng.integers(70, 190)
    image = np.full((size, size, 3), base, dtype=np.float64) + rng.normal(0, 12, (size, size, 3))
    occupied = np.zeros((size, size), np.uint8)
    scene = Scene(image=image, masks=[], shapes=[], colours=[])
    for _ in range(rng.integers(1, 4)):
        for _attempt in range(20):
            shape, colour = SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(4)]
            radius = rng.uniform(11, 24)
            center = rng.uniform(radius + 2, size - radius - 2, 2)
            mask = np.zeros((size, size), np.uint8)
            if shape == "circle":
                cv2.circle(mask, tuple(int(c) for c in np.round(center)), int(round(radius * 0.8)), 1, -1)
            else:
                cv2.fillPoly(mask, [_shape_polygon(shape, center, radius, rng.uniform(0, 2 * np.pi))], 1)
            if not (mask & cv2.dilate(occupied, np.ones((5, 5), np.uint8))).any():
                break
        else:
            continue
        occupied |= mask
        jitter = rng.integers(-25, 26, 3)
        image[mask > 0] = np.array(COLOURS[colour]) + jitter + rng.normal(0, 6, (int(mask.sum()), 3))
        scene.masks.append(mask > 0)
        scene.shapes.append(shape)
        scene.colours.append(colour)
    scene.image = np.clip(image, 0, 255).astype(np.uint8)
    return scene


def make_scenes(n_images: int, *, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng) for _ in range(n_images)]


@dataclass
class RegionSet:
    """Regions of several scenes, flattened in stream order: ``features (N, F)``, labels per region,
    ``tasks[i]`` the index of region i's scene (its task)."""

    scenes: list[Scene]
    features: np.ndarray
    shapes: list[str]
    colours: list[str]
    tasks: list[int]

    def labels(self, k: int | None = None) -> dict[str, list]:
        """Head labels of the first ``k`` regions (all when None)."""
        k = len(self.shapes) if k is None else k
        return {"category": list(self.shapes[:k]), "attributes": [[c] for c in self.colours[:k]]}

    def subset(self, rows: list[int]) -> RegionSet:
        """The regions ``rows`` (indices), in that order, as a stream (``scenes`` stay whole)."""
        return RegionSet(
            scenes=self.scenes,
            features=self.features[rows],
            shapes=[self.shapes[i] for i in rows],
            colours=[self.colours[i] for i in rows],
            tasks=[self.tasks[i] for i in rows],
        )


def region_set(osprey, scenes: list[Scene]) -> RegionSet:
    from osprey.learning.region_features import region_features

    features = [region_features(osprey, s.image, s.masks) for s in scenes]
    return RegionSet(
        scenes=scenes,
        features=np.concatenate(features),
        shapes=[x for s in scenes for x in s.shapes],
        colours=[x for s in scenes for x in s.colours],
        tasks=[i for i, s in enumerate(scenes) for _ in s.masks],
    )


def head_fields():
    from osprey.learning.head import HeadField

    return [
        HeadField(name="category", labels=SHAPES),
        HeadField(name="attributes", labels=tuple(COLOURS), multi_label=True),
    ]


def score(category_probs: np.ndarray, attribute_probs: np.ndarray, test: RegionSet) -> dict[str, float]:
    """``category_probs (N, 3)`` in ``SHAPES`` order, ``attribute_probs (N, 4)`` in ``COLOURS`` order:
    category accuracy and colour accuracy (the top attribute is the true colour)."""
    shape_truth = np.array([SHAPES.index(s) for s in test.shapes])
    colour_truth = np.array([list(COLOURS).index(c) for c in test.colours])
    return {
        "category_acc": float((category_probs.argmax(1) == shape_truth).mean()),
        "colour_acc": float((attribute_probs.argmax(1) == colour_truth).mean()),
    }


def train_head(train: RegionSet, k: int, layout):
    from osprey.learning.head import HeadTrainer

    trainer = HeadTrainer(fields=head_fields(), layout=layout)
    return trainer.fit(train.features[:k], train.labels(k))


def fast_head_version(layout) -> Callable:
    def run(k: int, train: RegionSet, test: RegionSet) -> dict[str, float]:
        start = time.perf_counter()
        head = train_head(train, k, layout)
        fit_s = time.perf_counter() - start
        probs = head.predict_proba(test.features)
        out = score(probs["category"], probs["attributes"], test)
        mean_ap = head.evaluate(test.features, test.labels()).get("attributes")
        return {**out, "attributes_map": mean_ap, "fit_s": fit_s}

    return run


def osprey_scores(osprey, test: RegionSet) -> tuple[np.ndarray, np.ndarray]:
    """Osprey's own ``(N, 3)`` category and ``(N, 4)`` attribute probabilities on ``test``."""
    from osprey.inference.fields import LabelRequest

    request = LabelRequest(categories=SHAPES, attributes=tuple(COLOURS))
    cats, attrs = [], []
    for scene in test.scenes:
        for answer in osprey.label(scene.image, scene.masks, request):
            cats.append([answer.category.scores[s] for s in SHAPES])
            attrs.append([answer.attributes[c] for c in COLOURS])
    return np.array(cats), np.array(attrs)


def fit_served(train: RegionSet, osprey_probs: tuple[np.ndarray, np.ndarray], k: int, layout):
    """The head trained on the first ``k`` regions of ``train``, with its blend weights fitted by
    cross-validation on them (:func:`osprey.learning.blend.cross_validated_blend`), as a training job
    does; ``osprey_probs`` are Osprey's ``(N, 3)`` / ``(N, 4)`` probabilities on ``train``."""
    from osprey.learning.blend import cross_validated_blend
    from osprey.learning.head import HeadTrainer

    trainer = HeadTrainer(fields=head_fields(), layout=layout)
    head = trainer.fit(train.features[:k], train.labels(k))
    cats, attrs = osprey_probs
    blend = cross_validated_blend(
        trainer,
        train.features[:k],
        train.labels(k),
        {"category": cats[:k], "attributes": attrs[:k]},
        groups=train.tasks[:k],
        n_train=head.n_train,
    )
    return head.with_blend(blend)


def served_probs(head, features: np.ndarray, osprey_probs: tuple[np.ndarray, np.ndarray]):
    """What is served for ``features``: category ``(N, 3)`` and attribute ``(N, 4)`` probabilities,
    Osprey's pooled with ``head``'s by its head weights (the rule of ``blend_labels``)."""
    from osprey.learning.blend import pool_arrays

    weights, probs = head.head_weights(), head.predict_proba(features)
    cats, attrs = osprey_probs
    return (
        pool_arrays(cats, probs["category"], weights["category"], multi_label=False),
        pool_arrays(attrs, probs["attributes"], weights["attributes"], multi_label=True),
    )


def blended_version(osprey, layout) -> tuple[Callable, Callable]:
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def base(regions: RegionSet) -> tuple[np.ndarray, np.ndarray]:
        if id(regions) not in cache:
            cache[id(regions)] = osprey_scores(osprey, regions)
        return cache[id(regions)]

    def run_osprey(k: int, train: RegionSet, test: RegionSet) -> dict[str, float]:
        return score(*base(test), test)

    def run_blend(k: int, train: RegionSet, test: RegionSet) -> dict[str, float]:
        head = fit_served(train, base(train), k, layout)
        out = score(*served_probs(head, test.features, base(test)), test)
        return {**out, "head_weight": head.head_weights()["category"]}

    return run_osprey, run_blend


def task_scores(head, pool: RegionSet, osprey_probs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Each pool task's prediction score as ``/predict`` computes it (least confident region's category
    margin; the regions here are drawn by hand, so no SAM IoU): ``(n_tasks,)``."""
    from backend.predict.confidence import region_confidence, task_confidence
    from osprey.inference.fields import ClosedSetAnswer, RegionLabels

    if head is None:  # nothing accepted yet: Osprey alone is served
        cats = osprey_probs[0]
    else:
        cats = served_probs(head, pool.features, osprey_probs)[0]
    per_task: dict[int, list[float]] = {}
    for task, row in zip(pool.tasks, cats, strict=True):
        scores = dict(zip(SHAPES, map(float, row), strict=True))
        best = max(scores, key=scores.get)
        labels = RegionLabels(category=ClosedSetAnswer(label=best, score=scores[best], scores=scores))
        per_task.setdefault(task, []).append(region_confidence(labels, None))
    return np.array([task_confidence(per_task[t]) for t in range(len(pool.scenes))])


def uncertainty_stream(pool: RegionSet, osprey_probs, n_labels: int, batch: int, layout) -> list[int]:
    """Region indices of ``pool`` in the order an annotator sorting by score accepts them: the ``batch``
    lowest-scored unlabelled tasks, then the model refitted on everything accepted, and again."""
    stream: list[int] = []
    labelled: set[int] = set()
    while len(stream) < n_labels and len(labelled) < len(pool.scenes):
        head = None
        if stream:
            head = fit_served(pool.subset(stream), _rows(osprey_probs, stream), len(stream), layout)
        scores = task_scores(head, pool, osprey_probs)
        order = [t for t in np.argsort(scores, kind="stable") if t not in labelled][:batch]
        for task in order:
            labelled.add(int(task))
            stream += [i for i, t in enumerate(pool.tasks) if t == task]
    return stream


def _rows(probs: tuple[np.ndarray, np.ndarray], rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return probs[0][rows], probs[1][rows]


def active_learning(osprey, layout, args, seed: int) -> list[dict]:
    """For each order of ``args.orders``: served accuracy on held-out images every ``args.every`` labels
    (rows ``{"order", "seed", "k", "category_acc", "colour_acc", "head_weight"}``)."""
    pool = region_set(osprey, make_scenes(args.pool_images, seed=seed))
    test = region_set(osprey, make_scenes(args.test_images, seed=seed + 1000))
    pool_probs, test_probs = osprey_scores(osprey, pool), osprey_scores(osprey, test)
    n_labels = min(args.max_labels, len(pool.shapes))
    rows = []
    for order in args.orders:
        if order == "random":
            stream = list(range(n_labels))
        else:
            stream = uncertainty_stream(pool, pool_probs, n_labels, args.batch, layout)
        train, train_probs = pool.subset(stream), _rows(pool_probs, stream)
        for k in range(args.every, n_labels + 1, args.every):
            head = fit_served(train, train_probs, k, layout)
            out = score(*served_probs(head, test.features, test_probs), test)
            rows.append(
                {"order": order, "seed": seed, "k": k, **out, "head_weight": head.head_weights()["category"]}
            )
    return rows


def labels_to_target(rows: list[dict], target: float) -> int | None:
    """The fewest accepted labels at which served category accuracy reached ``target`` (None: never)."""
    return next((r["k"] for r in rows if r["category_acc"] >= target), None)


def print_active_learning(rows: list[dict], args) -> None:
    ks = sorted({r["k"] for r in rows})
    print("order        seed  " + " ".join(f"{k:>5}" for k in ks) + f"  labels to {args.target:.2f}")
    needed: dict[str, list] = {}
    for order in args.orders:
        for seed in sorted({r["seed"] for r in rows}):
            mine = [r for r in rows if r["order"] == order and r["seed"] == seed]
            n = labels_to_target(mine, args.target)
            needed.setdefault(order, []).append(n)
            cells = " ".join(f"{r['category_acc']:>5.2f}" for r in mine)
            print(f"{order:<12} {seed:>4}  {cells}  {n if n is not None else 'not reached':>12}")
    cap = max(ks) + args.every  # a seed that never reached the target counts as one step past the end
    for order, ns in needed.items():
        reached = [n for n in ns if n is not None]
        counted = [n if n is not None else cap for n in ns]
        curve = np.mean([r["category_acc"] for r in rows if r["order"] == order])
        print(
            f"# {order}: labels to reach category accuracy {args.target:.2f}, mean of {len(ns)} seeds: "
            f"{np.mean(counted):.1f} (reached in {len(reached)} of {len(ns)}; a miss counts {cap}); "
            f"mean accuracy over the curve {curve:.3f}"
        )


def save_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, title in zip(
        axes, ("category_acc", "colour_acc"), ("category (shape)", "colour"), strict=True
    ):
        for version in dict.fromkeys(r["version"] for r in rows):
            points = [(r["k"], r[metric]) for r in rows if r["version"] == version]
            ax.plot(*zip(*points, strict=True), marker="o", label=version)
        ax.set(title=title, xlabel="accepted labels (k)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_versions(osprey, layout, *, with_osprey: bool) -> dict[str, Callable]:
    """Version name -> ``(k, train, test) -> {metric: value}``; one table row / plot line each."""
    versions: dict[str, Callable] = {"fast-head": fast_head_version(layout)}
    if with_osprey:
        versions["osprey"], versions["osprey+head"] = blended_version(osprey, layout)
    return versions


def _cell(row: dict, key: str, width: int, digits: int = 3) -> str:
    value = row.get(key)
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def run_curve(osprey, layout, args) -> list[dict]:
    """The versions table: each version trained on the first k regions of the stream."""
    ks = [int(k) for k in args.ks.split(",")]
    train_scenes = []
    rng = np.random.default_rng(args.seed)
    while sum(len(s.masks) for s in train_scenes) < max(ks):
        train_scenes.append(make_scene(rng))
    train = region_set(osprey, train_scenes)
    test = region_set(osprey, make_scenes(args.test_images, seed=args.seed + 1000))
    versions = build_versions(osprey, layout, with_osprey=not args.no_osprey)
    rows = []
    if not args.json:
        weights = "random weights" if osprey.untrained else "trained"
        print(
            f"# {osprey.model_id} ({weights}), F={layout.dim}, {len(test.shapes)} held-out regions; chance 0.33 / 0.25"
        )
        print(
            f"{'version':<12} {'k':>4} {'category_acc':>13} {'colour_acc':>11} {'attributes_map':>15} "
            f"{'head_weight':>12} {'fit_s':>7}"
        )
    for version, run in versions.items():
        for k in ks:
            row = {"version": version, "k": k, **run(k, train, test)}
            rows.append(row)
            if args.json:
                print(json.dumps(row))
            else:
                cells = [_cell(row, "category_acc", 13), _cell(row, "colour_acc", 11)]
                cells += [_cell(row, "attributes_map", 15), _cell(row, "head_weight", 12, 2)]
                cells += [_cell(row, "fit_s", 7, 2)]
                print(f"{version:<12} {k:>4} " + " ".join(cells))
    if args.png:
        save_png(rows, Path(args.png))
        if not args.json:
            print(f"# plot: {args.png}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="Osprey preset or checkpoint dir (default tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="comma-separated training sizes")
    parser.add_argument("--test-images", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-osprey", action="store_true", help="skip the osprey and osprey+head versions")
    parser.add_argument("--json", action="store_true", help="one JSON object per point")
    parser.add_argument(
        "--png", default="bench/out/learning_curve.png", help="where to save the plot ('' skips)"
    )
    parser.add_argument(
        "--order",
        default="",
        help="active learning instead of the versions table: comma-separated task orders to compare, "
        "from 'uncertainty' (lowest prediction score first) and 'random'",
    )
    parser.add_argument("--pool-images", type=int, default=100, help="active learning: unlabelled tasks")
    parser.add_argument("--max-labels", type=int, default=80, help="active learning: accepted labels at most")
    parser.add_argument("--batch", type=int, default=3, help="active learning: tasks between refits")
    parser.add_argument("--every", type=int, default=5, help="active learning: labels between measurements")
    parser.add_argument("--target", type=float, default=0.9, help="active learning: category accuracy")
    parser.add_argument(
        "--seeds", type=int, default=1, help="active learning: pools (seeds seed, seed+1 ...)"
    )
    args = parser.parse_args()
    args.orders = [o.strip() for o in args.order.split(",") if o.strip()]
    unknown = sorted(set(args.orders) - {"uncertainty", "random"})
    if (
        unknown
        or min(args.pool_images, args.max_labels, args.batch, args.seeds, args.test_images, args.every) < 1
    ):
        parser.error(
            f"--order takes 'uncertainty' and/or 'random' (got {unknown or args.order!r}); "
            "--pool-images, --max-labels, --batch, --seeds, --every and --test-images must be >= 1"
        )
    logging.basicConfig(level=logging.ERROR)

    from osprey.inference.api import Osprey
    from osprey.learning.region_features import feature_layout

    osprey = Osprey.from_pretrained(args.preset, device=args.device)
    layout = feature_layout(osprey)
    if not args.orders:
        run_curve(osprey, layout, args)
        return 0
    rows = []
    for seed in range(args.seed, args.seed + args.seeds):
        for row in active_learning(osprey, layout, args, seed):
            rows.append(row)
            if args.json:
                print(json.dumps(row))
    if not args.json:
        weights = "random weights" if osprey.untrained else "trained"
        print(
            f"# {osprey.model_id} ({weights}); pool of {args.pool_images} tasks, refit every {args.batch} "
            f"tasks, {args.test_images} held-out images; served category accuracy at k accepted labels"
        )
        print_active_learning(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
