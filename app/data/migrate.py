"""Bring a database to the latest schema by running the Alembic migrations shipped with the app."""

from __future__ import annotations

from app.paths import MIGRATIONS_DIR


def run_migrations(database_url: str | None = None) -> None:
    """Bring the database schema to the latest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    # Built here rather than read from alembic.ini, which stays in the checkout for `alembic revision`.
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url:
        cfg.set_main_option("sqlalchemy.url", database_url)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")
