"""Fault tests: a private Postgres and a private Redis that a test may stop, restart or starve.

`database_url` is overridden here: every test in this folder runs on a migrated database of the
private Postgres (never SQLite, never the shared server), so `settings`, `engine`, `db` and
`make_user` of tests/conftest.py all point at a database the test may take down. `redis_url` is
overridden the same way, and the real Celery worker fixtures of tests/workers are reused.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import service_unavailable
from tests.private_services import (
    AppServer,
    PrivatePostgres,
    PrivateRedis,
    SmallDisk,
    postgres_bin_dir,
    start_app_server,
)
from tests.workers.conftest import celery_worker, worker_env  # noqa: F401 - fixtures reused here


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


@pytest.fixture
def app_server(settings, tmp_path) -> Iterator[Callable[..., AppServer]]:
    """Factory: start the web app (uvicorn, one process, a free port) with the test's settings."""
    started: list[AppServer] = []

    def start(extra_env: dict[str, str] | None = None, uvicorn_args: tuple[str, ...] = ()) -> AppServer:
        log_path = tmp_path / f"server-{len(started)}.log"
        server = start_app_server({**os.environ, **(extra_env or {})}, log_path, uvicorn_args=uvicorn_args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def small_disk(settings, monkeypatch) -> Iterator[SmallDisk]:
    """A 64 MiB tmpfs as the data dir (PREFLOOP_DATA_DIR), for tests that fill it up.

    Mounting needs root: without it the test skips, saying so; as root (CI), a refused mount is a
    failure under PREFLOOP_REQUIRE_SERVICES=1.
    """
    from app.config import reset_settings

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as a full data disk needs root (CAP_SYS_ADMIN)")
    disk = SmallDisk(size_mb=64)
    try:
        try:
            disk.mount()
        except OSError as exc:
            service_unavailable(f"cannot mount a tmpfs for the disk-full tests: {exc}")
        monkeypatch.setenv("PREFLOOP_DATA_DIR", str(disk.path))
        # The disk fills while the work runs, as when something else takes the space meanwhile: the
        # free-space check at a run's start (PREFLOOP_MIN_FREE_DISK_GB) would refuse it before it began.
        monkeypatch.setenv("PREFLOOP_MIN_FREE_DISK_GB", "0")
        reset_settings()
        yield disk
    finally:
        reset_settings()
        disk.destroy()
