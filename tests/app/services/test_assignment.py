"""Task assignment: overlap, never the same task twice, resuming a held task, expiry, kinds, gold."""

from __future__ import annotations

import random
from datetime import UTC, timedelta

import pytest
from sqlalchemy import select, update

from app.data.models import TASK_KINDS, Assignment, Task, utcnow
from app.services.assignment import expire_stale_assignments
from app.services.schemas import AnnotationIn
from tests.annotating import next_task, next_task_id, shown_response_ids, submit_annotation
from tests.world import World

TTL = 600


def seed(db, n: int, required: int = 1, k: int = 3, kind: str = "rank") -> list[int]:
    items = [(f"prompt {i}", [f"answer {i}.{j}" for j in range(k)]) for i in range(n)]
    return World(db).tasks_from_texts(items, required=required, kind=kind, prompt_set=f"set-{kind}-{n}-{k}")


def rank_all(db, task_id: int, user_id: int) -> None:
    payload = AnnotationIn(ranking=[[r] for r in shown_response_ids(db, task_id)])
    submit_annotation(db, task_id, user_id, payload)


def let_expire(db, user_id: int) -> None:
    """The annotator's assignments pass their deadline and the expiry job gives their slots back."""
    db.execute(
        update(Assignment)
        .where(Assignment.user_id == user_id)
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    db.commit()
    assert expire_stale_assignments(db) == 1


def claimed(db, task_id: int) -> int:
    db.expire_all()
    return db.get(Task, task_id).claimed_count


def test_oldest_task_first_and_a_reload_resumes_it(db, make_user):
    first, second = seed(db, 2)
    user, _ = make_user()
    view = next_task(db, user.id, TTL)
    assert view.id == first and view.prompt_text == "prompt 0"
    assert [r.text for r in sorted(view.responses, key=lambda r: r.text)] == [
        "answer 0.0",
        "answer 0.1",
        "answer 0.2",
    ]
    assert [r.position for r in view.responses] == [0, 1, 2]
    assert view.expires_at is not None
    assert next_task(db, user.id, TTL).id == first  # same task again, no second slot
    assert claimed(db, first) == 1 and claimed(db, second) == 0


def test_overlap_gives_a_task_to_n_distinct_annotators(db, make_user):
    first, second = seed(db, 2, required=2)
    a, b, c = (make_user()[0] for _ in range(3))
    assert next_task_id(db, a.id, TTL) == first
    assert next_task_id(db, b.id, TTL) == first
    assert next_task_id(db, c.id, TTL) == second  # first has no free slot left
    assert claimed(db, first) == 2


def test_an_annotator_never_gets_a_task_they_submitted_or_skipped(db, make_user):
    t1, t2, t3 = seed(db, 3, required=2)
    user, _ = make_user()
    assert next_task_id(db, user.id, TTL) == t1
    rank_all(db, t1, user.id)
    assert next_task_id(db, user.id, TTL) == t2
    submit_annotation(db, t2, user.id, AnnotationIn(skip=True, skip_reason="cannot judge"))
    assert next_task_id(db, user.id, TTL) == t3
    rank_all(db, t3, user.id)
    assert next_task_id(db, user.id, TTL) is None
    # The skipped slot went back: another annotator can still take both slots of t2.
    other, _ = make_user()
    assert next_task_id(db, other.id, TTL) == t1
    assert claimed(db, t2) == 0


def test_expired_assignments_return_their_slot_to_the_pool(db, make_user):
    (task,) = seed(db, 1)
    slow, quick = make_user()[0], make_user()[0]
    assert next_task_id(db, slow.id, TTL) == task
    assert next_task_id(db, quick.id, TTL) is None
    db.execute(update(Assignment).values(expires_at=utcnow() - timedelta(seconds=1)))
    db.commit()
    assert expire_stale_assignments(db) == 1
    assert expire_stale_assignments(db) == 0
    assert claimed(db, task) == 0
    assert next_task_id(db, quick.id, TTL) == task
    assert claimed(db, task) == 1


def test_an_expired_task_can_come_back_to_the_same_annotator(db, make_user):
    (task,) = seed(db, 1)
    user, _ = make_user()
    next_task_id(db, user.id, TTL)
    db.execute(update(Assignment).values(expires_at=utcnow() - timedelta(seconds=1)))
    db.commit()
    expire_stale_assignments(db)
    assert next_task_id(db, user.id, TTL) == task
    row = db.scalar(select(Assignment).where(Assignment.user_id == user.id))
    expires_at = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)  # SQLite
    assert row.status == "active" and expires_at > utcnow()


