"""The export run body: write one researcher export zip for a run row of kind 'export'."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.common.reporting import RunCancelled
from app.config import Settings, get_settings
from app.data.db import session_factory
from app.services.exports.exporter import ExportCancelled, export_dataset
from app.services.exports.jobs import export_file_for
from app.services.exports.pseudonym import pseudonym_key
from app.services.exports.spec import ExportSpec
from app.services.runs import execute


def export_body(sessions: sessionmaker[Session], settings: Settings):
    def body(run_id: int, config: dict[str, Any], reporter) -> dict[str, Any]:
        spec = ExportSpec.model_validate(config)
        with sessions() as db:
            try:
                result = export_dataset(
                    db,
                    spec,
                    export_file_for(settings, run_id, spec),
                    pseudonym_key=pseudonym_key(settings),
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
    sessions = sessions or session_factory()
    return execute(run_id, export_body(sessions, settings or get_settings()), sessions)
