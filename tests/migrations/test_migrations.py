"""pytest-alembic's built-in checks, on SQLite and Postgres, plus `alembic check`."""

from pytest_alembic.tests import (  # noqa: F401 - collected as tests
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)


def test_alembic_check_reports_no_pending_changes(alembic_runner, alembic_engine):
    """The models and the migrations agree (what `alembic check` verifies)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.data.db import Base

    alembic_runner.migrate_up_to("heads")
    with alembic_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
