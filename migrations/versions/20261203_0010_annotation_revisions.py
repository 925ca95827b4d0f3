"""annotators revise their judgements (earlier versions kept) and give claimed tasks back

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 12:00:00.000000

An annotation row holds the latest version of a judgement; `revision` counts the revisions and
`annotation_revisions` keeps every version a revision replaced. An assignment may now be
`released`: its annotator gave the task back unjudged, and it counts as seen, so the task goes to
someone else. The Postgres submit function needs no change: it inserts annotations with the new
columns' defaults and treats a released assignment as it treats an expired one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
STATUSES_BEFORE = "status IN ('active', 'submitted', 'skipped', 'expired')"
STATUSES_AFTER = "status IN ('active', 'submitted', 'skipped', 'expired', 'released')"


def _assignment_statuses(check: str) -> None:
    with op.batch_alter_table('assignments') as batch:
        batch.drop_constraint(op.f('ck_assignments_status'), type_='check')
        batch.create_check_constraint(op.f('ck_assignments_status'), check)


def upgrade() -> None:
    with op.batch_alter_table('annotations') as batch:
        batch.add_column(sa.Column('revision', sa.Integer(), server_default='0', nullable=False))
        batch.add_column(sa.Column('revised_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        'annotation_revisions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('annotation_id', sa.Integer(), nullable=False),
        sa.Column('revision', sa.Integer(), nullable=False),
        sa.Column('ranking', JSON, nullable=False),
        sa.Column('all_bad', sa.Boolean(), nullable=False),
        sa.Column('flags', JSON, nullable=False),
        sa.Column('rationale', sa.Text(), nullable=False),
        sa.Column('time_spent_ms', sa.Integer(), nullable=False),
        sa.Column('shown_order_unchanged', sa.Boolean(), nullable=False),
        sa.Column('payload_hash', sa.String(length=64), nullable=False),
        sa.Column('made_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('replaced_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ['annotation_id'], ['annotations.id'],
            name=op.f('fk_annotation_revisions_annotation_id_annotations'), ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_annotation_revisions')),
        sa.UniqueConstraint('annotation_id', 'revision', name=op.f('uq_annotation_revisions_annotation_id_revision')),
    )
    _assignment_statuses(STATUSES_AFTER)


def downgrade() -> None:
    # A released assignment reads as an expired one to the code before this migration.
    op.execute("UPDATE assignments SET status = 'expired' WHERE status = 'released'")
    _assignment_statuses(STATUSES_BEFORE)
    op.drop_table('annotation_revisions')
    with op.batch_alter_table('annotations') as batch:
        batch.drop_column('revised_at')
        batch.drop_column('revision')
