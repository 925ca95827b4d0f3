"""Rate limits: login per address and per username (429 with Retry-After and a message, counted in
Redis when the app has one, in the process otherwise or while Redis is down); task requests and
submissions per annotator; password checks on threads of their own.

The limits here are per day: a sliding-window counter lets one extra hit through just after its
window turns over, and a test that crossed a minute's end would see it.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import anyio
import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from app.config import Settings
from app.web.main import create_app
from tests.conftest import service_unavailable
from tests.world import World


def app_with(settings, engine, **overrides):
    return create_app(Settings(**{**settings.model_dump(), **overrides}), engine)


def try_login(client: TestClient, username: str, password: str):
    client.get("/login")
    csrf = client.cookies.get("prefloop_csrf")
    return client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": csrf},
        headers={"Accept": "text/html"},
        follow_redirects=False,
    )


def test_a_username_that_failed_too_often_waits_even_with_the_right_password(settings, engine, make_user):
    user, password = make_user("annotator")
    other, other_password = make_user("annotator")
    with TestClient(app_with(settings, engine, login_failure_limit_per_user="3/day")) as client:
        for _ in range(3):
            assert try_login(client, user.username, "wrong").status_code == 400
        refused = try_login(client, user.username, password)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 24 * 3600
        assert "Too many login attempts; try again in" in refused.text
        assert "prefloop_session" not in refused.cookies
        assert try_login(client, other.username, other_password).status_code == 303  # others unaffected


def test_a_successful_login_clears_the_failures(settings, engine, make_user):
    user, password = make_user("annotator")
    with TestClient(app_with(settings, engine, login_failure_limit_per_user="3/day")) as client:
        for _ in range(2):
            try_login(client, user.username, "wrong")
        assert try_login(client, user.username, password).status_code == 303
        for _ in range(2):
            try_login(client, user.username, "wrong")
        assert try_login(client, user.username, password).status_code == 303


def test_one_address_gets_a_limited_number_of_attempts(settings, engine):
    with TestClient(app_with(settings, engine, login_rate_limit_per_ip="4/day")) as client:
        statuses = [try_login(client, f"nobody-{i}", "guess").status_code for i in range(5)]
    assert statuses == [400, 400, 400, 400, 429]


def test_task_requests_and_submissions_are_limited_per_annotator(settings, engine, db, api_headers):
    app = app_with(settings, engine, task_request_rate_limit="2/day", submission_rate_limit="1/day")
    task_ids = World(db).tasks_from_texts([("q?", ["a", "b"]), ("r?", ["c", "d"])])
    first, second = api_headers("annotator"), api_headers("annotator")
    with TestClient(app) as client:
        assert client.get("/api/tasks/next", headers=first).status_code == 200
        task = client.get("/api/tasks/next", headers=first).json()
        refused = client.get("/api/tasks/next", headers=first)
        assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
        assert refused.json()["detail"].startswith("Too many task requests; try again in")
        assert client.get("/api/tasks/next", headers=second).status_code == 200  # per annotator

        ranking = {"ranking": [[r["id"]] for r in task["responses"]]}
        url = f"/api/tasks/{task['id']}/annotation"
        assert client.post(url, json=ranking, headers=first).status_code == 201
        again = client.post(url, json=ranking, headers=first)
        assert again.status_code == 429 and "Too many submissions" in again.json()["detail"]
    assert task["id"] in task_ids


def test_the_annotation_form_shows_the_limit_in_the_task(settings, engine, make_user):
    user, password = make_user("annotator")
    with TestClient(app_with(settings, engine, submission_rate_limit="1/day")) as client:
        try_login(client, user.username, password)
        headers = {"HX-Request": "true", "X-CSRF-Token": client.cookies.get("prefloop_csrf")}
        client.post("/annotate/tasks/1", data={"payload": "{}"}, headers=headers)
        refused = client.post("/annotate/tasks/1", data={"payload": "{}"}, headers=headers)
    assert refused.headers["hx-retarget"] == "#submit-error"
    assert "Too many submissions; try again in" in refused.text


def test_the_limits_are_shared_through_redis(settings, engine, redis_url, make_user):
    """Two web processes (two apps here) count one username's failures together."""
    user, password = make_user("annotator", username=f"shared-{uuid.uuid4().hex[:8]}")
    # Only the username's counter is under test (the address, "testclient", is every test's).
    options = {
        "redis_url": redis_url,
        "login_failure_limit_per_user": "2/day",
        "login_rate_limit_per_ip": "off",
    }
    with (
        TestClient(app_with(settings, engine, **options)) as one,
        TestClient(app_with(settings, engine, **options)) as two,
    ):
        assert try_login(one, user.username, "wrong").status_code == 400
        assert try_login(two, user.username, "wrong").status_code == 400
        assert try_login(one, user.username, password).status_code == 429


