"""Hostile text everywhere a user or a model can put it, on every page that shows it, in Chromium.

Prompts, responses, rationales, flag notes, usernames, prompt-set names and descriptions, export
names, run errors, evaluation samples and guidelines carry strings that run script if a page ever
inserts them as HTML. Every page is visited twice:

- with the Content-Security-Policy bypassed, so escaping alone must keep the script from running:
  no flag set on window, no dialog, no injected element, and the text shown as text;
- with the policy on, where the pages must work without a single violation (htmx included).

The page list is every GET page route of the app, so a page added later is visited too.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import pytest
from sqlalchemy import text

from app.data.models import Policy, Round, Run, Task
from app.services.guidelines import save_guidelines
from app.services.quality.gold import mark_gold
from tests.world import PASSWORD, World

pytestmark = pytest.mark.e2e

SCRIPT = "<script>window.__pwned='script';alert('script')</script>"
IMG = "<img src=x onerror=\"window.__pwned='img';alert('img')\">"
SVG = "\"><svg onload=\"window.__pwned='svg';alert('svg')\">"
QUOTE = "' autofocus onfocus='window.__pwned=1"
MARKDOWN = (
    "[click me](javascript:window.__pwned='md-link') "
    "![pic](javascript:alert('md-img')) "
    "<a href=\"javascript:window.__pwned='raw-link'\">raw</a> "
    "<iframe src=\"javascript:alert('frame')\"></iframe>"
)
HOSTILE = [SCRIPT, IMG, SVG, QUOTE, MARKDOWN]

# Whatever escaping let through would show up as one of these (none is in the app's own markup).
INJECTED = (
    'script:not([src]):not([type="application/json"]), img[src="x"], svg[onload], iframe, '
    "[onerror], [onload], [onfocus], [onclick], a[href^='javascript' i]"
)

WATCH_CSP = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push(e.violatedDirective + ' ' + (e.blockedURI || 'inline') + ' ' + e.sourceFile + ':' + e.lineNumber);
});
"""


@dataclass
class Seeded:
    admin: str
    annotator: str
    ids: dict[str, int]
    shown_on: dict[str, str]  # path -> a hostile string that must appear there as text


def _hostile_user(world: World, role: str, payload: str):
    return world.user(f"{payload[:50]}{uuid.uuid4().hex[:6]}", role=role)


def _two_policies(db) -> list[int]:
    """Two policy rows of versions no other test uses (the leaderboard reads rows, not files)."""
    top = db.scalar(text("SELECT coalesce(max(version), 0) FROM policies"))
    versions = [max(top, 900) + 1, max(top, 900) + 2]
    for version in versions:
        db.add(Policy(version=version, kind="ppo", path=f"/nonexistent/v{version}", sha256="0" * 64))
    db.commit()
    return versions


