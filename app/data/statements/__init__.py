"""The annotation hot path's SQL: named statements, each run by its database's own runner.

postgres/ and sqlite/ hold every statement written out in full, as each driver takes it (psycopg's
%(name)s, sqlite3's :name), and the runners send the text of a file as it is: what a reader sees
is what the database runs. The function that stores a judgement on Postgres is created by a
migration from migrations/sql/.
"""

from __future__ import annotations

from sqlalchemy import Engine

from app.data.statements.hot_connections import HotConnections
from app.data.statements.postgres_runner import PostgresStatements
from app.data.statements.runner import IntegrityConflict, Statement, StatementRunner
from app.data.statements.sqlite_runner import SqliteStatements

__all__ = ["IntegrityConflict", "Statement", "StatementRunner", "open_statements"]


async def open_statements(engine: Engine, hot_connections: int) -> StatementRunner:
    """The runner of the engine's database, for use on the running event loop.

    On Postgres, `hot_connections` async connections run the statements on the loop (opened on first
    use); with 0 they run on the engine's pool in worker threads.
    """
    if engine.dialect.name == "sqlite":
        return SqliteStatements(engine)
    hot = None
    if hot_connections:
        hot = HotConnections(engine, hot_connections)
        await hot.open()
    return PostgresStatements(engine, hot)
