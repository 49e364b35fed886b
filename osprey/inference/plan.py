"""Turning a :class:`~osprey.inference.fields.LabelRequest` into prompts, candidates and answers.

Both the fast path and the upstream-style baseline build their questions here, so they ask the
model exactly the same things and differ only in how they run it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from osprey.model import prompts as P

from .fields import ClosedSetAnswer, LabelRequest, RegionLabels


@dataclass(frozen=True)
class Question:
    """One prompt. ``key`` names what it answers: ``category``, ``part``, ``attribute:<name>``,
    ``caption``, ``description`` or ``open_category``."""

    key: str
    text: str
    ids: tuple[int, ...]  # one IMAGE_PLACEHOLDER_ID per <image>


@dataclass
class ScoreTask:
    """Score each candidate answer to ``question`` for ``region``: ``candidates[i] = (label, ids)``.
    ``image`` is the region's image within an :class:`~osprey.inference.fast.ImageBatch` (0 alone)."""

    region: int
    question: Question
    candidates: list[tuple[str, list[int]]]
    log_likelihoods: list[float] = field(default_factory=list)
    image: int = 0


@dataclass
class GenerateTask:
    """Greedy answer to ``question`` for ``region`` (of ``image``, as for :class:`ScoreTask`)."""

    region: int
    question: Question
    max_new_tokens: int
    image: int = 0
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)  # log p of each greedy token

    @property
    def confidence(self) -> float:
        """Geometric-mean probability of the generated tokens (1.0 when nothing was generated)."""
        if not self.token_logprobs:
            return 1.0
        return float(torch.tensor(self.token_logprobs, dtype=torch.float64).mean().exp())


class Planner:
    """Builds the questions for a request and assembles answers from model outputs, in the words of one
    model's prompt set (``prompts``: the functions of :mod:`osprey.model.prompts`)."""

    def __init__(self, *, tokenizer, request: LabelRequest, untrained: bool = False, prompts=P) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts  # the model's prompt set: Osprey's (osprey.model.prompts) by default
        self.request = request
        self.untrained = untrained
        self._questions: dict[str, Question] = {}

    def question(self, key: str, first_turn: str) -> Question:
        if key not in self._questions:
            text = self.prompts.conversation(first_turn)
            self._questions[key] = Question(
                key=key, text=text, ids=tuple(self.prompts.tokenize_prompt(self.tokenizer, text))
            )
        return self._questions[key]

    def _answer(self, question: Question, answer: str, *, finished: bool) -> list[int]:
        return self.prompts.answer_ids(
            self.tokenizer, list(question.ids), question.text, answer, finished=finished
        )

    # ---- round 1: everything that does not depend on another answer ----
    def first_round(self, num_regions: int) -> tuple[list[ScoreTask], list[GenerateTask]]:
        req = self.request
        scores: list[ScoreTask] = []
        gens: list[GenerateTask] = []
        closed_categories = bool(req.categories)
        per_question: list[tuple[Question, list[tuple[str, list[int]]]]] = []
        if closed_categories:
            q = self.question("category", self.prompts.category_turn(req.categories, req.parts or ()))
            # With parts, the answer is "category:part"; round 1 scores how the answer starts.
            finished = req.parts is None
            per_question.append((q, [(c, self._answer(q, c, finished=finished)) for c in req.categories]))
        elif req.parts is not None:
            q = self.question("part", self.prompts.category_turn(req.parts))
            per_question.append((q, [(p, self._answer(q, p, finished=True)) for p in req.parts]))
        for attribute in req.attributes or ():
            q = self.question(f"attribute:{attribute}", self.prompts.attribute_turn(attribute))
            per_question.append(
                (
                    q,
                    [
                        (ans, self._answer(q, ans, finished=True))
                        for ans in (self.prompts.YES, self.prompts.NO)
                    ],
                )
            )
        for region in range(num_regions):
            for q, candidates in per_question:
                scores.append(ScoreTask(region=region, question=q, candidates=candidates))
        generated = []
        if req.open_category:
            generated.append(
                (self.question("open_category", self.prompts.open_category_turn()), req.max_category_tokens)
            )
        if req.caption:
            generated.append((self.question("caption", self.prompts.caption_turn()), req.max_caption_tokens))
        if req.description:
            generated.append(
                (self.question("description", self.prompts.description_turn()), req.max_description_tokens)
            )
        for region in range(num_regions):
            for q, limit in generated:
                gens.append(GenerateTask(region=region, question=q, max_new_tokens=limit))
        return scores, gens

    # ---- round 2: parts given each region's most likely category ----
    def second_round(self, first: list[ScoreTask]) -> list[ScoreTask]:
        req = self.request
        if not (req.categories and req.parts):
            return []
        tasks = []
        for task in first:
            if task.question.key != "category":
                continue
            best = task.candidates[int(torch.tensor(task.log_likelihoods).argmax())][0]
            candidates = [(p, self._answer(task.question, f"{best}:{p}", finished=True)) for p in req.parts]
            tasks.append(
                ScoreTask(region=task.region, question=task.question, candidates=candidates, image=task.image)
            )
        return tasks

    # ---- answers ----
    def assemble(
        self, num_regions: int, first: list[ScoreTask], second: list[ScoreTask], gens: list[GenerateTask]
    ) -> list[RegionLabels]:
        results = [RegionLabels(untrained=self.untrained) for _ in range(num_regions)]
        for task in first:
            probs = torch.tensor(task.log_likelihoods, dtype=torch.float64).softmax(0).tolist()
            key = task.question.key
            out = results[task.region]
            if key.startswith("attribute:"):
                out.attributes = out.attributes or {}
                out.attributes[key.split(":", 1)[1]] = probs[0]
            else:
                setattr(out, key, _closed(task.candidates, probs))
        for task in second:
            probs = torch.tensor(task.log_likelihoods, dtype=torch.float64).softmax(0).tolist()
            results[task.region].part = _closed(task.candidates, probs)
        for task in gens:
            text = self.tokenizer.decode(task.token_ids, skip_special_tokens=True)
            key = task.question.key
            out = results[task.region]
            if key == "open_category":
                out.category = self.prompts.clean_answer(text, keep_after_colon=self.request.parts is None)
                out.text_scores["category"] = task.confidence
            else:
                setattr(out, key, self.prompts.clean_answer(text, keep_after_colon=False))
                out.text_scores[key] = task.confidence
        if self.request.attributes:
            for out in results:  # keep the requested order
                out.attributes = {a: out.attributes[a] for a in self.request.attributes}
        return results


def _closed(candidates: list[tuple[str, list[int]]], probs: list[float]) -> ClosedSetAnswer:
    best = max(range(len(probs)), key=probs.__getitem__)
    return ClosedSetAnswer(
        label=candidates[best][0],
        score=probs[best],
        scores={c[0]: p for c, p in zip(candidates, probs, strict=True)},
    )


def candidate_log_likelihood(log_probs: torch.Tensor, target_ids: list[int]) -> float:
    """Sum of ``log_probs[i, target_ids[i]]``; ``log_probs`` is ``(len(target_ids), V)``."""
    index = torch.tensor(target_ids, device=log_probs.device)
    return float(log_probs.gather(1, index[:, None]).sum())
