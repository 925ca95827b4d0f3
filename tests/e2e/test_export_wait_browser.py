"""A researcher in a real Chromium queues an export behind a running one and sees where it stands."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from playwright.sync_api import expect
from sqlalchemy import delete

from app.data.models import Run, User, utcnow
from app.services.accounts import hash_password
from tests.e2e.conftest import PASSWORD, shot

pytestmark = pytest.mark.e2e


def test_a_queued_export_shows_its_place_in_line_and_an_estimate(page, server, server_db):
    server_db.execute(delete(Run).where(Run.kind == "export"))
    # An export in progress is listed to whoever asked for it (and admins) only, so the researcher
    # here asked for the running one; the finished one is everyone's to see anyway.
    researcher = User(
        username=f"res-{uuid.uuid4().hex[:8]}", role="researcher", password_hash=hash_password(PASSWORD)
    )
    server_db.add(researcher)
    server_db.flush()
    now = utcnow()
    finished = Run(
        kind="export",
        status="succeeded",
        config={"format": "pairwise"},
        started_at=now - timedelta(seconds=120),
    )
    finished.finished_at = now
    running = Run(
        kind="export",
        status="running",
        config={"format": "pairwise"},
        started_at=now,
        progress=0.5,
        created_by=researcher.id,
    )
    server_db.add_all([finished, running])
    server_db.commit()

    page.goto(f"{server.url}/login")
    page.fill("input[name=username]", researcher.username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}/research")
    page.click("button:has-text('Queue export')")

    queued = page.locator("#export-runs tr[data-status=queued]")
    queued.wait_for()
    wait = queued.locator("[id^=export-wait-]")
    # Half of the running export (60 s) and then its own typical 120 s.
    assert wait.inner_text() == "next in line, 1 ahead; done in about 3 min"
    running_row = page.locator(f"#export-run-{running.id}")
    assert running_row.locator(f"#export-wait-{running.id}").inner_text() == "about 1 min left"
    shot(page, "export-waiting")

    # The running export ends: the polled table moves the queued one up.
    server_db.get(Run, running.id).status = "succeeded"
    server_db.commit()
    # A locator assertion, not wait_for_function: the page's CSP (no 'unsafe-eval') blocks its eval.
    expect(page.locator("#export-runs tr[data-status=queued] [id^=export-wait-]")).to_have_text(
        "next in line; done in about 2 min"
    )
    assert page.errors == []  # type: ignore[attr-defined]
