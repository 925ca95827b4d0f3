"""The JSON API and the browser routes of the annotation side, through the real app."""

from __future__ import annotations

import json
import re

from sqlalchemy import func, select

from app.data.models import Annotation, AppSetting, Policy, PolicyAlias, Task
from app.services.quality.gold import mark_gold
from tests.world import World

XSS = '<script>window.__pwned = 1</script> and <img src=x onerror="window.__pwned = 2">'


def seed(db, n=2, k=3, required=1, kind="rank", name="api"):
    items = [(f"{name} question {i}?", [f"{name} answer {i}.{j}" for j in range(k)]) for i in range(n)]
    return World(db).tasks_from_texts(items, required=required, kind=kind, prompt_set=f"{name}-{kind}")


def ranking_of(task: dict) -> list[list[int]]:
    return [[r["id"]] for r in task["responses"]]


# ---------------------------------------------------------------- tasks


def test_next_task_and_submit_through_the_api(client, db, api_headers):
    first, second = seed(db)
    headers = api_headers("annotator")
    task = client.get("/api/tasks/next", headers=headers).json()
    assert task["id"] == first and task["kind"] == "rank"
    assert task["prompt"] == "api question 0?" and task["messages"][-1]["role"] == "user"
    assert [r["label"] for r in task["responses"]] == [1, 2, 3]
    assert set(task["responses"][0]) == {"id", "label", "text"}  # nothing about the policy
    assert task["expires_at"]

    body = {
        "ranking": [[task["responses"][2]["id"]], [task["responses"][0]["id"], task["responses"][1]["id"]]]
    }
    created = client.post(f"/api/tasks/{first}/annotation", json=body, headers=headers)
    assert created.status_code == 201, created.text
    assert created.json() == {
        "annotation_id": created.json()["annotation_id"],
        "task_id": first,
        "status": "submitted",
        "comparisons": 2,
        "shown_order_unchanged": False,
    }
    replay = client.post(f"/api/tasks/{first}/annotation", json=body, headers=headers)
    assert replay.status_code == 200 and replay.json() == created.json()
    changed = client.post(
        f"/api/tasks/{first}/annotation", json={"ranking": ranking_of(task)}, headers=headers
    )
    assert changed.status_code == 409 and "different judgement" in changed.json()["detail"]

    assert client.get("/api/tasks/next", headers=headers).json()["id"] == second
    assert db.scalar(select(func.count(Annotation.id))) == 1


def test_no_task_left_is_204(client, db, api_headers):
    headers = api_headers("annotator")
    response = client.get("/api/tasks/next", headers=headers)
    assert response.status_code == 204 and response.content == b""


def test_overlap_and_kind_filter_through_the_api(client, db, api_headers):
    (rank_task,) = seed(db, n=1, required=2)
    (arena_task,) = seed(db, n=1, k=2, kind="arena", name="duel")
    a, b, c = api_headers("annotator"), api_headers("annotator"), api_headers("admin")
    assert client.get("/api/tasks/next", params={"kind": "rank"}, headers=a).json()["id"] == rank_task
    assert client.get("/api/tasks/next", params={"kind": "rank"}, headers=b).json()["id"] == rank_task
    assert client.get("/api/tasks/next", params={"kind": "rank"}, headers=c).status_code == 204
    arena = client.get("/api/tasks/next", params={"kind": "arena"}, headers=c).json()
    assert arena["id"] == arena_task and arena["kind"] == "arena" and len(arena["responses"]) == 2
    bad = client.get("/api/tasks/next", params={"kind": "essay"}, headers=c)
    assert bad.status_code == 422


def test_bad_payloads_get_422_with_what_to_fix(client, db, api_headers):
    (task_id,) = seed(db, n=1)
    headers = api_headers("annotator")
    task = client.get("/api/tasks/next", headers=headers).json()
    ids = [r["id"] for r in task["responses"]]

    missing = client.post(f"/api/tasks/{task_id}/annotation", json={"ranking": [[ids[0]]]}, headers=headers)
    assert missing.status_code == 422
    assert f"missing response ids {sorted(ids[1:])}" in missing.json()["detail"]

    unknown = client.post(
        f"/api/tasks/{task_id}/annotation", json={"ranking": [[i] for i in ids] + [[987654]]}, headers=headers
    )
    assert unknown.status_code == 422 and "unknown response ids [987654]" in unknown.json()["detail"]

    skip = client.post(f"/api/tasks/{task_id}/annotation", json={"skip": True}, headers=headers)
    assert skip.status_code == 422 and "skip_reason" in skip.json()["detail"]

    extra = client.post(
        f"/api/tasks/{task_id}/annotation", json={"ranking": [[1]], "score": 3}, headers=headers
    )
    assert extra.status_code == 422 and "score" in extra.json()["detail"]

    nowhere = client.post("/api/tasks/999999/annotation", json={"ranking": [[1]]}, headers=headers)
    assert nowhere.status_code == 404


