"""JSON API of the annotation side: next task, submit a judgement, prompt sets.

Bearer tokens or the browser session; annotators and admins annotate, admins upload prompt sets.
The browser UI (app/web/routes/annotate.py) calls the same service functions.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile, status
from fastapi.responses import JSONResponse, Response

from app.services.annotation import AnnotationError, submit_annotation
from app.services.assignment import TaskView
from app.services.prompt_sets import create_prompt_set, list_prompt_sets
from app.services.prompt_uploads import PromptSetError
from app.services.schemas import (
    AnnotationIn,
    AnnotationResult,
    PromptSetErrorOut,
    PromptSetImportOut,
    PromptSetOut,
    RowErrorOut,
    TaskOut,
)
from app.web.deps import DbSession, PathId
from app.web.next_task import next_view
from app.web.rate_limits import rate_limits
from app.web.security import Admin, Annotator, Researcher
from app.web.uploads import read_within_limit

router = APIRouter(tags=["annotation"])


def task_json(view: TaskView) -> dict:
    """TaskOut as plain JSON data (built directly: this is on every annotator's request)."""
    return {
        "id": view.id,
        "kind": view.kind,
        "messages": [{"role": m["role"], "content": m["content"]} for m in view.messages],
        "prompt": view.prompt_text,
        "responses": [{"id": r.id, "label": i, "text": r.text} for i, r in enumerate(view.responses, 1)],
        "expires_at": view.expires_at.isoformat() if view.expires_at else None,
    }


def json_response(data: dict, status_code: int = 200) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status_code, media_type="application/json")


@router.get(
    "/api/tasks/next",
    response_model=TaskOut,
    summary="The task to work on now",
    responses={
        204: {"description": "No task is left for you right now."},
        429: {"description": "Too many task requests; wait Retry-After seconds."},
    },
)
async def api_next_task(
    request: Request,
    principal: Annotator,
    kind: Annotated[
        list[Literal["rank", "arena"]] | None, Query(description="Only these task kinds (default: any).")
    ] = None,
):
    """Assigns a task you have neither done nor skipped (or returns the one you hold). Submit before
    `expires_at`, or the slot returns to the pool. Arena tasks never reveal which policy wrote what."""
    await rate_limits(request).task_request(principal)
    view = await next_view(request, principal.id, kind)
    if view is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return json_response(task_json(view))


@router.post(
    "/api/tasks/{task_id}/annotation",
    response_model=AnnotationResult,
    status_code=status.HTTP_201_CREATED,
    summary="Submit your judgement of a task",
    responses={
        200: {"model": AnnotationResult, "description": "The same judgement was already stored (replay)."},
        404: {"description": "No such task."},
        409: {"description": "A different judgement exists, or the task is not (any more) yours."},
        422: {"description": "Unknown, foreign, missing or repeated response ids, or an invalid payload."},
        429: {"description": "Too many submissions; wait Retry-After seconds."},
    },
)
async def api_submit_annotation(
    request: Request,
    task_id: PathId,
    payload: AnnotationIn,
    principal: Annotator,
    next: Annotated[bool, Query(description="Also assign and return the next task (`next_task`).")] = False,
):
    """Idempotent: sending the same judgement again returns the stored result with 200."""
    await rate_limits(request).submission(principal)
    statements = request.app.state.statements
    try:
        result, created = await submit_annotation(statements, task_id, principal.id, payload)
    except AnnotationError as exc:
        raise HTTPException(exc.status, exc.message) from None
    body = result.model_dump(exclude={"next_task"})
    if next:
        view = await next_view(request, principal.id)
        body["next_task"] = task_json(view) if view else None
    return json_response(body, status.HTTP_201_CREATED if created else status.HTTP_200_OK)


def prompt_set_out(summary) -> PromptSetOut:
    return PromptSetOut(
        id=summary.id,
        name=summary.name,
        description=summary.description,
        eval_fraction=summary.eval_fraction,
        split_seed=summary.split_seed,
        prompts=summary.prompts,
        train=summary.train,
        eval=summary.eval,
        created_at=summary.created_at,
    )


def _row_errors(errors) -> list[RowErrorOut]:
    return [RowErrorOut(line=e.line, unit=e.unit, message=e.message) for e in errors]


def read_upload(file: UploadFile, limit: int) -> bytes:
    data = read_within_limit(file, limit)
    if data is None:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"the file is larger than {limit // (1024 * 1024)} MiB; split it into several sets",
        )
    return data


@router.post(
    "/api/prompt-sets",
    response_model=PromptSetImportOut,
    status_code=status.HTTP_201_CREATED,
    summary="Upload a prompt set (JSONL, CSV or Parquet)",
    responses={
        409: {"model": PromptSetErrorOut, "description": "A set with this name exists."},
        413: {"description": "The file is too large."},
        422: {"model": PromptSetErrorOut, "description": "Invalid rows, listed with their line numbers."},
    },
)
def api_create_prompt_set(
    request: Request,
    principal: Admin,
    db: DbSession,
    file: Annotated[UploadFile, File(description="Rows with a `prompt` text or a `messages` chat list.")],
    name: Annotated[str, Form(min_length=1, max_length=200)],
    description: Annotated[str, Form(max_length=2000)] = "",
    eval_fraction: Annotated[float, Form(ge=0.0, lt=1.0, description="Share held out for evaluation.")] = 0.1,
    split_seed: Annotated[int, Form(description="Seed of the train/eval split.")] = 0,
    skip_invalid: Annotated[
        bool, Form(description="Import the valid rows even if some are invalid.")
    ] = False,
    format: Annotated[
        Literal["jsonl", "csv", "parquet"] | None, Form(description="Default: from the file.")
    ] = None,
):
    """Rows are validated one by one; any invalid row refuses the upload (with every error listed)
    unless `skip_invalid` is set. Duplicates (same content) are dropped; the split is deterministic."""
    data = read_upload(file, request.app.state.settings.max_upload_bytes)
    try:
        report = create_prompt_set(
            db,
            name=name,
            data=data,
            filename=file.filename,
            fmt=format,
            description=description,
            eval_fraction=eval_fraction,
            split_seed=split_seed,
            created_by=principal.id,
            skip_invalid=skip_invalid,
        )
    except PromptSetError as exc:
        db.rollback()
        body = PromptSetErrorOut(detail=str(exc), errors=_row_errors(exc.errors))
        return JSONResponse(body.model_dump(), status_code=exc.status)
    summary = next(s for s in list_prompt_sets(db) if s.id == report.prompt_set.id)
    return PromptSetImportOut(
        prompt_set=prompt_set_out(summary),
        created=report.created,
        duplicates=report.duplicates,
        errors=_row_errors(report.errors),
    )


@router.get("/api/prompt-sets", response_model=list[PromptSetOut], summary="Prompt sets with their sizes")
def api_list_prompt_sets(principal: Researcher, db: DbSession) -> list[PromptSetOut]:
    return [prompt_set_out(s) for s in list_prompt_sets(db)]
