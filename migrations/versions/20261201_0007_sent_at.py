"""runs and rounds record when their task was last sent again

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 12:00:00.000000

Maintenance re-sends a run or round still queued long after its task was sent (a send that failed
after the row committed); `sent_at` is when it last did, so a row waiting behind a long job is sent
once per period rather than at every beat. NULL means the task went out when the row was created.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("runs", "rounds"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ("runs", "rounds"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("sent_at")