def test_without_redis_the_limits_count_in_the_process(settings, engine):
    # Nothing listens on port 1: logins keep working, and are still limited.
    overrides = {"redis_url": "redis://127.0.0.1:1/0", "login_rate_limit_per_ip": "2/day"}
    with TestClient(app_with(settings, engine, **overrides)) as client:
        statuses = [try_login(client, "nobody", "guess").status_code for _ in range(3)]
    assert statuses == [400, 400, 429]


def test_bad_limit_settings_are_refused_with_the_notation(settings):
    with pytest.raises(ValueError, match="'five a minute' is not a rate limit; write e.g. '30/minute'"):
        Settings(**{**settings.model_dump(), "submission_rate_limit": "five a minute"})
    assert (
        Settings(**{**settings.model_dump(), "submission_rate_limit": "off"}).submission_rate_limit == "off"
    )


def test_password_checks_do_not_take_the_shared_thread_pool(settings, engine, make_user, monkeypatch):
    """Logins stuck in argon2 wait on threads of their own; pages keep being served meanwhile."""
    from app.web.routes import auth

    user, _ = make_user("annotator")
    release, entered = threading.Event(), threading.Semaphore(0)

    def slow_authenticate(db, username, password):
        entered.release()
        release.wait(20)
        return None

    monkeypatch.setattr(auth, "authenticate", slow_authenticate)
    app = app_with(settings, engine, login_concurrency=1, login_rate_limit_per_ip="off")

    async def scenario() -> int:
        # The shared pool gets two threads: a login holding one each would leave none for pages.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            await client.get("/login")
            form = {"username": user.username, "password": "x", "csrf_token": client.cookies["prefloop_csrf"]}
            async with anyio.create_task_group() as group:
                for _ in range(4):
                    group.start_soon(functools.partial(client.post, "/login", data=form))
                await anyio.to_thread.run_sync(entered.acquire)  # one password check is running
                try:
                    with anyio.fail_after(10):
                        page = await client.get("/login")  # a sync route: needs a shared thread
                finally:
                    release.set()
            return page.status_code

    assert anyio.run(scenario) == 200


@contextlib.contextmanager
def private_redis(port: int, folder) -> Iterator[subprocess.Popen]:
    """A redis-server of this test's own (the shared one is never stopped)."""
    if shutil.which("redis-server") is None:
        service_unavailable("redis-server is not installed")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield process
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def test_annotation_goes_on_while_redis_is_down_and_counts_there_again_when_back(
    settings, engine, db, api_headers, tmp_path, monkeypatch
):
    from app.web import rate_limits

    monkeypatch.setattr(rate_limits, "RETRY_REDIS_AFTER_SECONDS", 0.2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    World(db).tasks_from_texts([("q?", ["a", "b"])])
    headers = api_headers("annotator")
    app = app_with(settings, engine, redis_url=f"redis://127.0.0.1:{port}/0", task_request_rate_limit="3/day")
    counters = redis.Redis(port=port, socket_timeout=1)
    with TestClient(app) as client:
        with private_redis(port, tmp_path):
            assert client.get("/api/tasks/next", headers=headers).status_code == 200
            assert counters.keys("prefloop-limits*")  # counted in Redis
        # Redis is gone: the annotator keeps working, still limited (now by this process).
        statuses = [client.get("/api/tasks/next", headers=headers).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        time.sleep(0.3)
        with private_redis(port, tmp_path):
            assert client.get("/api/tasks/next", headers=headers).status_code == 200
            assert counters.keys("prefloop-limits*")  # back to the shared counters
    counters.close()
