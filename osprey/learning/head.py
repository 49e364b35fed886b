"""The fast per-project head: small classifiers on region features, trained in seconds on CPU.

For every closed-set field of a project (category, part: one label per region; attributes: any
number per region) the head learns ``p(label | region features)`` from the regions annotators
accepted (features from :func:`osprey.learning.region_features.region_features`).

Model, per field: the features are standardised (training mean and std) and each feature group
(res2 .. res5, geometry, colour) is further scaled by ``1 / sqrt(group size)``, so every group
carries the same total variance; with the L2 penalty below this is a Gaussian prior under which
each group's contribution to the logits has the same prior variance, and the 12 geometry
numbers are not drowned by 2880 CLIP channels. Then a linear layer (or, with ``hidden_dim > 0``,
one GELU hidden layer) gives softmax logits (single-label fields) or independent sigmoid logits
(attributes). Training minimises the summed, class-balanced (single-label: each seen label gets
the same total weight), label-smoothed cross entropy plus ``weight_decay / 2 * ||W||^2``
(weights, not biases) with full-batch L-BFGS. Because the data term is a sum, the penalty is a
fixed Gaussian prior whose relative pull fades as accepted labels accumulate.

Labels never seen in training (the project's label set comes from its config, and most labels
have no examples at first) cannot be learned; they get the Laplace share of the probability
mass: with ``N`` training examples, ``L`` labels of which ``U`` unseen and pseudo-count ``a``
(``unseen_pseudo_count``, default 1), the unseen labels share ``u = U a / (N + L a)`` equally and
the classifier's softmax over the seen labels is scaled by ``1 - u``. With no data the head is
uniform; the share fades as examples arrive. An attribute that never varied in training (always
or never ticked) gets the constant ``(positives + a) / (N + 2a)``.

:mod:`osprey.learning.blend` pools the head's probabilities with Osprey's own; the head weight of
each field is fitted on held-out labels when the head is trained and saved with it
(:attr:`FastHead.blend`), so a restart serves the same blend.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .blend import FieldBlend, prior_weight
from .region_features import FeatureLayout

logger = logging.getLogger(__name__)

HEAD_FORMAT = "osprey-fast-head"
HEAD_FORMAT_VERSION = 1


@dataclass(frozen=True)
class HeadField:
    """A closed-set field and its full label set (from the project's label config)."""

    name: str
    labels: tuple[str, ...]
    multi_label: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if not self.name or not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(
                f"field {self.name!r} needs a name and a non-empty list of distinct labels, got "
                f"{list(self.labels)}; pass the labels of the project's Choices for this field"
            )


@dataclass(frozen=True)
class HeadConfig:
    """Training settings (module docstring explains each term)."""

    hidden_dim: int = 0  # 0: linear; > 0: one GELU hidden layer of this width
    # L2 on weights, added to the *summed* loss: a N(0, 1/wd) prior on each weight; as every feature
    # group has unit total variance, a group's logit contribution has prior std 1/sqrt(wd) = 2
    weight_decay: float = 0.25
    label_smoothing: float = 0.05
    class_balance: bool = True
    unseen_pseudo_count: float = 1.0
    max_iter: int = 200  # L-BFGS iterations per field
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.hidden_dim >= 0, "hidden_dim >= 0"),
            (self.weight_decay > 0, "weight_decay > 0"),
            (0 <= self.label_smoothing < 1, "0 <= label_smoothing < 1"),
            (self.unseen_pseudo_count > 0, "unseen_pseudo_count > 0"),
            (self.max_iter >= 1, "max_iter >= 1"),
        ]
        for ok, expected in checks:
            if not ok:
                raise ValueError(f"HeadConfig expects {expected}, got {self}")


@dataclass
class _FieldModel:
    """One field's trained state: classifier outputs (``outputs``: label names), parameters and,
    for attributes that never varied, constant probabilities."""

    spec: HeadField
    n_train: int
    outputs: tuple[str, ...] = ()
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    constants: dict[str, float] = field(default_factory=dict)