def test_repeated_ids_are_refused_by_name_and_nothing_is_stored(client, db, api_headers):
    (task_id,) = seed(db, n=1)
    headers = api_headers("annotator")
    ids = [r["id"] for r in client.get("/api/tasks/next", headers=headers).json()["responses"]]
    body = {"ranking": [[ids[0]], [ids[1], ids[0]], [ids[2]]]}
    refused = client.post(f"/api/tasks/{task_id}/annotation", json=body, headers=headers)
    assert refused.status_code == 422
    assert f"response ids [{ids[0]}] appear more than once" in refused.json()["detail"]
    assert refused.json()["errors"]  # refused by the payload's validation, before the database
    assert db.scalar(select(func.count(Annotation.id))) == 0


def test_a_huge_ranking_is_refused_before_any_pair_is_built(client, db, api_headers):
    (task_id,) = seed(db, n=1)
    headers = api_headers("annotator")
    client.get("/api/tasks/next", headers=headers)
    repeats = {"ranking": [[1] * 1000, [1] * 1000]}  # 10^6 pairs if derived
    distinct = {"ranking": [list(range(1, 1001)), list(range(1001, 2001))]}
    for body in (repeats, distinct):
        refused = client.post(f"/api/tasks/{task_id}/annotation", json=body, headers=headers)
        assert refused.status_code == 422 and "ranking" in refused.json()["detail"]
        assert refused.json()["errors"]
    assert db.scalar(select(func.count(Annotation.id))) == 0
    db.expire_all()
    assert db.get(Task, task_id).annotation_count == 0


def test_skip_and_all_bad_through_the_api(client, db, api_headers):
    t1, t2 = seed(db)
    headers = api_headers("annotator")
    client.get("/api/tasks/next", headers=headers)
    skipped = client.post(
        f"/api/tasks/{t1}/annotation", json={"skip": True, "skip_reason": "not my field"}, headers=headers
    )
    assert skipped.status_code == 201 and skipped.json()["status"] == "skipped"
    assert client.get("/api/tasks/next", headers=headers).json()["id"] == t2
    bad = client.post(f"/api/tasks/{t2}/annotation", json={"all_bad": True}, headers=headers)
    assert bad.status_code == 201 and bad.json()["comparisons"] == 0
    db.expire_all()  # the seeded rows may still sit in this session's identity map
    assert db.get(Task, t1).status == "open" and db.get(Task, t2).status == "done"


def _what_tells_tasks_apart(task: dict) -> dict:
    """The next-task JSON less what differs between any two tasks (ids, texts, the deadline's instant)."""
    content = {"id", "messages", "prompt", "responses", "expires_at"}
    return {
        **{key: value for key, value in task.items() if key not in content},
        "keys": sorted(task),
        "message_keys": [sorted(m) for m in task["messages"]],
        "responses": [(sorted(r), r["label"]) for r in task["responses"]],
    }


def test_gold_and_normal_tasks_look_the_same_to_an_annotator(app, client, db, api_headers, settings):
    world = World(db)
    normal, gold = world.task(3), world.task(3)
    normal_id, gold_id = normal.id, gold.id
    mark_gold(db, gold_id, world.shown(gold)[0], settings)
    db.commit()
    # Every new assignment a gold draw: the gold task first, then (none left) the normal one.
    app.state.settings = settings.model_copy(update={"gold_share": 1.0})
    headers = api_headers("annotator")
    seen, results = [], []
    for expected in (gold_id, normal_id):
        task = client.get("/api/tasks/next", headers=headers).json()
        assert task["id"] == expected
        done = client.post(
            f"/api/tasks/{expected}/annotation", json={"ranking": ranking_of(task)}, headers=headers
        )
        assert done.status_code == 201, done.text
        seen.append(_what_tells_tasks_apart(task))
        results.append({k: v for k, v in done.json().items() if k not in ("annotation_id", "task_id")})
    assert seen[0] == seen[1]
    assert results[0] == results[1]


