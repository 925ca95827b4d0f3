"""Every response carries the security headers; pages hold no inline script, style or handler, so
the Content-Security-Policy can forbid them; HSTS and a Secure CSRF cookie in production."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.config import Settings
from app.paths import TEMPLATES_DIR
from app.web.main import create_app
from app.web.security_headers import policy_for


def _directives(policy: str) -> dict[str, str]:
    return dict(part.strip().split(" ", 1) for part in policy.split(";") if part.strip())


def test_pages_api_errors_and_static_files_carry_the_headers(client, login):
    anonymous = {
        "page": client.get("/login"),
        "json": client.get("/healthz"),
        "404": client.get("/no-such-page"),
        "static": client.get("/static/app.css"),
        "401": client.get("/api/tasks/next"),
    }
    login("admin")
    signed_in = {"admin page": client.get("/admin"), "api": client.get("/api/rounds")}
    for name, response in {**anonymous, **signed_in}.items():
        headers = response.headers
        policy = _directives(headers["content-security-policy"])
        assert policy["script-src"] == "'self'", name
        assert policy["style-src"] == "'self'", name
        assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'", name
        assert headers["x-frame-options"] == "DENY", name
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["referrer-policy"] == "same-origin", name
        assert "strict-transport-security" not in headers, name  # not production: maybe plain HTTP


def test_the_api_docs_get_a_policy_of_their_own(client):
    docs = _directives(client.get("/docs").headers["content-security-policy"])
    assert "'unsafe-inline'" in docs["script-src"] and docs["frame-ancestors"] == "'none'"
    assert "'unsafe-inline'" in _directives(policy_for("/redoc"))["script-src"]
    assert _directives(policy_for("/docsearch"))["script-src"] == "'self'"  # a prefix, not a page
    assert _directives(policy_for("/admin"))["script-src"] == "'self'"


def test_production_adds_hsts_and_a_secure_csrf_cookie(settings, engine):
    production = Settings(**{**settings.model_dump(), "environment": "production"})
    with TestClient(create_app(production, engine), base_url="https://testserver") as client:
        response = client.get("/login")
    assert response.headers["strict-transport-security"].startswith("max-age=31536000")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("prefloop_csrf=") and re.search(r";\s*Secure", cookie, re.IGNORECASE)


def test_the_csrf_cookie_is_not_secure_outside_production(client):
    cookie = client.get("/login").headers["set-cookie"]
    assert not re.search(r";\s*Secure", cookie, re.IGNORECASE)


INLINE = [
    (re.compile(r"<script(?![^>]*\bsrc=)(?![^>]*type=\"application/json\")[^>]*>", re.I), "inline script"),
    (re.compile(r"<style\b", re.I), "style element"),
    (re.compile(r"\sstyle\s*=", re.I), "style attribute"),
    (re.compile(r"\son[a-z]+\s*=", re.I), "event handler attribute"),
    (re.compile(r"javascript:", re.I), "javascript: URL"),
]


def test_templates_hold_no_inline_script_style_or_handlers():
    found = []
    for path in sorted(TEMPLATES_DIR.rglob("*.html")):
        text = path.read_text()
        for pattern, what in INLINE:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(TEMPLATES_DIR)}:{line}: {what}")
    assert found == []


def test_htmx_is_told_not_to_inject_its_indicator_styles(client):
    page = client.get("/login").text
    assert re.search(r'<meta name="htmx-config" content=\'\{[^\']*"includeIndicatorStyles": false', page)
    assert ".htmx-indicator" in client.get("/static/app.css").text
