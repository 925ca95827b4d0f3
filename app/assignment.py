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
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import anyio
from sqlalchemy import DateTime, Engine, TextClause, and_, bindparam, select, text, update
from sqlalchemy.orm import Session

from app.db import is_postgres, run_on_its_own
from app.expiring import ExpiringMap
from app.hot_statements import HotStatements
from app.models import TASK_KINDS, Assignment, JSONType, Task, utcnow

_rng = random.Random()
MAX_CLAIM_ATTEMPTS = 8  # SQLite: bounded retries; in practice the first attempt always decides


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
    return tuple(sorted(set(kinds)))


# ---------------------------------------------------------------- SQL of the hot path
#
# Hand-written statements, built once: assignment runs on every page load and API call, and the
# expression-building and ORM overhead of composing these per call cost more than the database
# work. Postgres claims a slot in one statement; SQLite (one writer at a time) in two.

_KIND = " AND t.kind IN :kinds"
_KIND_ARRAY = " AND t.kind = ANY(:kinds)"  # the same as one array parameter (a statement psycopg runs)

# Resume: the task this annotator holds, with its deadline pushed (page reload, second tab, retry).
_RESUME = """
UPDATE assignments SET expires_at = :expires_at
WHERE id = (
    SELECT a.id FROM assignments a JOIN tasks t ON t.id = a.task_id
    WHERE a.user_id = :user_id AND a.status = 'active' AND t.status = 'open'{kind}
    ORDER BY a.id LIMIT 1
)
RETURNING task_id
"""

# The oldest ordinary task from id :floor on with a free slot that this annotator has not seen (an
# expired assignment of theirs does not count as seen). Walks ix_tasks_claimable.
_CANDIDATE = """
SELECT t.id FROM tasks t
WHERE t.status = 'open' AND t.claimed_count < t.required_annotations AND t.is_gold = false{kind}
  AND t.id >= :floor
  AND NOT EXISTS (
    SELECT 1 FROM assignments a
    WHERE a.task_id = t.id AND a.user_id = :user_id AND a.status <> 'expired'
  )
ORDER BY t.id LIMIT 1
"""

# Record the assignment; a task this annotator let expire comes back to them (reactivate that row).
_ASSIGN = """
INSERT INTO assignments (task_id, user_id, status, created_at, expires_at)
{source}
ON CONFLICT (task_id, user_id) DO UPDATE
    SET status = 'active', created_at = excluded.created_at, expires_at = excluded.expires_at
    WHERE assignments.status = 'expired'
RETURNING task_id
"""

# Postgres: choose (skipping rows other transactions hold), assign, and count the slot, in one
# statement. The slot is counted only for an assignment actually made (none when a concurrent request
# of the same annotator assigned this task first), so the statement never needs undoing and can run
# on its own, without a surrounding transaction. OFFSET 0 keeps the NOT EXISTS a per-candidate probe
# of (task_id, user_id): left to itself the planner turns it into a merge anti-join that reads every
# assignment of the table, so each claim grew slower as annotations piled up.
_CANDIDATE_LOCKED = _CANDIDATE.replace("LIMIT 1", "LIMIT 1 FOR UPDATE SKIP LOCKED").replace(
    "a.status <> 'expired'\n", "a.status <> 'expired' OFFSET 0\n"
)
_ASSIGN_CANDIDATE = _ASSIGN.format(source="SELECT id, :user_id, 'active', :now, :expires_at FROM candidate")
_COUNT_ASSIGNED = (
    "UPDATE tasks SET claimed_count = claimed_count + 1 FROM assigned "
    "WHERE tasks.id = assigned.task_id RETURNING tasks.id AS task_id"
)
_CLAIM_POSTGRES = (
    "WITH candidate AS (" + _CANDIDATE_LOCKED + "),\n"
    "assigned AS (" + _ASSIGN_CANDIDATE + ")\n" + _COUNT_ASSIGNED
)

# SQLite: count the slot of the candidate (atomic: SQLite runs one writer at a time), then assign.
_CLAIM_SQLITE = """
UPDATE tasks SET claimed_count = claimed_count + 1
WHERE id = ({candidate}) AND status = 'open' AND claimed_count < required_annotations
RETURNING id
""".replace("{candidate}", _CANDIDATE)
_ASSIGN_ONE = _ASSIGN.format(source="VALUES (:task_id, :user_id, 'active', :now, :expires_at)")

