"""Admin console pages for quality control: agreement, annotators, gold tasks, the policy leaderboard."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse

from app.data.models import Prompt, Task
from app.services.quality.agreement import agreement_report
from app.services.quality.annotator_stats import SuspicionRules, annotator_stats
from app.services.quality.gold import (
    GoldError,
    gold_accuracy,
    gold_candidates,
    gold_choices,
    gold_tasks,
    mark_gold,
    unmark_gold,
)
from app.services.quality.leaderboard import leaderboard
from app.web.deps import DbSession
from app.web.security import Admin
from app.web.templating import render

router = APIRouter(tags=["quality"])

# Bootstrap draws per page view: 1000 puts the 2.5% quantile on 25 draws, and costs well under a
# second for thousands of tasks.
PAGE_BOOTSTRAP = 1000


@router.get("/admin/quality", include_in_schema=False)
def quality_overview(request: Request, db: DbSession, _: Admin):
    settings = request.app.state.settings
    report = agreement_report(db, n_boot=PAGE_BOOTSTRAP)
    accuracy = gold_accuracy(db, settings)
    context = {
        "section": "agreement",
        "report": report,
        "flagged": [g for g in accuracy if g.flagged],
        "gold_count": len(gold_tasks(db)),
        "settings": settings,
    }
    return render(request, "admin/quality.html", context, block="content")


@router.get("/admin/quality/annotators", include_in_schema=False)
def quality_annotators(request: Request, db: DbSession, _: Admin):
    settings = request.app.state.settings
    stats = annotator_stats(db)
    gold = {g.user_id: g for g in gold_accuracy(db, settings)}
    agreement = {row.user_id: row for row in agreement_report(db, n_boot=PAGE_BOOTSTRAP).by_annotator}
    context = {
        "section": "annotators",
        "rows": [(s, gold.get(s.user_id), agreement.get(s.user_id)) for s in stats],
        "rules": SuspicionRules(),
        "settings": settings,
    }
    return render(request, "admin/quality_annotators.html", context, block="content")


def _gold_page(
    request: Request,
    db,
    task_id: int | None,
    *,
    message: str | None = None,
    error: str | None = None,
    status_code: int = 200,
    search: str = "",
):
    task = db.get(Task, task_id) if task_id else None
    prompt = db.get(Prompt, task.prompt_id) if task else None
    if task_id and task is None and error is None:
        error, status_code = f"Task {task_id} does not exist.", 404
    context = {
        "section": "gold",
        "gold": gold_tasks(db),
        "candidates": gold_candidates(db, settings=request.app.state.settings),
        "choices": gold_choices(db, search),
        "search": search,
        "task": task,
        "prompt": prompt,
        "message": message,
        "error": error,
        "settings": request.app.state.settings,
    }
    return render(request, "admin/quality_gold.html", context, block="content", status_code=status_code)


@router.get("/admin/quality/gold", include_in_schema=False)
def quality_gold(
    request: Request,
    db: DbSession,
    _: Admin,
    task_id: Annotated[
        int | None, Query(ge=1, description="Load this task to pick its best response.")
    ] = None,
    done: Annotated[str | None, Query(max_length=20)] = None,
    q: Annotated[str, Query(max_length=200, description="Only tasks whose prompt contains this text.")] = "",
):
    messages = {"marked": "Gold response saved.", "unmarked": "The task is an ordinary task again."}
    return _gold_page(request, db, task_id, message=messages.get(done or ""), search=q)


@router.post("/admin/quality/gold/{task_id}", include_in_schema=False)
def quality_gold_mark(
    request: Request,
    db: DbSession,
    _: Admin,
    task_id: int,
    response_id: Annotated[int, Form(ge=1)],
):
    try:
        mark_gold(db, task_id, response_id, request.app.state.settings)
    except GoldError as exc:
        db.rollback()
        status_code = 404 if "does not exist" in str(exc) else 400
        return _gold_page(request, db, task_id, error=str(exc), status_code=status_code)
    db.commit()
    return RedirectResponse(f"/admin/quality/gold?task_id={task_id}&done=marked", status_code=303)


@router.post("/admin/quality/gold/{task_id}/unmark", include_in_schema=False)
def quality_gold_unmark(request: Request, db: DbSession, _: Admin, task_id: int):
    try:
        unmark_gold(db, task_id, request.app.state.settings)
    except GoldError as exc:
        db.rollback()
        return _gold_page(request, db, None, error=str(exc), status_code=404)
    db.commit()
    return RedirectResponse("/admin/quality/gold?done=unmarked", status_code=303)


@router.get("/admin/quality/leaderboard", include_in_schema=False)
def quality_leaderboard(request: Request, db: DbSession, _: Admin):
    board = leaderboard(db, request.app.state.settings, n_boot=PAGE_BOOTSTRAP)
    chart = {
        "labels": [f"v{e.version}" for e in board.entries],
        "ratings": [round(e.rating.value, 1) for e in board.entries],
        "intervals": [
            [round(e.rating.low, 1), round(e.rating.high, 1)] if e.rating.low == e.rating.low else None
            for e in board.entries
        ],
    }
    context = {"section": "leaderboard", "board": board, "chart": chart}
    return render(request, "admin/quality_leaderboard.html", context, block="content")
