"""The pairwise comparisons a ranking gives: the one statement of the rule in Python.

Every response in a better tie group beats every response in a worse one, with margin = the distance
between the groups (adjacent groups 1, one group between them 2, …); responses in the same group
(ties) give none, and an all-bad judgement gives none. Pairs are derived where a judgement is stored,
after its ranking was checked against the responses shown (sqlite_runner.store_judgement here;
prefloop_submit_annotation, migrations/sql/submit_annotation_v3.sql, states the same rule in SQL).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    chosen: int
    rejected: int
    margin: float


def derive_pairs(ranking: list[list[int]], all_bad: bool = False) -> list[Pair]:
    """Pairs (chosen beats rejected) from tie groups best→worst; margin is the group distance."""
    if all_bad:
        return []
    pairs = []
    for i, better in enumerate(ranking):
        for j in range(i + 1, len(ranking)):
            for chosen in better:
                for rejected in ranking[j]:
                    pairs.append(Pair(chosen=chosen, rejected=rejected, margin=float(j - i)))
    return pairs
