"""An annotator in a real Chromium: keyboard ranking with a tie, drag ranking, the unchanged-order
warning, skip with a reason, arena verdicts, and model output that tries to run script."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.data.models import Annotation
from tests.e2e.conftest import log_in, shot
from tests.world import World

pytestmark = pytest.mark.e2e

XSS_SCRIPT = "<script>window.__pwned = 'script'; alert('script')</script>"
XSS_IMG = "<img src=x onerror=\"window.__pwned = 'img'; alert('img')\">"


def seed(db, n=2, k=4, kind="rank", name="e2e"):
    items = [
        (f"{name} prompt {i}: explain tides", [f"{name} answer {i}.{j}" for j in range(k)]) for i in range(n)
    ]
    return World(db).tasks_from_texts(items, kind=kind, prompt_set=name)


def label_to_id(page) -> dict[int, int]:
    cards = page.locator("#ranking li.response")
    return {
        int(cards.nth(i).get_attribute("data-label")): int(cards.nth(i).get_attribute("data-response-id"))
        for i in range(cards.count())
    }


def order(page) -> list[int]:
    cards = page.locator("#ranking li.response")
    return [int(cards.nth(i).get_attribute("data-response-id")) for i in range(cards.count())]


def annotation(db, task_id: int) -> Annotation:
    db.expire_all()
    return db.scalar(select(Annotation).where(Annotation.task_id == task_id))


def test_rank_by_keyboard_with_a_tie_then_get_the_next_task(page, server, server_db, annotator):
    first, second = seed(server_db)
    log_in(page, server, annotator.username)
    page.wait_for_selector(f"#task[data-task-id='{first}']")
    ids = label_to_id(page)

    for key in ("3", "t", "1", "4"):  # 3 best, 1 tied with 3, then 4; 2 is placed last by itself
        page.keyboard.press(key)
    assert order(page) == [ids[3], ids[1], ids[4], ids[2]]
    assert page.locator("#ranking li.response").nth(1).get_attribute("data-tied") == "true"
    assert "3 = 1 > 4 > 2" in page.inner_text("#kbd-status")
    shot(page, "keyboard-ranked-with-tie")

    page.keyboard.press("Enter")
    page.wait_for_selector(f"#task[data-task-id='{second}']")
    assert "Saved task" in page.inner_text(".flash")
    assert page.inner_text("[data-count=total]") == "1"
    shot(page, "keyboard-next-task")

    stored = annotation(server_db, first)
    assert stored.ranking == [sorted([ids[3], ids[1]]), [ids[4]], [ids[2]]]
    assert stored.shown_order_unchanged is False and stored.time_spent_ms > 0
    assert page.errors == []


def test_rank_by_drag_and_the_unchanged_order_warning(page, server, server_db, annotator):
    first, second = seed(server_db, name="drag")
    log_in(page, server, annotator.username)
    page.wait_for_selector(f"#task[data-task-id='{first}']")
    ids = label_to_id(page)

    # Drag the fourth card onto the first one (SortableJS in mouse-event mode; the cards stand side
    # by side on this wide window, so the path goes up and across).
    source = page.locator("li.response[data-label='4'] .response-head .key").bounding_box()
    target = page.locator("li.response[data-label='1'] .response-head").bounding_box()
    page.mouse.move(source["x"] + 5, source["y"] + 5)
    page.mouse.down()
    steps = 12
    for i in range(1, steps + 1):
        x = source["x"] + 5 + (target["x"] + 20 - source["x"] - 5) * i / steps
        y = source["y"] + (target["y"] + 4 - source["y"]) * i / steps
        page.mouse.move(x, y)
        page.wait_for_timeout(20)
    page.mouse.up()
    page.wait_for_timeout(200)
    assert order(page)[0] == ids[4]
    # Tie the second card with the first by clicking its tie button.
    page.locator("#ranking li.response").nth(1).locator(".tie-toggle").click()
    shot(page, "drag-ranked")
    page.click("#rank-form button[type=submit]")
    page.wait_for_selector(f"#task[data-task-id='{second}']")
    stored = annotation(server_db, first)
    assert stored.ranking[0] == sorted([ids[4], ids[1]])
    assert [g for g in stored.ranking[1:]] == [[ids[2]], [ids[3]]]

    # Submitting the order exactly as shown asks for confirmation first.
    shown = order(page)
    page.keyboard.press("Enter")
    page.wait_for_selector("#unchanged-warning:not([hidden])")
    assert annotation(server_db, second) is None
    shot(page, "unchanged-warning")
    page.keyboard.press("Enter")
    page.wait_for_selector("#empty-pool")
    stored = annotation(server_db, second)
    assert stored.ranking == [[i] for i in shown] and stored.shown_order_unchanged is True
    assert page.errors == []


def test_help_overlay_flags_and_skip_with_a_reason(page, server, server_db, annotator):
    first, second = seed(server_db, name="skip")
    log_in(page, server, annotator.username)
    page.wait_for_selector(f"#task[data-task-id='{first}']")
    page.keyboard.press("?")
    assert page.is_visible("#help-overlay")
    shot(page, "help-overlay")
    page.keyboard.press("Escape")
    assert not page.is_visible("#help-overlay")
    page.keyboard.press("g")
    assert page.is_visible("#guidelines-panel")
    page.keyboard.press("g")

    # Flag response 2 as nonsense by keyboard, then rank and submit.
    ids = label_to_id(page)
    page.keyboard.press("f")
    page.keyboard.press("2")
    page.keyboard.press("n")
    assert page.locator("li.response[data-label='2'] input[value=nonsense]").is_checked()
    page.keyboard.press("Escape")
    for key in ("2", "1", "3"):
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#task[data-task-id='{second}']")
    assert annotation(server_db, first).flags == {"responses": {str(ids[2]): ["nonsense"]}}

    page.keyboard.press("s")
    page.wait_for_selector("#skip-dialog[open]")
    page.keyboard.press("2")
    shot(page, "skip-dialog")
    page.keyboard.press("Enter")
    page.wait_for_selector("#empty-pool")
    stored = annotation(server_db, second)
    assert stored.skipped and stored.skip_reason == "The prompt is unclear or broken"
    assert page.errors == []


def test_arena_verdict_by_keyboard(page, server, server_db, annotator):
    (task_id,) = seed(server_db, n=1, k=2, kind="arena", name="arena")
    log_in(page, server, annotator.username)
    page.wait_for_selector(f"#task[data-task-id='{task_id}'][data-kind=arena]")
    ids = label_to_id(page)
    assert page.locator("#ranking .side").all_inner_texts() == ["Response A", "Response B"]
    page.keyboard.press("Enter")  # no verdict yet: refused in the page
    assert "Pick the better response" in page.inner_text("#submit-error")
    page.keyboard.press("2")
    shot(page, "arena")
    page.keyboard.press("Enter")
    page.wait_for_selector("#empty-pool")
    assert annotation(server_db, task_id).ranking == [[ids[2]], [ids[1]]]


def test_model_output_with_script_shows_as_text_and_runs_nothing(page, server, server_db, annotator):
    World(server_db).tasks_from_texts(
        [(f"Reply with HTML {XSS_IMG}", [XSS_SCRIPT, XSS_IMG, "**bold** and `code`"])],
        prompt_set="xss",
    )
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    log_in(page, server, annotator.username)
    page.wait_for_selector("#task")
    page.wait_for_timeout(300)
    bodies = page.locator("#ranking .response-body")
    texts = [bodies.nth(i).inner_text() for i in range(bodies.count())]
    assert any("<script>window.__pwned = 'script'" in t for t in texts)
    assert any("<img src=x onerror=" in t for t in texts)
    assert XSS_IMG in page.inner_text(".prompt")
    assert page.evaluate("window.__pwned") is None
    assert dialogs == []
    assert page.locator("#task img").count() == 0 and page.locator("#task script").count() == 0
    assert page.locator("#ranking .response-body strong").count() == 1  # safe Markdown still works
    shot(page, "xss-as-text")
    assert page.errors == []
