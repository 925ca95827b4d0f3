"""Export runs: a `runs` row of kind 'export' holds the spec (config), progress and the result.

`POST /api/exports` and the research form create the row and enqueue the export task (default
queue); the worker executes it (workers/runs/export.py) and writes one zip under DATA_DIR/exports.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from app.config import Settings
from app.data.models import Run
from app.services import dispatch
from app.services.exports.spec import ExportSpec


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
    dispatch.enqueue(dispatch.EXPORT_DATASET, run_id)
