"""Agreement between annotators and consensus scores, from rankings given as tie groups best→worst.

A judgement of one pair of responses (x, y) by one annotation is one of four outcomes: "a" (x above y),
"b" (y above x), "tie" (same tie group) or "bothbad" (the annotation marked every response bad), or None
when the annotation did not rank both. Agreement is percent agreement on these outcomes:

- for one row (a comparison, a battle): the share of the task's annotators who judged that pair and
  gave the same outcome as the row's annotator (1.0 when nobody else judged it);
- for a task: the mean, over pairs of annotators, of the share of response pairs both judged on which
  they gave the same outcome (None with fewer than two annotators).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

OUTCOMES = ("a", "b", "tie", "bothbad")
FLIP = {"a": "b", "b": "a", "tie": "tie", "bothbad": "bothbad"}


@dataclass(frozen=True)
class Judgement:
    """One non-skipped annotation, reduced to what agreement needs."""

    annotation_id: int
    ranking: Sequence[Sequence[int]]
    all_bad: bool = False
    group_of: dict[int, int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        groups = {rid: g for g, group in enumerate(self.ranking) for rid in group}
        object.__setattr__(self, "group_of", groups)

    def outcome(self, x: int, y: int) -> str | None:
        if self.all_bad:
            return "bothbad"
        gx, gy = self.group_of.get(x), self.group_of.get(y)
        if gx is None or gy is None:
            return None
        if gx == gy:
            return "tie"
        return "a" if gx < gy else "b"


def pair_agreement(
    judgements: Iterable[Judgement], own_annotation_id: int, x: int, y: int, outcome: str
) -> tuple[float, int]:
    """(agreement, judges) for one annotation's outcome on (x, y); that annotation counts as agreeing."""
    agree = judges = 1
    for other in judgements:
        if other.annotation_id == own_annotation_id:
            continue
        theirs = other.outcome(x, y)
        if theirs is None:
            continue
        judges += 1
        agree += theirs == outcome
    return agree / judges, judges


def mean_outcome_agreement(judgements: Sequence[Judgement], response_ids: Sequence[int]) -> float | None:
    """A task's agreement: the mean, over pairs of its annotators, of the share of response pairs both
    judged on which they gave the same outcome, all-bad included (None below two annotators)."""
    if len(judgements) < 2:
        return None
    pairs = list(combinations(response_ids, 2))
    shares = []
    for first, second in combinations(judgements, 2):
        both = same = 0
        for x, y in pairs:
            o1, o2 = first.outcome(x, y), second.outcome(x, y)
            if o1 is None or o2 is None:
                continue
            both += 1
            same += o1 == o2
        if both:
            shares.append(same / both)
    return sum(shares) / len(shares) if shares else None


def consensus_scores(judgements: Iterable[Judgement], response_ids: Sequence[int]) -> dict[int, float | None]:
    """Each response's mean normalised Borda score in [0, 1] over the annotations that ranked it.

    Within one ranking a response scores the share of the other ranked responses it beats, a tie counting
    half (best alone = 1, worst alone = 0). All-bad annotations say nothing about order and are left out.
    None for a response no annotation ranked.
    """
    totals = {rid: 0.0 for rid in response_ids}
    counts = dict.fromkeys(response_ids, 0)
    for judgement in judgements:
        if judgement.all_bad:
            continue
        ranked = [rid for rid in response_ids if rid in judgement.group_of]
        if len(ranked) < 2:
            continue
        for rid in ranked:
            g = judgement.group_of[rid]
            beats = sum(
                1.0 if judgement.group_of[o] > g else 0.5 if judgement.group_of[o] == g else 0.0
                for o in ranked
                if o != rid
            )
            totals[rid] += beats / (len(ranked) - 1)
            counts[rid] += 1
    return {rid: (totals[rid] / counts[rid] if counts[rid] else None) for rid in response_ids}
