"""The annotation UI: one page whose task block is swapped by htmx after every submission.

The page shows the prompt and its responses (escaped text through safe Markdown), the ranking
controls (drag, keyboard, ties, all bad, flags, skip, rationale), the admin-edited guidelines, the
annotator's progress and the live policy version. The submit endpoint answers with the next task's
block; a refused submission answers with a message swapped into the task's error area instead.
A held task can be given back (release); an empty pool says what is on its way and polls.
The history page lists the annotator's recent judgements; one still open can be revised.
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
from app.services.annotator_progress import judgement_counts, judgement_counts_now
from app.services.assignment import TaskView, release_task
from app.services.guidelines import load_guidelines
from app.services.pool_outlook import pool_outlook
from app.services.registry import live_policy
from app.services.revisions import (
    judged_task_view,
    own_annotation,
    recent_judgements,
    revise_annotation,
    revision_blocker,
)
from app.services.schemas import FLAG_LABELS, MAX_RATIONALE_CHARS, AnnotationIn
from app.web.deps import DbSession
from app.web.next_task import next_view
from app.web.rate_limits import RateLimited, rate_limits
from app.web.security import Annotator
from app.web.templating import is_htmx, render

router = APIRouter(tags=["annotate"], include_in_schema=False)

SKIP_REASONS = (
    "I can't judge this topic",
    "The prompt is unclear or broken",
    "The responses are unreadable",
    "Other",
)
# The empty-pool page polls this often: soon while tasks are being written, lazily otherwise.
POLL_SECONDS_GENERATING = 5
POLL_SECONDS_IDLE = 30


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
        "max_rationale": MAX_RATIONALE_CHARS,
        "revise": None,
    }
    if view is None and db is not None:
        outlook = pool_outlook(db)
        context["outlook"] = outlook
        context["poll_seconds"] = POLL_SECONDS_GENERATING if outlook.generating else POLL_SECONDS_IDLE
    return context


def _render_page(
    request: Request,
    db: Session | None,
    progress: dict[str, int],
    view: TaskView | None,
    flash: str | None = None,
):
    """The page (or, for htmx, its task block) around `view`; may read the database (guidelines, the
    live version before the policy holder has read it, the empty pool's outlook), so a worker thread
    unless render_page finds it reads nothing."""
    context = _task_context(request, db, progress, view, flash=flash)
    if not is_htmx(request):
        context["guidelines"] = load_guidelines(db)
    if db is not None:
        db.commit()  # only read: a commit keeps the connection's prepared statements (app.data.db.read_session)
    return render(request, "annotate/index.html", context, block="task")


async def render_page(
    request: Request, db: Session, progress: dict[str, int], view: TaskView | None, flash: str | None = None
):
    """_render_page, on the event loop when it reads nothing: the htmx block of a task once the policy
    holder knows the live version (the hot path: no thread hand-off, no session). An empty pool reads
    its outlook, so it takes a worker thread."""
    if is_htmx(request) and view is not None and _holder_knows_live_version(request):
        return _render_page(request, None, progress, view, flash)  # reads nothing: no session
    return await run_in_threadpool(_render_page, request, db, progress, view, flash)


@router.get("/annotate")
async def annotate_page(request: Request, principal: Annotator, db: DbSession):
    await rate_limits(request).task_request(principal)
    # The claim runs on the event loop where the app has hot connections (app.data.statements).
    view, progress = await next_view_and_progress(request, principal.id)
    return await render_page(request, db, progress, view)


@router.get("/annotate/next")
async def annotate_next(request: Request, principal: Annotator, db: DbSession):
    """The task block alone for htmx ('check again', the empty-pool poll); the whole page otherwise."""
    return await annotate_page(request, principal, db)


def _parse_judgement(payload: str) -> AnnotationIn | str:
    """The posted judgement, or what is wrong with it in words."""
    try:
        return AnnotationIn.model_validate_json(payload)
    except ValidationError as exc:
        return "; ".join(_problem(err) for err in exc.errors())


def _problem(err: dict[str, Any]) -> str:
    field = err.get("loc", ("",))[0] if err.get("loc") else ""
    if field == "rationale" and err.get("type") == "string_too_long":
        return f"The rationale is too long: at most {MAX_RATIONALE_CHARS:,} characters. Shorten it and submit again."
    return err["msg"].removeprefix("Value error, ")


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
        await rate_limits(request).submission(principal)
    except RateLimited as exc:
        return _refusal(request, exc.detail, exc.status_code)
    body = _parse_judgement(payload)
    if isinstance(body, str):
        return _refusal(request, body, 422)
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


@router.post("/annotate/tasks/{task_id}/release")
async def annotate_release(request: Request, task_id: int, principal: Annotator, db: DbSession):
    """Give the held task back unjudged and show the next one (never the one given back)."""
    if not is_htmx(request):
        return RedirectResponse("/annotate", status_code=303)
    released = await run_in_threadpool(release_task, db, task_id, principal.id)
    if released:
        flash = f"Gave task #{task_id} back: someone else will judge it."
    else:
        flash = f"Task #{task_id} was no longer yours to give back."
    view, progress = await next_view_and_progress(request, principal.id)
    return await render_page(request, db, progress, view, flash)


# ---------------------------------------------------------------- history and revisions


def _history_page(request: Request, db: Session, user_id: int, flash: str | None):
    context = {"judgements": recent_judgements(db, user_id), "flash": flash}
    db.commit()
    return render(request, "annotate/history.html", context)


@router.get("/annotate/history")
async def annotate_history(request: Request, principal: Annotator, db: DbSession, revised: int | None = None):
    """The annotator's recent judgements, newest first, each with a Revise link while it is open."""
    flash = (
        f"Saved your revision of judgement #{revised}; exports and rounds use it from now on."
        if revised
        else None
    )
    return await run_in_threadpool(_history_page, request, db, principal.id, flash)


def _revise_page(request: Request, db: Session, user_id: int, annotation_id: int):
    try:
        annotation = own_annotation(db, annotation_id, user_id)
    except AnnotationError as exc:
        return render(
            request, "error.html", {"status": exc.status, "detail": exc.message}, status_code=exc.status
        )
    blocker = revision_blocker(db, annotation)
    if blocker:
        detail = f"Judgement #{annotation_id} cannot be revised: {blocker}."
        return render(request, "error.html", {"status": 409, "detail": detail}, status_code=409)
    judged = judged_task_view(db, annotation)
    context = _task_context(request, db, judgement_counts(db, user_id), judged.view)
    context["revise"] = {
        "annotation": annotation,
        "tied": set(judged.tied),
        "verdict": judged.verdict,
        "flags": annotation.flags.get("responses", {}),
        "flag_note": annotation.flags.get("note", ""),
        "shown": [r.id for r in sorted(judged.view.responses, key=lambda r: r.position)],
    }
    context["guidelines"] = load_guidelines(db)
    db.commit()
    return render(request, "annotate/index.html", context)


@router.get("/annotate/history/{annotation_id}")
async def annotate_revise_page(request: Request, annotation_id: int, principal: Annotator, db: DbSession):
    """A judged task laid out as it was judged, to change and save as a revision."""
    return await run_in_threadpool(_revise_page, request, db, principal.id, annotation_id)


@router.post("/annotate/history/{annotation_id}")
def annotate_revise(
    request: Request,
    annotation_id: int,
    principal: Annotator,
    db: DbSession,
    payload: Annotated[str, Form(max_length=200_000)],
):
    """Store the revised judgement (the replaced version is kept) and go back to the history."""
    if not is_htmx(request):
        return RedirectResponse(f"/annotate/history/{annotation_id}", status_code=303)
    body = _parse_judgement(payload)
    if isinstance(body, str):
        return _refusal(request, body, 422)
    try:
        revise_annotation(db, annotation_id, principal.id, body)
    except AnnotationError as exc:
        return _refusal(request, exc.message, exc.status)
    response = HTMLResponse("")
    response.headers["HX-Redirect"] = f"/annotate/history?revised={annotation_id}"
    return response
