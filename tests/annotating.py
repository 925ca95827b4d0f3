"""The async annotation and assignment services, called from sync test code with a session's database.

Each call opens the database's statements on a loop of its own (tests.aio.run_async) and closes them
again. On Postgres they run on the engine's pool (no hot connections: a test's loop lives for one
call); the web app's hot connections have tests of their own.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.data.models import TaskResponse
from app.data.statements import StatementRunner, open_statements
from app.services import annotation, assignment
from app.services.assignment import TaskView
from app.services.schemas import AnnotationIn, AnnotationResult
from tests.aio import run_async

T = TypeVar("T")


def with_statements(db: Session, call: Callable[[StatementRunner], Awaitable[T]]) -> T:
    """`call(statements)` on the session's database, run to its end."""

    async def run() -> T:
        statements = await open_statements(db.get_bind(), hot_connections=0)
        try:
            return await call(statements)
        finally:
            await statements.close()

    return run_async(run())


def next_task(
    db: Session,
    user_id: int,
    ttl_seconds: float,
    kinds: Sequence[str] | None = None,
    gold_share: float = 0.0,
    rng: random.Random | None = None,
) -> TaskView | None:
    """app.services.assignment.next_task."""
    return with_statements(
        db, lambda statements: assignment.next_task(statements, user_id, ttl_seconds, kinds, gold_share, rng)
    )


def next_task_id(db: Session, user_id: int, ttl_seconds: float, **options) -> int | None:
    """The id of the task next_task gives the annotator, or None."""
    view = next_task(db, user_id, ttl_seconds, **options)
    return None if view is None else view.id


def submit_annotation(
    db: Session, task_id: int, user_id: int, payload: AnnotationIn
) -> tuple[AnnotationResult, bool]:
    """app.services.annotation.submit_annotation."""
    return with_statements(
        db, lambda statements: annotation.submit_annotation(statements, task_id, user_id, payload)
    )


def shown_response_ids(db: Session, task_id: int) -> list[int]:
    """The task's response ids in the order annotators see them (the session's reads end)."""
    shown = select(TaskResponse.response_id).where(TaskResponse.task_id == task_id)
    ids = list(db.scalars(shown.order_by(TaskResponse.position)))
    db.rollback()
    return ids
