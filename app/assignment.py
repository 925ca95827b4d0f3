"""Which task an annotator gets next, and returning expired assignments to the pool."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.models import Assignment, utcnow


def expire_stale_assignments(db: Session) -> int:
    """Mark unanswered assignments past their deadline as expired, freeing their slot."""
    result = db.execute(
        update(Assignment)
        .where(Assignment.status == "active", Assignment.expires_at < utcnow())
        .values(status="expired")
    )
    db.commit()
    return result.rowcount or 0
