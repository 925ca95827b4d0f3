"""Researcher exports: the /research page (form + export runs with live progress) and the JSON API.

- `GET  /api/exports/formats`           formats and their fields
- `GET  /api/exports/stream`            a small export streamed synchronously as JSONL (row limit)
- `POST /api/exports`                   queue an export run (default queue); 202 with its URLs
- `GET  /api/exports`                   export runs, newest first
- `GET  /api/exports/{id}`              one run's status, progress and result
- `GET  /api/exports/{id}/download`     the finished zip (Hugging Face layout + README.md card)
- `POST /api/exports/{id}/cancel`       stop a queued or running export

Researchers and admins only (bearer token or browser session); annotators get 403. Which runs a
caller sees and may cancel: app/services/exports/access.py (admins: all; a researcher: their own in
every state and everyone's finished exports; cancelling: the requester or an admin). Errors show a
short message with an error id; the traceback is in the log.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.common.errors import public_error, record_failure
from app.config import get_settings
from app.data.models import Policy, PromptSet, Run, User, utcnow
from app.services.exports import FORMATS, ExportSpec, iter_rows
from app.services.exports.access import may_cancel_export, may_see_export, visible_exports
from app.services.exports.exporter import begin_snapshot
from app.services.exports.jobs import create_export_run, enqueue_export
from app.services.exports.pseudonym import pseudonym_key
from app.services.exports.waiting import ExportWait, describe_wait, export_waits
from app.services.exports.writers import json_line
from app.services.retention import LowDiskSpace, ensure_free_disk
from app.services.runs import request_cancel
from app.web.deps import DbSession, PathId
from app.web.security import Principal, Researcher
from app.web.templating import is_htmx, render

log = logging.getLogger(__name__)
router = APIRouter(tags=["exports"])

MAX_STREAM_ROWS = 50_000
ACTIVE = ("queued", "running")


# ---------------------------------------------------------------- API models


class StreamQuery(ExportSpec):
    limit: int = Field(10_000, ge=1, le=MAX_STREAM_ROWS, description="Stop after this many rows.")


class ExportFieldOut(BaseModel):
    name: str
    type: str
    description: str


class ExportFormatOut(BaseModel):
    name: str
    title: str
    description: str
    fields: list[ExportFieldOut]


class ExportRunOut(BaseModel):
    id: int
    status: str
    progress: float
    progress_message: str
    error: str
    spec: dict[str, Any]
    result: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    status_url: str
    download_url: str | None = Field(None, description="Set once the run succeeded.")
    requested_by: str | None = Field(None, description="Username of the researcher who asked for it.")
    queue_position: int | None = Field(
        None, description="While queued: 1 when this export starts next, 2 when one other waits before it, …"
    )
    exports_ahead: int | None = Field(
        None, description="While queued: exports running or queued before this one."
    )
    estimated_seconds_left: float | None = Field(
        None,
        description="While queued or running: a rough estimate of the seconds until it is done, from the "
        "durations of recent exports; null when no export has finished yet.",
    )


def run_out(run: Run, requested_by: str | None = None, wait: ExportWait | None = None) -> ExportRunOut:
    done = run.status == "succeeded"
    waiting = wait is not None and run.status in ACTIVE
    return ExportRunOut(
        id=run.id,
        status=run.status,
        progress=run.progress,
        progress_message=run.progress_message,
        error=public_error(run.error),
        spec=run.config,
        result=run.result if done else {},
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        status_url=f"/api/exports/{run.id}",
        download_url=f"/api/exports/{run.id}/download" if done else None,
        requested_by=requested_by,
        queue_position=wait.position if waiting else None,
        exports_ahead=wait.ahead if waiting and wait.position is not None else None,
        estimated_seconds_left=wait.seconds_left if waiting else None,
    )


def _requester(db: Session, run: Run) -> str | None:
    return db.scalar(select(User.username).where(User.id == run.created_by)) if run.created_by else None


def _export_run(db: Session, run_id: int, principal: Principal) -> Run:
    """The export run, if this caller may see it; else 404, the same as for an id that does not exist."""
    run = db.get(Run, run_id)
    if run is None or run.kind != "export" or not may_see_export(run, principal.id, principal.role):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"there is no export run {run_id} that you can see")
    return run


FINISHED_FILE_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {"description": "The export has not finished (queued, running, failed or cancelled)."},
    410: {"description": "The export's file is no longer on disk."},
}


def _visible_runs(db: Session, principal: Principal, limit: int) -> list[tuple[Run, str | None]]:
    """Export runs this caller may see, newest first, each with its requester's username."""
    rows = db.execute(
        select(Run, User.username)
        .outerjoin(User, User.id == Run.created_by)
        .where(Run.kind == "export", visible_exports(principal.id, principal.role))
        .order_by(Run.id.desc())
        .limit(limit)
    ).all()
    return [(run, username) for run, username in rows]


