"""Request bodies over the limit of their route and caller get a 413 with a message before the app
reads them: at once when Content-Length says so, after the chunk that crosses it when streamed.

The app is driven over raw ASGI so the test sees how many chunks of the body were pulled.
"""

from __future__ import annotations

import json

import anyio
import pytest

from app.config import Settings
from app.web.main import create_app

CHUNK = 8 * 1024


@pytest.fixture
def small_limits(settings, engine):
    """An app with small limits, so that a test sends kilobytes rather than megabytes."""
    limited = Settings(
        **{
            **settings.model_dump(),
            "max_anonymous_body_bytes": 16 * 1024,
            "max_body_bytes": 64 * 1024,
            "max_upload_bytes": 256 * 1024,
        }
    )
    return create_app(limited, engine)


def drive(app, method: str, path: str, headers: dict[str, str], chunks: int, declare: bool, first=b""):
    """Send `first` then `chunks` chunks of CHUNK bytes; (status, headers, body, chunks the app pulled)."""
    pulled = 0
    sent: list[dict] = []
    body_chunks = ([first] if first else []) + [b"a" * CHUNK] * chunks
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if declare:
        raw_headers.append((b"content-length", str(sum(map(len, body_chunks))).encode()))
    else:
        raw_headers.append((b"transfer-encoding", b"chunked"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw_headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }

    async def receive():
        nonlocal pulled
        if pulled < len(body_chunks):
            pulled += 1
            return {
                "type": "http.request",
                "body": body_chunks[pulled - 1],
                "more_body": pulled < len(body_chunks),
            }
        await anyio.sleep_forever()

    async def send(message):
        sent.append(message)

    anyio.run(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers_out = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers_out, body, pulled


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "streamed"])
def test_anonymous_bodies_over_the_smallest_limit_are_refused_before_they_are_read(small_limits, declare):
    status, headers, body, pulled = drive(
        small_limits, "POST", "/login", {"content-type": "application/x-www-form-urlencoded"}, 100, declare
    )
    assert status == 413
    detail = json.loads(body)["detail"]
    assert "16 KiB" in detail and "not signed in" in detail
    assert pulled == (0 if declare else 3)  # 3 chunks of 8 KiB are the first over 16 KiB
    assert headers["x-content-type-options"] == "nosniff"  # refusals carry the security headers too


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "streamed"])
def test_an_upload_is_checked_while_it_streams_not_once_it_is_on_disk(small_limits, api_headers, declare):
    admin = api_headers("admin")
    headers = {**admin, "content-type": "multipart/form-data; boundary=x"}
    preamble = b'--x\r\ncontent-disposition: form-data; name="file"; filename="p.jsonl"\r\n\r\n'
    status, _, body, pulled = drive(small_limits, "POST", "/api/prompt-sets", headers, 200, declare, preamble)
    assert status == 413
    assert "320 KiB" in json.loads(body)["detail"]  # 256 KiB plus the multipart allowance
    assert pulled == (0 if declare else 1 + 40)  # 1.6 MB offered; the file part stopped after 320 KiB


def test_only_the_roles_of_an_upload_route_get_its_larger_limit(small_limits, api_headers):
    annotator = {**api_headers("annotator"), "content-type": "multipart/form-data; boundary=x"}
    status, _, body, pulled = drive(small_limits, "POST", "/api/prompt-sets", annotator, 20, True)
    assert status == 413 and "64 KiB" in json.loads(body)["detail"] and pulled == 0


def test_a_forged_token_counts_as_not_signed_in(small_limits):
    headers = {"authorization": "Bearer forged", "content-type": "application/json"}
    status, _, body, _ = drive(small_limits, "POST", "/api/tasks/1/annotation", headers, 4, True)
    assert status == 413 and "not signed in" in json.loads(body)["detail"]


def test_signed_in_bodies_under_the_limit_reach_the_route(small_limits, api_headers):
    headers = {**api_headers("annotator"), "content-type": "application/json"}
    # 40 KiB of "a" is over the anonymous limit but under the signed-in one: the route parses it.
    status, _, body, pulled = drive(small_limits, "POST", "/api/tasks/1/annotation", headers, 5, True)
    assert status == 422 and pulled == 5
    assert "JSON" in json.loads(body)["detail"]


def test_a_browser_form_over_the_limit_gets_the_error_page(small_limits, engine):
    from fastapi.testclient import TestClient

    with TestClient(small_limits) as client:
        client.get("/login")
        response = client.post(
            "/login",
            data={"username": "x" * 10, "password": "p" * 1000, "next": "/" + "n" * 20_000},
            headers={"Accept": "text/html"},
        )
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("text/html")
    assert "not signed in" in response.text
