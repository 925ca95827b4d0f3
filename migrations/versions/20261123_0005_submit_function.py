"""Postgres: a judgement is stored by one function call (one round trip, one statement)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 17:30:00.000000

The function (migrations/sql/submit_annotation_v1.sql, loaded by name) locks the task row, reads the
annotator's assignment after the lock, checks the ranking against the responses shown, counts the
judgement, and stores the annotation, its comparisons and the assignment's new status, where the
application took five round trips before. Called outside a transaction it commits by itself.
SQLite runs the same steps under its write lock (app/data/statements/sqlite_runner.py).
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Released migrations load their SQL by file name; a changed function comes in a new file and migration.
SUBMIT_ANNOTATION = (Path(__file__).resolve().parent.parent / 'sql' / 'submit_annotation_v1.sql').read_text()


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(SUBMIT_ANNOTATION)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(
            'DROP FUNCTION IF EXISTS prefloop_submit_annotation(integer, integer, integer[], integer[], '
            'integer[], boolean, boolean, jsonb, text, jsonb, text, integer, text, timestamptz, integer[], '
            'integer[], double precision[])'
        )
