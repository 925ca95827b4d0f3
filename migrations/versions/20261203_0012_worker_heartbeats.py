"""workers record a heartbeat, so the web app can tell whether any worker consumes each queue

Revision ID: 0012
Revises: 0008
Create Date: 2026-12-03 12:00:00.000000

Each Celery worker process upserts its row every few seconds while it runs and deletes it when it
stops cleanly; a row whose `beat_at` is old belongs to a worker that died (SIGKILL, OOM, power cut).
`/healthz` and the admin dashboard read them; the table lives in the database because workers may run
on other hosts than the web app.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("hostname", sa.String(255), primary_key=True),
        sa.Column("queues", sa.String(255), nullable=False, server_default=""),
        sa.Column("pid", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("worker_heartbeats")
