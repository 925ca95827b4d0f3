"""worker heartbeats; Postgres derives a judgement's comparisons only after checking its ranking

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-03 12:00:00.000000

Workers record a heartbeat, so the web app can tell whether any worker consumes each queue. Each
Celery worker process upserts its row every few seconds while it runs and deletes it when it
stops cleanly; a row whose `beat_at` is old belongs to a worker that died (SIGKILL, OOM, power cut).
`/healthz` and the admin dashboard read them; the table lives in the database because workers may run
on other hosts than the web app.

Version 3 of prefloop_submit_annotation (migrations/sql/submit_annotation_v3.sql, loaded by name)
derives the comparisons from the ranking itself, after the ranking was checked against the responses
shown, instead of taking pair arrays derived before any check; version 2's signature is dropped. The
downgrade puts version 2 back. SQLite derives them at the same step in Python.
"""

from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Released migrations load their SQL by file name; a changed function comes in a new file and migration.
SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
ARGS_V3 = "integer, integer, integer[], integer[], integer[], boolean, boolean, jsonb, text, jsonb, text, integer, text, timestamptz"
ARGS_V2 = ARGS_V3 + ", integer[], integer[], double precision[]"


def _swap_function(drop_args: str, load: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS prefloop_submit_annotation({drop_args})")
        op.execute((SQL_DIR / load).read_text())


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("hostname", sa.String(255), primary_key=True),
        sa.Column("queues", sa.String(255), nullable=False, server_default=""),
        sa.Column("pid", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
    )
    _swap_function(ARGS_V2, "submit_annotation_v3.sql")


def downgrade() -> None:
    _swap_function(ARGS_V3, "submit_annotation_v2.sql")
    op.drop_table("worker_heartbeats")
