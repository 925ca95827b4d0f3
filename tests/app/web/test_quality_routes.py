"""Quality pages: they render for admins with data, gold tasks are managed by form, others are refused."""

from __future__ import annotations

import re

import pytest

from app.data.models import Task
from tests.world import World

PAGES = ["/admin/quality", "/admin/quality/annotators", "/admin/quality/gold", "/admin/quality/leaderboard"]


def _world(db) -> World:
    w = World(db)
    ann, bob, cat = w.user("ann"), w.user("bob"), w.user("cat")
    nasty = w.prompt_set("<b>set</b>", [f"<script>alert({i})</script>" for i in range(3)])
    for prompt in nasty:
        task = w.task(["<img src=x onerror=alert(1)>", "b", "c"], prompt=prompt, required=3)
        w.judge(task, ann, [[0], [1], [2]])
        w.judge(task, bob, [[0], [2], [1]])
        w.judge(task, cat, [[0], [1, 2]])
        arena = w.task(2, kind="arena", versions=[0, 1], required=2)
        w.judge(arena, ann, [[1], [0]])
        w.judge(arena, bob, [[1, 0]])
    return w


def test_pages_render_for_admins(client, db, login):
    _world(db)
    login("admin")
    for path in PAGES:
        page = client.get(path)
        assert page.status_code == 200, (path, page.text[:500])
        assert (
            "<script>alert(" not in page.text
            and "<img src=x" not in page.text
            and "<b>set</b>" not in page.text
        )

    agreement = client.get("/admin/quality").text
    assert 'id="agreement-table"' in agreement and "&lt;b&gt;set&lt;/b&gt;" in agreement
    assert re.search(r"\d+\.\d%\s*<span class=\"ci\">\[", agreement)  # a value with its interval
    annotators = client.get("/admin/quality/annotators").text
    assert all(name in annotators for name in ("ann", "bob", "cat"))
    board = client.get("/admin/quality/leaderboard").text
    assert 'id="leaderboard-chart"' in board and "v0" in board and "v1" in board
    assert "chart-4.6.1.umd.min.js" in board


def test_pages_render_with_no_data(client, login):
    login("admin")
    for path in PAGES:
        assert client.get(path).status_code == 200


@pytest.mark.parametrize("role", ["annotator", "researcher"])
def test_other_roles_are_refused(client, login, role):
    login(role)
    for path in PAGES:
        assert client.get(path, headers={"Accept": "application/json"}).status_code == 403
    assert client.post("/admin/quality/gold/1", data={"response_id": "1"}).status_code == 403


def test_admin_marks_and_unmarks_a_gold_task(client, db, login):
    w = _world(db)
    task = w.task(3, prompt="Which is best?")
    ids = w.shown(task)
    login("admin")

    page = client.get(f"/admin/quality/gold?task_id={task.id}")
    assert page.status_code == 200 and "Make this a gold task" in page.text

    done = client.post(
        f"/admin/quality/gold/{task.id}", data={"response_id": str(ids[0])}, follow_redirects=False
    )
    assert done.status_code == 303
    db.expire_all()
    stored = db.get(Task, task.id)
    assert stored.is_gold and stored.gold_response_id == ids[0]
    listing = client.get("/admin/quality/gold").text
    assert f"?task_id={task.id}" in listing and "Which is best?" in listing

    wrong = client.post(f"/admin/quality/gold/{task.id}", data={"response_id": "999999"})
    assert wrong.status_code == 400 and "is not one of task" in wrong.text
    missing = client.post("/admin/quality/gold/999999", data={"response_id": str(ids[0])})
    assert missing.status_code == 404 and "does not exist" in missing.text
    assert client.get("/admin/quality/gold?task_id=999999").status_code == 404

    client.post(f"/admin/quality/gold/{task.id}/unmark", follow_redirects=False)
    db.expire_all()
    assert not db.get(Task, task.id).is_gold


def test_forms_need_the_csrf_token(client, db, login):
    w = _world(db)
    task = w.task(3)
    login("admin")
    del client.headers["X-CSRF-Token"]
    refused = client.post(f"/admin/quality/gold/{task.id}", data={"response_id": str(w.shown(task)[0])})
    assert refused.status_code == 403
