"""At phone width (390 px, touch) in Chromium: no page is wider than the screen, the top bar keeps
its items on at most two tidy rows, and keyboard hints are hidden on a touch screen."""

from __future__ import annotations

import contextlib

import pytest

from tests.e2e.conftest import ARTIFACTS, PASSWORD
from tests.e2e.console.conftest import log_in_as
from tests.e2e.console.test_accessibility import ADMIN_PAGES, seed_console

pytestmark = pytest.mark.e2e

PHONE = {
    "viewport": {"width": 390, "height": 844},
    "is_mobile": True,
    "has_touch": True,
    "device_scale_factor": 2,
}


@pytest.fixture
def phone(browser, server, request):
    context = browser.new_context(**PHONE)
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-phone.png"), full_page=True)
    context.close()


def overflow(page) -> int:
    """How many CSS pixels the page is wider than the screen (0: nothing off-screen sideways)."""
    return page.evaluate("document.documentElement.scrollWidth - window.innerWidth")


def topbar_rows(page) -> int:
    """The number of distinct rows the top bar's items sit on."""
    return page.evaluate(
        """() => new Set([...document.querySelectorAll('.topbar > *')]
                .filter((el) => el.offsetParent !== null)
                .map((el) => Math.round(el.getBoundingClientRect().top / 8))).size"""
    )


def test_console_and_research_pages_fit_a_phone(phone, server, server_db, admin, researcher, no_active_round):
    round_id, run_id = seed_console(server_db)
    log_in_as(phone, server, admin, "admin")
    wide = {}
    for path in (*ADMIN_PAGES, f"/admin/rounds/{round_id}", f"/admin/runs/{run_id}", "/research"):
        phone.goto(f"{server.url}{path}")
        phone.wait_for_load_state("networkidle")
        if overflow(phone) > 0:
            wide[path] = overflow(phone)
        assert topbar_rows(phone) <= 2, path
    assert wide == {}
    phone.context.clear_cookies()
    log_in_as(phone, server, researcher, "researcher")
    assert overflow(phone) == 0


def test_keyboard_hints_are_hidden_on_a_touch_screen(phone, server, server_db, annotator):
    from tests.world import World

    World(server_db).tasks_from_texts([("Explain tides", ["The moon.", "The sun."])], prompt_set="phone")
    phone.goto(f"{server.url}/login")
    phone.fill("input[name=username]", annotator.username)
    phone.fill("input[name=password]", PASSWORD)
    phone.click("button[type=submit]")
    phone.wait_for_selector("#task")
    assert phone.locator("kbd").count() > 0
    assert phone.evaluate("[...document.querySelectorAll('kbd')].every((k) => k.offsetParent === null)")
    assert phone.is_hidden(".meta-actions [data-action=help]")  # the keyboard help button too
    assert overflow(phone) == 0 and topbar_rows(phone) <= 2
