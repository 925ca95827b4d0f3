"""What the annotation services ask of a database: run a named statement, get its rows.

Each database answers every statement in its own way: Postgres runs the file of that name in
postgres/ as one statement on an autocommit connection; SQLite runs the file in sqlite/, or several
of its files as steps under the database's write lock, and returns rows of the same columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import Engine


class Statement(StrEnum):
    """The statements of the annotation hot path (the rows each returns are described in its file)."""

    NEXT_TASK = "next_task"  # resume the held task or claim a free slot from a floor; the task's rows
    RESUME_TASK = "resume_task"  # the held task's rows, its deadline pushed
    CLAIM_TASK = "claim_task"  # a slot of a given task; its rows
    STORE_JUDGEMENT = "store_judgement"  # one row: the outcome of storing a judgement
    STORED_JUDGEMENT = "stored_judgement"  # the annotator's stored judgement of a task
    KNOWN_RESPONSE_IDS = "known_response_ids"  # which of the given response ids exist
    ANNOTATOR_PROGRESS = "annotator_progress"  # the annotator's judgement counts (one row or none)


class IntegrityConflict(Exception):
    """A statement broke a constraint of the database (a unique key, say) and changed nothing."""


class StatementRunner(Protocol):
    """Runs the annotation statements on one database; each call commits by itself."""

    @property
    def engine(self) -> Engine:
        """The database's engine (for what is kept per database, and the sessions of rare paths)."""
        ...

    async def rows(self, statement: Statement, params: Mapping[str, Any]) -> list[Any]:
        """The statement's rows (named tuples), committed. Lists in `params` are arrays of values;
        JSON columns come back decoded. Raises IntegrityConflict when a constraint refused it."""
        ...

    async def close(self) -> None:
        """Give back the connections it holds."""
        ...
