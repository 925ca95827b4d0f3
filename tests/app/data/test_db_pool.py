"""Pooled Postgres connections: a connection that died while idle in the pool is replaced, not used."""

from __future__ import annotations

import pytest
from sqlalchemy import text

import app.data.db as db_module
from app.data.db import make_engine

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(engine, pid: int) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.commit()


def test_a_connection_killed_while_idle_is_replaced_on_checkout(settings, monkeypatch):
    engine = make_engine(settings.sqlalchemy_url, pool_size=1, max_overflow=1)
    killer = make_engine(settings.sqlalchemy_url, pool_size=1, max_overflow=0)
    try:
        first = _backend_pid(engine)
        _terminate(killer, first)  # as a database restart or an idle timeout would
        monkeypatch.setattr(db_module, "IDLE_PING_SECONDS", 0.0)  # the pooled connection counts as idle
        assert _backend_pid(engine) != first  # the dead one was pinged, dropped and replaced
    finally:
        engine.dispose()
        killer.dispose()


def test_a_connection_back_from_recent_use_is_handed_out_without_a_ping(settings, monkeypatch):
    engine = make_engine(settings.sqlalchemy_url, pool_size=1, max_overflow=0)
    pings = []
    original = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda conn: pings.append(1) or original(conn))
    try:
        first = _backend_pid(engine)
        assert _backend_pid(engine) == first
        assert pings == []
        monkeypatch.setattr(db_module, "IDLE_PING_SECONDS", 0.0)
        assert _backend_pid(engine) == first
        assert pings == [1]
    finally:
        engine.dispose()


def _prepared_statements(session) -> int:
    """How many statements psycopg has prepared on the session's connection (ends no transaction)."""
    driver = session.connection().connection.driver_connection
    return driver.execute("SELECT count(*) FROM pg_prepared_statements", prepare=False).fetchone()[0]


def test_run_in_autocommit_prepares_and_commits_by_itself(settings):
    from app.data.db import run_in_autocommit, session_factory

    engine = make_engine(settings.sqlalchemy_url, pool_size=1, max_overflow=0)
    other = make_engine(settings.sqlalchemy_url, pool_size=1, max_overflow=0)
    sessions = session_factory(engine)
    try:
        with sessions() as db:
            db.execute(text("CREATE TABLE scratch (n int)"))
            db.commit()
        rows = run_in_autocommit(
            engine, "INSERT INTO scratch VALUES (%(n)s) RETURNING n + 1 AS next", {"n": 41}
        )
        assert [row.next for row in rows] == [42]
        with other.connect() as conn:  # committed: another connection sees it
            assert conn.execute(text("SELECT n FROM scratch")).scalars().all() == [41]
        with sessions() as db:  # the pool's one connection, back in the state the pool hands it out in
            driver = db.connection().connection.driver_connection
            assert driver.autocommit is False
            assert _prepared_statements(db) == 1  # prepared on its first use
            db.execute(text("DROP TABLE scratch"))
            db.commit()
    finally:
        engine.dispose()
        other.dispose()


def test_read_sessions_keep_the_connections_prepared_statements(settings):
    """psycopg forgets a connection's prepared statements at every rollback; read_session commits."""
    from app.data.db import read_session, run_in_autocommit, session_factory

    engine = make_engine(settings.sqlalchemy_url, pool_size=1, max_overflow=0)
    sessions = session_factory(engine)
    statement = "SELECT %(n)s AS n"
    try:
        run_in_autocommit(engine, statement, {"n": 1})
        with read_session(sessions) as db:
            db.execute(text("SELECT 1"))
        with sessions() as db:
            assert _prepared_statements(db) == 1  # the one connection of the pool kept it
            db.rollback()
            db.execute(text("SELECT 1"))
            db.rollback()  # what a plain session's close does after a read
            assert _prepared_statements(db) == 0
    finally:
        engine.dispose()