_VIEW = text(
    """
SELECT t.kind, t.prompt_id, t.required_annotations, p.messages, tr.position, r.id AS response_id, r.text
FROM tasks t
JOIN prompts p ON p.id = t.prompt_id
JOIN task_responses tr ON tr.task_id = t.id
JOIN responses r ON r.id = tr.response_id
WHERE t.id = :task_id
ORDER BY tr.position
"""
).columns(messages=JSONType)
_EXPIRES_AT = text(
    "SELECT expires_at FROM assignments WHERE task_id = :task_id AND user_id = :user_id"
).columns(expires_at=DateTime(timezone=True))
# Postgres, the common case of a next-task request in one round trip: resume the held task or else
# claim a new slot (as _RESUME and _CLAIM_POSTGRES), and return the chosen task as _VIEW does. The
# claim runs only when nothing was resumed (a one-time filter on the resumed CTE).
_NEXT_POSTGRES = (
    "WITH resumed AS (" + _RESUME + "),\n"
    "candidate AS ("
    + _CANDIDATE_LOCKED.replace("WHERE t.status", "WHERE NOT EXISTS (SELECT 1 FROM resumed) AND t.status", 1)
    + "),\n"
    "assigned AS (" + _ASSIGN_CANDIDATE + "),\n"
    "claimed AS (" + _COUNT_ASSIGNED + "),\n"
    "chosen AS (SELECT task_id FROM resumed UNION ALL SELECT task_id FROM claimed)\n"
    """
SELECT c.task_id, t.kind, t.prompt_id, t.required_annotations, p.messages, tr.position,
       r.id AS response_id, r.text
FROM chosen c
JOIN tasks t ON t.id = c.task_id
JOIN prompts p ON p.id = t.prompt_id
JOIN task_responses tr ON tr.task_id = t.id
JOIN responses r ON r.id = tr.response_id
ORDER BY tr.position
"""
)
# Typed so that SQLite stores them in the same text format as the ORM does (its comparisons are textual).
_TIMES = (
    bindparam("now", type_=DateTime(timezone=True)),
    bindparam("expires_at", type_=DateTime(timezone=True)),
)


@lru_cache(maxsize=32)
def _statement(name: str, dialect: str, kinds: tuple[str, ...]) -> TextClause:
    """A compiled-once statement for this dialect and kind filter (none when every kind is wanted)."""
    kind = "" if kinds == TASK_KINDS else _KIND_ARRAY if name == "next" else _KIND
    sql = {
        "resume": _RESUME,
        "claim": _CLAIM_POSTGRES if dialect == "postgresql" else _CLAIM_SQLITE,
        "assign": _ASSIGN_ONE,
        "next": _NEXT_POSTGRES,
    }[name].replace("{kind}", kind)
    stmt = text(sql)
    stmt = stmt.bindparams(*[b for b in _TIMES if f":{b.key}" in sql])
    if ":kinds" in sql and name != "next":
        stmt = stmt.bindparams(bindparam("kinds", expanding=True))
    return stmt


def _params(
    user_id: int, kinds: tuple[str, ...], now: datetime, ttl: timedelta, **extra: Any
) -> dict[str, Any]:
    params = {"user_id": user_id, "now": now, "expires_at": now + ttl, "floor": 0, **extra}
    if kinds != TASK_KINDS:
        params["kinds"] = list(kinds)
    return params


def _resume(db: Session, user_id: int, kinds: tuple[str, ...], now: datetime, ttl: timedelta) -> int | None:
    """The task this annotator already holds, its deadline pushed (uncommitted)."""
    stmt = _statement("resume", db.get_bind().dialect.name, kinds)
    return db.connection().execute(stmt, _params(user_id, kinds, now, ttl)).scalar()


