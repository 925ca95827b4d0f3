"""Export runs between researchers: a researcher sees their own exports in every state and everyone's
finished ones, only the requester or an admin cancels, admins see all; errors show a short message
and an error id while the traceback goes to the log."""

from __future__ import annotations

import logging
import re

import pytest

from app.data.models import Round, Run
from app.services.accounts import create_api_token
from tests.world import PASSWORD, World, export_history
from workers.runs.export import run_export_job

ERROR_ID = re.compile(r"\(error id ([0-9a-f]{8})\)$")


@pytest.fixture
def team(client, db):
    """Researchers ana and ben, an admin, and ana's exports: #1 queued, #2 finished, #3 failed."""
    world = World(db)
    export_history(world)
    headers = {}
    for name, role in (("ana", "researcher"), ("ben", "researcher"), ("root", "admin")):
        user = world.user(f"{name}-<b>x</b>", role=role)
        headers[name] = {"Authorization": f"Bearer {create_api_token(db, user, 'test')}"}
    db.commit()
    ids = [client.post("/api/exports", json={}, headers=headers["ana"]).json()["id"] for _ in range(3)]
    assert run_export_job(ids[1], client.app.state.sessionmaker) == "succeeded"
    failed = db.get(Run, ids[2])
    failed.status, failed.error = "failed", "OSError: disk full (error id 0badcafe)"
    db.commit()
    return headers, ids


def test_researchers_see_their_own_exports_and_everyones_finished_ones(client, team):
    headers, (queued, finished, failed) = team
    listed = {run["id"]: run for run in client.get("/api/exports", headers=headers["ben"]).json()}
    assert set(listed) == {finished}
    assert listed[finished]["requested_by"] == "ana-<b>x</b>"
    for run_id in (queued, failed):
        for suffix in ("", "/download", "/card"):
            hidden = client.get(f"/api/exports/{run_id}{suffix}", headers=headers["ben"])
            assert hidden.status_code == 404, (run_id, suffix)
            assert "that you can see" in hidden.json()["detail"]
    assert client.get(f"/api/exports/{finished}", headers=headers["ben"]).status_code == 200
    assert client.get(f"/api/exports/{finished}/download", headers=headers["ben"]).status_code == 200
    assert client.get(f"/api/exports/{finished}/card", headers=headers["ben"]).status_code == 200

    own = {run["id"] for run in client.get("/api/exports", headers=headers["ana"]).json()}
    assert own == {queued, finished, failed}
    everything = {run["id"] for run in client.get("/api/exports", headers=headers["root"]).json()}
    assert everything == {queued, finished, failed}
    assert client.get(f"/api/exports/{failed}", headers=headers["root"]).json()["error"].startswith("OSError")


def test_only_the_requester_or_an_admin_cancels(client, team):
    headers, (queued, finished, _failed) = team
    assert client.post(f"/api/exports/{queued}/cancel", headers=headers["ben"]).status_code == 404
    refused = client.post(f"/api/exports/{finished}/cancel", headers=headers["ben"])
    assert refused.status_code == 403 and "only they or an admin" in refused.json()["detail"]
    assert (
        client.post(f"/api/exports/{queued}/cancel", headers=headers["ana"]).json()["status"] == "cancelled"
    )

    bens = client.post("/api/exports", json={}, headers=headers["ben"]).json()["id"]
    assert client.post(f"/api/exports/{bens}/cancel", headers=headers["ana"]).status_code == 404
    cancelled = client.post(f"/api/exports/{bens}/cancel", headers=headers["root"])
    assert cancelled.status_code == 200 and cancelled.json()["requested_by"] == "ben-<b>x</b>"


def test_the_research_page_follows_the_same_rules(client, team, db):
    headers, (queued, finished, failed) = team
    bens = client.post("/api/exports", json={}, headers=headers["ben"]).json()["id"]
    client.cookies.clear()
    client.get("/login")
    csrf = client.cookies.get("prefloop_csrf")
    login = client.post(
        "/login",
        data={"username": "ben-<b>x</b>", "password": PASSWORD, "csrf_token": csrf},
        follow_redirects=False,
    )
    assert login.status_code == 303
    page = client.get("/research").text
    assert f'id="export-run-{finished}"' in page and f'id="export-run-{bens}"' in page
    assert f'id="export-run-{queued}"' not in page and f'id="export-run-{failed}"' not in page
    assert "ana-&lt;b&gt;x&lt;/b&gt;" in page and "ana-<b>x</b>" not in page
    assert page.count('hx-post="/api/exports/') == 1 and f'hx-post="/api/exports/{bens}/cancel"' in page


def test_a_failed_export_shows_a_short_message_and_logs_the_traceback(
    client, db, api_headers, settings, caplog
):
    headers = api_headers("researcher")
    run_id = client.post("/api/exports", json={}, headers=headers).json()["id"]
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    settings.exports_dir.write_text("a file where the exports folder belongs")
    with caplog.at_level(logging.ERROR):
        assert run_export_job(run_id, client.app.state.sessionmaker) == "failed"
    shown = client.get(f"/api/exports/{run_id}", headers=headers).json()["error"]
    assert "Traceback" not in shown and "\n" not in shown and 'File "' not in shown
    error_id = ERROR_ID.search(shown).group(1)
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "Traceback" in caplog.text


def test_tracebacks_stored_by_older_versions_never_reach_a_response(client, db, api_headers, login):
    traceback_text = (
        'ValueError: bad value\n\nTraceback (most recent call last):\n  File "/srv/app/secret.py", line 3\n'
    )
    run = Run(kind="export", status="failed", error=traceback_text, config={})
    round_ = Round(algorithm="dpo", status="failed", active=None, error=traceback_text)
    db.add_all([run, round_])
    db.commit()
    trained = Run(kind="reward", status="failed", error=traceback_text, config={}, round_id=round_.id)
    db.add(trained)
    db.commit()
    admin = api_headers("admin")
    responses = [
        client.get(f"/api/exports/{run.id}", headers=admin),
        client.get(f"/api/rounds/{round_.id}", headers=admin),
    ]
    login("admin")
    responses += [client.get(f"/admin/runs/{trained.id}"), client.get(f"/admin/rounds/{round_.id}")]
    for response in responses:
        assert response.status_code == 200, response.url
        assert "bad value" in response.text
        assert "Traceback" not in response.text and "secret.py" not in response.text, response.url
