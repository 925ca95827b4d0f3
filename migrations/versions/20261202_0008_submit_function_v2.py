"""Postgres: a submission to a task the caller holds no assignment for is refused before its ranking

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 12:00:00.000000

Version 1 of prefloop_submit_annotation checked the ranking before the assignment, so an annotator
posting to someone else's task got "invalid" and, from the application, that task's response ids.
Version 2 (migrations/sql/submit_annotation_v2.sql, loaded by name) answers "not assigned" first and
hands back no response ids with it. The downgrade loads version 1 again. SQLite runs the same steps
in Python (app/data/statements/sqlite_runner.py), so there is nothing to change there.
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Released migrations load their SQL by file name; a changed function comes in a new file and migration.
SQL_DIR = Path(__file__).resolve().parent.parent / 'sql'


def _load(name: str) -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute((SQL_DIR / name).read_text())


def upgrade() -> None:
    _load('submit_annotation_v2.sql')


def downgrade() -> None:
    _load('submit_annotation_v1.sql')
