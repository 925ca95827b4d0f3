"""Admin pages for the annotation inputs: prompt sets (upload, sizes, generate tasks from a set),
the task pool, and the annotation guidelines (Markdown stored in app_settings, previewed safely)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.data.models import PromptSet, Run, Task
from app.services.guidelines import DEFAULT_GUIDELINES, load_guidelines, save_guidelines, saved_guidelines
from app.services.pool_settings import (
    MAX_TASK_OVERLAP,
    PoolSettingError,
    paused_prompt_sets,
    save_task_overlap,
    saved_task_overlap,
    set_prompt_set_in_refill,
    task_overlap,
)
from app.services.prompt_sets import create_prompt_set, list_prompt_sets
from app.services.prompt_uploads import PromptSetError
from app.services.tasks_pool import claimable_task_count, request_refill
from app.web.deps import DbSession
from app.web.markdown import render_markdown
from app.web.security import Admin
from app.web.templating import render
from app.web.uploads import read_within_limit

log = logging.getLogger(__name__)

router = APIRouter(tags=["admin prompts"], include_in_schema=False)

MAX_GUIDELINES_CHARS = 50_000


def pool_summary(db: Session) -> dict[str, Any]:
    by_status = dict(
        db.execute(select(Task.status, func.count(Task.id)).group_by(Task.status)).tuples().all()
    )
    runs = db.scalars(select(Run).where(Run.kind == "generate").order_by(Run.id.desc()).limit(5)).all()
    return {
        "claimable": claimable_task_count(db),
        "open": by_status.get("open", 0),
        "done": by_status.get("done", 0),
        "closed": by_status.get("closed", 0),
        "runs": runs,
    }


def _page(request: Request, db: Session, status_code: int = 200, **extra: Any) -> HTMLResponse:
    context = {
        "sets": list_prompt_sets(db),
        "pool": pool_summary(db),
        "settings": request.app.state.settings,
        "form": {},
        "report": None,
        "upload_error": None,
        "upload_errors": [],
        "message": None,
        "overlap": task_overlap(db, request.app.state.settings),
        "overlap_saved": saved_task_overlap(db) is not None,
        "max_overlap": MAX_TASK_OVERLAP,
        "overlap_error": None,
        "paused_sets": paused_prompt_sets(db),
        "notice": None,
    }
    context.update(extra)
    db.rollback()
    return render(request, "admin/prompts.html", context, status_code=status_code)


@router.get("/admin/prompts")
def prompts_page(request: Request, principal: Admin, db: DbSession, saved: str = ""):
    return _page(
        request, db, notice="Saved: new tasks use the overlap below." if saved == "overlap" else None
    )


@router.post("/admin/prompts")
def prompts_upload(
    request: Request,
    principal: Admin,
    db: DbSession,
    file: Annotated[UploadFile, File()],
    name: Annotated[str, Form(max_length=200)] = "",
    description: Annotated[str, Form(max_length=2000)] = "",
    eval_fraction: Annotated[str, Form(max_length=20)] = "0.1",
    split_seed: Annotated[str, Form(max_length=20)] = "0",
    skip_invalid: Annotated[bool, Form()] = False,
):
    form = {
        "name": name,
        "description": description,
        "eval_fraction": eval_fraction,
        "split_seed": split_seed,
        "skip_invalid": skip_invalid,
    }
    try:
        fraction, seed = float(eval_fraction), int(split_seed)
    except ValueError:
        return _page(
            request, db, 422, form=form, upload_error="Eval fraction must be a number and seed an integer."
        )
    data = read_within_limit(file, request.app.state.settings.max_upload_bytes)
    if data is None:
        return _page(request, db, 413, form=form, upload_error="The file is too large; split it.")
    try:
        report = create_prompt_set(
            db,
            name=name or (file.filename or "").rsplit(".", 1)[0],
            data=data,
            filename=file.filename,
            description=description,
            eval_fraction=fraction,
            split_seed=seed,
            created_by=principal.id,
            skip_invalid=skip_invalid,
        )
    except PromptSetError as exc:
        db.rollback()
        return _page(request, db, exc.status, form=form, upload_error=str(exc), upload_errors=exc.errors)
    return _page(request, db, report=report)


@router.post("/admin/prompts/{prompt_set_id}/refill")
def prompts_refill_toggle(
    request: Request,
    prompt_set_id: int,
    principal: Admin,
    db: DbSession,
    included: Annotated[bool, Form()],
):
    """Let the automatic refill draw from this prompt set, or pause it (its tasks stay)."""
    if db.get(PromptSet, prompt_set_id) is None:
        return _page(request, db, 404, message=f"There is no prompt set {prompt_set_id}.")
    set_prompt_set_in_refill(db, prompt_set_id, included)
    return RedirectResponse("/admin/prompts", status_code=303)


@router.post("/admin/prompts/{prompt_set_id}/generate")
def prompts_generate(
    request: Request,
    prompt_set_id: int,
    principal: Admin,
    db: DbSession,
    n_prompts: Annotated[int, Form(ge=1, le=10_000)] = 16,
):
    """Queue a generation run over this set's train prompts (the live policy answers them)."""
    if db.get(PromptSet, prompt_set_id) is None:
        return _page(request, db, 404, message=f"There is no prompt set {prompt_set_id}.")
    try:
        run_id = request_refill(
            db,
            prompt_set_id=prompt_set_id,
            n_prompts=n_prompts,
            created_by=principal.id,
            settings=request.app.state.settings,
        )
    except Exception as exc:  # the broker is down: the run row exists, the beat re-queues it later
        log.warning("could not enqueue the generation run: %s", exc)
        db.rollback()
        return _page(request, db, 503, message=f"The run could not be queued: {exc}")
    if run_id is None:
        return _page(request, db, 409, message="Nothing to generate: no live policy or no train prompts.")
    return RedirectResponse(f"/admin/runs/{run_id}", status_code=303)


