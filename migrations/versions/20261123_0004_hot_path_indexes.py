"""indexes of the assignments annotators hold right now and of open gold tasks; no duplicate
index on comparisons.annotation_id (the unique index leads with it)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 15:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = "status = 'active'"
GOLD_OPEN = "is_gold = true AND status = 'open'"


def upgrade() -> None:
    op.create_index(
        'ix_assignments_active_user', 'assignments', ['user_id', 'id'], unique=False,
        postgresql_where=sa.text(ACTIVE), sqlite_where=sa.text(ACTIVE),
    )
    op.create_index(
        'ix_tasks_gold_open', 'tasks', ['id'], unique=False,
        postgresql_where=sa.text(GOLD_OPEN), sqlite_where=sa.text(GOLD_OPEN),
    )
    op.drop_index('ix_comparisons_annotation_id', table_name='comparisons')


def downgrade() -> None:
    op.create_index('ix_comparisons_annotation_id', 'comparisons', ['annotation_id'], unique=False)
    op.drop_index('ix_tasks_gold_open', table_name='tasks')
    op.drop_index('ix_assignments_active_user', table_name='assignments')
