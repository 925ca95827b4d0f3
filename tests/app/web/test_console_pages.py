"""Console pages that follow a run or round to its end, the task overlap form, the gold task list,
and the API reference served from our own files."""

from __future__ import annotations

import re

import pytest

from app.data.models import AppSetting, Round, Run
from tests.world import World

HX = {"HX-Request": "true"}


@pytest.fixture
def admin(login):
    return login("admin")


def active_round(db) -> tuple[Round, Run]:
    round_ = Round(algorithm="ppo", status="running", stage="ppo", active=True, config={})
    db.add(round_)
    db.flush()
    run = Run(kind="ppo", round_id=round_.id, status="running", progress=0.5)
    db.add(run)
    db.commit()
    return round_, run


def test_the_poll_that_sees_a_run_end_swaps_out_cancel_and_in_the_result(client, admin, db):
    round_, run = active_round(db)
    running = client.get(f"/admin/runs/{run.id}", headers=HX)
    assert running.status_code == 200 and "hx-swap-oob" not in running.text
    run.status, run.result = "succeeded", {"policy_version": 3, "note": "<b>done</b>"}
    db.commit()
    ended = client.get(f"/admin/runs/{run.id}", headers=HX)
    assert ended.status_code == 286
    actions = re.search(r'<div id="run-actions" hx-swap-oob="true">(.*?)</div>', ended.text, re.S)
    assert actions and "Cancel run" not in actions.group(1)
    assert 'id="run-outcome" hx-swap-oob="true"' in ended.text and "policy_version" in ended.text
    assert "&lt;b&gt;done&lt;/b&gt;" in ended.text and "<b>done</b>" not in ended.text


def test_a_round_page_poll_swaps_out_cancel_at_the_end(client, admin, db):
    round_, _run = active_round(db)
    assert "Cancel round" in client.get(f"/admin/rounds/{round_.id}").text
    round_.status, round_.active = "succeeded", None
    db.commit()
    ended = client.get(f"/admin/rounds/{round_.id}", headers=HX)
    assert ended.status_code == 286
    assert 'id="round-actions" hx-swap-oob="true"' in ended.text and "Cancel round" not in ended.text
    assert 'id="round-candidates" hx-swap-oob="true"' in ended.text


def test_the_start_button_is_disabled_while_a_round_is_active(client, admin, db):
    round_, _run = active_round(db)
    for path in ("/admin", "/admin/rounds"):
        page = client.get(path).text
        button = re.search(r'<div class="start-round".*?</div>', page, re.S).group(0)
        assert "disabled" in button and f"#{round_.id}" in button and 'hx-trigger="every 5s"' in button
    assert client.get("/admin/rounds/start-button", headers=HX).status_code == 200
    round_.status, round_.active = "succeeded", None
    db.commit()
    enabled = client.get("/admin/rounds/start-button", headers=HX)
    assert enabled.status_code == 286 and "disabled" not in enabled.text and "hx-get" not in enabled.text


@pytest.mark.parametrize(
    ("value", "message"), [("abc", "whole number"), ("0", "from 1 to 20"), ("99", "from 1 to 20")]
)
def test_a_bad_overlap_is_refused_with_what_to_enter(client, admin, db, value, message):
    response = client.post("/admin/prompts/overlap", data={"overlap": value})
    assert response.status_code == 422 and message in response.text
    assert db.get(AppSetting, "task_overlap") is None


def test_the_overlap_is_saved_and_reset(client, admin, db, settings):
    response = client.post("/admin/prompts/overlap", data={"overlap": "3"}, follow_redirects=False)
    assert response.status_code == 303
    page = client.get(response.headers["location"]).text
    assert 'id="overlap-saved"' in page and 'name="overlap" value="3"' in page
    client.post("/admin/prompts/overlap", data={"reset": "true"})
    db.expire_all()
    assert db.get(AppSetting, "task_overlap") is None
    assert f'name="overlap" value="{settings.task_overlap}"' in client.get("/admin/prompts").text


def test_the_gold_page_lists_tasks_to_choose_and_escapes_their_prompts(client, admin, db):
    task = World(db).task(2, prompt="<script>alert(1)</script> tides")
    page = client.get("/admin/quality/gold", params={"q": "TIDES"}).text
    assert f"/admin/quality/gold?task_id={task.id}" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "No ordinary task has" in client.get("/admin/quality/gold", params={"q": "nothing-like-it"}).text


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_api_reference_loads_only_our_files(client, path):
    page = client.get(path)
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page.text) == []  # no inline script
    for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert client.get(src).status_code == 200, src


def test_the_admin_pauses_and_resumes_the_refill_from_a_prompt_set(client, admin, db):
    (prompt,) = World(db).prompt_set("refill-toggle", ["a prompt"])
    set_id = prompt.prompt_set_id
    page = client.get("/admin/prompts").text
    assert re.search(rf'id="refill-{set_id}">.*?draws from it.*?Pause', page, re.S)
    client.post(f"/admin/prompts/{set_id}/refill", data={"included": "false"})
    page = client.get("/admin/prompts").text
    assert re.search(rf'id="refill-{set_id}">.*?paused.*?Resume', page, re.S)
    db.expire_all()
    assert str(set_id) in db.get(AppSetting, "refill_paused_prompt_sets").value
    assert client.post("/admin/prompts/999999/refill", data={"included": "true"}).status_code == 404