# ---------------------------------------------------------------- task overlap


@router.post("/admin/prompts/overlap")
def overlap_save(
    request: Request,
    principal: Admin,
    db: DbSession,
    overlap: Annotated[str, Form(max_length=10)] = "",
    reset: Annotated[bool, Form()] = False,
):
    """Annotators per new task, stored (or reset to PREFLOOP_TASK_OVERLAP); a bad value answers 422."""
    value = None
    if not reset:
        text = overlap.strip()
        if not text.isdigit():
            return _page(
                request, db, 422, overlap_error="Enter a whole number of annotators per task, e.g. 3."
            )
        value = int(text)
    try:
        save_task_overlap(db, value)
    except PoolSettingError as exc:
        return _page(request, db, 422, overlap_error=str(exc))
    return RedirectResponse("/admin/prompts?saved=overlap", status_code=303)


# ---------------------------------------------------------------- guidelines


@router.get("/admin/prompts/guidelines")
def guidelines_page(request: Request, principal: Admin, db: DbSession, saved: bool = False):
    text = load_guidelines(db)
    row = saved_guidelines(db)
    db.rollback()
    context = {
        "text": text,
        "saved": saved,
        "is_default": row is None,
        "updated_at": row.updated_at if row else None,
    }
    return render(request, "admin/prompts_guidelines.html", context)


@router.post("/admin/prompts/guidelines")
def guidelines_save(
    request: Request,
    principal: Admin,
    db: DbSession,
    text: Annotated[str, Form(max_length=MAX_GUIDELINES_CHARS)] = "",
    reset: Annotated[bool, Form()] = False,
):
    save_guidelines(db, DEFAULT_GUIDELINES if reset else text)
    return RedirectResponse("/admin/prompts/guidelines?saved=1", status_code=303)


@router.post("/admin/prompts/guidelines/preview")
def guidelines_preview(
    principal: Admin, text: Annotated[str, Form(max_length=MAX_GUIDELINES_CHARS)] = ""
) -> HTMLResponse:
    """The Markdown as annotators will see it (htmx, as the admin types)."""
    return HTMLResponse(render_markdown(text), headers={"Vary": "HX-Request"})
