"""Which task an annotator gets next, and returning expired and released assignments to the pool.

A task asks for `required_annotations` judgements (the overlap). Each one is a slot; a slot is taken
by an active or submitted assignment and counted in `tasks.claimed_count`. Every change of that
counter is a conditional UPDATE of the task row, so two annotators can never take the same slot:
on Postgres the candidate is chosen with `SELECT … FOR UPDATE SKIP LOCKED`, so concurrent annotators
walk past each other's rows instead of queueing on them; SQLite runs one writer at a time.

Lock order is always task row first, then assignment rows (here, in submission and in expiry),
which keeps concurrent submit / assign / expire free of deadlocks.

An annotator is never offered a task they submitted, skipped, released or currently hold; one they
let expire may come back to them. Reloading the page gives back the task they hold instead of a new slot.
"""

from __future__ import annotations

import random
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
from sqlalchemy import Engine, and_, select, update
from sqlalchemy.orm import Session

from app.common.expiring import ExpiringMap
from app.data.db import is_postgres, read_session, session_factory
from app.data.models import TASK_KINDS, Assignment, Task, utcnow
from app.data.statements import Statement, StatementRunner
from app.services.quality.gold import choose_gold

_rng = random.Random()


@dataclass(frozen=True)
class TaskResponseView:
    id: int
    position: int
    text: str


@dataclass(frozen=True)
class TaskView:
    """What an annotator sees: no policy versions (arena tasks are blind) and nothing that tells a gold
    task from another (its overlap, for one, is the gold cap)."""

    id: int
    kind: str
    prompt_id: int
    messages: list[dict[str, str]]
    responses: list[TaskResponseView]
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
    return tuple(sorted(set(kinds)))


async def next_task(
    statements: StatementRunner,
    user_id: int,
    ttl_seconds: float,
    kinds: Sequence[str] | None = None,
    gold_share: float = 0.0,
    rng: random.Random | None = None,
) -> TaskView | None:
    """Assign (or resume) a task and return what the annotator sees (committed); None when nothing is left.

    With gold_share > 0, that share of new assignments is a gold task the annotator has not seen,
    when one is left.
    """
    wanted, rng = _kinds(kinds), rng or _rng
    ttl = timedelta(seconds=ttl_seconds)
    if _draws_gold(gold_share, wanted, rng):
        view = await _held_or_gold_task(statements, user_id, wanted, ttl, rng)
        if view is not None:
            return view
    floors = _floors(statements.engine)
    floor = floors.get(user_id, wanted)
    for start in (floor, 0) if floor else (0,):
        now = utcnow()
        rows = await statements.rows(Statement.NEXT_TASK, _params(user_id, wanted, now, ttl, floor=start))
        if rows:
            floors.set(user_id, wanted, rows[0].task_id)
            return _view_of(rows, now + ttl)
    # Nothing free for them, or a concurrent request of theirs claimed the slot this one chose: look
    # for what they now hold.
    return await _held_task(statements, user_id, wanted, ttl)


def _params(
    user_id: int, kinds: tuple[str, ...], now: datetime, ttl: timedelta, **extra: Any
) -> dict[str, Any]:
    return {"user_id": user_id, "kinds": list(kinds), "now": now, "expires_at": now + ttl, **extra}


def _view_of(rows: Sequence[Any], expires_at: datetime) -> TaskView:
    first = rows[0]
    return TaskView(
        id=first.task_id,
        kind=first.kind,
        prompt_id=first.prompt_id,
        messages=list(first.messages),
        responses=[TaskResponseView(id=r.response_id, position=r.position, text=r.text) for r in rows],
        expires_at=expires_at,
    )


async def _held_task(
    statements: StatementRunner, user_id: int, kinds: tuple[str, ...], ttl: timedelta
) -> TaskView | None:
    """The task this annotator holds, its deadline pushed; None if they hold none."""
    now = utcnow()
    rows = await statements.rows(Statement.RESUME_TASK, _params(user_id, kinds, now, ttl))
    return _view_of(rows, now + ttl) if rows else None


