"""An annotator's judgement counts (today in UTC, and in total), as the annotation page shows them.

Read from `annotator_progress`, the row a trigger on `annotations` keeps per annotator: one lookup
by key after every submit, the same cost with ten judgements behind the annotator or ten thousand.
The annotation page reads it with the hot-path statements (no session, no transaction);
`judgement_counts` reads it in a session for everything else.
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.data.models import AnnotatorProgress, utcnow
from app.data.statements import Statement, StatementRunner


def _counts(row, today: date | None) -> dict[str, int]:
    if row is None:
        return {"today": 0, "total": 0}
    today = today or utcnow().date()
    # SQLite's driver hands the day back as text, Postgres's as a date.
    on_day = str(row.judged_day)[:10] == today.isoformat()
    return {"today": row.judged_on_day if on_day else 0, "total": row.judged_total}


def judgement_counts(db: Session, user_id: int, today: date | None = None) -> dict[str, int]:
    """{"today": judgements on the current UTC day, "total": all judgements}; skips not counted."""
    row = db.execute(
        select(
            AnnotatorProgress.judged_total, AnnotatorProgress.judged_day, AnnotatorProgress.judged_on_day
        ).where(AnnotatorProgress.user_id == user_id)
    ).first()
    return _counts(row, today)


async def judgement_counts_now(statements: StatementRunner, user_id: int) -> dict[str, int]:
    """judgement_counts on the annotation statements (the hot path: one statement, autocommit)."""
    rows = await statements.rows(Statement.ANNOTATOR_PROGRESS, {"user_id": user_id})
    return _counts(rows[0] if rows else None, None)
