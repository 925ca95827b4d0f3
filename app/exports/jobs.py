"""Export runs: a `runs` row of kind 'export' holds the spec (config), progress and the result; the
Celery task `workers.tasks.export_dataset` calls run_export_job with the row's id."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.exports.exporter import ExportCancelled, export_dataset
from app.exports.spec import ExportSpec
from app.models import Run

log = logging.getLogger(__name__)


def export_file_for(settings: Settings, run_id: int, spec: ExportSpec) -> Path:
    return settings.exports_dir / f"export-{run_id:06d}-{spec.format}-{spec.file_format}.zip"


def create_export_run(db: Session, spec: ExportSpec, user_id: int | None) -> Run:
    """Insert a queued export run. Runs always produce a zip: one file to download."""
    spec = spec.model_copy(update={"layout": "zip"})
    run = Run(kind="export", status="queued", config=spec.model_dump(mode="json"), created_by=user_id)
    db.add(run)
    db.commit()
    return run


def enqueue_export(run_id: int) -> None:
    """Send the run to the default queue (call after the row is committed)."""
    from workers.tasks import export_dataset as task

    task.apply_async(args=[run_id], queue="default")


def run_export_job(
    sessions: sessionmaker[Session], run_id: int, settings: Settings | None = None
) -> dict[str, Any]:
    """Claim the run, export with throttled progress and cancel checks, and record the outcome."""
    from workers.progress import DbReporter, claim_run, fail_run, finish_run

    settings = settings or get_settings()
    with sessions() as db:
        if not claim_run(db, run_id):
            log.info("export run %s is not queued (already taken, finished or cancelled)", run_id)
            return {"run_id": run_id, "claimed": False}
        run = db.get(Run, run_id)
        assert run is not None
        spec = ExportSpec.model_validate(run.config)
    reporter = DbReporter(sessions, run_id, every_seconds=1.0)
    try:
        with sessions() as db:
            result = export_dataset(
                db,
                spec,
                export_file_for(settings, run_id, spec),
                secret_key=settings.secret_key,
                progress=reporter.progress,
                should_stop=reporter.should_stop,
                overwrite=True,  # a redelivered run rewrites its own file
            )
        reporter.flush()
        summary = result.as_dict()
        with sessions() as db:
            finish_run(db, run_id, "succeeded", result=summary)
        return {"run_id": run_id, "claimed": True, "status": "succeeded", "rows": summary["total_rows"]}
    except ExportCancelled:
        with sessions() as db:
            finish_run(db, run_id, "cancelled", error="cancelled on request")
        return {"run_id": run_id, "claimed": True, "status": "cancelled"}
    except Exception as exc:
        log.exception("export run %s failed", run_id)
        with sessions() as db:
            fail_run(db, run_id, exc)
        return {"run_id": run_id, "claimed": True, "status": "failed"}
