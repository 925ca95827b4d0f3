"""Browser tests of the admin console, the research page and the API reference: sessions for any
role, and the axe-core accessibility check."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import PASSWORD, LiveServer

# axe-core from npm (MPL-2.0, licence beside it), vendored so the check needs no network.
AXE = Path(__file__).resolve().parent / "vendor" / "axe-core-4.14.1" / "axe.min.js"
HOME_BY_ROLE = {"admin": "/admin", "researcher": "/research", "annotator": "/annotate"}


def make_account(db, role: str) -> str:
    """A fresh account with the e2e password; returns its username."""
    from app.data.models import User
    from app.services.accounts import hash_password

    user = User(
        username=f"{role[:3]}-{uuid.uuid4().hex[:8]}", role=role, password_hash=hash_password(PASSWORD)
    )
    db.add(user)
    db.commit()
    return user.username


def log_in_as(page, server: LiveServer, username: str, role: str) -> None:
    page.goto(f"{server.url}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}{HOME_BY_ROLE[role]}")


@pytest.fixture
def admin(server_db) -> str:
    return make_account(server_db, "admin")


@pytest.fixture
def researcher(server_db) -> str:
    return make_account(server_db, "researcher")


def serious_violations(page, exclude: tuple[str, ...] = (), skip_rules: tuple[str, ...] = ()) -> list[str]:
    """axe-core's serious and critical WCAG 2.x A/AA violations on the page as it stands
    (`skip_rules`: axe rule ids not checked, for markup of a vendored library we cannot change)."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        # Evaluated through the DevTools protocol, which the pages' Content-Security-Policy does not govern.
        page.evaluate(AXE.read_text() + "\n;true")
    result = page.evaluate(
        """async ([exclude, skip]) => {
            const context = exclude.length ? { exclude: exclude.map((s) => [s]) } : document;
            const r = await window.axe.run(context, {
                runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] },
                rules: Object.fromEntries(skip.map((id) => [id, { enabled: false }])),
            });
            return r.violations
                .filter((v) => v.impact === "serious" || v.impact === "critical")
                .map((v) => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map((n) => n.target.join(" ")).join(", ")}`);
        }""",
        [list(exclude), list(skip_rules)],
    )
    return result


@pytest.fixture
def no_active_round(server):
    """No round active before or after the test (one may be active at a time; tests make their own)."""
    from sqlalchemy import text

    def clear():
        with server.engine.begin() as conn:
            conn.execute(
                text("UPDATE rounds SET active = NULL, status = 'cancelled' WHERE active IS NOT NULL")
            )

    clear()
    yield
    clear()
