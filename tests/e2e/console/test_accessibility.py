"""Every page, as the role that uses it, checked by axe-core in Chromium (WCAG 2.1 A and AA): no
serious or critical violation. And the help overlay takes the focus and gives it back."""

from __future__ import annotations

import pytest

from app.data.models import Round, Run, RunMetric
from tests.e2e.conftest import log_in, shot
from tests.e2e.console.conftest import log_in_as, serious_violations
from tests.world import World

pytestmark = pytest.mark.e2e

ADMIN_PAGES = (
    "/admin",
    "/admin/rounds",
    "/admin/runs",
    "/admin/policies",
    "/admin/playground",
    "/admin/prompts",
    "/admin/prompts/guidelines",
    "/admin/quality",
    "/admin/quality/annotators",
    "/admin/quality/gold",
    "/admin/quality/leaderboard",
    "/admin/no-such-page",
)


def seed_console(db) -> tuple[int, int]:
    """A finished round with a run, metrics and samples, and a task: pages with content to check."""
    round_ = Round(
        algorithm="ppo", status="succeeded", stage="done", active=None, config={"policy": {"steps": 2}}
    )
    db.add(round_)
    db.flush()
    run = Run(kind="ppo", round_id=round_.id, status="succeeded", progress=1.0, result={"reward_gain": 0.2})
    db.add(run)
    db.flush()
    db.add_all([RunMetric(run_id=run.id, step=s, name="reward_raw", value=0.1 * s) for s in (1, 2)])
    samples = [{"prompt": "Say *hi*", "live": "hi", "candidate": "**hi**"}]
    db.add(Run(kind="evaluate", round_id=round_.id, status="succeeded", result={"samples": samples}))
    db.commit()
    World(db).tasks_from_texts([("Explain tides", ["The moon.", "The sun.", "Wind."])], prompt_set="a11y")
    return round_.id, run.id


def check(page, url: str) -> list[str]:
    page.goto(url)
    page.wait_for_load_state("networkidle")
    return [f"{url}: {v}" for v in serious_violations(page)]


def test_console_research_and_login_pages_have_no_serious_violations(
    page, server, server_db, admin, researcher, no_active_round
):
    round_id, run_id = seed_console(server_db)
    problems = check(page, f"{server.url}/login")
    log_in_as(page, server, admin, "admin")
    for path in (*ADMIN_PAGES, f"/admin/rounds/{round_id}", f"/admin/runs/{run_id}", "/research"):
        problems += check(page, f"{server.url}{path}")
    page.goto(f"{server.url}/admin/quality/gold?q=tides")
    page.click("#gold-choices a")
    problems += [f"gold editor: {v}" for v in serious_violations(page)]
    page.context.clear_cookies()
    log_in_as(page, server, researcher, "researcher")
    problems += check(page, f"{server.url}/research")
    assert problems == []


def test_annotation_page_and_its_overlays_have_no_serious_violations(page, server, server_db, annotator):
    World(server_db).tasks_from_texts(
        [("Explain tides", ["The **moon**.", "The sun.", "Wind."])], prompt_set="a11y"
    )
    log_in(page, server, annotator.username)
    page.wait_for_selector("#task")
    problems = [f"annotate: {v}" for v in serious_violations(page)]

    page.keyboard.press("?")
    page.wait_for_selector("#help-overlay:not([hidden])")
    assert page.evaluate("document.getElementById('help-overlay').contains(document.activeElement)")
    problems += [f"help overlay: {v}" for v in serious_violations(page)]
    shot(page, "help-overlay-focused")
    page.keyboard.press("Escape")
    assert page.is_hidden("#help-overlay")
    assert not page.evaluate("document.getElementById('help-overlay').contains(document.activeElement)")

    page.click("[data-action=help]")  # opened by its button, the focus goes back to the button
    page.wait_for_selector("#help-overlay:not([hidden])")
    page.keyboard.press("Enter")  # the Close button has the focus
    assert page.is_hidden("#help-overlay")
    assert page.evaluate("document.activeElement.dataset.action") == "help"

    page.keyboard.press("s")
    page.wait_for_selector("#skip-dialog[open]")
    problems += [f"skip dialog: {v}" for v in serious_violations(page)]
    assert problems == []


def test_the_api_reference_pages_have_no_serious_violations_of_ours(page, server):
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)
    # Swagger UI nests its copy-link button inside each operation's summary button: its own markup.
    problems = [f"/docs: {v}" for v in serious_violations(page, skip_rules=("nested-interactive",))]
    page.goto(f"{server.url}/redoc")
    page.wait_for_selector("[data-section-id]", timeout=20_000)
    problems += [f"/redoc: {v}" for v in serious_violations(page)]
    assert problems == []
