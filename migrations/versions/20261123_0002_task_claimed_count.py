"""task claimed_count and the claimable-task index

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 11:29:02.311866
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIMABLE = "status = 'open' AND claimed_count < required_annotations"


def upgrade() -> None:
    with op.batch_alter_table('tasks') as batch:
        batch.add_column(sa.Column('claimed_count', sa.Integer(), server_default='0', nullable=False))
    # Slots already handed out before this column existed.
    op.execute(
        "UPDATE tasks SET claimed_count = (SELECT count(*) FROM assignments a "
        "WHERE a.task_id = tasks.id AND a.status IN ('active', 'submitted'))"
    )
    with op.batch_alter_table('tasks') as batch:
        batch.create_check_constraint(
            'claims_in_range', 'claimed_count >= 0 AND claimed_count <= required_annotations'
        )
    op.create_index(
        'ix_tasks_claimable', 'tasks', ['id'], unique=False,
        postgresql_where=sa.text(CLAIMABLE), sqlite_where=sa.text(CLAIMABLE),
    )


def downgrade() -> None:
    op.drop_index('ix_tasks_claimable', table_name='tasks')
    with op.batch_alter_table('tasks') as batch:
        batch.drop_constraint('claims_in_range', type_='check')
        batch.drop_column('claimed_count')
