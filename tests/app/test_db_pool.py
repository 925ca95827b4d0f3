"""Pooled Postgres connections: a connection that died while idle in the pool is replaced, not used."""

from __future__ import annotations

import pytest
from sqlalchemy import text

import app.db as db_module
from app.db import make_engine

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