def _finished_file(run: Run) -> Path:
    if run.status != "succeeded":
        raise HTTPException(status.HTTP_409_CONFLICT, f"export run {run.id} is {run.status}, not finished")
    path = Path(run.result.get("path") or "")
    if not path.is_file():
        raise HTTPException(status.HTTP_410_GONE, f"the file of export run {run.id} is no longer on disk")
    return path


def _queue(db: Session, spec: ExportSpec, user_id: int) -> Run:
    """Insert the run, commit, then enqueue; a broker that cannot be reached fails the run, loudly."""
    try:
        ensure_free_disk(get_settings())
    except LowDiskSpace as exc:
        raise HTTPException(status.HTTP_507_INSUFFICIENT_STORAGE, f"export not queued: {exc}") from None
    run = create_export_run(db, spec, user_id)
    try:
        enqueue_export(run.id)
    except Exception as exc:
        error = record_failure(log, exc, f"could not queue export run {run.id}")
        run.status, run.finished_at = "failed", utcnow()
        run.error = f"could not reach the task queue: {error}"
        db.commit()
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"export run {run.id} could not be queued: the broker is unreachable",
        ) from exc
    return run


# ---------------------------------------------------------------- JSON API


@router.get("/api/exports/formats", summary="Export formats and their fields")
def export_formats(principal: Researcher) -> list[ExportFormatOut]:
    return [
        ExportFormatOut(
            name=f.name,
            title=f.title,
            description=f.description,
            fields=[ExportFieldOut(name=n, type=str(t), description=d) for n, t, d in f.fields],
        )
        for f in FORMATS.values()
    ]


@router.get(
    "/api/exports/stream",
    summary="Stream a small export as JSONL",
    description="Rows of the chosen format as JSON lines, each with its `split`, up to `limit` rows. "
    "For large exports, Parquet and the dataset card, queue a run with POST /api/exports.",
    response_class=StreamingResponse,
)
def stream_export(request: Request, principal: Researcher, query: Annotated[StreamQuery, Query()]):
    spec = ExportSpec.model_validate(query.model_dump(exclude={"limit"}))
    sessions = request.app.state.sessionmaker
    key = pseudonym_key(request.app.state.settings)
    lines = _stream_lines(sessions, spec, query.limit, key)
    try:
        first = next(
            lines
        )  # surfaces spec problems (e.g. a missing chat template) as a 422, not a cut stream
    except StopIteration:
        first = ""
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc

    def body() -> Iterator[str]:
        if first:
            yield first
        yield from lines

    filename = f"prefloop-{spec.format}.jsonl"
    return StreamingResponse(
        body(),
        media_type="application/x-ndjson",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Row-Limit": str(query.limit),
        },
    )


def _stream_lines(sessions, spec: ExportSpec, limit: int, key: str) -> Iterator[str]:
    with sessions() as db:
        begin_snapshot(db)
        for count, (split, row, _meta) in enumerate(iter_rows(db, spec, pseudonym_key=key)):
            if count >= limit:
                return
            yield json_line(row | {"split": split})


@router.post(
    "/api/exports",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Queue an export run",
    description="Writes a zip with the Hugging Face layout (data/<split>-*.parquet|jsonl) and a README.md "
    "dataset card. Poll status_url; download from download_url once it succeeded.",
)
def create_export(spec: ExportSpec, principal: Researcher, db: DbSession) -> ExportRunOut:
    run = _queue(db, spec, principal.id)
    return run_out(run, principal.username, export_waits(db).get(run.id))


@router.get(
    "/api/exports",
    summary="Export runs, newest first",
    description="Admins see every export run; a researcher sees their own in every state and the finished "
    "exports of everyone.",
)
def list_exports(
    principal: Researcher, db: DbSession, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> list[ExportRunOut]:
    waits = export_waits(db)
    return [
        run_out(run, username, waits.get(run.id)) for run, username in _visible_runs(db, principal, limit)
    ]


@router.get("/api/exports/{run_id:int}", summary="One export run")
def get_export(run_id: PathId, principal: Researcher, db: DbSession) -> ExportRunOut:
    run = _export_run(db, run_id, principal)
    wait = export_waits(db).get(run.id) if run.status in ACTIVE else None
    return run_out(run, _requester(db, run), wait)


@router.get(
    "/api/exports/{run_id:int}/download",
    summary="Download a finished export (zip)",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The zip archive.",
            "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        },
        **FINISHED_FILE_ERRORS,
    },
)
def download_export(run_id: PathId, principal: Researcher, db: DbSession):
    path = _finished_file(_export_run(db, run_id, principal))
    return FileResponse(path, media_type="application/zip", filename=path.name)