def _claim_new(
    db: Session, user_id: int, kinds: tuple[str, ...], now: datetime, ttl: timedelta
) -> int | None:
    """Take a free slot of the oldest task this annotator has not seen; returns its id (uncommitted).

    None when there is none, or when a concurrent request of the same annotator took one first (the
    caller then finds that one with _resume).
    """
    dialect = db.get_bind().dialect.name
    conn = db.connection()
    params = _params(user_id, kinds, now, ttl)
    if dialect == "postgresql":
        return conn.execute(_statement("claim", dialect, kinds), params).scalar()
    for _ in range(MAX_CLAIM_ATTEMPTS):
        task_id = conn.execute(_statement("claim", dialect, kinds), params).scalar()
        if task_id is None:
            return None
        if conn.execute(_statement("assign", dialect, kinds), {**params, "task_id": task_id}).scalar():
            return task_id
        db.rollback()  # the same annotator, concurrently: give the slot back
        return None
    return None


def _take_slot(db: Session, task_id: int, user_id: int, now: datetime, ttl: timedelta) -> bool:
    """Claim one slot of a given task and record the assignment (uncommitted); False if it is full."""
    conn = db.connection()
    counted = conn.execute(
        update(Task)
        .where(Task.id == task_id, Task.status == "open", Task.claimed_count < Task.required_annotations)
        .values(claimed_count=Task.claimed_count + 1)
    ).rowcount
    if counted != 1:
        return False
    params = _params(user_id, TASK_KINDS, now, ttl, task_id=task_id)
    if conn.execute(_statement("assign", "any", TASK_KINDS), params).scalar() is None:
        db.rollback()
        return False
    return True


def _draws_gold(share: float, kinds: tuple[str, ...], rng: random.Random) -> bool:
    """Whether this assignment, if it is a new one, should be a gold task (known best answer)."""
    return share > 0 and "rank" in kinds and rng.random() < share


def _claim_gold(db: Session, user_id: int, now: datetime, ttl: timedelta, rng: random.Random) -> int | None:
    """A slot of a gold task this annotator has not seen (app/quality/gold.py), or None."""
    from app.quality.gold import choose_gold

    task = choose_gold(db, user_id, 1.0, rng)  # the caller's draw already decided "gold"
    if task is None:
        return None
    return task.id if _take_slot(db, task.id, user_id, now, ttl) else None


def _assign(
    db: Session,
    user_id: int,
    ttl_seconds: int,
    kinds: tuple[str, ...],
    gold: bool,
    rng: random.Random,
) -> tuple[int | None, datetime]:
    """Resume the held task or claim a new slot (uncommitted); returns it with its new deadline."""
    ttl = timedelta(seconds=ttl_seconds)
    now = utcnow()
    task_id = _resume(db, user_id, kinds, now, ttl)
    if task_id is None and gold:
        task_id = _claim_gold(db, user_id, now, ttl, rng)
    if task_id is None:
        task_id = _claim_new(db, user_id, kinds, now, ttl)
    if task_id is None:
        task_id = _resume(db, user_id, kinds, now, ttl)  # a concurrent request of theirs got one
    return task_id, now + ttl


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
    wanted, rng = _kinds(kinds), rng or _rng
    task_id, _deadline = _assign(db, user_id, ttl_seconds, wanted, _draws_gold(gold_share, wanted, rng), rng)
    db.commit()
    return task_id


def load_task_view(db: Session, task_id: int, user_id: int | None = None) -> TaskView | None:
    """The task with its prompt and responses in shown order (one query, plus the deadline)."""
    conn = db.connection()
    rows = conn.execute(_VIEW, {"task_id": task_id}).all()
    if not rows:
        return None
    expires_at = None
    if user_id is not None:
        expires_at = conn.execute(_EXPIRES_AT, {"task_id": task_id, "user_id": user_id}).scalar()
    return _view_of(rows, task_id, expires_at)


def _view_of(rows: Sequence[Any], task_id: int, expires_at: datetime | None) -> TaskView:
    first = rows[0]
    return TaskView(
        id=task_id,
        kind=first.kind,
        prompt_id=first.prompt_id,
        messages=list(first.messages),
        responses=[TaskResponseView(id=r.response_id, position=r.position, text=r.text) for r in rows],
        required_annotations=first.required_annotations,
        expires_at=expires_at,
    )


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


