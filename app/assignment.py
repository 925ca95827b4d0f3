"""Which task an annotator gets next, and returning expired assignments to the pool.

A task asks for `required_annotations` judgements (the overlap). Each one is a slot; a slot is taken
by an active or submitted assignment and counted in `tasks.claimed_count`. Every change of that
counter is a conditional UPDATE of the task row, so two annotators can never take the same slot:

- Postgres: the candidate is chosen with `SELECT … FOR UPDATE SKIP LOCKED`, so concurrent annotators
  walk past each other's rows instead of queueing on them; the lock is held until commit.
- SQLite: writers are serialised by the database; the conditional UPDATE alone is enough.

Lock order is always task row first, then assignment rows (here, in submission and in expiry),
which keeps concurrent submit / assign / expire free of deadlocks.

An annotator is never offered a task they submitted, skipped or currently hold; one they let expire
may come back to them. Reloading the page gives back the task they hold instead of a new slot.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.db import is_postgres
from app.models import TASK_KINDS, Assignment, Prompt, Response, Task, TaskResponse, utcnow

_rng = random.Random()
MAX_CLAIM_ATTEMPTS = (
    8  # a candidate can fill up between the SELECT and the UPDATE on SQLite; try the next one
)


@dataclass(frozen=True)
class TaskResponseView:
    id: int
    position: int
    text: str


@dataclass(frozen=True)
class TaskView:
    """What an annotator sees: no policy versions (arena tasks are blind)."""

    id: int
    kind: str
    prompt_id: int
    messages: list[dict[str, str]]
    responses: list[TaskResponseView]
    required_annotations: int
    expires_at: datetime

    @property
    def prompt_text(self) -> str:
        for message in reversed(self.messages):
            if message["role"] == "user":
                return message["content"]
        return ""


def _kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    if not kinds:
        return TASK_KINDS
    unknown = set(kinds) - set(TASK_KINDS)
    if unknown:
        raise ValueError(f"unknown task kinds {sorted(unknown)}; use {', '.join(TASK_KINDS)}")
    return tuple(kinds)


def _held_task(db: Session, user_id: int, kinds: tuple[str, ...]) -> int | None:
    """A task this annotator already holds (page reload, second tab, retried request)."""
    return db.scalar(
        select(Assignment.task_id)
        .join(Task, Task.id == Assignment.task_id)
        .where(
            Assignment.user_id == user_id,
            Assignment.status == "active",
            Task.status == "open",
            Task.kind.in_(kinds),
        )
        .order_by(Assignment.id)
        .limit(1)
    )


def _take_slot(db: Session, task_id: int, user_id: int, ttl: timedelta) -> bool | None:
    """Claim one slot of a task and record the assignment (uncommitted).

    True on success; False when the task filled up meanwhile; None when a concurrent request of the
    same annotator got there first (the transaction is then rolled back).
    """
    claimed = db.execute(
        update(Task)
        .where(
            Task.id == task_id,
            Task.status == "open",
            Task.claimed_count < Task.required_annotations,
        )
        .values(claimed_count=Task.claimed_count + 1)
    ).rowcount
    if claimed != 1:
        return False
    now = utcnow()
    insert = pg_insert if is_postgres(db) else sqlite_insert
    stmt = insert(Assignment).values(
        task_id=task_id, user_id=user_id, status="active", created_at=now, expires_at=now + ttl
    )
    # A task this annotator let expire comes back to them: reactivate that row.
    stmt = stmt.on_conflict_do_update(
        index_elements=["task_id", "user_id"],
        set_={"status": "active", "created_at": now, "expires_at": now + ttl},
        where=Assignment.status == "expired",
    )
    if db.execute(stmt.returning(Assignment.id)).scalar_one_or_none() is None:
        db.rollback()
        return None
    return True


def _claim_gold(
    db: Session, user_id: int, kinds: tuple[str, ...], ttl: timedelta, share: float, rng: random.Random
) -> int | None:
    """Now and then a gold task (known best answer) instead of an ordinary one (app/quality/gold.py)."""
    if share <= 0 or "rank" not in kinds:
        return None
    from app.quality.gold import choose_gold

    task = choose_gold(db, user_id, share, rng)
    if task is None:
        return None
    return task.id if _take_slot(db, task.id, user_id, ttl) else None


def _claim_new(db: Session, user_id: int, kinds: tuple[str, ...], ttl: timedelta) -> int | None:
    """Take a free slot of the oldest task this annotator has not seen; returns its id (uncommitted)."""
    postgres = is_postgres(db)
    seen = exists().where(
        Assignment.task_id == Task.id,
        Assignment.user_id == user_id,
        Assignment.status != "expired",
    )
    query = (
        select(Task.id)
        .where(
            Task.status == "open",
            Task.claimed_count < Task.required_annotations,
            Task.kind.in_(kinds),
            Task.is_gold.is_(False),  # gold tasks come only through _claim_gold, at their share
            ~seen,
        )
        .order_by(Task.id)
        .limit(1)
    )
    if postgres:
        query = query.with_for_update(skip_locked=True)
    skipped: list[int] = []
    for _ in range(MAX_CLAIM_ATTEMPTS):
        if skipped:
            query = query.where(Task.id.not_in(skipped))
        task_id = db.scalar(query)
        if task_id is None:
            return None
        taken = _take_slot(db, task_id, user_id, ttl)
        if taken is None:  # only a concurrent request of the same annotator gets here
            return _held_task(db, user_id, kinds)
        if not taken:  # filled by someone else in between (SQLite only: Postgres holds the row lock)
            skipped.append(task_id)
            continue
        return task_id
    return None


def assign_next_task(
    db: Session,
    user_id: int,
    ttl_seconds: int,
    kinds: Sequence[str] | None = None,
    gold_share: float = 0.0,
    rng: random.Random | None = None,
) -> int | None:
    """The id of the task this annotator should work on now (an existing hold or a new slot), committed.

    None when no task is left for them. With gold_share > 0, that share of new assignments is a gold
    task the annotator has not seen, when one is left.
    """
    wanted = _kinds(kinds)
    ttl = timedelta(seconds=ttl_seconds)
    held = _held_task(db, user_id, wanted)
    if held is not None:
        # Working on it again: push the deadline so the expiry job does not take it away mid-work.
        db.execute(
            update(Assignment)
            .where(Assignment.task_id == held, Assignment.user_id == user_id, Assignment.status == "active")
            .values(expires_at=utcnow() + ttl)
        )
        db.commit()
        return held
    task_id = _claim_gold(db, user_id, wanted, ttl, gold_share, rng or _rng)
    if task_id is None:
        task_id = _claim_new(db, user_id, wanted, ttl)
    db.commit()
    return task_id


def load_task_view(db: Session, task_id: int, user_id: int | None = None) -> TaskView | None:
    """The task with its prompt and responses in shown order (one query for the task, one for responses)."""
    row = db.execute(
        select(Task.id, Task.kind, Task.prompt_id, Task.required_annotations, Prompt.messages)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .where(Task.id == task_id)
    ).first()
    if row is None:
        return None
    responses = db.execute(
        select(TaskResponse.position, Response.id, Response.text)
        .join(Response, Response.id == TaskResponse.response_id)
        .where(TaskResponse.task_id == task_id)
        .order_by(TaskResponse.position)
    ).all()
    expires_at: Any = None
    if user_id is not None:
        expires_at = db.scalar(
            select(Assignment.expires_at).where(Assignment.task_id == task_id, Assignment.user_id == user_id)
        )
    return TaskView(
        id=row.id,
        kind=row.kind,
        prompt_id=row.prompt_id,
        messages=list(row.messages),
        responses=[TaskResponseView(id=r.id, position=r.position, text=r.text) for r in responses],
        required_annotations=row.required_annotations,
        expires_at=expires_at,
    )


def next_task(
    db: Session,
    user_id: int,
    ttl_seconds: int,
    kinds: Sequence[str] | None = None,
    gold_share: float = 0.0,
    rng: random.Random | None = None,
) -> TaskView | None:
    """Assign (or resume) a task and return what the annotator sees; None when nothing is left."""
    task_id = assign_next_task(db, user_id, ttl_seconds, kinds, gold_share, rng)
    if task_id is None:
        return None
    view = load_task_view(db, task_id, user_id)
    db.rollback()  # end the read transaction; nothing to write
    return view


def release_assignment(db: Session, task_id: int, user_id: int) -> bool:
    """Give an active slot back without judging the task (e.g. the annotator logs out). Committed."""
    task_lock = select(Task.id).where(Task.id == task_id)
    if is_postgres(db):
        task_lock = task_lock.with_for_update()
    db.execute(task_lock)
    released = db.execute(
        update(Assignment)
        .where(Assignment.task_id == task_id, Assignment.user_id == user_id, Assignment.status == "active")
        .values(status="expired")
    ).rowcount
    if released:
        db.execute(update(Task).where(Task.id == task_id).values(claimed_count=Task.claimed_count - 1))
    db.commit()
    return bool(released)


def expire_stale_assignments(db: Session, batch: int = 1000) -> int:
    """Mark unanswered assignments past their deadline as expired and give their slots back."""
    now = utcnow()
    stale = and_(Assignment.status == "active", Assignment.expires_at < now)
    task_ids = sorted(db.scalars(select(Assignment.task_id).where(stale).distinct().limit(batch)).all())
    if not task_ids:
        db.rollback()
        return 0
    # Task rows first (the same order as assignment and submission), then their assignments.
    lock = select(Task.id).where(Task.id.in_(task_ids)).order_by(Task.id)
    if is_postgres(db):
        lock = lock.with_for_update()
    db.execute(lock)
    expired = db.execute(
        update(Assignment)
        .where(stale, Assignment.task_id.in_(task_ids))
        .values(status="expired")
        .returning(Assignment.task_id)
    ).all()
    per_task = Counter(row.task_id for row in expired)
    for task_id, count in sorted(per_task.items()):
        db.execute(update(Task).where(Task.id == task_id).values(claimed_count=Task.claimed_count - count))
    db.commit()
    return sum(per_task.values())
