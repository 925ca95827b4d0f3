"""The embedded supervisor and worker liveness, with real Celery worker processes killed by SIGKILL.

A killed worker is started again after its backoff; a worker that keeps dying at start makes the
supervisor give up with the reason; `/healthz` and the admin dashboard say when no worker is alive.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from app.cli.serve import worker_command
from app.cli.supervisor import Backoff, Supervisor
from app.config import get_settings, reset_settings
from app.data.db import session_factory
from app.services.worker_status import build_report, read_workers
from app.web.main import create_app

pytestmark = pytest.mark.slow

QUICK_BEATS = {
    "PREFLOOP_WORKER_HEARTBEAT_SECONDS": "0.5",
    "PREFLOOP_WORKER_STALE_SECONDS": "3",
    "PREFLOOP_WORKER_STATUS_CACHE_SECONDS": "0",
}


@pytest.fixture
def quick_beats(worker_env, monkeypatch):
    for key, value in QUICK_BEATS.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    return get_settings()


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _alive_gpu_worker(engine):
    def find():
        with session_factory(engine)() as db:
            workers = read_workers(db, timedelta(seconds=3))
        return next((w for w in workers if w.alive and "gpu" in w.queues), None)

    return find


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the embedded stack's database
def test_a_worker_killed_with_sigkill_is_started_again(quick_beats, engine, tmp_path):
    log_path = tmp_path / "workers.log"
    with log_path.open("w") as log:
        supervisor = Supervisor(
            {"gpu worker": worker_command("gpu", 1, beat=False)},
            Backoff(first_delay=0.5, max_delay=2, fast_failure_seconds=60, max_fast_failures=5),
            output=log,
        )
        with supervisor:
            first = _wait_for(_alive_gpu_worker(engine), 90, "the worker's first heartbeat")
            assert first.pid == supervisor.pids["gpu worker"]

            os.killpg(first.pid, signal.SIGKILL)  # the worker and its pool children, at once

            def restarted():
                seen = _alive_gpu_worker(engine)()
                return seen if seen is not None and seen.pid != first.pid else None

            second = _wait_for(restarted, 90, f"a new worker after the kill:\n{log_path.read_text()}")
            child = supervisor.children[0]
            assert child.exits == [-signal.SIGKILL] and child.restarts == 1
            assert second.pid == supervisor.pids["gpu worker"]
            assert supervisor.gave_up is None
        # Stopped cleanly, a worker removes its heartbeat: it is gone, not dead.
        with session_factory(engine)() as db:
            assert read_workers(db, timedelta(seconds=3)) == []


def test_a_worker_that_keeps_dying_at_start_makes_the_supervisor_give_up(tmp_path):
    reasons: list[str] = []
    dies_at_once = [sys.executable, "-c", "raise SystemExit(3)"]
    supervisor = Supervisor(
        {"gpu worker": dies_at_once},
        Backoff(first_delay=0.05, max_delay=0.2, fast_failure_seconds=60, max_fast_failures=3),
        on_give_up=reasons.append,
        poll_seconds=0.05,
    )
    with supervisor:
        _wait_for(lambda: reasons, 30, "the supervisor to give up")
    assert supervisor.children[0].exits == [3, 3, 3, 3]
    assert reasons == [supervisor.gave_up]
    assert reasons[0].startswith("the gpu worker died 4 times in a row, each within 60s of its start")
    assert "last exit code 3" in reasons[0] and "process manager" in reasons[0]


def test_backoff_doubles_up_to_its_maximum():
    backoff = Backoff(first_delay=1, max_delay=10)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 10, 10]


def _log_in(client: TestClient, make_user, role: str) -> None:
    user, password = make_user(role)
    client.get("/login")
    csrf = client.cookies.get("prefloop_csrf")
    response = client.post(
        "/login",
        data={"username": user.username, "password": password, "csrf_token": csrf},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text


def test_healthz_and_dashboard_say_when_no_worker_is_alive(quick_beats, engine, celery_worker, make_user):
    worker = celery_worker("gpu,default")
    settings = get_settings()  # with the quick heartbeats and no caching
    _wait_for(_alive_gpu_worker(engine), 30, "the worker's heartbeat")
    with TestClient(create_app(settings, engine)) as client:
        body = client.get("/healthz").json()
        assert body["status"] == "ok", body
        assert body["workers"]["alive"] == 1
        assert body["workers"]["queues"]["gpu"] == {"workers": 1, "waiting": 0}
        assert body["workers"]["queues"]["default"] == {"workers": 1, "waiting": 0}

        worker.kill_hard()
        _wait_for(lambda: not build_report(session_factory(engine), settings).any_alive, 30, "staleness")

        response = client.get("/healthz")
        body = response.json()
        assert response.status_code == 200  # the web app itself serves; its background work waits
        assert body["status"] == "degraded"
        assert body["workers"] == {
            "alive": 0,
            "queues": {"gpu": {"workers": 0, "waiting": 0}, "default": {"workers": 0, "waiting": 0}},
        }
        assert "prefloop-" not in response.text  # no host names for anonymous callers

        _log_in(client, make_user, "admin")
        page = client.get("/admin").text
    assert 'id="no-worker-alive"' in page
    assert 'id="queue-gpu-workers">· 0 workers alive' in page
    assert "silent" in page and "prefloop-gpu-default@" in page


def test_beats_messages_expire_before_the_next_one_so_no_backlog_builds():
    from workers.celery_app import celery_app

    for entry in celery_app.conf.beat_schedule.values():
        assert entry["options"]["expires"] == entry["schedule"].total_seconds()