@router.post(
    "/api/exports/{run_id:int}/cancel",
    summary="Cancel a queued or running export",
    description="Only the researcher who asked for the export, or an admin, may cancel it.",
    responses={409: {"description": "The export already ended."}},
)
def cancel_export(run_id: PathId, principal: Researcher, db: DbSession) -> ExportRunOut:
    run = _export_run(db, run_id, principal)
    if not may_cancel_export(run, principal.id, principal.role):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"export run {run_id} was asked for by {_requester(db, run) or 'another user'}; only they "
            "or an admin may cancel it",
        )
    if not request_cancel(db, run_id):
        raise HTTPException(status.HTTP_409_CONFLICT, f"export run {run_id} already ended ({run.status})")
    db.refresh(run)
    return run_out(run, _requester(db, run))


# ---------------------------------------------------------------- research page


def _page_context(db: Session, principal: Principal, **extra: Any) -> dict[str, Any]:
    visible = _visible_runs(db, principal, 30)
    runs = [run for run, _ in visible]
    return {
        "requesters": {run.id: username for run, username in visible},
        "may_cancel": {run.id for run in runs if may_cancel_export(run, principal.id, principal.role)},
        "formats": list(FORMATS.values()),
        "prompt_sets": db.execute(select(PromptSet.id, PromptSet.name).order_by(PromptSet.name)).all(),
        "policy_versions": list(db.scalars(select(Policy.version).order_by(Policy.version))),
        "runs": runs,
        "polling": any(run.status in ACTIVE for run in runs),
        "waits": {run_id: describe_wait(wait) for run_id, wait in export_waits(db).items()},
        "defaults": ExportSpec(),
        "message": None,
        "error": None,
        **extra,
    }


@router.get("/research", summary="Researcher exports page", include_in_schema=False)
def research_page(request: Request, principal: Researcher, db: DbSession):
    return render(request, "research/index.html", _page_context(db, principal))


@router.get("/research/exports", summary="Export runs (htmx fragment)", include_in_schema=False)
def research_runs(request: Request, principal: Researcher, db: DbSession):
    return render(request, "research/index.html", _page_context(db, principal), block="runs")


FORM_LISTS = ("prompt_set_ids", "policy_versions")
FORM_FLAGS = ("exclude_flagged", "exclude_skipped")


def spec_from_form(form) -> ExportSpec:
    """The research form as an ExportSpec: empty fields take the defaults, unticked boxes are false."""
    data: dict[str, Any] = {}
    for key in ExportSpec.model_fields:
        if key in FORM_LISTS:
            data[key] = [v for v in form.getlist(key) if v != ""]
        elif key in FORM_FLAGS:
            data[key] = form.get(key) in ("on", "true", "1")
        elif (value := form.get(key)) not in (None, ""):
            data[key] = value
    return ExportSpec.model_validate(data)


@router.post("/research/exports", summary="Queue an export from the form", include_in_schema=False)
async def research_create(request: Request, principal: Researcher, db: DbSession):
    form = await request.form()
    # Queueing commits and sends to the broker: a worker thread, not the event loop.
    return await run_in_threadpool(_create_from_form, request, form, principal, db)


def _create_from_form(request: Request, form: Any, principal: Principal, db: Session):
    try:
        spec = spec_from_form(form)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in exc.errors()
        )
        context = _page_context(db, principal, error=f"Not queued. {problems}")
        return render(
            request,
            "research/index.html",
            context,
            block="runs",
            status_code=200 if is_htmx(request) else 422,
        )
    try:
        run = _queue(db, spec, principal.id)
    except HTTPException as exc:
        context = _page_context(db, principal, error=str(exc.detail))
        return render(
            request,
            "research/index.html",
            context,
            block="runs",
            status_code=200 if is_htmx(request) else 503,
        )
    if not is_htmx(request):
        return RedirectResponse("/research", status_code=303)
    context = _page_context(db, principal, message=f"Export #{run.id} queued.")
    return render(request, "research/index.html", context, block="runs")


@router.get(
    "/api/exports/{run_id:int}/card",
    summary="The dataset card (README.md) of a finished export",
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": "The card, Markdown.",
            "content": {"text/markdown": {"schema": {"type": "string"}}},
        },
        **FINISHED_FILE_ERRORS,
    },
)
def export_card(run_id: PathId, principal: Researcher, db: DbSession) -> PlainTextResponse:
    with zipfile.ZipFile(_finished_file(_export_run(db, run_id, principal))) as archive:
        card = archive.read("README.md").decode("utf-8")
    return PlainTextResponse(card, media_type="text/markdown; charset=utf-8")
