"""The annotation UI: one page whose task block is swapped by htmx after every submission.

The page shows the prompt and its responses (escaped text through safe Markdown), the ranking
controls (drag, keyboard, ties, all bad, flags, skip, rationale), the admin-edited guidelines, the
annotator's progress and the live policy version. The submit endpoint answers with the next task's
block; a refused submission answers with a message swapped into the task's error area instead.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.services.annotation import AnnotationError, submit_annotation
from app.services.annotator_progress import judgement_counts
from app.services.assignment import TaskView
from app.services.guidelines import load_guidelines
from app.services.registry import live_policy
from app.services.schemas import FLAG_LABELS, AnnotationIn
from app.web.deps import DbSession
from app.web.next_task import next_view
from app.web.security import Annotator
from app.web.templating import is_htmx, render

router = APIRouter(tags=["annotate"], include_in_schema=False)

SKIP_REASONS = (
    "I can't judge this topic",
    "The prompt is unclear or broken",
    "The responses are unreadable",
    "Other",
)


def annotator_progress(db: Session, user_id: int) -> dict[str, int]:
    """Judgements (skips not counted) today (UTC) and in total: one row, however long the history."""
    return judgement_counts(db, user_id)


def live_version(request: Request, db: Session) -> int | None:
    holder = getattr(request.app.state, "policy_holder", None)
    if holder is not None and holder.live_version is not None:
        return holder.live_version
    policy = live_policy(db)
    return policy.version if policy else None


def _task_context(
    request: Request, db: Session, user_id: int, view: TaskView | None, flash: str | None = None
) -> dict[str, Any]:
    context = {
        "task": view,
        "progress": annotator_progress(db, user_id),
        "live_version": live_version(request, db),
        "flag_labels": FLAG_LABELS,
        "skip_reasons": SKIP_REASONS,
        "flash": flash,
    }
    return context


def _render_page(
    request: Request, db: Session, user_id: int, view: TaskView | None, flash: str | None = None
):
    """The page (or, for htmx, its task block) around `view`; reads the database, so a worker thread."""
    context = _task_context(request, db, user_id, view, flash=flash)
    if not is_htmx(request):
        context["guidelines"] = load_guidelines(db)
    db.commit()  # only read: a commit keeps the connection's prepared statements (app.data.db.read_session)
    return render(request, "annotate/index.html", context, block="task")


@router.get("/annotate")
async def annotate_page(request: Request, principal: Annotator, db: DbSession):
    # The claim runs on the event loop where the app has hot connections (app.data.statements).
    view = await next_view(request, principal.id)
    return await run_in_threadpool(_render_page, request, db, principal.id, view)


@router.get("/annotate/next")
async def annotate_next(request: Request, principal: Annotator, db: DbSession):
    """The task block alone for htmx ('check again', the empty-pool poll); the whole page otherwise."""
    return await annotate_page(request, principal, db)


def _refusal(request: Request, message: str, status_code: int) -> HTMLResponse:
    """Show a refused submission inside the task's error area; the task stays on screen."""
    response = render(
        request, "annotate/_error.html", {"message": message, "status": status_code}, status_code=200
    )
    response.headers["HX-Retarget"] = "#submit-error"
    response.headers["HX-Reswap"] = "innerHTML"
    return response


@router.post("/annotate/tasks/{task_id}")
async def annotate_submit(
    request: Request,
    task_id: int,
    principal: Annotator,
    db: DbSession,
    payload: Annotated[str, Form(max_length=200_000)],
):
    """Store the judgement (JSON in the `payload` field, the same schema as the API) and answer with
    the next task's block."""
    if not is_htmx(request):
        return RedirectResponse("/annotate", status_code=303)
    try:
        body = AnnotationIn.model_validate_json(payload)
    except ValidationError as exc:
        problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in exc.errors())
        return _refusal(request, problems, 422)
    try:
        result, _created = await submit_annotation(request.app.state.statements, task_id, principal.id, body)
    except AnnotationError as exc:
        return _refusal(request, exc.message, exc.status)
    if result.status == "skipped":
        flash = f"Skipped task #{task_id}."
    elif body.all_bad:
        flash = f"Saved task #{task_id} as all bad."
    else:
        flash = f"Saved task #{task_id}: {result.comparisons} comparisons."
    view = await next_view(request, principal.id)
    return await run_in_threadpool(_render_page, request, db, principal.id, view, flash)
