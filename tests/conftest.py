"""Shared fixtures.

Databases: every test that takes `engine` (or `db`, `client`) runs twice, on SQLite and on Postgres.
SQLite gets a fresh copy of a migrated template file per test; Postgres gets one migrated database
per test session, truncated after each test. Tests commit for real (routes and workers do), so
isolation is by truncation rather than a rolled-back outer transaction.

Services: a missing Postgres or Redis skips with a reason, unless PREFLOOP_REQUIRE_SERVICES=1
(set by CI), under which the test fails instead.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

REQUIRE_SERVICES = os.environ.get("PREFLOOP_REQUIRE_SERVICES") == "1"
PG_ADMIN_URL = os.environ.get(
    "PREFLOOP_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PREFLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def service_unavailable(reason: str) -> None:
    """Skip for a missing service, or fail when CI demands every service."""
    message = f"service unavailable: {reason}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (PREFLOOP_REQUIRE_SERVICES=1 forbids skipping)")
    pytest.skip(message)


# ---------------------------------------------------------------- background tasks


@pytest.fixture(scope="session", autouse=True)
def task_sender() -> Iterator[None]:
    """Services enqueue by name through the broker of the current settings, as in every process."""
    from app.broker import install_sender
    from app.services import dispatch

    install_sender()
    yield
    dispatch.install(None)


# ---------------------------------------------------------------- models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, built once per test session."""
    from app.inference.model_files import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-policy") / "model", seed=0)


# ---------------------------------------------------------------- databases


def _migrate(url: str) -> None:
    from app.data.migrate import run_migrations

    run_migrations(url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    _migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated Postgres database of our own for this test session, dropped at the end."""
    from sqlalchemy import create_engine

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        admin.dispose()
        yield ""  # database_url reports the service as unavailable
        return
    name = f"prefloop_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    _migrate(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _truncate_all(engine: Engine) -> None:
    from app.data.db import Base

    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> Iterator[str]:
    """The URL of an empty, migrated database: SQLite and Postgres in turn."""
    if request.param == "sqlite":
        path = tmp_path / "prefloop.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_url")
    if not url:
        service_unavailable(f"Postgres is not reachable at {PG_ADMIN_URL}")
    from app.data.db import make_engine

    yield url
    engine = make_engine(url, pool_size=2)
    _truncate_all(engine)
    engine.dispose()


@pytest.fixture
def settings(database_url, tmp_path, monkeypatch):
    """Settings for one test, exported as PREFLOOP_* env vars so every layer (and subprocesses) agrees."""
    from app.config import get_settings, reset_settings

    env = {
        "PREFLOOP_ENVIRONMENT": "test",
        "PREFLOOP_DATA_DIR": str(tmp_path / "data"),
        "PREFLOOP_DATABASE_URL": database_url,
        "PREFLOOP_SECRET_KEY": "test-secret-key-that-is-long-enough-0123456789",
        "PREFLOOP_PSEUDONYM_KEY": "test-pseudonym-key-that-is-long-enough-0123456789",
        "PREFLOOP_SERVE_POLICY": "false",
        "PREFLOOP_POLICY_POLL_SECONDS": "0.5",
        "PREFLOOP_DEVICE": "cpu",
        # A collection at every app start-up would cost seconds over the suite; test_main covers it.
        "PREFLOOP_GC_FREEZE": "false",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("PREFLOOP_BROKER_URL", "PREFLOOP_REDIS_URL", "PREFLOOP_BASE_MODEL"):
        monkeypatch.delenv(key, raising=False)
    reset_settings()
    (tmp_path / "data").mkdir(exist_ok=True)
    yield get_settings()
    reset_settings()


@pytest.fixture
def engine(settings) -> Iterator[Engine]:
    from app.data.db import make_engine

    engine = make_engine(settings.sqlalchemy_url, pool_size=5)
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine) -> Iterator[Session]:
    from app.data.db import session_factory

    session = session_factory(engine)()
    yield session
    session.close()


# ---------------------------------------------------------------- web app


@pytest.fixture
def app(settings, engine):
    from app.web.main import create_app

    return create_app(settings, engine)


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def make_user(db):
    """Create a user with a role; returns (user, password)."""
    from app.data.models import User
    from app.services.accounts import hash_password

    def factory(role: str = "annotator", username: str | None = None, password: str = "correct-horse-1"):
        user = User(
            username=username or f"{role}-{uuid.uuid4().hex[:6]}",
            role=role,
            password_hash=hash_password(password),
        )
        db.add(user)
        db.commit()
        return user, password

    return factory


@pytest.fixture
def login(client, make_user):
    """Log a new user of a role in through the form; the client then carries the session cookie."""

    def do_login(role: str = "annotator"):
        user, password = make_user(role)
        client.cookies.clear()
        page = client.get("/login")
        assert page.status_code == 200
        csrf = client.cookies.get("prefloop_csrf")
        response = client.post(
            "/login",
            data={"username": user.username, "password": password, "csrf_token": csrf},
            follow_redirects=False,
        )
        assert response.status_code == 303, response.text
        client.headers["X-CSRF-Token"] = csrf
        return user

    return do_login


@pytest.fixture
def api_headers(db, make_user):
    """Bearer-token headers for a new user of a role."""
    from app.services.accounts import create_api_token

    def factory(role: str = "annotator") -> dict[str, str]:
        user, _ = make_user(role)
        token = create_api_token(db, user, "test")
        db.commit()
        return {"Authorization": f"Bearer {token}"}

    return factory


# ---------------------------------------------------------------- services


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:
        service_unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL
