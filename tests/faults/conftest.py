"""Fault tests: a private Postgres and a private Redis that a test may stop, restart or starve.

`database_url` is overridden here: every test in this folder runs on a migrated database of the
private Postgres (never SQLite, never the shared server), so `settings`, `engine`, `db` and
`make_user` of tests/conftest.py all point at a database the test may take down. `redis_url` is
overridden the same way, and the real Celery worker fixtures of tests/workers are reused.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import service_unavailable
from tests.private_services import PrivatePostgres, PrivateRedis, postgres_bin_dir
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
