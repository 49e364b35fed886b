"""How tasks are predicted: the settings every step of a prediction reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from backend.labelstudio.limits import DEFAULT_LIMITS, PayloadLimits


@dataclass(frozen=True)
class PredictOptions:
    """``refine_existing``: refine a task's drawn regions with SAM first; ``segment_everything``: SAM's
    automatic masks for a task with no regions; ``attribute_threshold``: an attribute is pre-selected at
    this probability; token limits of the generated fields; ``limits`` bound the regions and prompts a
    task may carry."""

    refine_existing: bool = False
    segment_everything: bool = True
    attribute_threshold: float = 0.5
    max_caption_tokens: int = 32
    max_description_tokens: int = 256
    limits: PayloadLimits = field(default=DEFAULT_LIMITS)
