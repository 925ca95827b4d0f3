"""An annotator's day in Chromium: work survives a lost session, unplaced responses and an over-long
rationale are refused in view, every message about a submission shows where the eye is, a held task
can be given back, the empty pool says what is coming and refreshes itself, judgements can be
revised from the history, long responses compare side by side, and the login form and Back after
logout behave.

Screenshots of the compare layout go to test-artifacts/e2e/; with PREFLOOP_UPDATE_SCREENSHOTS=1 they
are also written to docs/screenshots/ (the ones the documentation shows)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from app.data.models import Annotation, AnnotationRevision, Run
from tests.e2e.conftest import ARTIFACTS, PASSWORD, log_in, shot
from tests.world import World

pytestmark = pytest.mark.e2e

DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
LONG = "\n\n".join(
    f"Paragraph {i}: the tide rises and falls twice a day as the moon pulls the sea." for i in range(40)
)


def seed(db, n=2, k=4, name="day", texts=None):
    items = [
        (f"{name} prompt {i}: explain tides", texts or [f"{name} answer {i}.{j}" for j in range(k)])
        for i in range(n)
    ]
    return World(db).tasks_from_texts(items, prompt_set=name)


def labels_to_ids(page) -> dict[int, int]:
    cards = page.locator("#ranking li.response")
    return {
        int(cards.nth(i).get_attribute("data-label")): int(cards.nth(i).get_attribute("data-response-id"))
        for i in range(cards.count())
    }


def annotation(db, task_id: int) -> Annotation | None:
    db.expire_all()
    return db.scalar(select(Annotation).where(Annotation.task_id == task_id))


def in_view(page, selector: str) -> bool:
    """The element is visible and wholly inside the window as it is scrolled now."""
    box = page.locator(selector).bounding_box()
    height = page.viewport_size["height"]
    return box is not None and box["height"] > 0 and box["y"] >= 0 and box["y"] + box["height"] <= height


def draft_of(page) -> str | None:
    return page.evaluate("localStorage.getItem(document.querySelector('#task').dataset.draftKey)")


def test_a_lost_session_keeps_the_judgement_and_sends_it_after_signing_in_again(
    page, server, server_db, annotator
):
    first, second = seed(server_db, name="lost")
    log_in(page, server, annotator.username)
    page.wait_for_selector(f"#task[data-task-id='{first}']")
    ids = labels_to_ids(page)
    for key in ("f", "2", "n", "Escape", "2", "1", "3"):
        page.keyboard.press(key)
    page.fill("textarea[name=rationale]", "2 explains the moon; 1 forgets it")
    assert '"rationale":"2 explains the moon; 1 forgets it"' in draft_of(page)

    # A reload brings the same task back with the work restored from local storage (and drops
    # drafts untouched for a week).
    page.evaluate("localStorage.setItem('prefloop.draft.0.task.0', JSON.stringify({savedAt: 1}))")
    page.reload()
    page.wait_for_selector(f"#task[data-task-id='{first}']")
    page.wait_for_selector("#draft-note:not([hidden])")
    assert page.evaluate("localStorage.getItem('prefloop.draft.0.task.0')") is None
    assert "3 > 4" in page.inner_text("#kbd-status") and "2 > 1" in page.inner_text("#kbd-status")
    assert page.input_value("textarea[name=rationale]") == "2 explains the moon; 1 forgets it"
    assert page.locator("li.response[data-label='2'] input[value=nonsense]").is_checked()

    # Logged out in another tab: the submit is refused with 401; the page says so and offers to sign in.
    other = page.context.new_page()
    other.goto(f"{server.url}/annotate")
    other.click("header form button[type=submit]")
    other.wait_for_url(f"{server.url}/login")
    other.close()
    page.keyboard.press("Enter")
    page.wait_for_selector("#login-dialog[open]")
    assert "session has ended" in page.inner_text("#submit-error")
    assert page.input_value("#login-dialog input[name=username]") == annotator.username
    assert annotation(server_db, first) is None
    shot(page, "lost-session-sign-in")

    page.fill("#login-dialog input[name=password]", "not the password")
    page.click("#login-dialog button[type=submit]")
    page.wait_for_selector("#login-dialog-error:has-text('wrong password')")
    assert page.locator("#login-dialog").is_visible()

    page.fill("#login-dialog input[name=password]", PASSWORD)
    page.click("#login-dialog button[type=submit]")
    page.wait_for_selector(f"#task[data-task-id='{second}']")
    stored = annotation(server_db, first)
    assert stored.ranking == [[ids[2]], [ids[1]], [ids[3]], [ids[4]]]
    assert stored.rationale == "2 explains the moon; 1 forgets it"
    assert stored.flags == {"responses": {str(ids[2]): ["nonsense"]}}
    assert page.evaluate(f"Object.keys(localStorage).filter(k => k.endsWith('.task.{first}'))") == []
    assert page.errors == []


def test_unplaced_responses_and_an_over_long_rationale_are_refused_in_view(
    page, server, server_db, annotator
):
    first, second = seed(server_db, name="unplaced")
    log_in(page, server, annotator.username)
    page.wait_for_selector(f"#task[data-task-id='{first}']")
    page.keyboard.press("2")
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    page.wait_for_selector("#submit-error .error")
    assert "responses 3 and 4 are not placed yet" in page.inner_text("#submit-error")
    assert in_view(page, "#submit-error")
    assert annotation(server_db, first) is None

    too_long = "why " * 1253  # 5,012 characters: over the 5,000 the server takes
    page.fill("textarea[name=rationale]", too_long)
    assert len(page.input_value("textarea[name=rationale]")) == len(too_long)  # nothing cut
    assert "5,012 / 5,000 characters: 12 over the limit" in page.inner_text("#rationale-count")
    page.keyboard.press("Escape")  # out of the text field: keys rank again
    page.keyboard.press("3")  # 4 is placed last by itself
    page.keyboard.press("Enter")
    page.wait_for_selector("#submit-error:has-text('12 characters over the limit')")
    assert in_view(page, "#submit-error")
    shot(page, "rationale-over-limit")
    assert annotation(server_db, first) is None

    page.fill("textarea[name=rationale]", too_long[:5000])
    assert "5,000 / 5,000 characters" in page.inner_text("#rationale-count")
    page.keyboard.press("Escape")
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#task[data-task-id='{second}']")
    assert len(annotation(server_db, first).rationale) == 4999  # stored stripped of the trailing space
    assert page.errors == []


def test_messages_about_a_submission_show_where_the_eye_is(page, server, server_db, annotator):
    first, second = seed(server_db, name="eye", texts=[LONG, LONG + " (b)", LONG + " (c)", LONG + " (d)"])
    page.set_viewport_size({"width": 1280, "height": 800})
    log_in(page, server, annotator.username)
    page.wait_for_selector(f"#task[data-task-id='{first}']")
    assert page.evaluate("document.documentElement.scrollHeight") > 1200  # the submit control is far below
    page.evaluate("window.scrollTo(0, 0)")

    page.keyboard.press("Enter")  # the order as shown: asks for confirmation
    page.wait_for_selector("#unchanged-warning:not([hidden])")
    assert in_view(page, "#unchanged-warning") and in_view(page, "#rank-form button[type=submit]")
    shot(page, "unchanged-warning-in-view")

    page.keyboard.press("s")
    page.wait_for_selector("#skip-dialog[open]")
    page.keyboard.press("4")  # Other, with no details
    page.keyboard.press("Enter")
    page.wait_for_selector("#submit-error:has-text(\"choose 'Other'\")")
    assert in_view(page, "#submit-error")

    # A second tab judges the task differently first: this tab's submission is refused, in view.
    other = page.context.new_page()
    other.goto(f"{server.url}/annotate")
    other.wait_for_selector(f"#task[data-task-id='{first}']")
    for key in ("4", "3", "2"):
        other.keyboard.press(key)
    other.keyboard.press("Enter")
    other.wait_for_selector(f"#task[data-task-id='{second}']")
    other.close()
    for key in ("2", "1", "3"):
        page.keyboard.press(key)
    page.evaluate("window.scrollTo(0, 0)")
    page.keyboard.press("Enter")
    page.wait_for_selector("#submit-error:has-text('different judgement')")
    assert in_view(page, "#submit-error")
    shot(page, "stale-tab-in-view")
    assert page.errors == []


def test_give_back_and_an_empty_pool_that_says_what_is_coming(page, server, server_db, annotator):
    first, second = seed(server_db, n=2, name="release")
    log_in(page, server, annotator.username)
    page.wait_for_selector(f"#task[data-task-id='{first}']")
    page.click("button.release")
    page.wait_for_selector(f"#task[data-task-id='{second}']")
    assert f"Gave task #{first} back" in page.inner_text(".flash")

    server_db.add(Run(kind="generate", status="running", progress=0.25, config={"prompt_ids": [1, 2, 3]}))
    server_db.commit()
    for key in ("2", "1", "3"):
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#empty-pool")  # the task given back is not offered again
    assert "3 tasks coming" in page.inner_text("#pool-outlook") and "25% done" in page.inner_text(
        "#pool-outlook"
    )
    shot(page, "empty-pool-outlook")

    (new_task,) = seed(server_db, n=1, name="arrives")
    page.wait_for_selector(f"#task[data-task-id='{new_task}']", timeout=15_000)  # polled, no reload
    assert page.errors == []


def test_revise_a_judgement_from_the_history(page, server, server_db, annotator):
    first, second = seed(server_db, name="revise")
    log_in(page, server, annotator.username)
    page.wait_for_selector(f"#task[data-task-id='{first}']")
    ids = labels_to_ids(page)
    for key in ("1", "2", "3"):
        page.keyboard.press(key)
    page.fill("textarea[name=rationale]", "first thoughts")
    page.keyboard.press("Escape")
    page.keyboard.press("Enter")
    page.wait_for_selector("#unchanged-warning:not([hidden])")
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#task[data-task-id='{second}']")

    page.click("a.history-link")
    page.wait_for_selector("table.history-table")
    assert "1 > 2 > 3 > 4" in page.inner_text("table.history-table")
    page.click("a.revise-link")
    page.wait_for_selector(f"#task[data-task-id='{first}'][data-revise]")
    assert page.input_value("textarea[name=rationale]") == "first thoughts"
    for key in ("4", "t", "3", "1"):
        page.keyboard.press(key)
    page.fill("textarea[name=rationale]", "second thoughts")
    page.keyboard.press("Escape")
    shot(page, "revise")
    page.keyboard.press("Enter")
    page.wait_for_url("**/annotate/history?revised=*")
    assert "Saved your revision" in page.inner_text(".flash")
    assert "3 = 4 > 1 > 2" in page.inner_text("table.history-table")

    stored = annotation(server_db, first)
    assert stored.ranking == [sorted([ids[4], ids[3]]), [ids[1]], [ids[2]]] and stored.revision == 1
    assert stored.rationale == "second thoughts"
    kept = server_db.scalar(select(AnnotationRevision).where(AnnotationRevision.annotation_id == stored.id))
    assert kept.rationale == "first thoughts" and kept.ranking == [[ids[i]] for i in (1, 2, 3, 4)]
    assert page.errors == []


def test_compare_layout_side_by_side_on_wide_screens_and_stacked_on_phones(
    browser, server, server_db, annotator
):
    texts = [LONG, "A short answer.", LONG.replace("tide", "sea"), "Another short one."]
    seed(server_db, n=1, name="compare", texts=texts)
    saved = []
    for width, height, name in ((1440, 900, "compare-1440"), (390, 844, "compare-390")):
        context = browser.new_context(viewport={"width": width, "height": height}, is_mobile=width < 500)
        page = context.new_page()
        page.set_default_timeout(10_000)
        errors = []
        page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
        log_in(page, server, annotator.username)
        page.wait_for_selector("#task")
        cards = page.locator("#ranking li.response")
        boxes = [cards.nth(i).bounding_box() for i in range(4)]
        # One number per card: its rank; the response's key is drawn as a key.
        assert [cards.nth(i).locator(".rank-badge").inner_text() for i in range(4)] == [
            f"Rank {i}" for i in (1, 2, 3, 4)
        ]
        assert page.locator("#ranking .label").count() == 0
        assert [cards.nth(i).locator(".key").inner_text() for i in range(4)] == ["1", "2", "3", "4"]
        if width >= 900:
            assert (
                abs(boxes[0]["y"] - boxes[1]["y"]) < 2
                and boxes[1]["x"] > boxes[0]["x"] + boxes[0]["width"] - 1
            )
            long_card = cards.filter(has_text="the tide rises")
            long_body = long_card.locator(".response-body")
            other_body = cards.filter(has_text="the sea rises").locator(".response-body")
            assert long_card.locator(".expand-toggle").is_visible()
            short = cards.filter(has_text="A short answer.")
            assert not short.locator(".expand-toggle").is_visible()  # nothing to expand
            long_body.evaluate("el => { el.scrollTop = (el.scrollHeight - el.clientHeight) / 2; }")
            page.wait_for_function(
                "el => el.scrollTop > 0", arg=other_body.element_handle()
            )  # scrolled together
            fraction = other_body.evaluate("el => el.scrollTop / (el.scrollHeight - el.clientHeight)")
            assert 0.4 < fraction < 0.6
            page.evaluate("window.scrollTo(0, 0)")
        else:
            assert all(abs(b["x"] - boxes[0]["x"]) < 2 for b in boxes)  # stacked
            assert all(boxes[i + 1]["y"] > boxes[i]["y"] + boxes[i]["height"] - 1 for i in range(3))
            assert page.locator("#task").evaluate("el => el.scrollWidth <= el.clientWidth")
        path = ARTIFACTS / f"{name}.png"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
        saved.append(path)
        if width >= 900:
            page.click("[data-compare=expand-all]")
            assert long_body.evaluate("el => el.scrollHeight <= el.clientHeight + 1")
            assert long_card.locator(".expand-toggle").inner_text() == "Show less"
            page.click("[data-compare=collapse-all]")
            assert long_body.evaluate("el => el.scrollHeight > el.clientHeight + 1")
        assert errors == []
        context.close()
    if os.environ.get("PREFLOOP_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for path in saved:
            shutil.copy(path, DOCS_SCREENSHOTS / path.name)


def test_login_keeps_the_username_and_back_after_logout_shows_no_cached_page(page, server, annotator):
    page.goto(f"{server.url}/login")
    page.fill("input[name=username]", annotator.username)
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    page.wait_for_selector(".error")
    assert page.input_value("input[name=username]") == annotator.username
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}/annotate")
    response = page.reload()
    assert response.headers["cache-control"] == "no-store"
    assert annotator.username in page.inner_text("header")

    page.click("header form button[type=submit]")
    page.wait_for_url(f"{server.url}/login")
    page.go_back()
    page.wait_for_load_state()
    assert annotator.username not in page.content()
    assert page.url.startswith(f"{server.url}/login")