def test_a_submission_to_someone_elses_task_names_none_of_its_responses(client, db, api_headers):
    (task_id,) = seed(db, n=1)
    ids = [
        r["id"] for r in client.get("/api/tasks/next", headers=api_headers("annotator")).json()["responses"]
    ]
    outsider = api_headers("annotator")
    answers = [
        client.post(f"/api/tasks/{task_id}/annotation", json={"ranking": ranking}, headers=outsider)
        for ranking in ([[999_991], [999_992]], [[ids[0]]], [[i] for i in ids])
    ]
    details = {a.json()["detail"] for a in answers}
    assert {a.status_code for a in answers} == {409} and len(details) == 1  # whatever the ranking
    (detail,) = details
    assert "not assigned to you" in detail
    assert {int(n) for n in re.findall(r"\d+", detail)} <= {task_id}  # names no response id


def test_the_api_is_in_openapi(client, api_headers):
    schema = client.get("/openapi.json").json()
    for path in ("/api/tasks/next", "/api/tasks/{task_id}/annotation", "/api/prompt-sets"):
        assert path in schema["paths"]
    assert {"AnnotationIn", "AnnotationResult", "TaskOut", "PromptSetImportOut"} <= set(
        schema["components"]["schemas"]
    )


# ---------------------------------------------------------------- prompt sets