def _forward(params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x (N, F)`` -> logits ``(N, outputs)``."""
    if "hidden.weight" in params:
        x = F.gelu(F.linear(x, params["hidden.weight"], params["hidden.bias"]))
    return F.linear(x, params["out.weight"], params["out.bias"])


def _train(
    x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *, multi: bool, config: HeadConfig
) -> dict[str, torch.Tensor]:
    """Fit one field's classifier: ``x (N, F)``, ``targets (N, C)`` soft targets, ``weights (N,)``."""
    generator = torch.Generator().manual_seed(config.seed)
    n_in, n_out = x.shape[1], targets.shape[1]
    params: dict[str, torch.Tensor] = {}
    if config.hidden_dim:
        scale = 1.0 / math.sqrt(n_in)
        params["hidden.weight"] = torch.randn(config.hidden_dim, n_in, generator=generator) * scale
        params["hidden.bias"] = torch.zeros(config.hidden_dim)
        n_in = config.hidden_dim
    params["out.weight"] = torch.zeros(n_out, n_in)
    params["out.bias"] = torch.zeros(n_out)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        list(params.values()),
        lr=1.0,
        max_iter=config.max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = _forward(params, x)
        if multi:
            per_example = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1)
        else:
            per_example = -(targets * F.log_softmax(logits, dim=1)).sum(1)
        penalty = sum(p.pow(2).sum() for name, p in params.items() if name.endswith("weight"))
        loss = (weights * per_example).sum() + 0.5 * config.weight_decay * penalty
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return {name: p.detach().contiguous() for name, p in params.items()}


def _clean_field_labels(spec: HeadField, raw: Sequence, n: int) -> list:
    """Per example: a label (single) / a set of labels (multi), or None when not annotated.
    Labels outside the label set are dropped with a warning (the config may have changed)."""
    if len(raw) != n:
        raise ValueError(f"labels[{spec.name!r}] has {len(raw)} entries, expected one per feature row ({n})")
    known, dropped, out = set(spec.labels), 0, []
    for value in raw:
        if value is None:
            out.append(None)
        elif spec.multi_label:
            if isinstance(value, str):
                raise ValueError(f"labels[{spec.name!r}] must hold lists of labels, got the string {value!r}")
            dropped += sum(v not in known for v in value)
            out.append({v for v in value if v in known})
        else:
            dropped += value not in known
            out.append(value if value in known else None)
    if dropped:
        logger.warning("field %s: ignored %d labels that are not in its label set", spec.name, dropped)
    return out


