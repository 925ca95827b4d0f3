"""The generation run body: sample responses from a policy and turn them into ranking tasks."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.data.db import session_factory
from app.services.runs import execute
from app.services.tasks_pool import generate_tasks


def run_generation(
    run_id: int, sessions: sessionmaker[Session] | None = None, settings: Settings | None = None
) -> str | None:
    """Execute a generation run row: claim it, generate, record the result.

    Returns the final status, or None when another delivery owns the run.
    """
    sessions = sessions or session_factory()

    def body(_run_id: int, config: dict[str, Any], reporter) -> dict[str, Any]:
        return generate_tasks(sessions, config, reporter, settings)

    return execute(run_id, body, sessions)
