"""pytest-alembic runs against an empty database: a fresh SQLite file and a fresh Postgres database."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pytest_alembic.config import Config
from sqlalchemy import create_engine, text

from app.paths import MIGRATIONS_DIR
from tests.conftest import PG_ADMIN_URL, service_unavailable


@pytest.fixture
def alembic_config() -> Config:
    return Config(
        config_options={
            "file": str(Path(__file__).resolve().parents[2] / "alembic.ini"),
            "script_location": str(MIGRATIONS_DIR),
        }
    )


@pytest.fixture(params=["sqlite", "postgres"])
def alembic_engine(request, tmp_path):
    if request.param == "sqlite":
        from app.data.db import make_engine

        engine = make_engine(f"sqlite:///{tmp_path / 'migrations.db'}")
        yield engine
        engine.dispose()
        return
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        admin.dispose()
        service_unavailable(f"Postgres is not reachable at {PG_ADMIN_URL}: {exc}")
    name = f"prefloop_mig_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name)
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
