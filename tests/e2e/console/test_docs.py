"""The API reference (/docs, /redoc) and the favicon in a Chromium that can reach nothing but the
server: every file comes from the app itself."""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import pytest

from tests.e2e.conftest import shot
from tests.e2e.console.conftest import log_in_as

pytestmark = pytest.mark.e2e


def offline(page, server) -> list[str]:
    """Refuse every request to another host (as on a machine without internet); returns them."""
    ours = urlsplit(server.url).netloc
    refused: list[str] = []

    def handle(route):
        if urlsplit(route.request.url).netloc in (ours, ""):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", handle)
    return refused


def test_swagger_ui_and_redoc_work_offline(page, server):
    refused = offline(page, server)
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".swagger-ui .opblock-tag", timeout=20_000)
    assert page.locator(".swagger-ui .opblock").count() > 5
    assert "/api/tasks/next" in page.inner_text(".swagger-ui")
    shot(page, "docs-swagger-ui")
    page.goto(f"{server.url}/redoc")
    page.wait_for_selector("[data-section-id]", timeout=20_000)
    assert "tasks" in page.inner_text("body").lower()
    shot(page, "docs-redoc")
    # Redoc's side menu shows its maker's logo from their CDN and drops the image when that fails;
    # nothing else may leave the machine.
    assert [u for u in refused if u != "https://cdn.redoc.ly/redoc/logo-mini.svg"] == []
    assert page.errors == []


def test_the_research_page_links_to_the_reference_and_every_page_has_an_icon(page, server, researcher):
    log_in_as(page, server, researcher, "researcher")
    assert page.locator("a[href^='/docs']").count() >= 1 and page.locator("a[href='/redoc']").count() == 1
    icon = page.locator("link[rel=icon]").get_attribute("href")
    assert page.request.get(urljoin(page.url, icon)).headers["content-type"].startswith("image/svg")
    assert page.request.get(f"{server.url}/favicon.ico").status == 200
    page.click("a[href='/redoc']")
    page.wait_for_selector("[data-section-id]", timeout=20_000)
