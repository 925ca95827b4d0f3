"""Postgres restarted under 50 annotators: clean 503s while it is down, recovery on its own, no lost work.

A real web app (uvicorn subprocess) on the private Postgres; 50 annotators work through the JSON
API at once, each as a careful client does: ask for a task, submit, and on a failed submission send
the same judgement again (the API is idempotent) until it is acknowledged. Postgres is stopped mid-
load and started again a few seconds later.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import pytest
from sqlalchemy import func, select

from app.data.models import Annotation, Comparison, User
from app.services.accounts import create_api_token
from tests.aio import run_async
from tests.world import World

ANNOTATORS = 50
TASKS = 60
RESPONSES = 3
THINK_SECONDS = 0.3  # between two tasks of one annotator
DOWN_SECONDS = 3.0
RECOVERY_SECONDS = 10.0  # the app must answer normally again this long after Postgres is back
AFTER_SECONDS = 13.0  # load goes on this long after Postgres is back


@dataclass
class Outcome:
    at: float
    method: str
    status: int
    body: str


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    acknowledged: dict[tuple[int, int], str] = field(default_factory=dict)  # (user, task) -> rationale
    stop: bool = False


async def _annotator(client: httpx.AsyncClient, user_id: int, token: str, load: Load) -> None:
    headers = {"Authorization": f"Bearer {token}"}

    async def call(method: str, url: str, **kwargs) -> httpx.Response | None:
        try:
            response = await client.request(method, url, headers=headers, **kwargs)
        except httpx.HTTPError as error:  # the app itself must stay up: a dropped connection is a failure
            load.outcomes.append(Outcome(time.monotonic(), method, 0, repr(error)))
            return None
        load.outcomes.append(Outcome(time.monotonic(), method, response.status_code, response.text[:500]))
        return response

    while not load.stop:
        task = await call("GET", "/api/tasks/next")
        if task is None or task.status_code == 204:
            return  # nothing left (or the app died; the assertions say which)
        if task.status_code != 200:
            await asyncio.sleep(0.2)
            continue
        body = task.json()
        ids = [r["id"] for r in body["responses"]]
        rationale = f"user {user_id} task {body['id']}"
        payload = {"ranking": [[i] for i in ids], "rationale": rationale}
        while True:  # the same judgement until it is acknowledged
            sent = await call("POST", f"/api/tasks/{body['id']}/annotation", json=payload)
            if sent is not None and sent.status_code in (200, 201):
                load.acknowledged[(user_id, body["id"])] = rationale
                break
            if sent is not None and sent.status_code not in (503,):
                break  # an unexpected answer: recorded, and asserted on below
            await asyncio.sleep(0.2)
        await asyncio.sleep(THINK_SECONDS)


async def _run_load(url: str, tokens: dict[int, str], private_postgres) -> tuple[Load, float, float]:
    load = Load()
    limits = httpx.Limits(max_connections=ANNOTATORS + 5)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        workers = [asyncio.create_task(_annotator(client, uid, tok, load)) for uid, tok in tokens.items()]
        await asyncio.sleep(3)  # steady load first
        down_at = time.monotonic()
        await asyncio.to_thread(private_postgres.stop, "fast")
        await asyncio.sleep(DOWN_SECONDS)
        await asyncio.to_thread(private_postgres.start)
        up_at = time.monotonic()
        await asyncio.sleep(AFTER_SECONDS)
        load.stop = True
        await asyncio.wait_for(asyncio.gather(*workers), timeout=60)
    return load, down_at, up_at


@pytest.mark.slow
def test_a_postgres_restart_under_load_fails_cleanly_recovers_and_loses_nothing(
    settings, db, private_postgres, app_server
):
    world = World(db)
    world.tasks_from_texts(
        [(f"prompt {i}", [f"answer {i}.{j}" for j in range(RESPONSES)]) for i in range(TASKS)],
        required=ANNOTATORS,
    )
    # Token-only accounts: a password hash per annotator would cost seconds of argon2 for nothing.
    users = [User(username=f"load-{i}", role="annotator", password_hash="!") for i in range(ANNOTATORS)]
    db.add_all(users)
    db.flush()
    tokens = {user.id: create_api_token(db, user, "load") for user in users}
    db.commit()
    db.close()  # the test's own connection must not be the one that sees the restart

    # Keep-alive longer than the test: otherwise uvicorn may close a pooled connection just as the
    # client reuses it (a race of HTTP keep-alive that browsers retry and httpx does not).
    server = app_server(uvicorn_args=("--timeout-keep-alive", "120"))
    load, down_at, up_at = run_async(_run_load(server.url, tokens, private_postgres))

    failures = [o for o in load.outcomes if o.status not in (200, 201, 204)]
    # While Postgres was down (and just after), every failure is a clean 503 that says what happened.
    assert failures, "the restart did not reach any request: the test proved nothing"
    unclean = [o for o in failures if o.status != 503]
    assert not unclean, f"{unclean[:5]}\n{server.log()[-3000:]}"
    assert all("database" in o.body.lower() and "Traceback" not in o.body for o in failures), failures[:3]
    # The app recovers by itself: nothing fails later than RECOVERY_SECONDS after Postgres is back,
    # and requests succeed again after that.
    assert max(o.at for o in failures) < up_at + RECOVERY_SECONDS, max(o.at for o in failures) - up_at
    assert any(o.status in (200, 201) and o.at > up_at + RECOVERY_SECONDS for o in load.outcomes)
    assert "Traceback" not in server.log(), server.log()[-3000:]

    # Every acknowledged judgement is stored exactly once, with its pairs; nothing else is.
    db.expire_all()
    stored = {(a.user_id, a.task_id): a.rationale for a in db.scalars(select(Annotation))}
    assert stored == load.acknowledged
    pairs = db.scalar(select(func.count()).select_from(Comparison))
    assert pairs == len(stored) * RESPONSES * (RESPONSES - 1) // 2
    print(
        f"\n{len(load.outcomes)} requests, {len(load.acknowledged)} acknowledged = stored,"
        f" {len(failures)} clean 503s, Postgres down {up_at - down_at:.1f} s,"
        f" last failure {max(o.at for o in failures) - up_at:.1f} s after it was back"
    )
