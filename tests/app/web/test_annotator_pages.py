"""The annotator's pages beyond ranking: the login form keeps the username, signed-in pages are never
cached, a held task can be given back, the empty pool says what is coming, an over-long rationale is
refused with the limit, and the history lists, revises and guards judgements."""

from __future__ import annotations

import json
import re

from sqlalchemy import select

from app.data.models import Annotation, AnnotationRevision, Assignment, Round, Run
from app.services.schemas import MAX_RATIONALE_CHARS
from tests.world import World

HX = {"HX-Request": "true"}


def seed(db, n=2, k=3, name="desk"):
    items = [(f"{name} question {i}?", [f"{name} answer {i}.{j}" for j in range(k)]) for i in range(n)]
    return World(db).tasks_from_texts(items, prompt_set=name)


def response_ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'data-response-id="(\d+)"', html)]


def test_a_wrong_password_keeps_the_username(client, make_user):
    user, _ = make_user("annotator", username="keeps-<me>")
    client.get("/login")
    csrf = client.cookies.get("prefloop_csrf")
    page = client.post("/login", data={"username": user.username, "password": "wrong", "csrf_token": csrf})
    assert page.status_code == 400 and "Unknown user or wrong password" in page.text
    assert 'value="keeps-&lt;me&gt;"' in page.text  # kept, and escaped


def test_signed_in_pages_are_not_stored_by_the_browser(client, db, login):
    assert "no-store" not in client.get("/login").headers.get("cache-control", "")
    login("annotator")
    for path in ("/annotate", "/annotate/history"):
        assert client.get(path).headers["cache-control"] == "no-store", path


def test_give_back_frees_the_slot_and_shows_another_task(client, db, login):
    first, second = seed(db)
    user = login("annotator")
    assert f'data-task-id="{first}"' in client.get("/annotate").text
    page = client.post(f"/annotate/tasks/{first}/release", headers=HX)
    assert f"Gave task #{first} back" in page.text and f'data-task-id="{second}"' in page.text
    status = db.scalar(
        select(Assignment.status).where(Assignment.task_id == first, Assignment.user_id == user.id)
    )
    assert status == "released"
    again = client.post(f"/annotate/tasks/{first}/release", headers=HX)
    assert "no longer yours to give back" in again.text


def test_the_empty_pool_says_what_is_coming_and_polls(client, db, login):
    login("annotator")
    idle = client.get("/annotate").text
    assert "No responses are being generated right now" in idle and 'hx-trigger="every 30s"' in idle
    db.add(
        Run(
            kind="generate",
            status="running",
            progress=0.4,
            config={"prompt_ids": [1, 2, 3], "arena_prompt_ids": [4]},
        )
    )
    db.commit()
    busy = client.get("/annotate/next", headers=HX).text
    assert "4 tasks coming" in busy and "40% done" in busy and 'hx-trigger="every 5s"' in busy


def test_an_over_long_rationale_is_refused_with_the_limit(client, db, login):
    (task_id,) = seed(db, n=1)
    login("annotator")
    ids = response_ids(client.get("/annotate").text)
    payload = json.dumps({"ranking": [[i] for i in ids], "rationale": "x" * (MAX_RATIONALE_CHARS + 1)})
    refused = client.post(f"/annotate/tasks/{task_id}", data={"payload": payload}, headers=HX)
    assert refused.headers["HX-Retarget"] == "#submit-error"
    assert f"at most {MAX_RATIONALE_CHARS:,} characters" in refused.text
    assert db.scalar(select(Annotation).where(Annotation.task_id == task_id)) is None


def test_history_lists_and_revises_own_judgements_only(client, db, login):
    (task_id,) = seed(db, n=1, name="hist <b>")
    login("annotator")
    ids = response_ids(client.get("/annotate").text)
    payload = json.dumps({"ranking": [[i] for i in ids], "rationale": "as shown"})
    client.post(f"/annotate/tasks/{task_id}", data={"payload": payload}, headers=HX)
    annotation = db.scalar(select(Annotation).where(Annotation.task_id == task_id))

    history = client.get("/annotate/history").text
    assert "1 &gt; 2 &gt; 3" in history and f'href="/annotate/history/{annotation.id}"' in history
    assert "hist &lt;b&gt; question 0?" in history  # prompts are untrusted text

    page = client.get(f"/annotate/history/{annotation.id}").text
    assert f'hx-post="/annotate/history/{annotation.id}"' in page and "Save revision" in page
    assert "as shown</textarea>" in page and f'data-shown="{",".join(map(str, ids))}"' in page

    revised = json.dumps({"ranking": [[ids[2]], [ids[0], ids[1]]], "rationale": "third is best"})
    done = client.post(f"/annotate/history/{annotation.id}", data={"payload": revised}, headers=HX)
    assert done.headers["HX-Redirect"] == f"/annotate/history?revised={annotation.id}"
    db.expire_all()
    assert db.get(Annotation, annotation.id).ranking == [[ids[2]], sorted(ids[:2])]
    assert db.scalar(select(AnnotationRevision.rationale)) == "as shown"
    history = client.get(f"/annotate/history?revised={annotation.id}").text
    assert "3 &gt; 1 = 2" in history and "revised" in history and "Saved your revision" in history

    incomplete = json.dumps({"ranking": [[ids[0]]]})
    refused = client.post(f"/annotate/history/{annotation.id}", data={"payload": incomplete}, headers=HX)
    assert refused.headers["HX-Retarget"] == "#submit-error" and "every response" in refused.text

    db.add(Round(status="succeeded", active=None, comparison_snapshot=10**9))  # a round trained on it
    db.commit()
    frozen = client.get(f"/annotate/history/{annotation.id}")
    assert frozen.status_code == 409 and "a training round has already used it" in frozen.text
    assert f'href="/annotate/history/{annotation.id}"' not in client.get("/annotate/history").text

    client.headers.pop("X-CSRF-Token")  # the next login mints its own
    login("annotator")  # someone else
    assert client.get(f"/annotate/history/{annotation.id}").status_code == 404
    stolen = client.post(f"/annotate/history/{annotation.id}", data={"payload": revised}, headers=HX)
    assert "no judgement" in stolen.text
    assert f"/annotate/history/{annotation.id}" not in client.get("/annotate/history").text
