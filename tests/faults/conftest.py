"""Fault tests: a private Postgres and a private Redis that a test may stop, restart or starve.

`database_url` is overridden here: every test in this folder runs on a migrated database of the
private Postgres (never SQLite, never the shared server), so `settings`, `engine`, `db` and
`make_user` of tests/conftest.py all point at a database the test may take down. `redis_url` is
overridden the same way, and the real Celery worker fixtures of tests/workers are reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import service_unavailable
from tests.private_services import PrivatePostgres, PrivateRedis, free_port, postgres_bin_dir
from tests.workers.conftest import celery_worker, worker_env  # noqa: F401 - fixtures reused here

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        service_unavailable("Postgres server binaries (initdb, pg_ctl) are not installed")
    server = PrivatePostgres(bin_dir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    executable = shutil.which("redis-server")
    if executable is None:
        service_unavailable("redis-server is not installed")
    server = PrivateRedis(executable)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def database_url(private_postgres) -> str:
    """A migrated database on the private Postgres."""
    from app.data.migrate import run_migrations

    url = private_postgres.create_database(f"prefloop_fault_{uuid.uuid4().hex[:8]}")
    run_migrations(url)
    return url


@pytest.fixture
def redis_url(private_redis) -> str:
    return private_redis.url(0)


class AppServer:
    """The web app under uvicorn in a subprocess, with the test's PREFLOOP_* settings."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process = process
        self.url = url
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def app_server(settings, tmp_path) -> Iterator[Callable[..., AppServer]]:
    """Factory: start the web app (uvicorn, one process, a free port) and wait until it answers."""
    started: list[AppServer] = []

    def start(extra_env: dict[str, str] | None = None) -> AppServer:
        port = free_port()
        log_path = tmp_path / f"server-{len(started)}.log"
        env = {**os.environ, **(extra_env or {})}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app.web.main:create_app", "--factory",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            )  # fmt: skip
        server = AppServer(process, f"http://127.0.0.1:{port}", log_path)
        started.append(server)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{server.url}/login", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"the web app did not start:\n{server.log()[-3000:]}")
            time.sleep(0.2)

    yield start
    for server in started:
        server.stop()
