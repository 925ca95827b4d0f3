"""The annotation UI: one page whose task block is swapped by htmx after every submission.

The page shows the prompt and its responses (escaped text through safe Markdown), the ranking
controls (drag, keyboard, ties, all bad, flags, skip, rationale), the admin-edited guidelines, the
annotator's progress and the live policy version. The submit endpoint answers with the next task's
block; a refused submission answers with a message swapped into the task's error area instead.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.services.annotation import AnnotationError, submit_annotation
from app.services.annotator_progress import judgement_counts_now
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


async def next_view_and_progress(request: Request, user_id: int) -> tuple[TaskView | None, dict[str, int]]:
    """The annotator's next task and judgement counts, both on the app's statements, side by side.
    The counts are one row however long the annotator's history (app.services.annotator_progress)."""
    view, progress = await asyncio.gather(
        next_view(request, user_id), judgement_counts_now(request.app.state.statements, user_id)
    )
    return view, progress


def _holder_knows_live_version(request: Request) -> bool:
    holder = getattr(request.app.state, "policy_holder", None)
    return holder is not None and holder.alias_checked


def live_version(request: Request, db: Session | None) -> int | None:
    """The live policy's version, as the policy holder follows it. While it knows of none, a page
    asks the database (a policy may have just gone live); the htmx task block, on the hot path,
    takes the holder's word once it has read the alias (it polls every few seconds)."""
    holder = getattr(request.app.state, "policy_holder", None)
    if holder is not None and holder.live_version is not None:
        return holder.live_version
    if db is None or (is_htmx(request) and _holder_knows_live_version(request)):
        return None
    policy = live_policy(db)
    return policy.version if policy else None


def _task_context(
    request: Request,
    db: Session | None,
    progress: dict[str, int],
    view: TaskView | None,
    flash: str | None = None,
) -> dict[str, Any]:
    context = {
        "task": view,
        "progress": progress,
        "live_version": live_version(request, db),
        "flag_labels": FLAG_LABELS,
        "skip_reasons": SKIP_REASONS,
        "flash": flash,
    }
    return context


def _render_page(
    request: Request,
    db: Session | None,
    progress: dict[str, int],
    view: TaskView | None,
    flash: str | None = None,
):
    """The page (or, for htmx, its task block) around `view`; may read the database (guidelines, the
    live version before the policy holder has read it), so a worker thread unless render_on_loop."""
    context = _task_context(request, db, progress, view, flash=flash)
    if not is_htmx(request):
        context["guidelines"] = load_guidelines(db)
    if db is not None:
        db.commit()  # only read: a commit keeps the connection's prepared statements (app.data.db.read_session)
    return render(request, "annotate/index.html", context, block="task")


async def render_page(
    request: Request, db: Session, progress: dict[str, int], view: TaskView | None, flash: str | None = None
):
    """_render_page, on the event loop when it reads nothing: the htmx task block once the policy
    holder knows the live version (the hot path: no thread hand-off, no session)."""
    if is_htmx(request) and _holder_knows_live_version(request):
        return _render_page(request, None, progress, view, flash)  # reads nothing: no session
    return await run_in_threadpool(_render_page, request, db, progress, view, flash)


@router.get("/annotate")
async def annotate_page(request: Request, principal: Annotator, db: DbSession):
    # The claim runs on the event loop where the app has hot connections (app.data.statements).
    view, progress = await next_view_and_progress(request, principal.id)
    return await render_page(request, db, progress, view)


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
    view, progress = await next_view_and_progress(request, principal.id)
    return await render_page(request, db, progress, view, flash)
