"""From our tables to the trainers' plain inputs: comparisons up to a snapshot, prompts by split."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from app.data.models import Annotation, Comparison, Prompt, Response
from app.services.quality.gold import usable_annotation_clause
from workers.training.data import Comparison as TrainingComparison


def load_comparisons(db: Session, snapshot: int) -> list[TrainingComparison]:
    """Every usable comparison with id <= snapshot (annotators excluded by quality control are left
    out), joined to its prompt and both response texts."""
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
        )
        .join(Prompt, Prompt.id == Comparison.prompt_id)
        .join(chosen, chosen.id == Comparison.chosen_response_id)
        .join(rejected, rejected.id == Comparison.rejected_response_id)
        .join(Annotation, Annotation.id == Comparison.annotation_id)
        .where(Comparison.id <= snapshot, usable_annotation_clause(db))
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
        )
        for row in db.execute(query)
    ]


def load_prompts(db: Session, split: str, limit: int | None = None) -> list[list[dict]]:
    """Chat prompts of one split (train for PPO rollouts, eval for the gate), oldest first."""
    query = select(Prompt.messages).where(Prompt.split == split).order_by(Prompt.id)
    if limit:
        query = query.limit(limit)
    return list(db.scalars(query))