def test_prompt_set_upload_and_listing(client, api_headers):
    admin = api_headers("admin")
    rows = "\n".join(json.dumps({"prompt": f"Prompt {i}"}) for i in range(12)) + '\n{"prompt": "Prompt 3"}\n'
    created = client.post(
        "/api/prompt-sets",
        data={"name": "twelve", "eval_fraction": "0.25", "split_seed": "3"},
        files={"file": ("twelve.jsonl", rows.encode(), "application/jsonl")},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["created"] == 12 and body["duplicates"] == 1 and body["errors"] == []
    assert body["prompt_set"]["train"] + body["prompt_set"]["eval"] == 12

    again = client.post(
        "/api/prompt-sets",
        data={"name": "twelve"},
        files={"file": ("x.jsonl", b'{"prompt": "x"}', "application/jsonl")},
        headers=admin,
    )
    assert again.status_code == 409

    listing = client.get("/api/prompt-sets", headers=api_headers("researcher")).json()
    assert [(s["name"], s["prompts"]) for s in listing] == [("twelve", 12)]


def test_prompt_set_upload_lists_bad_lines(client, api_headers):
    admin = api_headers("admin")
    data = b'{"prompt": "fine"}\n{"prompt": \n{"prompt": ""}\n'
    refused = client.post(
        "/api/prompt-sets", data={"name": "broken"}, files={"file": ("b.jsonl", data)}, headers=admin
    )
    assert refused.status_code == 422
    assert [(e["line"], e["unit"]) for e in refused.json()["errors"]] == [(2, "line"), (3, "line")]
    lenient = client.post(
        "/api/prompt-sets",
        data={"name": "broken", "skip_invalid": "true"},
        files={"file": ("b.jsonl", data)},
        headers=admin,
    )
    assert lenient.status_code == 201 and lenient.json()["created"] == 1
    assert len(lenient.json()["errors"]) == 2
    annotator = client.post(
        "/api/prompt-sets", data={"name": "n"}, files={"file": ("b.jsonl", data)}, headers=api_headers()
    )
    assert annotator.status_code == 403


# ---------------------------------------------------------------- browser routes


def _live(db, version: int) -> None:
    policy = Policy(version=version, kind="base", path="/nonexistent", sha256="0" * 64)
    db.add(policy)
    db.flush()
    db.add(PolicyAlias(name="live", policy_id=policy.id))
    db.commit()


def test_annotate_page_escapes_model_output_and_shows_live_version(client, db, login):
    _live(db, 3)
    World(db).tasks_from_texts([("Say hi <b>bold</b>", [XSS, "**fine** answer", "`code`"])], prompt_set="xss")
    login("annotator")
    page = client.get("/annotate")
    assert page.status_code == 200
    html = page.text
    assert "<script>window.__pwned" not in html and "<img src=x" not in html
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html
    assert "Say hi &lt;b&gt;bold&lt;/b&gt;" in html
    assert "<strong>fine</strong> answer" in html  # safe Markdown still renders
    assert '<strong id="live-version">v3</strong>' in html
    assert "Rank the responses" in html and "Guidelines" in html


def test_submitting_in_the_ui_swaps_in_the_next_task(client, db, login):
    first, second = seed(db, name="ui")
    login("annotator")
    page = client.get("/annotate")
    assert f'data-task-id="{first}"' in page.text
    ids = [int(x.split('"')[1]) for x in page.text.split("data-response-id=")[1:]]
    payload = json.dumps({"ranking": [[ids[1]], [ids[0], ids[2]]], "time_spent_ms": 1234})
    hx = {"HX-Request": "true"}
    done = client.post(f"/annotate/tasks/{first}", data={"payload": payload}, headers=hx)
    assert done.status_code == 200
    assert "<html" not in done.text  # a fragment, not a page
    assert f'data-task-id="{second}"' in done.text and "2 comparisons" in done.text
    assert 'data-count="total">1<' in done.text

    refused = client.post(f"/annotate/tasks/{second}", data={"payload": '{"ranking": [[1]]}'}, headers=hx)
    assert refused.headers["HX-Retarget"] == "#submit-error"
    assert "unknown response ids" in refused.text or "missing response ids" in refused.text
    repeated = json.dumps({"ranking": [[ids[0]], [ids[0]]]})
    refused = client.post(f"/annotate/tasks/{second}", data={"payload": repeated}, headers=hx)
    assert refused.headers["HX-Retarget"] == "#submit-error"
    assert f"response ids [{ids[0]}] appear more than once" in refused.text
    huge = json.dumps({"ranking": [list(range(1, 1001)), list(range(1001, 2001))]})
    refused = client.post(f"/annotate/tasks/{second}", data={"payload": huge}, headers=hx)
    assert refused.headers["HX-Retarget"] == "#submit-error" and "at most" in refused.text
    invalid = client.post(f"/annotate/tasks/{second}", data={"payload": '{"skip": true}'}, headers=hx)
    assert invalid.headers["HX-Retarget"] == "#submit-error" and "skip_reason" in invalid.text
    last = client.post(
        f"/annotate/tasks/{second}", data={"payload": '{"skip": true, "skip_reason": "unclear"}'}, headers=hx
    )
    assert "Skipped task" in last.text and "No task for you right now" in last.text


def test_guidelines_are_edited_by_admins_and_rendered_safely(client, db, login):
    login("admin")
    saved = client.post(
        "/admin/prompts/guidelines",
        data={"text": "Prefer **short** answers.\n\n<script>alert(1)</script>"},
        follow_redirects=False,
    )
    assert saved.status_code == 303
    assert "Prefer" in db.get(AppSetting, "annotation_guidelines").value
    preview = client.post("/admin/prompts/guidelines/preview", data={"text": "*x* <img src=y onerror=z>"})
    assert "<em>x</em>" in preview.text and "<img" not in preview.text
    page = client.get("/annotate")
    assert "Prefer <strong>short</strong> answers." in page.text
    assert "<script>alert(1)</script>" not in page.text


def test_admin_prompt_page_uploads_and_reports_bad_lines(client, db, login):
    login("admin")
    assert client.get("/admin/prompts").status_code == 200
    ok = client.post(
        "/admin/prompts",
        data={"name": "from the form", "eval_fraction": "0.5"},
        files={"file": ("p.csv", b"prompt\nOne?\nTwo?\nThree?\n", "text/csv")},
    )
    assert ok.status_code == 200 and "Stored <strong>3</strong> prompts" in ok.text
    bad = client.post(
        "/admin/prompts",
        data={"name": "bad"},
        files={"file": ("p.jsonl", b'{"prompt": "a"}\nnot json\n', "application/jsonl")},
    )
    assert bad.status_code == 422 and "<code>line 2</code>" in bad.text


def test_submit_can_return_the_next_task_in_the_same_request(client, db, api_headers):
    first, second = seed(db, name="piggyback")
    headers = api_headers("annotator")
    task = client.get("/api/tasks/next", headers=headers).json()
    body = {"ranking": ranking_of(task)[::-1]}
    done = client.post(f"/api/tasks/{first}/annotation", params={"next": "true"}, json=body, headers=headers)
    assert done.status_code == 201
    assert done.json()["next_task"]["id"] == second
    assert [r["label"] for r in done.json()["next_task"]["responses"]] == [1, 2, 3]
    # The held task comes back on a replay; nothing new is assigned.
    again = client.post(f"/api/tasks/{first}/annotation", params={"next": "true"}, json=body, headers=headers)
    assert again.status_code == 200 and again.json()["next_task"]["id"] == second
    plain = client.post(f"/api/tasks/{first}/annotation", json=body, headers=headers)
    assert "next_task" not in plain.json()
    last = client.get("/api/tasks/next", headers=headers).json()
    ids = [r["id"] for r in last["responses"]]
    final = client.post(
        f"/api/tasks/{second}/annotation", params={"next": "true"}, json={"ranking": [ids]}, headers=headers
    )
    assert final.status_code == 201 and final.json()["next_task"] is None
