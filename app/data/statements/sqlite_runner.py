"""SQLite: each annotation statement as the steps of sqlite/ run under the database's write lock.

SQLite has no functions of our own and no writes inside WITH, so what one Postgres statement does
takes a few here: a statement that writes starts with BEGIN IMMEDIATE, which takes the write lock
that SQLite grants one connection at a time, runs its steps and commits. Holding the lock from the
first step, every read sees what the writes after it will change; no row locks are needed. The
steps mirror the Postgres statements (postgres/*.sql and prefloop_submit_annotation in
migrations/sql/submit_annotation_v3.sql) and return rows of the same columns. They run in a worker
thread on a connection of the engine's pool.
"""

from __future__ import annotations

import json
import sqlite3
from collections import namedtuple
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import DateTime, Engine

from app.data.statements.pairs import derive_pairs
from app.data.statements.runner import IntegrityConflict, Statement

SQL_DIR = Path(__file__).resolve().parent / "sqlite"


@cache
def step_sql(name: str) -> str:
    """The text of sqlite/<name>.sql, read once."""
    return (SQL_DIR / f"{name}.sql").read_text()


@cache
def _row_type(columns: tuple[str, ...]) -> type:
    return namedtuple("Row", columns)


class _Steps:
    """Runs files of sqlite/ on one connection, inside whatever transaction it has."""

    def __init__(self, connection: sqlite3.Connection, stored_time: Callable[[datetime], str]):
        self._connection = connection
        self._stored_time = stored_time

    def _bound(self, params: Mapping[str, Any]) -> dict[str, Any]:
        # Times as the ORM stores them (SQLite compares them as text); lists as JSON (read with json_each).
        bound = {}
        for key, value in params.items():
            if isinstance(value, datetime):
                value = self._stored_time(value)
            elif isinstance(value, list):
                value = json.dumps(value)
            bound[key] = value
        return bound

    def rows(self, name: str, params: Mapping[str, Any], json_columns: tuple[str, ...] = ()) -> list[Any]:
        cursor = self._connection.execute(step_sql(name), self._bound(params))
        if cursor.description is None:
            return []
        row_type = _row_type(tuple(column[0] for column in cursor.description))
        rows = [row_type(*values) for values in cursor.fetchall()]
        if json_columns:
            rows = [row._replace(**{c: json.loads(getattr(row, c)) for c in json_columns}) for row in rows]
        return rows

    def run(self, name: str, params: Mapping[str, Any]) -> None:
        self._connection.execute(step_sql(name), self._bound(params))

    def run_many(self, name: str, param_rows: list[Mapping[str, Any]]) -> None:
        self._connection.executemany(step_sql(name), [self._bound(params) for params in param_rows])

    def first(self, name: str, params: Mapping[str, Any]) -> Any | None:
        found = self.rows(name, params)
        return found[0] if found else None

    def value(self, name: str, params: Mapping[str, Any]) -> Any | None:
        row = self.first(name, params)
        return None if row is None else row[0]

    def task_rows(self, task_id: int) -> list[Any]:
        return self.rows("task_view", {"task_id": task_id}, json_columns=("messages",))


# ---------------------------------------------------------------- statements that write (the lock held)


def next_task(steps: _Steps, p: Mapping[str, Any]) -> list[Any]:
    """postgres/next_task.sql: the held task, or else a free slot of the oldest unseen task."""
    held = steps.value("resume_task", p)
    if held is not None:
        return steps.task_rows(held)
    free = steps.value("free_task", p)
    return [] if free is None else claim_task(steps, {**p, "task_id": free})


def resume_task(steps: _Steps, p: Mapping[str, Any]) -> list[Any]:
    """postgres/resume_task.sql: the held task, its deadline pushed."""
    held = steps.value("resume_task", p)
    return [] if held is None else steps.task_rows(held)


def claim_task(steps: _Steps, p: Mapping[str, Any]) -> list[Any]:
    """postgres/claim_task.sql: the slot is counted only for an assignment actually made."""
    if steps.value("assign_task", p) is None:
        return []
    steps.run("count_claimed_slot", p)
    return steps.task_rows(p["task_id"])


_Outcome = namedtuple(
    "_Outcome", "outcome shown new_annotation_id shown_order_unchanged"
)  # the function's row


