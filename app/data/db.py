"""Engine, sessions and the declarative Base (with a constraint naming convention for Alembic)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine, MetaData, create_engine, event, exc
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# Errors that mean "the database cannot be reached or is going away" rather than "this request is wrong":
# a refused or dropped connection (server down, restarting, shutting down), a closed connection, or
# no pooled connection within the pool timeout. The web app answers them with 503, and a client
# that tries again after the restart succeeds; the next checkout opens a fresh connection.
DATABASE_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.TimeoutError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the web app read while a worker writes; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str, pool_size: int | None = None, max_overflow: int | None = None) -> Engine:
    """An engine for SQLite (embedded) or Postgres (production); pool sizes default to the settings'."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    from app.config import get_settings

    settings = get_settings()
    engine = create_engine(
        url,
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=settings.db_max_overflow if max_overflow is None else max_overflow,
    )
    _ping_idle_connections(engine)
    return engine


IDLE_PING_SECONDS = 5.0


def _ping_idle_connections(engine: Engine) -> None:
    """Check a pooled connection before use if it sat idle a while; hand out busy ones as they are.

    A database restart or an idle timeout kills connections while they wait in the pool, and the
    first request to draw a dead one would fail. SQLAlchemy's pool_pre_ping prevents that with a
    round trip on every checkout, which under load is one extra round trip per request for
    connections that were in use a moment ago. Pinging only connections idle for IDLE_PING_SECONDS
    keeps the protection where it matters; a failed ping makes the pool open a fresh connection.
    """

    @event.listens_for(engine, "checkin")
    def returned(_dbapi_connection, record) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def ping_if_idle(dbapi_connection, record, _proxy) -> None:
        returned_at = record.info.get("returned_at")
        if returned_at is None or time.monotonic() - returned_at < IDLE_PING_SECONDS:
            return  # just opened, or back from a request a moment ago
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise exc.DisconnectionError(f"idle connection is gone: {error}") from error
        if not alive:
            raise exc.DisconnectionError("idle connection is gone")


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for a URL (default: the settings' database)."""
    from app.config import get_settings

    return _engine_for(url or get_settings().sqlalchemy_url)


@lru_cache
def _engine_for(url: str) -> Engine:
    return make_engine(url)


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (workers and the CLI)."""
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def read_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that only reads: it ends with COMMIT rather than ROLLBACK (the same for reads).

    psycopg forgets every statement it has prepared on a connection when that connection rolls back,
    and each of the hot path's statements is then parsed and planned anew for its next uses there.
    Frequent read-only sessions (login checks, the policy poll) would keep the pool's connections cold.
    """
    session = factory()
    try:
        yield session
        session.commit()
    finally:
        session.close()


def run_in_autocommit(engine: Engine, sql: str, params: Mapping[str, Any]) -> list[Any]:
    """Postgres: run one self-contained statement (or function call) on a pooled connection in
    autocommit, and return its rows as named tuples.

    Postgres commits the statement by itself, which saves the BEGIN and COMMIT round trips. The
    statement goes to psycopg as written (%(name)s placeholders), prepared on its first use on the
    connection: it is on every annotator's request when the web app runs without hot connections,
    and SQLAlchemy's execution layers around a single statement cost more Python time than psycopg's.
    """
    pooled = engine.raw_connection()
    try:
        driver = pooled.driver_connection
        driver.autocommit = True
        try:
            with driver.cursor(row_factory=namedtuple_row) as cursor:
                cursor.execute(sql, params, prepare=True)
                return cursor.fetchall() if cursor.description else []
        finally:
            if not driver.closed:
                driver.autocommit = False  # as the pool hands connections out
    finally:
        pooled.close()  # back to the pool


def is_postgres(session_or_engine) -> bool:
    bind = session_or_engine.get_bind() if isinstance(session_or_engine, Session) else session_or_engine
    return bind.dialect.name == "postgresql"