@pytest.fixture
def seeded(server, server_db) -> Seeded:
    world = World(server_db)
    admin = _hostile_user(world, "admin", SVG)
    annotator = _hostile_user(world, "annotator", IMG)
    judge = _hostile_user(world, "annotator", QUOTE)
    admin_id, admin_name, annotator_name, judge_id = admin.id, admin.username, annotator.username, judge.id

    set_name = f"{SVG} set {uuid.uuid4().hex[:4]}"
    task_ids = world.tasks_from_texts(
        [
            (f"Explain tides. {SCRIPT}", [IMG, f"{SVG} {QUOTE}"]),
            (f"Second {IMG} {MARKDOWN}", [SVG, SCRIPT, MARKDOWN]),
            (f"Third {SVG}", [IMG, QUOTE]),
        ],
        prompt_set=set_name,
    )
    server_db.execute(
        text("UPDATE prompt_sets SET description = :d WHERE name = :n").bindparams(
            d=IMG + MARKDOWN, n=set_name
        )
    )
    server_db.commit()

    # A judgement with a hostile rationale and flag note, by a hostile-named annotator.
    first, third = server_db.get(Task, task_ids[0]), server_db.get(Task, task_ids[2])
    judged = world.judge(first, judge, [[1], [0]], flags={0: ["other"]}, rationale=SCRIPT + MARKDOWN)
    judged.flags = {**judged.flags, "note": IMG + SVG}  # the flag note ("other"), as the service keeps it
    server_db.commit()

    # An arena battle between two versions, so the leaderboard draws its chart.
    versions = _two_policies(server_db)
    battle = world.task(
        [f"arena {SCRIPT}", f"arena {IMG}"], prompt=f"Arena {SVG}", kind="arena", versions=versions
    )
    world.judge(battle, judge, [[0], [1]])

    # A gold task (the gold page shows its prompt and responses).
    mark_gold(server_db, third.id, world.shown(third)[0])
    server_db.commit()

    save_guidelines(server_db, f"# Guidelines\n\n{MARKDOWN}\n\n{SCRIPT}\n\n{IMG}")
    server_db.commit()

    samples = [{"prompt": SCRIPT, "live": IMG, "candidate": SVG + MARKDOWN, "live_reward": 0.1}]
    round_ = Round(algorithm="dpo", status="awaiting_approval", stage="evaluate", active=None, config={})
    server_db.add(round_)
    server_db.flush()
    # Ended: it must not block the one-active-round rule for the next test.
    server_db.execute(text("UPDATE rounds SET active = NULL WHERE id = :i").bindparams(i=round_.id))
    evaluation = Run(
        kind="evaluate",
        round_id=round_.id,
        status="succeeded",
        progress=1.0,
        result={"samples": samples, "passed": True},
        config={"candidate_version": 1},
    )
    failed = Run(kind="dpo", round_id=round_.id, status="failed", progress=0.5, error=f"{SCRIPT}\n{IMG}")
    running = Run(kind="generate", status="running", progress=0.3, progress_message=f"{IMG} {SVG}")
    export = Run(
        kind="export",
        status="failed",
        config={"format": SVG, "file_format": IMG, "name": SCRIPT + SVG, "layout": "zip"},
        error=IMG,
        created_by=admin_id,
    )
    server_db.add_all([evaluation, failed, running, export])
    server_db.commit()

    ids = {
        "round_id": round_.id,
        "run_id": failed.id,
        "task_id": task_ids[2],
        "prompt_set_id": 0,
        "version": versions[0],
        "evaluation_id": evaluation.id,
        "running_id": running.id,
        "export_id": export.id,
        "user_id": judge_id,  # pages about one user (account management) show a hostile name
    }
    shown_on = {
        "/admin/prompts": SVG,
        f"/admin/rounds/{round_.id}": SCRIPT,
        f"/admin/runs/{failed.id}": SCRIPT,
        f"/admin/runs/{evaluation.id}": SVG,
        "/admin/quality/annotators": QUOTE,
        f"/admin/quality/gold?task_id={task_ids[2]}": "Third",
        "/admin/quality/gold": SVG,
        "/research": SVG,
        "/admin": admin_name,
    }
    return Seeded(admin=admin_name, annotator=annotator_name, ids=ids, shown_on=shown_on)


def page_paths(seeded: Seeded) -> list[str]:
    """Every GET page of the app (API routes are JSON, checked apart), with seeded ids filled in."""
    from fastapi.routing import APIRoute

    from app.web.routes import ROUTERS

    paths = set()
    for router in ROUTERS:
        for route in router.routes:
            if not isinstance(route, APIRoute) or "GET" not in route.methods:
                continue
            if route.path.startswith(("/api/", "/healthz", "/login")) or route.path == "/":
                continue
            if route.path.endswith(".json"):
                continue
            names = re.findall(r"\{(\w+)(?::\w+)?\}", route.path)
            if any(name not in seeded.ids for name in names):
                continue
            paths.add(re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: str(seeded.ids[m.group(1)]), route.path))
    paths.update(seeded.shown_on)
    paths.add(f"/admin/runs/{seeded.ids['evaluation_id']}")
    return sorted(paths)


def log_in_as(page, server, username: str, lands_on: str) -> None:
    page.goto(f"{server.url}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}{lands_on}")