def store_judgement(steps: _Steps, p: Mapping[str, Any]) -> list[Any]:
    """prefloop_submit_annotation (migrations/sql/submit_annotation_v3.sql), step by step."""
    state = steps.first("judgement_state", p)
    if state is None:
        return [_Outcome("no_task", [], None, None)]
    shown = json.loads(state.shown)
    if state.assignment_status in ("submitted", "skipped"):
        return [_Outcome("judged", shown, None, None)]  # a replay or a changed judgement
    # Before the ranking: its refusal names the task's responses, which only its annotators may see.
    if state.assignment_id is None:
        return [_Outcome("not_assigned", [], None, None)]
    # Every response exactly once (shown ids are distinct), flags only on shown responses.
    named, task = set(p["named"]), set(shown)
    every_one_once = not p["named"] or (len(p["named"]) == len(shown) and named == task)
    if not (named <= task and set(p["flagged"]) <= task and every_one_once):
        return [_Outcome("invalid", shown, None, None)]
    # A skip gives a held slot back; a judgement on an expired assignment needs a free slot again.
    holds_slot = state.assignment_status == "active"
    if p["skip"]:
        counts, claim_delta = 0, -1 if holds_slot else 0
    else:
        counts, claim_delta = 1, 0 if holds_slot else 1
    if steps.first("count_judgement", {**p, "counts": counts, "claim_delta": claim_delta}) is None:
        return [_Outcome("closed", shown, None, None)]
    unchanged = not p["skip"] and not p["all_bad"] and p["order"] is not None and p["order"] == shown
    annotation_id = steps.value("insert_annotation", {**p, "shown_order_unchanged": unchanged})
    # Derived only now, from a ranking that names each shown response once.
    pairs = [] if p["skip"] else derive_pairs(json.loads(p["ranking"]), p["all_bad"])
    comparison = {"annotation_id": annotation_id, "prompt_id": state.prompt_id, "now": p["now"]}
    steps.run_many(
        "insert_comparison",
        [
            {**comparison, "chosen": pair.chosen, "rejected": pair.rejected, "margin": pair.margin}
            for pair in pairs
        ],
    )
    steps.run("mark_assignment_judged", {"skip": p["skip"], "assignment_id": state.assignment_id})
    return [_Outcome("stored", shown, annotation_id, unchanged)]


WRITES: dict[Statement, Callable[[_Steps, Mapping[str, Any]], list[Any]]] = {
    Statement.NEXT_TASK: next_task,
    Statement.RESUME_TASK: resume_task,
    Statement.CLAIM_TASK: claim_task,
    Statement.STORE_JUDGEMENT: store_judgement,
}

# ---------------------------------------------------------------- statements that only read (no lock)

READS: dict[Statement, tuple[str, tuple[str, ...]]] = {  # the file, and its JSON columns
    Statement.STORED_JUDGEMENT: ("stored_judgement", ("ranking",)),
    Statement.KNOWN_RESPONSE_IDS: ("known_response_ids", ()),
    Statement.ANNOTATOR_PROGRESS: ("annotator_progress", ()),
}


class SqliteStatements:
    """The StatementRunner of a SQLite database."""

    def __init__(self, engine: Engine):
        self._engine = engine
        timestamp = DateTime(timezone=True).dialect_impl(engine.dialect)
        self._stored_time = timestamp.bind_processor(engine.dialect)

    @property
    def engine(self) -> Engine:
        return self._engine

    async def rows(self, statement: Statement, params: Mapping[str, Any]) -> list[Any]:
        return await anyio.to_thread.run_sync(self._run, statement, params)

    def _run(self, statement: Statement, params: Mapping[str, Any]) -> list[Any]:
        pooled = self._engine.raw_connection()
        try:
            connection = pooled.driver_connection
            steps = _Steps(connection, self._stored_time)
            if statement in READS:
                name, json_columns = READS[statement]
                return steps.rows(name, params, json_columns)
            connection.execute("BEGIN IMMEDIATE")  # waits for the write lock (the busy timeout)
            try:
                found = WRITES[statement](steps, params)
            except BaseException:
                connection.rollback()
                raise
            connection.commit()
            return found
        except sqlite3.IntegrityError as error:
            raise IntegrityConflict(str(error)) from error
        finally:
            pooled.close()  # back to the pool

    async def close(self) -> None:
        """Nothing to give back: each statement borrows a connection of the engine's pool."""
