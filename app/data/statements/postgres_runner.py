"""Postgres: each annotation statement is one file of postgres/, run as written in autocommit.

Every statement is complete on its own (a claim counts its slot only for the assignment it made; a
judgement is stored by one call of prefloop_submit_annotation), so it needs no transaction around
it. With hot connections the statements run on the event loop (app.data.statements.hot_connections);
without them (db_hot_pool_size 0), on the engine's pool in a worker thread, as other requests do.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import psycopg
from sqlalchemy import Engine

from app.data.db import run_in_autocommit
from app.data.statements.hot_connections import HotConnections
from app.data.statements.runner import IntegrityConflict, Statement

SQL_DIR = Path(__file__).resolve().parent / "postgres"


@cache
def statement_sql(statement: Statement) -> str:
    """The text of the statement's file, read once."""
    return (SQL_DIR / f"{statement}.sql").read_text()


class PostgresStatements:
    """The StatementRunner of a Postgres database."""

    def __init__(self, engine: Engine, hot: HotConnections | None):
        self._engine = engine
        self.hot = hot

    @property
    def engine(self) -> Engine:
        return self._engine

    async def rows(self, statement: Statement, params: Mapping[str, Any]) -> list[Any]:
        sql = statement_sql(statement)
        try:
            if self.hot is not None:
                return await self.hot.rows(sql, params)
            return await anyio.to_thread.run_sync(run_in_autocommit, self._engine, sql, params)
        except psycopg.IntegrityError as error:
            raise IntegrityConflict(str(error)) from error

    async def close(self) -> None:
        if self.hot is not None:
            await self.hot.close()
