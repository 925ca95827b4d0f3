"""The annotators' statements on hot connections of the event loop (Postgres): used by the API,
robust to a dead connection, and off with db_hot_pool_size 0."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

import app.data.statements.hot_connections as hot_module
from app.data.statements.hot_connections import APPLICATION_NAME, HotConnections
from tests.aio import run_async
from tests.world import World

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

PID = "SELECT pg_backend_pid() AS pid"


def _hot_backends(db) -> int:
    db.rollback()
    mine = "application_name = :name AND datname = current_database()"
    return db.execute(
        text(f"SELECT count(*) FROM pg_stat_activity WHERE {mine}"), {"name": APPLICATION_NAME}
    ).scalar_one()


def _seed(db) -> None:
    World(db).tasks_from_texts([(f"question {i}?", [f"answer {i}.{j}" for j in range(3)]) for i in range(2)])


def test_the_annotation_api_runs_on_the_hot_connections(client, db, api_headers, app):
    _seed(db)
    headers = api_headers("annotator")
    assert app.state.statements.hot is not None and app.state.statements.hot.is_open
    assert _hot_backends(db) == 0  # opened on first use
    task = client.get("/api/tasks/next", headers=headers).json()
    ranking = [[r["id"]] for r in task["responses"]]
    url = f"/api/tasks/{task['id']}/annotation"
    stored = client.post(url + "?next=true", json={"ranking": ranking}, headers=headers)
    assert stored.status_code == 201 and stored.json()["comparisons"] == 3
    assert stored.json()["next_task"]["id"] != task["id"]
    assert _hot_backends(db) >= 1  # the claim and the judgement went through them
    replay = client.post(url, json={"ranking": ranking}, headers=headers)
    assert replay.status_code == 200  # the stored judgement, read on the hot connections too
    changed = client.post(url, json={"ranking": ranking[::-1]}, headers=headers)
    assert changed.status_code == 409


def test_a_hot_connection_killed_while_idle_is_replaced(engine, db, monkeypatch):
    async def scenario() -> tuple[int, int]:
        hot = HotConnections(engine, size=1)
        await hot.open()
        try:
            first = (await hot.rows(PID, {}))[0].pid
            db.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
            db.commit()
            monkeypatch.setattr(hot_module, "IDLE_PING_SECONDS", 0.0)  # the idle connection is pinged
            second = (await hot.rows(PID, {}))[0].pid
            return first, second
        finally:
            await hot.close()

    first, second = run_async(scenario())
    assert second != first


def test_a_statement_that_fails_leaves_the_pool_usable(engine):
    async def scenario() -> int:
        hot = HotConnections(engine, size=1)
        await hot.open()
        try:
            with pytest.raises(Exception, match="division by zero"):
                await hot.rows("SELECT 1 / %(zero)s AS x", {"zero": 0})
            return (await hot.rows("SELECT %(n)s AS n", {"n": 5}))[0].n
        finally:
            await hot.close()

    assert run_async(scenario()) == 5


def test_with_no_hot_connections_the_api_uses_worker_threads(settings, engine, db, api_headers):
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.web.main import create_app

    _seed(db)
    headers = api_headers("annotator")
    app = create_app(Settings(**{**settings.model_dump(), "db_hot_pool_size": 0}), engine)
    with TestClient(app) as client:
        assert app.state.statements.hot is None
        task = client.get("/api/tasks/next", headers=headers).json()
        ranking = [[r["id"]] for r in task["responses"]]
        url = f"/api/tasks/{task['id']}/annotation"
        assert client.post(url, json={"ranking": ranking}, headers=headers).status_code == 201
    assert _hot_backends(db) == 0


def test_a_request_cancelled_mid_statement_leaves_the_pool_usable(engine):
    async def scenario() -> int:
        hot = HotConnections(engine, size=1)
        await hot.open()
        try:
            slow = asyncio.ensure_future(hot.rows("SELECT pg_sleep(5)", {}))
            await asyncio.sleep(0.2)
            slow.cancel()  # as when the client goes away and the server cancels the handler
            with pytest.raises(asyncio.CancelledError):
                await slow
            return (await asyncio.wait_for(hot.rows("SELECT 7 AS n", {}), 10))[0].n
        finally:
            await hot.close()

    assert run_async(scenario()) == 7


def test_a_connection_killed_mid_statement_fails_that_request_only(engine, db):
    async def scenario() -> int:
        hot = HotConnections(engine, size=1)
        await hot.open()
        try:
            pid = (await hot.rows(PID, {}))[0].pid
            slow = asyncio.ensure_future(hot.rows("SELECT pg_sleep(5)", {}))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(_terminate, db, pid)  # the server restarts, say
            with pytest.raises(Exception, match="terminat|closed|lost"):
                await slow
            return (await asyncio.wait_for(hot.rows(PID, {}), 10))[0].pid
        finally:
            await hot.close()

    assert run_async(scenario()) > 0


def _terminate(db, pid: int) -> None:
    db.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    db.commit()
