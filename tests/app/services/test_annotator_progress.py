"""An annotator's judgement counts: kept by the database as judgements are stored, read as one row,
at the same cost with 10 judgements behind the annotator as with 10,000."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from sqlalchemy import event, insert

from app.data.models import Annotation, Task, utcnow
from app.services.annotator_progress import judgement_counts
from tests.world import World


def history(db, user_id: int, judgements: int, *, skips: int = 0, days_ago: int = 0) -> None:
    """Stored judgements (and skips) of `user_id`, inserted in bulk as if made `days_ago` days ago."""
    (prompt,) = World(db).prompt_set(None, [f"history of {user_id} {days_ago}"])
    when = utcnow() - timedelta(days=days_ago)
    count = judgements + skips
    task_ids = db.scalars(
        insert(Task).returning(Task.id, sort_by_parameter_order=True),
        [
            {"prompt_id": prompt.id, "kind": "rank", "status": "done", "required_annotations": 1}
            for _ in range(count)
        ],
    ).all()
    db.execute(
        insert(Annotation),
        [
            {
                "task_id": task_id,
                "user_id": user_id,
                "ranking": [],
                "skipped": i >= judgements,
                "payload_hash": f"{i:064d}",
                "created_at": when,
            }
            for i, task_id in enumerate(task_ids)
        ],
    )
    db.commit()


def test_judgements_count_skips_do_not(db):
    world = World(db)
    ann, other = world.user(), world.user()
    tasks = [world.task(3) for _ in range(3)]
    world.judge(tasks[0], ann, [[0], [1], [2]])
    world.skip(tasks[1], ann)
    world.judge(tasks[2], ann, [[2, 1], [0]])
    assert judgement_counts(db, ann.id) == {"today": 2, "total": 2}
    assert judgement_counts(db, other.id) == {"today": 0, "total": 0}


def test_today_starts_at_zero_on_a_new_day_and_older_rows_do_not_reset_it(db):
    world = World(db)
    ann = world.user()
    history(db, ann.id, 5, skips=2, days_ago=1)
    assert judgement_counts(db, ann.id) == {"today": 0, "total": 5}
    world.judge(world.task(3), ann, [[0], [1], [2]])
    assert judgement_counts(db, ann.id) == {"today": 1, "total": 6}
    history(db, ann.id, 3, days_ago=2)  # e.g. an import of older judgements
    assert judgement_counts(db, ann.id) == {"today": 1, "total": 9}
    tomorrow = utcnow().date() + timedelta(days=1)
    assert judgement_counts(db, ann.id, today=tomorrow) == {"today": 0, "total": 9}


def _statements(db, action) -> list[str]:
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(re.sub(r"\s+", " ", statement))

    engine = db.get_bind()
    event.listen(engine, "before_cursor_execute", record)
    try:
        result = action()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return result, seen


def test_the_read_costs_one_lookup_whatever_the_history(db):
    world = World(db)
    short, long = world.user(), world.user()
    history(db, short.id, 10)
    history(db, long.id, 10_000)
    short_id, long_id = short.id, long.id
    db.expire_all()
    counts_short, statements_short = _statements(db, lambda: judgement_counts(db, short_id))
    counts_long, statements_long = _statements(db, lambda: judgement_counts(db, long_id))
    assert counts_short == {"today": 10, "total": 10} and counts_long == {"today": 10_000, "total": 10_000}
    assert statements_short == statements_long and len(statements_long) == 1
    assert "annotations" not in statements_long[0] and "count(" not in statements_long[0].lower()


@pytest.mark.parametrize("prior", [10, 10_000])
def test_the_submit_page_runs_the_same_statements_whatever_the_history(db, client, login, prior):
    """The htmx submit answers with the next task block and the counts; nothing in it scans history."""
    user = login("annotator")
    history(db, user.id, prior)
    world = World(db)
    first, second = world.task(3), world.task(3)
    headers = {"HX-Request": "true"}
    page = client.get("/annotate/next", headers=headers)
    assert f'data-task-id="{first.id}"' in page.text
    shown = world.shown(first)
    payload = json.dumps({"ranking": [[i] for i in shown], "time_spent_ms": 3000})
    response, statements = _statements(
        db, lambda: client.post(f"/annotate/tasks/{first.id}", data={"payload": payload}, headers=headers)
    )
    assert response.status_code == 200 and f'data-task-id="{second.id}"' in response.text
    assert f">{prior + 1}<" in response.text.replace(" ", "")
    aggregates = [s for s in statements if "annotations" in s and re.search(r"(count|sum)\(", s, re.I)]
    assert aggregates == []
