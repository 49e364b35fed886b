"""Learning curve: held-out accuracy against the number of accepted labels, per model version.

The synthetic task (also used by ``tests/osprey/learning/test_head.py``): 128x128 noisy backgrounds with
1-3 non-overlapping shapes each (circle, square, triangle; random size, position and rotation),
filled in red, green, blue or yellow with jitter. Category = shape, attribute = colour. Regions
arrive as a stream of "accepted" annotations; for each ``k`` the versions are trained on the first
``k`` and scored on a fixed held-out set of separate images:

- ``osprey``: Osprey's own closed-set scores (does not learn; with random weights it is chance);
- ``fast-head``: :class:`osprey.learning.head.FastHead` on :func:`osprey.learning.region_features.region_features`;
- ``osprey+head``: both pooled with :func:`osprey.learning.head.blend` (head weight ``k / (k + 20)``).

A version is a function ``(k, train, test) -> {metric: value}`` returned by :func:`build_versions`;
the table and the plot have one row / line per version, so registry versions (LoRA fine-tunes,
promoted heads) slot in as more entries there.

    python bench/learning_curve.py                          # tiny random-weight Osprey, CPU
    python bench/learning_curve.py --json                   # one JSON object per point
    python bench/learning_curve.py --png bench/out/learning_curve.png
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
    """Regions of several scenes, flattened in stream order: ``features (N, F)``, labels per region."""

    scenes: list[Scene]
    features: np.ndarray
    shapes: list[str]
    colours: list[str]

    def labels(self, k: int | None = None) -> dict[str, list]:
        """Head labels of the first ``k`` regions (all when None)."""
        k = len(self.shapes) if k is None else k
        return {"category": list(self.shapes[:k]), "attributes": [[c] for c in self.colours[:k]]}


def region_set(osprey, scenes: list[Scene]) -> RegionSet:
    from osprey.learning.region_features import region_features

    features = [region_features(osprey, s.image, s.masks) for s in scenes]
    return RegionSet(
        scenes=scenes,
        features=np.concatenate(features),
        shapes=[x for s in scenes for x in s.shapes],
        colours=[x for s in scenes for x in s.colours],
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


def blended_version(osprey, layout) -> tuple[Callable, Callable]:
    from osprey.learning.head import blend

    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def base(test: RegionSet) -> tuple[np.ndarray, np.ndarray]:
        if "probs" not in cache:
            cache["probs"] = osprey_scores(osprey, test)
        return cache["probs"]

    def run_osprey(k: int, train: RegionSet, test: RegionSet) -> dict[str, float]:
        return score(*base(test), test)

    def run_blend(k: int, train: RegionSet, test: RegionSet) -> dict[str, float]:
        cats, attrs = base(test)
        head = train_head(train, k, layout)
        n = head.n_train
        cat_out, attr_out = [], []
        for i, probs in enumerate(head.label_probs(test.features)):
            ospr_c = dict(zip(SHAPES, cats[i], strict=True))
            ospr_a = dict(zip(COLOURS, attrs[i], strict=True))
            cat_out.append(list(blend(ospr_c, probs["category"], n["category"]).values()))
            attr_out.append(
                list(blend(ospr_a, probs["attributes"], n["attributes"], multi_label=True).values())
            )
        return score(np.array(cat_out), np.array(attr_out), test)

    return run_osprey, run_blend


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
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    from osprey.inference.api import Osprey
    from osprey.learning.region_features import feature_layout

    ks = [int(k) for k in args.ks.split(",")]
    osprey = Osprey.from_pretrained(args.preset, device=args.device)
    train_scenes = []
    rng = np.random.default_rng(args.seed)
    while sum(len(s.masks) for s in train_scenes) < max(ks):
        train_scenes.append(make_scene(rng))
    train = region_set(osprey, train_scenes)
    test = region_set(osprey, make_scenes(args.test_images, seed=args.seed + 1000))
    layout = feature_layout(osprey)
    versions = build_versions(osprey, layout, with_osprey=not args.no_osprey)

    rows = []
    if not args.json:
        weights = "random weights" if osprey.untrained else "trained"
        print(
            f"# {osprey.model_id} ({weights}), F={layout.dim}, {len(test.shapes)} held-out regions; chance 0.33 / 0.25"
        )
        print(
            f"{'version':<12} {'k':>4} {'category_acc':>13} {'colour_acc':>11} {'attributes_map':>15} {'fit_s':>7}"
        )
    for version, run in versions.items():
        for k in ks:
            row = {"version": version, "k": k, **run(k, train, test)}
            rows.append(row)
            if args.json:
                print(json.dumps(row))
            else:
                cells = [_cell(row, "category_acc", 13), _cell(row, "colour_acc", 11)]
                cells += [_cell(row, "attributes_map", 15), _cell(row, "fit_s", 7, 2)]
                print(f"{version:<12} {k:>4} " + " ".join(cells))
    if args.png:
        save_png(rows, Path(args.png))
        if not args.json:
            print(f"# plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