def _one_statement_tries(
    engine: Engine, user_id: int, kinds: tuple[str, ...], ttl: timedelta
) -> Iterator[tuple[datetime, dict[str, Any]]]:
    """The parameters of _NEXT_POSTGRES to try in turn: from the annotator's floor, then from the start."""
    floor = _floors(engine).get(user_id, kinds)
    for start in (floor, 0) if floor else (0,):
        now = utcnow()
        yield now, _params(user_id, kinds, now, ttl, floor=start)


def _claimed(engine: Engine, user_id: int, kinds: tuple[str, ...], rows: Sequence[Any], deadline: datetime):
    task_id = rows[0].task_id
    _floors(engine).set(user_id, kinds, task_id)
    return _view_of(rows, task_id, deadline)


def _next_in_one_statement(
    db: Session, user_id: int, kinds: tuple[str, ...], ttl_seconds: int
) -> TaskView | None:
    """Postgres: resume or claim, and read the task, in one round trip; None if no task is left.

    The statement is complete on its own (see _CLAIM_POSTGRES), so when the session has no transaction
    open yet it runs in autocommit (run_on_its_own): no BEGIN and COMMIT round trips around it.
    """
    ttl, engine = timedelta(seconds=ttl_seconds), db.get_bind()
    stmt = _statement("next", "postgresql", kinds)
    for now, params in _one_statement_tries(engine, user_id, kinds, ttl):
        rows = run_on_its_own(db, stmt, params)
        if rows:
            return _claimed(engine, user_id, kinds, rows, now + ttl)
    return None


def next_task(
    db: Session,
    user_id: int,
    ttl_seconds: int,
    kinds: Sequence[str] | None = None,
    gold_share: float = 0.0,
    rng: random.Random | None = None,
) -> TaskView | None:
    """Assign (or resume) a task and return what the annotator sees (committed); None when nothing is left."""
    wanted, rng = _kinds(kinds), rng or _rng
    gold = _draws_gold(gold_share, wanted, rng)
    if not gold and is_postgres(db):
        view = _next_in_one_statement(db, user_id, wanted, ttl_seconds)
        if view is not None:
            db.commit()
            return view
    return _next_by_steps(db, user_id, wanted, ttl_seconds, gold, rng)


async def next_task_async(
    hot: HotStatements | None,
    db: Session,
    user_id: int,
    ttl_seconds: int,
    kinds: Sequence[str] | None = None,
    gold_share: float = 0.0,
    rng: random.Random | None = None,
) -> TaskView | None:
    """next_task for an async handler: with `hot` (Postgres) the one-statement claim runs on the event
    loop, and a gold draw, or no task found that way, goes on in a worker thread with `db`; without
    it, all of next_task runs in a worker thread."""
    if hot is None:
        return await anyio.to_thread.run_sync(next_task, db, user_id, ttl_seconds, kinds, gold_share, rng)
    wanted, rng = _kinds(kinds), rng or _rng
    gold = _draws_gold(gold_share, wanted, rng)
    if not gold:
        ttl = timedelta(seconds=ttl_seconds)
        stmt = _statement("next", "postgresql", wanted)
        for now, params in _one_statement_tries(hot.engine, user_id, wanted, ttl):
            rows = await hot.rows(stmt, params)
            if rows:
                return _claimed(hot.engine, user_id, wanted, rows, now + ttl)
    return await anyio.to_thread.run_sync(_next_by_steps, db, user_id, wanted, ttl_seconds, gold, rng)


def _next_by_steps(
    db: Session, user_id: int, kinds: tuple[str, ...], ttl_seconds: int, gold: bool, rng: random.Random
) -> TaskView | None:
    """next_task in several statements: a gold task, SQLite, or on Postgres after the one statement
    found nothing (nothing is free for them, or a concurrent request of theirs claimed the slot
    first: look for what they now hold)."""
    now, ttl = utcnow(), timedelta(seconds=ttl_seconds)
    if not gold and is_postgres(db):
        task_id, deadline = _resume(db, user_id, kinds, now, ttl), now + ttl
    else:
        task_id, deadline = _assign(db, user_id, ttl_seconds, kinds, gold, rng)
    view = None
    if task_id is not None:
        view = replace(load_task_view(db, task_id), expires_at=deadline)  # set by the assigning statement
    db.commit()
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