def _draws_gold(share: float, kinds: tuple[str, ...], rng: random.Random) -> bool:
    """Whether this assignment, if it is a new one, should be a gold task (known best answer)."""
    return share > 0 and "rank" in kinds and rng.random() < share


async def _held_or_gold_task(
    statements: StatementRunner, user_id: int, kinds: tuple[str, ...], ttl: timedelta, rng: random.Random
) -> TaskView | None:
    """The held task, or else a slot of a gold task this annotator has not seen; None if neither."""
    view = await _held_task(statements, user_id, kinds, ttl)
    if view is not None:
        return view
    gold_id = await anyio.to_thread.run_sync(_choose_gold, statements.engine, user_id, rng)
    if gold_id is None:
        return None
    now = utcnow()
    rows = await statements.rows(Statement.CLAIM_TASK, _params(user_id, kinds, now, ttl, task_id=gold_id))
    return _view_of(rows, now + ttl) if rows else None


def _choose_gold(engine: Engine, user_id: int, rng: random.Random) -> int | None:
    """A gold task this annotator has not seen (app.services.quality.gold decides), or None."""
    with read_session(session_factory(engine)) as db:
        task = choose_gold(db, user_id, 1.0, rng)  # the caller's draw already decided "gold"
        return None if task is None else task.id


class ScanFloors:
    """Per annotator, the id their last claim found: where their next claim starts looking.

    Every claim takes a slot of the oldest task with one free, and counting the slot rewrites the task
    row, so the front of ix_tasks_claimable fills with entries of rows that are no longer claimable.
    Postgres removes them only when the table is vacuumed (at most about once a minute), and under a
    steady stream of claims a scan from the first id walks past thousands of them. Everything below an
    annotator's last claim was, at that moment, taken, locked by another claim, or seen by them, so
    their next scan can start there. A floor lasts `ttl` seconds: then the scan starts from the first
    id again and picks up slots given back since (skips, expired assignments). A scan from a floor
    that finds nothing is repeated from the first id, so "nothing left" is always a full answer.
    """

    def __init__(self, ttl: float = 10.0, max_entries: int = 100_000):
        self._floors: ExpiringMap[int] = ExpiringMap(ttl, max_entries)

    @property
    def ttl(self) -> float:
        return self._floors.ttl

    @ttl.setter
    def ttl(self, seconds: float) -> None:
        self._floors.ttl = seconds

    def get(self, user_id: int, kinds: tuple[str, ...]) -> int:
        return self._floors.get((user_id, kinds)) or 0

    def set(self, user_id: int, kinds: tuple[str, ...], task_id: int) -> None:
        self._floors.put((user_id, kinds), task_id)


_floors_by_engine: weakref.WeakKeyDictionary[Engine, ScanFloors] = weakref.WeakKeyDictionary()


def _floors(engine: Engine) -> ScanFloors:
    """The floors of this database (per engine: ids mean nothing across databases)."""
    floors = _floors_by_engine.get(engine)
    if floors is None:
        floors = _floors_by_engine.setdefault(engine, ScanFloors())
    return floors


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


def release_task(db: Session, task_id: int, user_id: int) -> bool:
    """Give back the caller's active assignment of the task unjudged (committed): its slot returns to
    the pool and the task goes to someone else. False when they hold no active assignment of it."""
    # Task row first (the order of assignment, submission and expiry), then the assignment.
    lock = select(Task.id).where(Task.id == task_id)
    if is_postgres(db):
        lock = lock.with_for_update()
    if db.execute(lock).first() is None:
        db.rollback()
        return False
    released = db.execute(
        update(Assignment)
        .where(Assignment.task_id == task_id, Assignment.user_id == user_id, Assignment.status == "active")
        .values(status="released")
        .returning(Assignment.id)
    ).first()
    if released is None:
        db.rollback()
        return False
    db.execute(update(Task).where(Task.id == task_id).values(claimed_count=Task.claimed_count - 1))
    db.commit()
    return True