class FastHead:
    """A trained head: per-field probabilities over each field's full label set, and ``blend``: per
    field, the head weight served (:class:`~osprey.learning.blend.FieldBlend`, fitted on held-out
    labels; fields without one use the prior rule, see :meth:`head_weights`).

    Build with :meth:`HeadTrainer.fit` (then :meth:`with_blend`) or :meth:`FastHead.load`.
    """

    def __init__(
        self,
        *,
        layout: FeatureLayout,
        config: HeadConfig,
        feature_mean: torch.Tensor,
        feature_scale: torch.Tensor,
        models: dict[str, _FieldModel],
        blend: Mapping[str, FieldBlend] | None = None,
    ) -> None:
        self.layout = layout
        self.config = config
        self.feature_mean = feature_mean
        self.feature_scale = feature_scale
        self.models = models
        self.blend = dict(blend or {})
        unknown = set(self.blend) - set(models)
        if unknown:
            raise ValueError(
                f"blend weights for unknown fields {sorted(unknown)}; the head has {sorted(models)}"
            )

    @property
    def fields(self) -> dict[str, HeadField]:
        return {name: m.spec for name, m in self.models.items()}

    @property
    def n_train(self) -> dict[str, int]:
        """Field -> number of accepted examples it was trained on."""
        return {name: m.n_train for name, m in self.models.items()}

    def head_weights(self) -> dict[str, float]:
        """Field -> the head's weight in what is served (:func:`osprey.learning.blend.blend_labels`):
        the fitted one (``blend``), else the prior rule ``n / (n + 20)``."""
        return {
            name: self.blend[name].weight if name in self.blend else prior_weight(m.n_train)
            for name, m in self.models.items()
        }

    def with_blend(self, blend: Mapping[str, FieldBlend]) -> FastHead:
        """The same head serving ``blend`` (field -> fitted weight); this one is not changed."""
        return FastHead(
            layout=self.layout,
            config=self.config,
            feature_mean=self.feature_mean,
            feature_scale=self.feature_scale,
            models=self.models,
            blend=blend,
        )

    def compatible_with(self, layout: FeatureLayout) -> bool:
        """True when features laid out as ``layout`` (e.g. ``feature_layout(osprey)``) fit this head."""
        return layout == self.layout

    def _standardise(self, features: np.ndarray) -> torch.Tensor:
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.layout.dim:
            raise ValueError(
                f"features must be (R, {self.layout.dim}) for this head, got shape {x.shape}; "
                "compute them with region_features() on the backbone the head was trained on"
            )
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf values")
        return (torch.from_numpy(x) - self.feature_mean) * self.feature_scale

    def predict_proba(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """``features (R, F)`` -> field -> ``(R, len(labels))`` float32 probabilities, columns in
        ``fields[field].labels`` order; single-label rows sum to 1, attribute columns are independent."""
        x = self._standardise(features)
        a = self.config.unseen_pseudo_count
        out = {}
        for name, model in self.models.items():
            labels = model.spec.labels
            probs = torch.zeros(x.shape[0], len(labels))
            column = {label: i for i, label in enumerate(labels)}
            with torch.no_grad():
                logits = _forward(model.params, x) if model.params else None
            if model.spec.multi_label:
                for label, value in model.constants.items():
                    probs[:, column[label]] = value
                if logits is not None:
                    probs[:, [column[label] for label in model.outputs]] = torch.sigmoid(logits)
            else:
                unseen = [label for label in labels if label not in model.outputs]
                share = len(unseen) * a / (model.n_train + len(labels) * a)
                for label in unseen:
                    probs[:, column[label]] = share / len(unseen)
                if model.outputs:
                    seen = torch.softmax(logits, dim=1) if logits is not None else torch.ones(x.shape[0], 1)
                    probs[:, [column[label] for label in model.outputs]] = (1.0 - share) * seen
            out[name] = probs.numpy()
        return out

    def label_probs(self, features: np.ndarray) -> list[dict[str, dict[str, float]]]:
        """Per region: field -> {label: probability} (the form :func:`blend` takes)."""
        probs = self.predict_proba(features)
        n = next(iter(probs.values())).shape[0] if probs else 0
        return [
            {
                name: dict(zip(self.models[name].spec.labels, map(float, p[i]), strict=True))
                for name, p in probs.items()
            }
            for i in range(n)
        ]

    def evaluate(self, features: np.ndarray, labels: Mapping[str, Sequence]) -> dict[str, float]:
        """Held-out score per field: accuracy (single-label) or mean average precision over the
        attributes with at least one positive and one negative example (multi-label). ``labels``
        as for :meth:`HeadTrainer.fit`; fields with nothing to score are left out."""
        probs = self.predict_proba(features)
        scores = {}
        for name, raw in labels.items():
            if name not in self.models:
                raise ValueError(f"unknown field {name!r}; this head has {sorted(self.models)}")
            spec = self.models[name].spec
            clean = _clean_field_labels(spec, raw, probs[name].shape[0])
            rows = [i for i, v in enumerate(clean) if v is not None]
            if not rows:
                continue
            p = probs[name][rows]
            if not spec.multi_label:
                truth = np.array([spec.labels.index(clean[i]) for i in rows])
                scores[name] = float((p.argmax(1) == truth).mean())
                continue
            truth = np.array([[label in clean[i] for label in spec.labels] for i in rows])
            aps = [_average_precision(p[:, j], truth[:, j]) for j in range(len(spec.labels))]
            aps = [ap for ap, col in zip(aps, truth.T, strict=True) if 0 < col.sum() < len(col)]
            if aps:
                scores[name] = float(np.mean(aps))
        return scores

    def save(self, path: str | Path) -> Path:
        """Write ``head.json`` (config, label sets, layout, fitted blend weights) and
        ``head.safetensors`` (feature statistics, parameters) into the new directory ``path``: written
        to a temporary sibling first, then renamed, so readers never see a half-written head."""
        path = Path(path)
        if path.exists():
            raise ValueError(f"{path} already exists; save each head to a new directory (e.g. a new version)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"feature_mean": self.feature_mean, "feature_scale": self.feature_scale}
        fields = []
        for name, model in self.models.items():
            tensors.update({f"{name}.{key}": value for key, value in model.params.items()})
            fields.append({**asdict(model.spec), "n_train": model.n_train, "outputs": list(model.outputs)})
            fields[-1]["constants"] = model.constants
            if name in self.blend:
                fields[-1]["blend"] = self.blend[name].to_dict()
        meta = {
            "format": HEAD_FORMAT,
            "version": HEAD_FORMAT_VERSION,
            "config": asdict(self.config),
            "layout": self.layout.to_dict(),
            "fields": fields,
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "head.safetensors"))
            (tmp / "head.json").write_text(json.dumps(meta, indent=2))
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(
            "saved fast head (%s) to %s", ", ".join(f"{k}={v}" for k, v in self.n_train.items()), path
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> FastHead:
        """Read a head written by :meth:`save`."""
        path = Path(path)
        if not (path / "head.json").is_file() or not (path / "head.safetensors").is_file():
            raise ValueError(f"{path} is not a saved head: expected head.json and head.safetensors in it")
        meta = json.loads((path / "head.json").read_text())
        if meta.get("format") != HEAD_FORMAT or meta.get("version") != HEAD_FORMAT_VERSION:
            raise ValueError(
                f"{path}/head.json is {meta.get('format')!r} v{meta.get('version')}, expected "
                f"{HEAD_FORMAT!r} v{HEAD_FORMAT_VERSION}; retrain the head with this version"
            )
        tensors = load_file(str(path / "head.safetensors"))
        models, blend = {}, {}
        for entry in meta["fields"]:
            spec = HeadField(
                name=entry["name"], labels=tuple(entry["labels"]), multi_label=entry["multi_label"]
            )
            prefix = f"{spec.name}."
            params = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            models[spec.name] = _FieldModel(
                spec=spec,
                n_train=int(entry["n_train"]),
                outputs=tuple(entry["outputs"]),
                params=params,
                constants={k: float(v) for k, v in entry["constants"].items()},
            )
            if entry.get("blend") is not None:  # heads saved before blends were fitted have none
                try:
                    blend[spec.name] = FieldBlend.from_dict(entry["blend"])
                except (TypeError, KeyError, AttributeError) as error:
                    raise ValueError(
                        f"{path}/head.json: field {spec.name}'s blend is unreadable ({error})"
                    ) from None
        return cls(
            layout=FeatureLayout.from_dict(meta["layout"]),
            config=HeadConfig(**meta["config"]),
            feature_mean=tensors["feature_mean"],
            feature_scale=tensors["feature_scale"],
            models=models,
            blend=blend,
        )


def _average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the precision-recall curve (mean precision at each positive's rank)."""
    order = np.argsort(-scores, kind="stable")
    hits = truth[order].astype(np.float64)
    if hits.sum() == 0:
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


class HeadTrainer:
    """Fits a :class:`FastHead` for ``fields`` on region features laid out as ``layout``.

    Args:
        fields: the project's closed-set fields with their full label sets.
        layout: the feature layout (``feature_layout(osprey)``); groups are balanced as the module
            docstring says. None: one group, and the head records an ``unknown`` backbone.
        config: training settings.
    """

    def __init__(
        self,
        *,
        fields: Sequence[HeadField],
        layout: FeatureLayout | None = None,
        config: HeadConfig | None = None,
    ) -> None:
        names = [spec.name for spec in fields]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"fields must be non-empty with distinct names, got {names}")
        self.fields = {spec.name: spec for spec in fields}
        self.layout = layout
        self.config = config or HeadConfig()

    def fit(self, features: np.ndarray, labels: Mapping[str, Sequence]) -> FastHead:
        """Train on ``features (N, F)`` and per-field labels.

        Args:
            features: one row per accepted region.
            labels: field -> N entries: a label (single-label fields) or a list of labels (multi-label
                fields, ``[]`` meaning "annotated, none applies"); ``None`` where the region has no
                annotation for that field. Fields left out count as all ``None``. Labels not in the
                field's label set are ignored with a warning.

        Returns:
            The trained head; ``head.n_train[field]`` counts the examples each field learned from.
        """
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise ValueError(f"features must be a finite (N, F) array, got shape {x.shape}")
        layout = self.layout or FeatureLayout(groups=(("features", x.shape[1]),), backbone="unknown")
        if x.shape[1] != layout.dim:
            raise ValueError(f"features have {x.shape[1]} columns but the layout describes {layout.dim}")
        unknown = set(labels) - set(self.fields)
        if unknown:
            raise ValueError(
                f"labels for unknown fields {sorted(unknown)}; the trainer has {sorted(self.fields)}"
            )
        start, n = time.perf_counter(), x.shape[0]
        mean = x.mean(0) if n else np.zeros(x.shape[1], np.float32)
        std = x.std(0) if n else np.ones(x.shape[1], np.float32)
        std = np.where(std > 1e-6, std, 1.0)
        group_scale = np.concatenate([np.full(d, 1.0 / math.sqrt(d)) for _, d in layout.groups])
        feature_mean = torch.from_numpy(mean.astype(np.float32))
        feature_scale = torch.from_numpy((group_scale / std).astype(np.float32))
        xs = (torch.from_numpy(x) - feature_mean) * feature_scale
        models = {}
        for name, spec in self.fields.items():
            clean = _clean_field_labels(spec, labels.get(name, [None] * n), n)
            fit = self._fit_multi if spec.multi_label else self._fit_single
            models[name] = fit(spec, xs, clean)
        counts = ", ".join(f"{k}={m.n_train}" for k, m in models.items())
        logger.info("fast head trained in %.2f s on %s examples", time.perf_counter() - start, counts)
        return FastHead(
            layout=layout,
            config=self.config,
            feature_mean=feature_mean,
            feature_scale=feature_scale,
            models=models,
        )

    def _fit_single(self, spec: HeadField, xs: torch.Tensor, clean: list) -> _FieldModel:
        rows = [i for i, v in enumerate(clean) if v is not None]
        counts = {label: 0 for label in spec.labels}
        for i in rows:
            counts[clean[i]] += 1
        seen = tuple(label for label in spec.labels if counts[label])
        if len(seen) < 2:  # nothing to discriminate: seen label(s) + the unseen share
            return _FieldModel(spec=spec, n_train=len(rows), outputs=seen)
        index = torch.tensor([seen.index(clean[i]) for i in rows])
        eps = self.config.label_smoothing
        targets = F.one_hot(index, len(seen)).float() * (1 - eps) + eps / len(seen)
        if self.config.class_balance:
            per_label = torch.tensor([counts[label] for label in seen], dtype=torch.float32)
            weights = len(rows) / (len(seen) * per_label[index])
        else:
            weights = torch.ones(len(rows))
        params = _train(xs[rows], targets, weights, multi=False, config=self.config)
        return _FieldModel(spec=spec, n_train=len(rows), outputs=seen, params=params)

    def _fit_multi(self, spec: HeadField, xs: torch.Tensor, clean: list) -> _FieldModel:
        rows = [i for i, v in enumerate(clean) if v is not None]
        truth = torch.tensor(
            [[label in clean[i] for label in spec.labels] for i in rows], dtype=torch.float32
        )
        truth = truth.reshape(len(rows), len(spec.labels))
        positives = truth.sum(0)
        varied = [j for j in range(len(spec.labels)) if 0 < positives[j] < len(rows)]
        a = self.config.unseen_pseudo_count
        constants = {
            label: float((positives[j] + a) / (len(rows) + 2 * a))
            for j, label in enumerate(spec.labels)
            if j not in varied
        }
        model = _FieldModel(spec=spec, n_train=len(rows), constants=constants)
        if varied:
            eps = self.config.label_smoothing
            targets = truth[:, varied] * (1 - eps) + eps / 2
            model.params = _train(xs[rows], targets, torch.ones(len(rows)), multi=True, config=self.config)
            model.outputs = tuple(spec.labels[j] for j in varied)
        return model
