"""An annotator's judgement counts (today in UTC, and in total), as the annotation page shows them.

Read from `annotator_progress`, the row a trigger on `annotations` keeps per annotator: one lookup
by key after every submit, the same cost with ten judgements behind the annotator or ten thousand.
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.data.models import AnnotatorProgress, utcnow


def judgement_counts(db: Session, user_id: int, today: date | None = None) -> dict[str, int]:
    """{"today": judgements on the current UTC day, "total": all judgements}; skips not counted."""
    row = db.execute(
        select(
            AnnotatorProgress.judged_total, AnnotatorProgress.judged_day, AnnotatorProgress.judged_on_day
        ).where(AnnotatorProgress.user_id == user_id)
    ).first()
    if row is None:
        return {"today": 0, "total": 0}
    today = today or utcnow().date()
    return {"today": row.judged_on_day if row.judged_day == today else 0, "total": row.judged_total}