def test_kinds_filter_and_done_or_closed_tasks(db, make_user):
    rank = seed(db, 1)
    arena = seed(db, 1, k=2, kind="arena")
    closed = seed(db, 1, k=2)
    db.execute(update(Task).where(Task.id.in_(closed)).values(status="closed"))
    db.commit()
    user, _ = make_user()
    view = next_task(db, user.id, TTL, kinds=["arena"])
    assert view.id == arena[0] and view.kind == "arena" and len(view.responses) == 2
    rank_all(db, arena[0], user.id)
    assert next_task_id(db, user.id, TTL, kinds=["arena"]) is None
    assert next_task_id(db, user.id, TTL) == rank[0]
    with pytest.raises(ValueError, match="unknown task kinds"):
        next_task_id(db, user.id, TTL, kinds=["essay"])


def test_gold_tasks_come_only_at_their_share(db, make_user):
    gold = pytest.importorskip("app.services.quality.gold")
    ordinary = seed(db, 2)
    (gold_task,) = seed(db, 1, k=2)
    response_id = shown_response_ids(db, gold_task)[0]
    gold.mark_gold(db, gold_task, response_id)
    db.commit()
    a, b = make_user()[0], make_user()[0]
    assert next_task_id(db, a.id, TTL, gold_share=0.0) == ordinary[0]
    assert next_task_id(db, b.id, TTL, gold_share=1.0, rng=random.Random(0)) == gold_task


def _floors_of(db):
    from app.services.assignment import _floors

    return _floors(db.get_bind())


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_slot_given_back_below_the_scan_floor_is_offered_when_nothing_is_left_above(db, make_user):
    first, second = seed(db, 2)
    early, late = make_user()[0], make_user()[0]
    assert next_task(db, early.id, TTL).id == first
    assert next_task(db, late.id, TTL).id == second  # late's next scan starts at `second`
    let_expire(db, early.id)  # `first` has a free slot again, below that floor
    rank_all(db, second, late.id)
    assert next_task(db, late.id, TTL).id == first  # nothing from the floor on: scanned from the start


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_the_scan_floor_lapses_and_the_oldest_free_slot_comes_first_again(db, make_user):
    first, second, third = seed(db, 3)
    early, late = make_user()[0], make_user()[0]
    assert next_task(db, early.id, TTL).id == first
    assert next_task(db, late.id, TTL).id == second
    let_expire(db, early.id)
    rank_all(db, second, late.id)
    floors = _floors_of(db)
    assert floors.get(late.id, TASK_KINDS) == second
    floors.ttl = 0  # as if the floor's time were up
    floors.set(late.id, TASK_KINDS, second)
    assert next_task(db, late.id, TTL).id == first  # not `third`: the oldest free slot again


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_concurrent_requests_of_one_annotator_count_each_slot_they_hold_once(db, make_user, engine):
    """Tabs asking at once: each gets a task it holds, and every task's slot counter equals its
    assignments (a lost race never leaves a slot counted for an assignment that was not made)."""
    import threading

    from sqlalchemy import func

    from app.data.db import session_factory

    tasks = seed(db, 4, required=2)
    user, _ = make_user()
    sessions = session_factory(engine)
    got: list[int | None] = []
    barrier = threading.Barrier(6)

    def ask() -> None:
        with sessions() as own:
            barrier.wait()
            view = next_task(own, user.id, TTL)
            got.append(view.id if view else None)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    db.expire_all()
    held = set(db.scalars(select(Assignment.task_id).where(Assignment.user_id == user.id)))
    assert None not in got and set(got) <= held
    for task_id in tasks:
        assignments = db.scalar(
            select(func.count()).select_from(Assignment).where(Assignment.task_id == task_id)
        )
        assert claimed(db, task_id) == assignments
