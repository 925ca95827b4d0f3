"""Concurrent annotators on Postgres: slots are never shared, overlap is exact, nothing acknowledged is lost.

20 threads (one annotator each) fetch and submit against 50 tasks with overlap 2 until no task is
left for them. Some submissions are sent twice (a client retry), some tasks are skipped. A second run
lets assignments expire while people work, with the expiry job racing the submissions.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

import pytest
from sqlalchemy import func, select

from app.data.db import make_engine, session_factory
from app.data.models import Annotation, Assignment, Task, User
from app.services.accounts import hash_password
from app.services.annotation import AnnotationError
from app.services.assignment import expire_stale_assignments
from app.services.schemas import AnnotationIn
from tests.aio import run_async
from tests.annotating import next_task, submit_annotation
from tests.world import World

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

THREADS = 20
TASKS = 50
OVERLAP = 2


@dataclass
class Outcome:
    acknowledged: list[tuple[int, int, int, bool]] = field(
        default_factory=list
    )  # annotation, task, user, skip
    refused: list[str] = field(default_factory=list)
    expired: int = 0  # assignments the expiry job took back while their annotator worked
    errors: list[BaseException] = field(default_factory=list)


def _annotators(db, n: int) -> list[int]:
    password = hash_password("not-used-here")  # one hash: argon2 is slow on purpose
    users = [User(username=f"worker-{i}", role="annotator", password_hash=password) for i in range(n)]
    db.add_all(users)
    db.commit()
    return [u.id for u in users]


def _unseen_open_tasks(db, user_id: int) -> int:
    seen = select(Assignment.task_id).where(Assignment.user_id == user_id, Assignment.status != "expired")
    count = db.scalar(select(func.count(Task.id)).where(Task.status == "open", Task.id.not_in(seen)))
    db.rollback()
    return count


def _work(sessions, user_id: int, ttl: float, seed: int, outcome: Outcome, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    db = sessions()
    try:
        deadline = time.monotonic() + 120  # bounded: a bug must not hang the test
        while time.monotonic() < deadline:
            view = next_task(db, user_id, ttl)
            if view is None:
                if _unseen_open_tasks(db, user_id) == 0:
                    return
                # Every free slot is held by someone right now; one may come back (skip, expiry).
                time.sleep(0.01)
                continue
            time.sleep(rng.uniform(0, 0.02))  # "reading": lets other threads interleave
            ids = [r.id for r in view.responses]
            rng.shuffle(ids)
            if rng.random() < 0.1:
                payload = AnnotationIn(skip=True, skip_reason="cannot judge")
            elif rng.random() < 0.3:
                payload = AnnotationIn(ranking=[ids[:2], *[[i] for i in ids[2:]]])  # a tie on top
            else:
                payload = AnnotationIn(ranking=[[i] for i in ids])
            try:
                result, _ = submit_annotation(db, view.id, user_id, payload)
                if rng.random() < 0.2:  # the client did not see the answer and sends it again
                    again, created = submit_annotation(db, view.id, user_id, payload)
                    assert again == result and not created
            except AnnotationError as exc:
                with lock:
                    outcome.refused.append(f"{exc.status}: {exc.message}")
                continue
            with lock:
                outcome.acknowledged.append((result.annotation_id, view.id, user_id, payload.skip))
        raise AssertionError(f"annotator {user_id} never ran out of tasks")
    except BaseException as exc:
        with lock:
            outcome.errors.append(exc)
    finally:
        db.close()


def _run(engine, ttl: float, expiry: bool) -> Outcome:
    sessions = session_factory(engine)
    with sessions() as db:
        items = [(f"prompt {i}", [f"answer {i}.{j}" for j in range(4)]) for i in range(TASKS)]
        World(db).tasks_from_texts(items, required=OVERLAP, prompt_set="concurrency")
        users = _annotators(db, THREADS)
    outcome, lock = Outcome(), threading.Lock()
    stop = threading.Event()

    def expire_loop() -> None:
        with sessions() as db:
            while not stop.is_set():
                try:
                    outcome.expired += expire_stale_assignments(db)
                except BaseException as exc:
                    with lock:
                        outcome.errors.append(exc)
                    return
                time.sleep(0.001)

    threads = [
        threading.Thread(target=_work, args=(sessions, uid, ttl, i, outcome, lock))
        for i, uid in enumerate(users)
    ]
    expirer = threading.Thread(target=expire_loop) if expiry else None
    if expirer:
        expirer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    stop.set()
    if expirer:
        expirer.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    return outcome


def _check_invariants(engine, outcome: Outcome) -> None:
    assert outcome.errors == [], outcome.errors[:3]
    with session_factory(engine)() as db:
        tasks = db.scalars(select(Task)).all()
        assert len(tasks) == TASKS
        judged: dict[int, list[int]] = {t.id: [] for t in tasks}
        rows = db.execute(
            select(Annotation.id, Annotation.task_id, Annotation.user_id, Annotation.skipped)
        ).all()
        for _id, task_id, user_id, skipped in rows:
            if not skipped:
                judged[task_id].append(user_id)
        for task in tasks:
            assert task.status == "done" and task.annotation_count == OVERLAP, task.id
            assert task.claimed_count == OVERLAP, task.id
            assert len(judged[task.id]) == OVERLAP and len(set(judged[task.id])) == OVERLAP, task.id
        stored = {(r.id, r.task_id, r.user_id, r.skipped) for r in rows}
        missing = [a for a in outcome.acknowledged if a not in stored]
        assert missing == []
        assert len(outcome.acknowledged) == len(rows)  # every stored judgement was acknowledged once
        assert db.scalar(select(Assignment.id).where(Assignment.status == "active")) is None


def test_twenty_annotators_fifty_tasks_overlap_two(settings, engine):
    big = make_engine(settings.sqlalchemy_url, pool_size=THREADS + 2)
    try:
        outcome = _run(big, ttl=600, expiry=False)
        _check_invariants(big, outcome)
        assert outcome.refused == []
        assert sum(1 for a in outcome.acknowledged if not a[3]) == TASKS * OVERLAP
    finally:
        big.dispose()


def test_expiry_racing_submissions_loses_nothing_acknowledged(settings, engine):
    big = make_engine(settings.sqlalchemy_url, pool_size=THREADS + 2)
    try:
        # Assignments expire after 2 ms, so many expire mid-work and go to someone else; late
        # submissions are accepted while a slot is free and refused (409) once the task is full.
        outcome = _run(big, ttl=0.002, expiry=True)
        _check_invariants(big, outcome)
        assert all(r.startswith("409") for r in outcome.refused), outcome.refused[:3]
        assert outcome.expired > 0  # the race this test is about did happen
    finally:
        big.dispose()


def test_twenty_annotators_over_the_api_share_the_few_hot_connections(settings, engine):
    """The same invariants through the HTTP API, whose claims and judgements run on the event loop over
    the app's few async connections (app.data.statements.hot_connections): 20 annotators at once share
    6 of them."""
    import httpx

    from app.services.accounts import create_api_token
    from app.web.main import create_app

    sessions = session_factory(engine)
    with sessions() as db:
        items = [(f"prompt {i}", [f"answer {i}.{j}" for j in range(4)]) for i in range(TASKS)]
        World(db).tasks_from_texts(items, required=OVERLAP, prompt_set="concurrency-api")
        users = _annotators(db, THREADS)
        tokens = {uid: create_api_token(db, db.get(User, uid), "concurrency") for uid in users}
        db.commit()
    app = create_app(settings, engine)
    outcome = Outcome()

    def nothing_left_for(user_id: int) -> bool:
        with sessions() as db:
            return _unseen_open_tasks(db, user_id) == 0

    async def annotator(client: httpx.AsyncClient, user_id: int, seed: int) -> None:
        rng = random.Random(seed)
        headers = {"Authorization": f"Bearer {tokens[user_id]}"}
        for _ in range(2000):  # bounded: a bug must not hang the test
            fetched = await client.get("/api/tasks/next", headers=headers)
            if fetched.status_code == 204:
                if await asyncio.to_thread(nothing_left_for, user_id):
                    return
                await asyncio.sleep(0.01)  # every free slot is held right now; one may come back
                continue
            assert fetched.status_code == 200, fetched.text
            task = fetched.json()
            ids = [r["id"] for r in task["responses"]]
            rng.shuffle(ids)
            await asyncio.sleep(rng.uniform(0, 0.01))
            skip = rng.random() < 0.1
            body = {"skip": True, "skip_reason": "cannot judge"} if skip else {"ranking": [[i] for i in ids]}
            url = f"/api/tasks/{task['id']}/annotation"
            stored = await client.post(url, json=body, headers=headers)
            assert stored.status_code == 201, stored.text
            if rng.random() < 0.2:  # a client retry gets the same answer, and stores nothing twice
                again = await client.post(url, json=body, headers=headers)
                assert again.status_code == 200 and again.json() == stored.json()
            outcome.acknowledged.append((stored.json()["annotation_id"], task["id"], user_id, skip))
        raise AssertionError(f"annotator {user_id} never ran out of tasks")

    async def main() -> None:
        async with app.router.lifespan_context(app):
            assert app.state.statements.hot is not None
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                results = await asyncio.gather(
                    *(annotator(client, uid, i) for i, uid in enumerate(users)), return_exceptions=True
                )
        outcome.errors.extend(r for r in results if isinstance(r, BaseException))

    run_async(main())
    _check_invariants(engine, outcome)
    assert sum(1 for a in outcome.acknowledged if not a[3]) == TASKS * OVERLAP
