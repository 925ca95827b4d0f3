"""Export runs: a `runs` row of kind 'export' holds the spec (config), progress and the result.

`POST /api/exports` and the research form create the row and send `workers.tasks.export_dataset`
(default queue); the task runs `run_export_job`, which follows the common run lifecycle of
workers/runs.py (claim, heartbeat, progress, cancel, finish) and writes one zip under DATA_DIR/exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.exports.exporter import ExportCancelled, export_dataset
from app.exports.spec import ExportSpec
from app.models import Run

TASK_NAME = "workers.tasks.export_dataset"


def export_file_for(settings: Settings, run_id: int, spec: ExportSpec) -> Path:
    return settings.exports_dir / f"export-{run_id:06d}-{spec.format}-{spec.file_format}.zip"


def create_export_run(db: Session, spec: ExportSpec, user_id: int | None) -> Run:
    """Insert and commit a queued export run. Runs always produce a zip: one file to download."""
    spec = spec.model_copy(update={"layout": "zip"})
    run = Run(kind="export", status="queued", config=spec.model_dump(mode="json"), created_by=user_id)
    db.add(run)
    db.commit()
    return run


def enqueue_export(run_id: int) -> None:
    """Send the run to the default queue (call after the row is committed)."""
    from workers.celery_app import send_task

    send_task(TASK_NAME, args=[run_id])


def export_body(sessions: sessionmaker[Session], settings: Settings):
    def body(run_id: int, config: dict[str, Any], reporter) -> dict[str, Any]:
        from workers.training.reporting import RunCancelled

        spec = ExportSpec.model_validate(config)
        with sessions() as db:
            try:
                result = export_dataset(
                    db,
                    spec,
                    export_file_for(settings, run_id, spec),
                    secret_key=settings.secret_key,
                    progress=reporter.progress,
                    should_stop=reporter.should_stop,
                    overwrite=True,  # a redelivered run rewrites its own file
                )
            except ExportCancelled as exc:
                raise RunCancelled(str(exc)) from exc
        return result.as_dict()

    return body


def run_export_job(
    run_id: int, sessions: sessionmaker[Session] | None = None, settings: Settings | None = None
) -> str | None:
    """Execute an export run; returns its final status, or None when another delivery owns it."""
    from app.db import session_factory
    from workers.runs import execute

    sessions = sessions or session_factory()
    return execute(run_id, export_body(sessions, settings or get_settings()), sessions)