def new_page(browser, *, bypass_csp: bool):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=bypass_csp)
    context.add_init_script(WATCH_CSP)
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.dialogs = []  # type: ignore[attr-defined]
    page.errors = []  # type: ignore[attr-defined]

    def on_dialog(dialog):
        page.dialogs.append(dialog.message)  # type: ignore[attr-defined]
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))  # type: ignore[attr-defined]
    return context, page


def assert_nothing_ran(page, where: str) -> None:
    page.wait_for_timeout(100)  # a late onerror/onload would have fired by now
    assert page.evaluate("window.__pwned") is None, where
    assert page.dialogs == [], where  # type: ignore[attr-defined]
    injected = page.evaluate(f"Array.from(document.querySelectorAll({INJECTED!r})).map(e => e.outerHTML)")
    assert injected == [], where


def test_hostile_text_is_shown_as_text_and_never_runs(browser, server, seeded):
    context, page = new_page(browser, bypass_csp=True)
    try:
        log_in_as(page, server, seeded.annotator, "/annotate")
        page.wait_for_selector("#task")
        assert_nothing_ran(page, "/annotate")
        shown = page.inner_text("body")
        assert SCRIPT in shown and IMG in shown and seeded.annotator in shown
        assert MARKDOWN.split(" ")[0] in shown  # the javascript: link stays text, never a link

        context.clear_cookies()
        log_in_as(page, server, seeded.admin, "/admin")
        visited = []
        for path in page_paths(seeded):
            response = page.goto(f"{server.url}{path}")
            assert response.status < 500, path
            assert_nothing_ran(page, path)
            if path in seeded.shown_on:
                assert seeded.shown_on[path] in page.inner_text("body"), path
            visited.append(path)
        assert page.errors == []  # type: ignore[attr-defined]
        assert len(visited) >= 15, visited

        # Raw API answers are never HTML a browser would render.
        card = page.request.get(f"{server.url}/api/exports/{seeded.ids['export_id']}/card")
        assert not card.headers.get("content-type", "").startswith("text/html")
    finally:
        context.close()


def test_every_page_works_under_the_content_security_policy(browser, server, seeded, server_db):
    context, page = new_page(browser, bypass_csp=False)
    try:
        log_in_as(page, server, seeded.admin, "/admin")
        for path in page_paths(seeded):
            response = page.goto(f"{server.url}{path}")
            assert "script-src 'self'" in response.headers["content-security-policy"], path
            page.wait_for_load_state("load")
            assert page.evaluate("window.__cspViolations") == [], path

        # Ranking and submitting (SortableJS, htmx swapping in the next task) under the policy.
        page.goto(f"{server.url}/annotate")
        shown_task = page.get_attribute("#task", "data-task-id")
        for key in ("2", "1", "3", "Enter"):
            page.keyboard.press(key)
        page.wait_for_selector(f".flash:has-text('Saved task #{shown_task}')")
        assert page.evaluate("window.__cspViolations") == []

        # The leaderboard's chart script (a file now, not inline) draws under the policy.
        page.goto(f"{server.url}/admin/quality/leaderboard")
        page.wait_for_function("window.Chart && Chart.getChart(document.getElementById('leaderboard-chart'))")

        # htmx runs under the policy: the guidelines preview renders as the admin types.
        page.goto(f"{server.url}/admin/prompts/guidelines")
        page.fill("textarea[name=text]", f"**bold preview** {IMG}")
        page.wait_for_selector("#guidelines-preview strong:text('bold preview')")
        assert page.evaluate("window.__cspViolations") == []

        # One-click forms still ask first (data-confirm, handled by static/page.js).
        running = seeded.ids["running_id"]
        page.goto(f"{server.url}/admin/runs/{running}")
        page.click("button:text('Cancel run')")
        assert page.dialogs and page.dialogs[0].startswith(f"Cancel run #{running}?")  # type: ignore[attr-defined]
        server_db.expire_all()
        assert server_db.scalar(text(f"SELECT cancel_requested FROM runs WHERE id = {running}")) in (0, False)
        assert page.evaluate("window.__cspViolations") == []
        assert page.errors == []  # type: ignore[attr-defined]
    finally:
        context.close()
