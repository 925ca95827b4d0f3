"""A waiting export says where it stands: its place in line and an estimate, in the API and on the page."""

from __future__ import annotations

from datetime import timedelta

from app.data.models import Run, utcnow
from app.services.exports.waiting import ExportWait, describe_wait


def _export_row(db, status: str, **fields) -> Run:
    run = Run(kind="export", status=status, config={"format": "pairwise"}, **fields)
    db.add(run)
    db.commit()
    return run


def test_queued_exports_show_their_place_in_line_and_an_estimate(client, api_headers, db, login):
    now = utcnow()
    # Two finished exports teach the typical duration (median of 100 s and 140 s: 120 s).
    for seconds in (100, 140):
        _export_row(db, "succeeded", started_at=now - timedelta(seconds=seconds), finished_at=now)
    running = _export_row(db, "running", started_at=now, progress=0.5)
    headers = api_headers("researcher")
    first = client.post("/api/exports", json={"format": "pairwise"}, headers=headers).json()
    second = client.post("/api/exports", json={"format": "pairwise"}, headers=headers).json()

    assert first["queue_position"] == 1 and first["exports_ahead"] == 1
    assert first["estimated_seconds_left"] == 60 + 120  # half the running one, then itself
    listed = {run["id"]: run for run in client.get("/api/exports", headers=headers).json()}
    assert listed[second["id"]]["queue_position"] == 2 and listed[second["id"]]["exports_ahead"] == 2
    assert listed[second["id"]]["estimated_seconds_left"] == 60 + 240
    assert listed[running.id]["queue_position"] is None
    assert listed[running.id]["estimated_seconds_left"] == 60
    done = [run for run in listed.values() if run["status"] == "succeeded"]
    assert all(run["estimated_seconds_left"] is None and run["queue_position"] is None for run in done)

    # The one ahead starts: the next one moves up.
    db.get(Run, first["id"]).status = "running"
    db.commit()
    moved = client.get(second["status_url"], headers=headers).json()
    assert moved["queue_position"] == 1 and moved["exports_ahead"] == 2

    login("researcher")
    page = client.get("/research/exports").text  # 60 s + 120 s for the two running, then 120 s
    assert f'id="export-wait-{second["id"]}">next in line, 2 ahead; done in about 5 min' in page


def test_without_a_finished_export_there_is_no_estimate(client, api_headers, db):
    headers = api_headers("researcher")
    queued = client.post("/api/exports", json={"format": "pairwise"}, headers=headers).json()
    assert queued["queue_position"] == 1 and queued["estimated_seconds_left"] is None


def test_waits_in_words():
    assert (
        describe_wait(ExportWait(position=1, ahead=0, seconds_left=30))
        == "next in line; done in under a minute"
    )
    assert describe_wait(ExportWait(position=3, ahead=3, seconds_left=None)) == (
        "3rd in line, 3 ahead; done in no estimate yet"
    )
    assert describe_wait(ExportWait(position=None, ahead=0, seconds_left=300)) == "about 5 min left"
