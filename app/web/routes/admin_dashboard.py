"""The admin dashboard: the live version, recent rounds and runs, workers and queues, annotation counts.

The live-version panel is polled by htmx, which gets only that block of the page.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.data.models import Annotation, Comparison, Run, Task, User
from app.services.rounds import active_round, comparisons_since_last_round
from app.web.admin_pages import live_state, recent_rounds, runs_of
from app.web.deps import DbSession
from app.web.security import Admin
from app.web.templating import is_htmx, render

router = APIRouter(tags=["admin console"], include_in_schema=False)


def annotator_counts(db: Session) -> dict[str, int]:
    """Annotators, today's activity, and the sizes of the annotation pipeline's tables."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return {
        "annotators": db.scalar(
            select(func.count(User.id)).where(User.role == "annotator", User.is_active.is_(True))
        )
        or 0,
        "active_today": db.scalar(
            select(func.count(func.distinct(Annotation.user_id))).where(Annotation.created_at >= today)
        )
        or 0,
        "annotations_today": db.scalar(
            select(func.count(Annotation.id)).where(Annotation.created_at >= today)
        )
        or 0,
        "annotations": db.scalar(select(func.count(Annotation.id))) or 0,
        "comparisons": db.scalar(select(func.count(Comparison.id))) or 0,
        "open_tasks": db.scalar(select(func.count(Task.id)).where(Task.status == "open")) or 0,
    }


@router.get("/admin")
def dashboard(request: Request, principal: Admin, db: DbSession):
    live = live_state(request, db)
    if is_htmx(request):  # the polled live-version panel only
        return render(request, "admin/dashboard.html", {"live": live}, block="live")
    settings = request.app.state.settings
    rounds = recent_rounds(db, 5)
    runs = list(db.scalars(select(Run).order_by(Run.id.desc()).limit(10)))
    context = {
        "live": live,
        "rounds": rounds,
        "round_runs": runs_of(db, [r.id for r in rounds]),
        "runs": runs,
        "workers": request.app.state.worker_reports.get(request.app.state.sessionmaker, settings),
        "stale_seconds": settings.worker_stale_seconds,
        "counts": annotator_counts(db),
        "since_last_round": comparisons_since_last_round(db),
        "form": None,
        "active_round": active_round(db),
    }
    return render(request, "admin/dashboard.html", context, block="live")
