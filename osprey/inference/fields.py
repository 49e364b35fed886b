"""What to ask about regions, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field


def _clean_labels(name: str, labels: list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    if labels is None:
        return None
    cleaned = tuple(str(label).strip() for label in labels)
    if any(not label for label in cleaned):
        raise ValueError(f"{name} contains an empty label: {list(labels)!r}")
    if len(set(cleaned)) != len(cleaned):
        raise ValueError(f"{name} contains duplicate labels: {list(labels)!r}")
    return cleaned


@dataclass(frozen=True)
class LabelRequest:
    """Fields to fill for every region.

    ``categories``/``parts``: closed label sets scored by likelihood (an empty tuple for
    ``categories`` means open vocabulary: the category is generated). ``attributes``: each gets
    an independent yes/no probability. ``caption``/``description``: greedy generation, stopped
    at ``</s>`` or the token limit.
    """

    categories: tuple[str, ...] | None = None
    parts: tuple[str, ...] | None = None
    attributes: tuple[str, ...] | None = None
    caption: bool = False
    description: bool = False
    max_caption_tokens: int = 32
    max_description_tokens: int = 256
    max_category_tokens: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", _clean_labels("categories", self.categories))
        object.__setattr__(self, "parts", _clean_labels("parts", self.parts))
        object.__setattr__(self, "attributes", _clean_labels("attributes", self.attributes))
        if self.parts is not None and not self.parts:
            raise ValueError("parts must list at least one label when given")
        if self.attributes is not None and not self.attributes:
            raise ValueError("attributes must list at least one label when given")
        for name in ("max_caption_tokens", "max_description_tokens", "max_category_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.fields:
            raise ValueError(
                "nothing to label: ask for categories, parts, attributes, caption or description"
            )

    @property
    def fields(self) -> list[str]:
        names = []
        if self.categories is not None:
            names.append("category")
        if self.parts is not None:
            names.append("part")
        if self.attributes is not None:
            names.append("attributes")
        if self.caption:
            names.append("caption")
        if self.description:
            names.append("description")
        return names

    @property
    def open_category(self) -> bool:
        return self.categories is not None and len(self.categories) == 0


@dataclass
class ClosedSetAnswer:
    """The most likely label and a probability for every candidate (they sum to 1)."""

    label: str
    score: float
    scores: dict[str, float]


@dataclass
class RegionLabels:
    """Osprey's answers for one region; a field not asked for stays None."""

    category: ClosedSetAnswer | str | None = None
    part: ClosedSetAnswer | None = None
    attributes: dict[str, float] | None = None
    caption: str | None = None
    description: str | None = None
    untrained: bool = False
    text_scores: dict[str, float] = field(default_factory=dict)  # generated field -> token confidence

    def to_dict(self) -> dict:
        def closed(value):
            if isinstance(value, ClosedSetAnswer):
                return {"label": value.label, "score": value.score, "scores": value.scores}
            return value

        out = {
            "category": closed(self.category),
            "part": closed(self.part),
            "attributes": self.attributes,
            "caption": self.caption,
            "description": self.description,
        }
        out = {k: v for k, v in out.items() if v is not None}
        if self.text_scores:
            out["text_scores"] = dict(self.text_scores)
        if self.untrained:
            out["warning"] = "untrained model: random weights, answers are meaningless"
        return out
