"""From our tables to the trainers' plain inputs: comparisons up to a snapshot (and the side of a
round's judge split they fall on), prompts by split."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from app.data.models import Annotation, Comparison, Prompt, Response
from app.services.quality.gold import usable_annotation_clause
from workers.training.data import Comparison as TrainingComparison


def load_comparisons(db: Session, snapshot: int) -> list[TrainingComparison]:
    """Every usable comparison with id <= snapshot (annotators excluded by quality control are left
    out) on a train-split prompt, joined to its prompt and both response texts (and whether each
    ended on its own or was cut off at the length limit). Comparisons on eval
    prompts (the arena votes of a human-confirmed round) never train: those prompts stay held out."""
    chosen = aliased(Response)
    rejected = aliased(Response)
    query = (
        select(
            Comparison.id,
            Comparison.prompt_id,
            Comparison.annotation_id,
            Prompt.messages,
            chosen.text,
            rejected.text,
            Comparison.margin,
            chosen.ended_with_eos,
            rejected.ended_with_eos,
        )
        .join(Prompt, Prompt.id == Comparison.prompt_id)
        .join(chosen, chosen.id == Comparison.chosen_response_id)
        .join(rejected, rejected.id == Comparison.rejected_response_id)
        .join(Annotation, Annotation.id == Comparison.annotation_id)
        .where(Comparison.id <= snapshot, Prompt.split == "train", usable_annotation_clause(db))
        .order_by(Comparison.id)
    )
    return [
        TrainingComparison(
            comparison_id=row[0],
            prompt_id=row[1],
            group_id=row[2],
            prompt=row[3],
            chosen=row[4],
            rejected=row[5],
            margin=float(row[6] or 0.0),
            chosen_ended=bool(row[7]),
            rejected_ended=bool(row[8]),
        )
        for row in db.execute(query)
    ]


def load_prompts(db: Session, split: str, limit: int | None = None) -> list[list[dict]]:
    """Chat prompts of one split (train for PPO rollouts, eval for the gate), oldest first."""
    query = select(Prompt.messages).where(Prompt.split == split).order_by(Prompt.id)
    if limit:
        query = query.limit(limit)
    return list(db.scalars(query))


def judge_holds(prompt_id: int, share: float, seed: int) -> bool:
    """Whether this prompt's comparisons belong to the judge's share (the rest train the policy).

    A pure function of (prompt, seed, share): the two sides are disjoint by prompt, so the judge's
    errors are independent of the reward model the policy is optimised against, and a redelivered
    stage draws the same split.
    """
    digest = hashlib.sha256(f"judge:{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def comparisons_for_side(
    comparisons: list[TrainingComparison], split: dict | None
) -> list[TrainingComparison]:
    """The comparisons of one side of a round's judge split (`{"side": "policy"|"judge",
    "judge_share": 0.5, "seed": 7}`); all of them without a split."""
    if not split:
        return comparisons
    share, seed = float(split["judge_share"]), int(split["seed"])
    want_judge = split["side"] == "judge"
    return [c for c in comparisons if judge_holds(c.prompt_id, share, seed) == want_judge]
